"""Reading prompt files: one prompt per line, blank lines skipped, duplicates kept once (with a warning)."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import MaskoptError

logger = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        raise MaskoptError(f"prompt file {path} is a folder; give a text file with one prompt per line")
    if not path.is_file():
        raise MaskoptError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise MaskoptError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts: list[str] = []
    for line in (line.strip() for line in lines):
        if not line:
            continue
        if line in prompts:
            logger.warning("prompt file %s: duplicate prompt %r kept once", path, line)
            continue
        prompts.append(line)
    if not prompts:
        raise MaskoptError(f"prompt file {path} holds no prompts")
    return prompts
