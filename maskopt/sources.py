"""Where a model or checkpoint comes from: a local path, or a Hugging Face hub id. One rule for every loader.

    >>> from maskopt.sources import local_or_hub
    >>> local_or_hub("stable-diffusion-v1-5/stable-diffusion-v1-5", "model")
    'stable-diffusion-v1-5/stable-diffusion-v1-5'
    >>> local_or_hub("./no/such/folder", "model")
    Traceback (most recent call last):
    ...
    maskopt.errors.MaskoptError: model './no/such/folder' is not a path that exists, nor a hub id 'org/name'

A name that exists on disk is local. A name spelled like a path ("./x", "/x", "~/x", or, where no file in
a repository is asked for, anything with more than one "/") must exist: sent to the hub, a typo would
come back as a confusing "repository not found". Anything else must be a hub id, "org/name", or with
`files=True` "org/name/path/in/repo.pt".
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import MaskoptError

EMBEDDED = "maskopt:default"  # the digits pipeline inside the package (maskopt/default/); models.py knows where it lives

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # the hub's repository names: letters, digits, '-', '_', '.'
_HUB_FILE = re.compile(r"[\w.-]+/[\w.-]+(/[^/\s]+)+")  # a file in one may hold more ('sac+logos+ava1-l14.pth')
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def local_or_hub(source: str, what: str, files: bool = False) -> Path | str:
    """An existing local path (as a Path), or a hub id (as the str); MaskoptError naming `what` otherwise.

    `files`: also accept a file inside a hub repository ("org/name/file.pt"), as single-file rewards take.
    """
    local = Path(source).expanduser()
    if source and local.exists():
        return local
    looks_local = source.startswith((".", "/", "~")) or (not files and source.count("/") > 1) or \
        (files and source.count("/") == 1 and source.endswith(_FILE_SUFFIXES))
    hub = _HUB_ID.fullmatch(source) or (files and _HUB_FILE.fullmatch(source))
    if looks_local or not hub:
        spelled = "org/name[/file]" if files else "org/name"
        raise MaskoptError(f"{what} {source!r} is not a path that exists, nor a hub id {spelled!r}")
    return source
