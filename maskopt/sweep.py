"""The bucket sweep: search one bucket's values at a time, in the order the sampler visits the buckets.

    >>> import numpy as np
    >>> opt = BucketSweep("OnePlusOne", "gates", n_buckets=4, n_units=32, budget=299, recompute=[4/15, 8/15, 12/15, 1])
    >>> opt.bucket                        # the first stage searches the first-visited bucket
    3
    >>> cand = opt.ask()                  # a child of opt.parametrization: every (bucket, unit) value
    >>> opt.tell(cand, loss=-1.0)
    >>> [n for _, n in opt.stages]        # evaluations per stage: equal U-Net time each
    [37, 47, 71, 144]

Why: the sampler visits buckets from high to low timestep, and the trajectory cache replays every step
before the first bucket in which a candidate differs from one already evaluated. A joint optimizer
(NGOpt picks COBYLA here) moves every bucket at once, so almost nothing replays. The sweep holds all
buckets but one at the best values found so far, so a candidate of stage k re-runs only the steps of
bucket k and of the buckets visited after it (`recompute[k]`, a fraction of all steps).

Order and budget: stages go first-visited bucket first (structure before texture, so later buckets are
tuned on top of the earlier choices), and each stage gets evaluations in proportion to 1/recompute[k],
so every stage costs about the same U-Net time. Each stage runs a fresh nevergrad optimizer (any
registry name) over that bucket's units, started from the best values so far.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import nevergrad as ng
import numpy as np

from .space import close, decode, encode, optimizer, space, tell

logger = logging.getLogger(__name__)


def plan(budget: int, recompute: Sequence[float]) -> list[tuple[int, int]]:
    """(bucket, evaluations) per stage, first-visited bucket (the last index) first; sums to `budget`."""
    order = list(range(len(recompute)))[::-1]
    weight = np.array([1.0 / recompute[k] for k in order])
    n = np.floor(weight / weight.sum() * budget).astype(int)
    n[-1] += budget - int(n.sum())
    return [(k, int(m)) for k, m in zip(order, n) if m > 0]


class BucketSweep:
    """ask/tell like a nevergrad optimizer, over the full (bucket x unit) parametrization of `space()`."""

    def __init__(self, name: str | None, kind: str, n_buckets: int, n_units: int, budget: int,
                 recompute: Sequence[float], workers: int = 1, gate_range: tuple[float, float] = (0.75, 1.25),
                 seed: int = 0, backbone: Sequence[int] = ()) -> None:
        self.name, self.kind, self.workers, self.gate_range, self.seed = name, kind, workers, gate_range, seed
        self.shape, self.backbone = (n_buckets, n_units), tuple(backbone)
        self.parametrization = space(kind, n_buckets, n_units, gate_range, seed, self.backbone)
        self.stages = plan(budget, recompute)
        short = min(n for _, n in self.stages)
        if kind == "gates" and short < n_units + 2:
            # COBYLA (NGOpt's pick for bounded gates) spends its first n + 2 evaluations probing one unit at a time
            logger.warning("the smallest stage of the sweep gets %d evaluations for %d units; a budget of about %d lets "
                           "every stage go past probing one unit at a time", short, n_units,
                           int(np.ceil((n_units + 2) / short * (budget + 1))))
        self.best = np.ones(self.shape)
        self.best_loss = float("inf")
        self.stage = -1
        self._opt: Any = None
        self._asked = self._told = 0
        self._pending: dict[str, Any] = {}  # uid of a full candidate -> (stage optimizer's candidate, values key, counted)
        self._known: dict[bytes, float] = {}  # every evaluated candidate's values -> its loss
        self._next_stage()

    @property
    def bucket(self) -> int | None:
        """The bucket the current stage searches (None once every stage is spent)."""
        return self.stages[self.stage][0] if self.stage < len(self.stages) else None

    def _next_stage(self) -> None:
        if self._opt is not None:
            close(self._opt)
        self.stage += 1
        self._asked = self._told = 0
        self._exhausted = False
        self._opt = None
        self._start = self.best.copy()  # the values the stage starts from
        if self.stage < len(self.stages):
            k, n = self.stages[self.stage]
            sub = space(self.kind, 1, self.shape[1], self.gate_range, self.seed * 1000 + self.stage, self.backbone)
            sub.value = encode(self.best[k:k + 1], self.kind, self.backbone)  # start from the best values so far
            # n + 1: many optimizers (COBYLA) first ask their starting point, the best so far, which is
            # answered below without an evaluation
            self._opt = optimizer(self.name, sub, self.kind, n + 1, self.workers)

    def ask(self) -> ng.p.Parameter:
        if self._opt is None:
            raise RuntimeError("the sweep's budget is spent")
        last = self.stage == len(self.stages) - 1  # the last stage takes any ask past the plan, rather than fail
        if self._asked >= self.stages[self.stage][1] and self._told == self._asked and not last:
            self._next_stage()
            return self.ask()
        k = self.bucket  # asks go past the stage's share only while its tells are pending (workers > 1)
        for _ in range(1 if self._exhausted else 1000):
            sub = self._opt.ask()
            values = self.best.copy()
            values[k] = decode(sub.value, 1, self.shape[1], self.backbone)[0]
            if values.tobytes() not in self._known:
                break
            # evaluated already (the stage's first ask is the best so far): its loss is known, no budget spent
            tell(self._opt, sub, self._known[values.tobytes()], self.kind)
        else:  # nothing new in 1000 proposals: the stage has searched its bucket out (a small discrete space)
            if not last and self._told == self._asked:
                self._next_stage()
                return self.ask()
            self._exhausted = True  # the last stage: answer known candidates at once, and the search stops
        # Only what the search will evaluate counts against the stage's share: not a twin of a candidate asked
        # and not yet told (workers > 1), nor a known one (the loop above ran out of tries).
        key = values.tobytes()
        counted = key not in self._known and all(key != other for _, other, _ in self._pending.values())
        self._asked += counted
        cand = self.parametrization.spawn_child(new_value=encode(values, self.kind, self.backbone))
        self._pending[cand.uid] = (sub, key, counted)
        return cand

    def tell(self, cand: ng.p.Parameter, loss: float) -> None:
        values = decode(cand.value, *self.shape, self.backbone)
        sub, _, counted = self._pending.pop(cand.uid, (None, None, False))
        if sub is not None:
            tell(self._opt, sub, loss, self.kind)
            self._told += counted
        elif self._opt is not None:  # not asked (the baseline, a journal replay): what the stage can use
            k = self.bucket
            if np.array_equal(np.delete(values, k, axis=0), np.delete(self.best, k, axis=0)):
                row = self._opt.parametrization.spawn_child(new_value=encode(values[k:k + 1], self.kind, self.backbone))
                tell(self._opt, row, loss, self.kind)
        self._known.setdefault(values.tobytes(), loss)
        if loss < self.best_loss:
            restart = sub is None and self._asked == 0 and self._opt is not None and not np.array_equal(values, self._start)
            self.best, self.best_loss = values, loss
            if restart:  # a better point told before the stage asked anything (a starting point): start from it
                self.stage -= 1
                self._next_stage()
                k = self.bucket
                row = self._opt.parametrization.spawn_child(new_value=encode(values[k:k + 1], self.kind, self.backbone))
                tell(self._opt, row, loss, self.kind)
