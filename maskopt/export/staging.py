"""An export is written into a temporary sibling of its folder and renamed into place only when it is whole.

So a failure (a parity failure, Ctrl-C) leaves no half folder and never destroys an existing one;
with --force the old folder is removed only after the new one is in place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..paths import make_folder, remove_made


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a fresh folder beside `out`; at the end of the block it becomes `out`. On an exception it is
    removed, with the parent folders made for it."""
    out = Path(out)
    made = make_folder(out.parent, "--out")
    staging = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"  # same disk as `out`: the rename is atomic
    make_folder(staging, "--out")
    try:
        yield staging
        install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_made(made, out.parent)
        raise


def install(staging: Path, out: Path) -> None:
    """Put the finished folder at `out`; an existing one (only with --force) is removed only after."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
