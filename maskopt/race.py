"""Racing: score a candidate's images in chunks and stop it once it clearly cannot beat the incumbent.

    >>> import numpy as np
    >>> race = Race(looks=(0.25, 0.5), alpha=0.05)
    >>> plan = race.plan(images=40, seed=0)            # one fixed order for every candidate, looks after 10 and 20
    >>> [len(c) for c in plan], sorted(np.concatenate(plan).tolist()) == list(range(40))
    ([10, 10, 20], True)
    >>> rng = np.random.default_rng(1)
    >>> loser = -0.05 + 0.01 * rng.standard_normal(40)  # per-image reward - incumbent's
    >>> race.verdict(loser[:10], total=40) is not None  # stopped after its first chunk
    True
    >>> race.verdict(-loser[:10], total=40) is None     # a winner goes on
    True

Why: most proposals of a (1+1) search are worse than their parent, yet each is scored on every prompt x
seed. Every candidate draws its images in one fixed random order (`plan`), so after each chunk it is
compared with the incumbent (the best candidate scored on every image) on the same images: the paired
differences d_i = reward_i - incumbent_i, whose mean over all N images decides who is better.

The test (`verdict`): after n of N images, an upper confidence bound on that full mean,

    mean(d) + offset + t(1 - alpha / looks, n - 1) * sd(d) / sqrt(n) * sqrt((N - n) / (N - 1)),

where `offset` is the candidate's objective terms known without images (its sparsity bonus minus the
incumbent's), the last factor is the finite-population correction (the n images are a random sample,
without replacement, of the N the full score averages; the unseen ones shrink as n grows), and alpha is
split evenly over the looks (Bonferroni), so the chance that a candidate is stopped while its full mean is
above `margin` is alpha under the t approximation. A candidate whose bound falls below `margin` is stopped.
margin 0 (the default): only candidates worse than the incumbent with high confidence; margin > 0 is an
indifference zone, also those that will not beat it by more than `margin` (in reward units; `search.py`
sets it from the baseline's per-image spread). On the embedded default a margin of 0.05 of that spread
stopped every candidate, improvements included: a search's steps gain far less than that.

Limits, said plainly: the t approximation is optimistic when the gain sits in a few images not yet
scored (right-skewed differences). For a candidate that would win by a hair, with the default single look
after a quarter of 60 images, the measured stop rate is 1.0% for normal differences and 4.3-4.8% for
right-skewed ones at alpha 0.025 (3.6% and 4.9-8.8% at 0.05: tests/test_race.py), which is why the
default is 0.025. benchmarks/time_to_gain.py re-scores stopped candidates on every image and counts those
that would have won.

A stopped candidate is never the best (only a full score can be), so the search reward stays exact.
What the optimizer is told is `told_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import t as student_t

from .journal import Entry

TIE = 1e-9  # a stopped candidate is told strictly worse than the incumbent (nevergrad's bests take ties)


@dataclass(frozen=True)
class Race:
    looks: tuple[float, ...] = (0.25,)  # after these shares of the images a candidate can stop (the chunk ends)
    alpha: float = 0.025  # nominal chance, per candidate, of stopping one whose full mean beats the margin
    margin: float = 0.0  # stop candidates whose bound is below this (reward units)

    def plan(self, images: int, seed: int) -> list[np.ndarray]:
        """The image indices of each chunk, in one fixed random order (the same for every candidate)."""
        order = np.random.default_rng([seed, images]).permutation(images)
        ends = sorted({min(max(round(f * images), 1), images) for f in self.looks} | {images})
        return [order[a:b] for a, b in zip([0, *ends[:-1]], ends)]

    def bound(self, d: np.ndarray, total: int, looks: int) -> float:
        """Upper confidence bound on the mean of the per-image differences over all `total` images."""
        n = len(d)
        if n >= total:
            return float(np.mean(d))
        if n < 2:
            return math.inf  # no spread to go on
        level = 1.0 - self.alpha / max(looks, 1)
        fpc = math.sqrt((total - n) / (total - 1))
        return float(np.mean(d) + student_t.ppf(level, n - 1) * np.std(d, ddof=1) / math.sqrt(n) * fpc)

    def verdict(self, d: np.ndarray, total: int, offset: float = 0.0, looks: int | None = None) -> str | None:
        """Why the candidate stops after scoring the images behind `d` (reward - incumbent's), or None."""
        d = np.asarray(d, dtype=np.float64)
        if len(d) >= total:
            return None  # scored in full: nothing to stop
        looks = len(self.looks) if looks is None else looks
        upper = self.bound(d, total, looks) + offset
        if upper < self.margin:
            return (f"after {len(d)} of {total} images its mean can beat the incumbent by at most {upper:+.3g} "
                    f"({1 - self.alpha / max(looks, 1):.4f} bound), below the margin {self.margin:.3g}")
        return None


@dataclass(frozen=True)
class Against:
    """What a group races against: the incumbent's per-image rewards, and per candidate the objective terms
    known without images (its sparsity bonus minus the incumbent's). Plain data: it travels to Ray actors."""

    race: Race
    rewards: tuple[float, ...]
    offsets: tuple[float, ...]

    def stop(self, c: int, scored: np.ndarray, rewards: np.ndarray) -> str | None:
        """`Evaluator.race`'s question for candidate c of the group, after the images `scored`."""
        return self.race.verdict(rewards - np.asarray(self.rewards)[scored], len(self.rewards), self.offsets[c])

    def subset(self, members: list[int]) -> "Against":
        """The same race for some candidates of the group (those sent to one evaluator)."""
        return Against(self.race, self.rewards, tuple(self.offsets[c] for c in members))


def told_loss(estimate: float, incumbent: float) -> float:
    """The loss a stopped candidate is told: its paired estimate (the incumbent's loss minus the mean paired
    difference on the images scored), never better than the incumbent's.

    Why both parts: a (1+1) optimizer (DiscreteOnePlusOne, OnePlusOne, the sweep's stages) only asks whether
    the child beats its parent; told strictly worse, a stopped child is never made the parent, exactly as a
    fully scored loser is not. Population and model-based optimizers (CMA, DE, COBYLA, NGOpt's picks) rank or
    fit what they are told: the paired estimate is the best guess of the full loss from the images scored,
    unbiased, with the incumbent's variance removed; with a margin it can be above the incumbent's objective
    by less than the margin, and is then capped, as a loser within the indifference zone.
    """
    return max(estimate, incumbent + TIE * max(1.0, abs(incumbent)))


# ---------------------------------------------------------------------------------------------------
# the racing policy of a search: which group is scored, against whom, and what a stopped candidate is told


def group_of(entries: Sequence[Entry], size: int) -> tuple[int, int]:
    """(first entry, size) of the group about to be scored: a new one after the journal, or the rest of a group a
    kill cut, taken as it began (its incumbent fixed at the group's start, as in the uninterrupted search)."""
    if entries and entries[-1].group is not None and sum(entries[-1].group) > len(entries):
        start, size = entries[-1].group
        return start, size
    return len(entries), size


def incumbent_of(entries: Sequence[Entry], start: int) -> Entry | None:
    """The best candidate scored in full before entry `start`: what a group starting there races against."""
    return min((e for e in entries[:start] if e.choosable), key=lambda e: e.loss, default=None)


def against(race: Race, incumbent: Entry, offsets: Sequence[float], baseline: Entry) -> Against:
    """What a group races against: the incumbent's per-image rewards, the margin in units of the baseline's
    per-image spread, and per candidate its objective terms known without images (`offsets`, sparsity)."""
    margin = race.margin * float(np.std(baseline.image_rewards, ddof=1))
    return Against(Race(race.looks, race.alpha, margin), tuple(incumbent.image_rewards),
                   tuple(o - (incumbent.objective - incumbent.reward) for o in offsets))


def stopped(entry: Entry, scored: Sequence[bool], incumbent: Entry, offset: float, reason: str, of: int) -> Entry:
    """`entry`, stopped by the race after the images `scored`: journaled with its paired estimate and told it,
    never better than the incumbent (`told_loss`)."""
    base = np.asarray(incumbent.image_rewards)
    mask = np.asarray(scored)
    estimate = incumbent.reward + float(np.mean(np.asarray(entry.image_rewards)[mask] - base[mask])) + offset
    if not entry.failed:
        entry.objective = -told_loss(-estimate, incumbent.loss)
    entry.partial = {"images": entry.images, "of": of, "estimate": estimate, "incumbent": incumbent.i,
                     "reason": reason}
    return entry
