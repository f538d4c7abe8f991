"""Output paths checked before any work: a command that will fail to write should fail at once, in one line."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MaskoptError


def check_writable(path: Path, what: str) -> None:
    """`path` (a file or folder to be made) can be created: its nearest existing ancestor is a writable folder."""
    path = Path(path).expanduser()
    ancestor = next(a for a in [path.parent, *path.parent.parents] if a.exists() or a == Path(a.anchor or "."))
    if not ancestor.is_dir():
        raise MaskoptError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MaskoptError(f"{what} {path}: cannot write in {ancestor}")


def make_folder(path: Path, what: str) -> None:
    """mkdir -p, with a failure (a read-only or virtual file system) as one line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MaskoptError(f"{what} {path}: cannot create it ({e.strerror})") from None
