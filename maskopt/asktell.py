"""The ask/tell driver of a search: ask candidates in groups, evaluate each once, tell every result.

    >>> import numpy as np
    >>> from maskopt.space import optimizer, space
    >>> shape = (2, 3)                                  # 2 buckets x 3 units, binary values
    >>> make = lambda: optimizer("DiscreteOnePlusOne", space("binary", *shape), "binary", budget=12, workers=1)
    >>> loss = lambda v: float(v.sum())                 # removing units lowers the loss
    >>> driver = AskTell(make, "binary", shape, budget=12, workers=1)
    >>> evaluated = driver.run(lambda group: [loss(v) for v in group])
    >>> driver.close()
    >>> len(evaluated), min(evaluated.values()) < loss(np.ones(shape))
    (12, True)

One loop serves a fresh search and a resumed one. `run(evaluate, journal)` answers from the journal
first: while journaled evaluations remain, a candidate the optimizer asks must be the next one
journaled, and gets its journaled loss instead of an evaluation. So a resumed search asks exactly as
the first run asked (same seed, same groups) and goes on as if it had never stopped. An ask that
differs from the journal (another --budget or --workers, an optimizer that is not deterministic) ends
the replay: a fresh optimizer is told every journaled evaluation as a point it did not ask, and the
search goes on from what was learned.

The objective is exact (the same seeds for every candidate), so a candidate proposed again is told its
known loss and costs no evaluation. The all-ones baseline is evaluated first and told as a point the
optimizer did not ask; then the starting points (`init`, e.g. FreeU's settings), the same way, and the
best of all these becomes the optimizer's starting value: a (1+1) optimizer mutates it, COBYLA starts there.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from .journal import Entry
from .space import close, decode, encode, tell

logger = logging.getLogger(__name__)

MAX_REPEATS = 1000  # already-evaluated proposals in a row after which a search counts as converged

Evaluate = Callable[[list[np.ndarray]], list[float]]  # value arrays -> their losses, in order


def key(values: Any) -> bytes:
    """A candidate's identity: its values as float64 bytes."""
    return np.asarray(values, dtype=np.float64).ravel().tobytes()


class Diverged(Exception):
    """The optimizer asked something other than the journal's next evaluation."""


class AskTell:
    """Drives an optimizer (nevergrad's, or the bucket sweep) over `budget` evaluations of `shape` values."""

    def __init__(self, make: Callable[[], Any], kind: str, shape: tuple[int, int], budget: int, workers: int,
                 backbone: Sequence[int] = (), init: Sequence[np.ndarray] = ()) -> None:
        self.make, self.kind, self.shape, self.budget, self.workers = make, kind, tuple(shape), budget, workers
        self.backbone = tuple(backbone)  # columns of backbone units (space.py)
        self.init = [np.asarray(v, dtype=np.float64).reshape(self.shape) for v in init]  # evaluated after the baseline
        self.opt = make()
        self.converged = False  # the optimizer proposed only evaluated candidates MAX_REPEATS times in a row

    @property
    def chosen(self) -> str | None:
        """What a portfolio optimizer (NGOpt) picked to run for this space, budget and workers."""
        info = getattr(self.opt, "_info", None)
        return info().get("sub-optim") if callable(info) else None

    def run(self, evaluate: Evaluate, journal: Sequence[Entry] = ()) -> dict[bytes, float]:
        """Evaluate the baseline, then ask, evaluate and tell until `budget` candidates are evaluated.

        `evaluate` scores a list of value arrays (a group, evaluated together). `journal`: evaluations
        of an earlier run of this search, replayed first. Returns every evaluated candidate's loss.
        """
        replay = _JournalFirst(journal, evaluate)
        try:
            return self._loop(replay)
        except Diverged:
            logger.info("the optimizer asks other candidates than the journal holds: told as points not asked")
            close(self.opt)
            self.opt = self.make()
            known = {}
            for e in journal:
                self._tell_unasked(e.values, e.loss)
                known[key(e.values)] = e.loss
            return self._loop(evaluate, known)

    def close(self) -> None:
        close(self.opt)

    def _loop(self, evaluate: Evaluate, known: dict[bytes, float] | None = None) -> dict[bytes, float]:
        if not known:  # the baseline first: it is always a candidate; then the starting points
            ones = np.ones(self.shape)
            known = {key(ones): evaluate([ones])[0]}
            self._tell_unasked(ones, known[key(ones)])
            start = list({key(v): v for v in self.init if key(v) != key(ones)}.values())  # each once, not the baseline
            if len(start) < len(self.init):
                logger.info("%d starting point(s) equal the baseline or another one: evaluated once",
                            len(self.init) - len(start))
            if len(start) > self.budget - 1:
                logger.warning("the budget holds %d of the %d starting points", self.budget - 1, len(start))
                start = start[: self.budget - 1]
            for i in range(0, len(start), self.workers):  # in groups of --workers, as the optimizer's candidates
                group = start[i:i + self.workers]
                known.update(zip(map(key, group), evaluate(group)))
                for v in group:
                    self._tell_unasked(v, known[key(v)])
        while len(known) < self.budget:
            group, self.converged = ask_group(self.opt, self.kind, self.shape, known,
                                              min(self.workers, self.budget - len(known)), self.backbone)
            todo = {k: values for _, k, values in group if k not in known}
            known.update(zip(todo, evaluate(list(todo.values())) if todo else []))
            for cand, k, _ in group:
                tell(self.opt, cand, known[k], self.kind)
            if self.converged and not todo:
                logger.warning("the optimizer proposed only evaluated candidates %d times in a row: stopping at %d of "
                               "%d evaluations", MAX_REPEATS, len(known), self.budget)
                break
        return known

    def _tell_unasked(self, values: Any, loss: float) -> None:
        child = self.opt.parametrization.spawn_child(new_value=encode(np.asarray(values), self.kind, self.backbone))
        tell(self.opt, child, loss, self.kind)


class _JournalFirst:
    """An `evaluate` that answers from the journal while it lasts and checks that each ask is the one journaled."""

    def __init__(self, journal: Sequence[Entry], evaluate: Evaluate) -> None:
        self.journal, self.evaluate, self.pos = list(journal), evaluate, 0

    def __call__(self, group: list[np.ndarray]) -> list[float]:
        n = min(len(group), len(self.journal) - self.pos)
        replayed = self.journal[self.pos:self.pos + n]
        if any(key(v) != key(e.values) for v, e in zip(group, replayed)):
            raise Diverged
        self.pos += n
        # a group cut by a kill: its journaled part is replayed, the rest evaluated now, as it was asked
        return [e.loss for e in replayed] + (self.evaluate(group[n:]) if n < len(group) else [])


def ask_group(opt: Any, kind: str, shape: tuple[int, int], known: dict[bytes, float], want: int,
              backbone: Sequence[int] = ()) -> tuple[list, bool]:
    """Ask until the group holds `want` distinct candidates not evaluated yet; returns it and whether it converged.

    A proposal evaluated already is told its known loss at once and does not count (the objective is
    exact). nevergrad's discrete optimizers propose the current best again and again (a mutated choice
    weight often keeps its choice), so asking only `want` times would leave a group of 8 with 2 or 3 new
    candidates. An optimizer that proposes nothing new `MAX_REPEATS` times in a row has converged.
    Returns the group's (candidate, key, values), not told, in ask order.
    """
    group: list = []
    new: set[bytes] = set()
    repeats = twins = 0
    # twins: proposals of a candidate already in the group. Its result is not known yet, so asking on
    # cannot teach the optimizer anything; past a few the group goes with what it has.
    while len(new) < want and repeats < MAX_REPEATS and twins < 4 * want:
        cand = opt.ask()
        values = decode(cand.value, *shape, backbone)
        k = key(values)
        if k in known:
            tell(opt, cand, known[k], kind)
            repeats += 1
            continue
        if k in new:
            twins += 1  # told once the group is evaluated
        else:
            repeats = 0
            new.add(k)
        group.append((cand, k, values))
    return group, repeats >= MAX_REPEATS
