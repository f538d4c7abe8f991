"""journal.jsonl: the search's durable record, one JSON line per evaluation, flushed before the next starts.

Line 1 is a header holding the resolved configuration; each further line is one evaluation, an `Entry`:
    {"i": 3, "values": [[...], ...], "reward": 0.91, "objective": 0.91, "failed": false,
     "rewards": [per prompt], "seconds": 4.2, "cache_hits": 9, "unet_calls": 51, "images": 40}
A failed candidate's non-finite rewards are written as null (strict JSON). The driver writes entries, the
optimizer is told `Entry.loss`, and the report and the progress bar read them.
After a SIGKILL the last line may be half-written: `read` drops it and `Journal` truncates it away.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .objective import INFEASIBLE_LOSS

logger = logging.getLogger(__name__)

FAILED_LOSS = 1e6  # a candidate whose reward is NaN/inf: scored as failed, the search goes on


@dataclass
class Entry:
    """One evaluation of a search, as journaled. Optional fields are None when they do not apply (and are
    then not written): racing's per-image rewards and group, a stopped candidate's `partial`, the set-level
    terms of an objective that has them."""

    i: int
    values: list  # (buckets, units)
    reward: float  # mean per-image reward over the images scored
    objective: float  # what the optimizer is told, as a reward (a stopped candidate: its paired estimate, capped)
    failed: bool
    rewards: list  # per prompt (a failed candidate: per image)
    seconds: float
    cache_hits: int
    unet_calls: int
    images: int | None = None  # images scored (journals from before racing lack it: all of them)
    image_rewards: list | None = None  # racing: per image, what later candidates are paired with
    group: list[int] | None = None  # racing: [first entry, size] of the group it was scored in
    partial: dict | None = None  # stopped by the race: {images, of, estimate, incumbent, reason}
    measures: dict | None = None  # set-level terms of its images
    ratios: dict | None = None  # ... relative to the baseline's
    feasible: bool | None = None  # within the --require bounds
    violation: float | None = None

    @property
    def loss(self) -> float:
        """The loss the optimizer is told: minus the objective; FAILED_LOSS for a failed candidate; for one that
        breaks a bound on a set-level term, INFEASIBLE_LOSS plus its violation (objective.py)."""
        if self.failed:
            return FAILED_LOSS
        if self.feasible is False:
            return INFEASIBLE_LOSS + self.violation
        return -self.objective

    @property
    def choosable(self) -> bool:
        """Whether it may become the best (the incumbent, the mask file's values): scored, on every image (a
        raced candidate stopped early only has an estimate), and within the bounds."""
        return not self.failed and self.feasible is not False and self.partial is None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in _REQUIRED}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Entry":
        """A journal line back (keys of other versions that no field holds are left out)."""
        return cls(**{k: d.get(k) for k in _FIELDS})


_FIELDS = tuple(f.name for f in fields(Entry))
_REQUIRED = _FIELDS[:9]  # null rewards of a failed candidate are written too


def read(path: Path) -> tuple[dict | None, list[Entry], int]:
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
            entries.append(Entry.from_json(obj))
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

    def append(self, obj: Entry | dict[str, Any]) -> None:
        obj = obj.to_json() if isinstance(obj, Entry) else obj
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
