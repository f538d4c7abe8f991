"""journal.jsonl: the search's durable record, one JSON line per evaluation, flushed before the next starts.

Line 1 is a header holding the resolved configuration; each further line is one evaluation:
    {"i": 3, "values": [[...], ...], "reward": 0.91, "objective": 0.91, "failed": false,
     "rewards": [per prompt], "seconds": 4.2, "cache_hits": 9}
A failed candidate's non-finite rewards are written as null (strict JSON).
After a SIGKILL the last line may be half-written: `read` drops it and `Journal` truncates it away.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def read(path: Path) -> tuple[dict | None, list[dict], int]:
    """(header, entries, byte length of the intact part). A torn last line is dropped."""
    if not path.exists():
        return None, [], 0
    data = path.read_bytes()
    header, entries, good = None, [], 0
    pos = 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        if not raw.endswith(b"\n"):
            logger.warning("journal %s: dropping a half-written last line (%d bytes)", path, len(raw))
            break
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            logger.warning("journal %s: dropping an unreadable line at byte %d", path, pos - len(raw))
            break
        if header is None and "config" in obj:
            header = obj
        else:
            entries.append(obj)
        good = pos
    return header, entries, good


class Journal:
    """Append-only writer; every line is flushed and fsynced before `append` returns."""

    def __init__(self, path: Path, header: dict | None = None) -> None:
        self.path = path
        _, _, good = read(path)
        self._f = open(path, "ab")
        if self._f.tell() > good:  # cut a torn tail so the next line starts clean
            self._f.truncate(good)
            self._f.seek(good)
        if header is not None and good == 0:
            self.append(header)

    def append(self, obj: dict[str, Any]) -> None:
        self._f.write((json.dumps(_strict(obj), allow_nan=False) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _strict(obj: Any) -> Any:
    """NaN and inf (a failed candidate's rewards) as null: strict JSON, which jq and other readers accept."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj
