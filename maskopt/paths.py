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


def check_out(out: Path, reuse: str, allowed: bool) -> bool:
    """The one output-folder rule of the commands that write a folder (search, export, eval): `--out` is not a
    file; one that holds something is refused unless `allowed` (`reuse` says how to allow it, e.g. 'add --force
    to replace it'); its nearest existing folder can be written. Returns whether it holds something."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MaskoptError(f"--out {out} is a file, not a folder")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not allowed:
        raise MaskoptError(f"--out {out} exists and is not empty ({reuse})")
    check_writable(out, "--out")
    return busy


def make_folder(path: Path, what: str) -> Path | None:
    """mkdir -p, with a failure (a read-only or virtual file system) as one line.

    Returns the topmost folder it made (None if `path` was there), for `remove_made` after a failure.
    """
    path = Path(os.path.abspath(path))  # "a/../b": made and removed as b, never as a
    made = next((a for a in reversed([path, *path.parents]) if not a.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_made(made, path)
        raise MaskoptError(f"{what} {path}: cannot create it ({e.strerror})") from None
    return made


def remove_made(made: Path | None, path: Path) -> None:
    """Remove the folders from `path` up to `made` that are empty: what `make_folder` made, if nothing came in since."""
    if made is None:
        return
    path = Path(os.path.abspath(path))
    for folder in [path, *path.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == made:
            return
