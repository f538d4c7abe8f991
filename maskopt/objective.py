"""The search's objective: a per-image reward, set-level terms relative to the baseline, and bounds on them.

    >>> objective = Objective.parse("digits=1,diversity=0.2", requires=["diversity>=0.97", "frechet<=1"])
    >>> objective.reward, objective.weights, objective.measures
    ('digits=1', {'diversity': 0.2}, ('diversity', 'frechet'))
    >>> s = objective.score(0.95, {"diversity": 1.9, "frechet": 4.0}, baseline={"diversity": 2.0, "frechet": 5.0})
    >>> round(s.objective, 4), s.feasible, round(s.violation, 4), s.ratios
    (1.14, False, 0.02, {'diversity': 0.95, 'frechet': 0.8})

Set-level terms score the images of one evaluation as a set, each as a ratio to the unmasked baseline's
on the same prompts x seeds: `diversity` (per prompt, the mean feature distance between the images of
its seeds, averaged over prompts; higher: more diverse) and `frechet` (the Frechet distance of all the
images' features to a reference set; lower: more natural). In `--reward` they enter a weighted sum like
any reward (`digits=1,diversity=0.2`; give `frechet` a negative weight to penalise it). `--require`
bounds them: `diversity>=0.97` keeps at least 97% of the baseline's diversity, `frechet<=1` keeps the
images no further from the reference than the baseline's.

A candidate that breaks a bound is infeasible: journaled with its violation (the sum of how far past
each bound it is, in ratio units) and told to the optimizer as INFEASIBLE_LOSS + violation: worse than
every feasible candidate whose objective is below INFEASIBLE_LOSS in size (any reward maskopt ships),
and worse the further it is past, so a (1+1) optimizer never makes it its parent. It is never chosen.
The baseline meets every bound by construction (its ratios are 1), so a bound it would break is refused.
A candidate whose measures are not finite (NaN images) is a failed candidate, as for a NaN reward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import MaskoptError
from .rewards import finite_weight

SET_TERMS = ("diversity", "frechet")
INFEASIBLE_LOSS = 1e5  # above any feasible loss (|objective| well below it), below a failed candidate's (1e6)
_BOUND = re.compile(r"\s*([a-z]+)\s*(>=|<=)\s*([0-9.eE+-]+)\s*")


@dataclass(frozen=True)
class Bound:
    term: str
    op: str  # ">=" or "<="
    value: float  # in units of the baseline's (a ratio)

    def violation(self, ratio: float) -> float:
        past = self.value - ratio if self.op == ">=" else ratio - self.value
        return max(0.0, past)

    def __str__(self) -> str:
        return f"{self.term}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Score:
    objective: float  # reward + weighted set terms (ratios)
    feasible: bool
    violation: float  # 0 when feasible
    ratios: dict[str, float]  # each measured set term, relative to the baseline's


@dataclass(frozen=True)
class Objective:
    reward: str  # the per-image part of the reward spec
    weights: dict[str, float]  # set term -> weight in the objective
    bounds: tuple[Bound, ...] = ()

    @property
    def measures(self) -> tuple[str, ...]:
        """The set terms an evaluation must measure (weighted or bounded), in SET_TERMS order."""
        used = set(self.weights) | {b.term for b in self.bounds}
        return tuple(t for t in SET_TERMS if t in used)

    @classmethod
    def parse(cls, spec: str, requires: Sequence[str] = ()) -> "Objective":
        """Split a `--reward` spec into its per-image reward and its set terms; parse the `--require` bounds."""
        weights: dict[str, float] = {}
        terms = [t.strip() for t in spec.split(",")] if "=" in spec else [spec.strip()]
        kept = []
        for term in terms:
            name, _, weight = term.rpartition("=") if "=" in term else (term, "", "1")
            if name.strip() in SET_TERMS:
                weights[name.strip()] = finite_weight(weight, term)
            else:
                kept.append(term)
        if not kept:
            raise MaskoptError(f"reward '{spec}' holds only set-level terms ({', '.join(SET_TERMS)}): add a per-image "
                               "reward they weigh against, e.g. digits=1,diversity=0.2")
        bounds = tuple(parse_bound(r) for r in requires)
        return cls(",".join(kept), weights, bounds)

    def score(self, reward: float, measures: Mapping[str, float], baseline: Mapping[str, float]) -> Score:
        """The objective of an evaluation whose images measured `measures`, against the baseline's `baseline`."""
        ratios = {t: _ratio(measures[t], baseline[t]) for t in self.measures}
        objective = reward + sum(w * ratios[t] for t, w in self.weights.items())
        violation = sum(b.violation(ratios[b.term]) for b in self.bounds)
        return Score(objective, violation == 0.0, violation, ratios)


def parse_bound(text: str) -> Bound:
    """'diversity>=0.97' or 'frechet<=1': a set term, a direction, a ratio the baseline (1) meets."""
    m = _BOUND.fullmatch(text)
    if m is None or m.group(1) not in SET_TERMS:
        raise MaskoptError(f"--require {text!r}: write TERM>=RATIO or TERM<=RATIO with TERM one of "
                           f"{', '.join(SET_TERMS)}, e.g. diversity>=0.97")
    try:
        value = float(m.group(3))
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise MaskoptError(f"--require {text!r}: {m.group(3)!r} is not a number")
    bound = Bound(m.group(1), m.group(2), value)
    if bound.violation(1.0) > 0:
        raise MaskoptError(f"--require {text!r}: the unmasked baseline (ratio 1) breaks it, so no search could start "
                           "feasible; bounds are relative to the baseline")
    return bound


def _ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else (1.0 if value == baseline else math.inf)
