"""Paired comparison of two samplings on the same prompts and seeds, with a bootstrap confidence interval."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Paired:
    baseline: float  # mean reward without masks
    masked: float  # mean reward with masks
    diff: float  # mean of per-image (masked - baseline)
    ci_low: float
    ci_high: float
    n: int  # number of pairs (images)

    @property
    def significant(self) -> bool:
        """True when the 95% interval excludes 0: only then is a difference reported as a gain or loss."""
        return self.ci_low > 0 or self.ci_high < 0

    def describe(self) -> str:
        verdict = "gain" if self.ci_low > 0 else "loss" if self.ci_high < 0 else "no significant difference"
        return f"{self.diff:+.4f} [95% CI {self.ci_low:+.4f}, {self.ci_high:+.4f}] over {self.n} images: {verdict}"

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def paired(baseline: Sequence[float], masked: Sequence[float], reps: int = 10_000, seed: int = 0) -> Paired:
    """Mean paired difference and its percentile-bootstrap 95% CI (pairs resampled with replacement)."""
    b, m = np.asarray(baseline, dtype=np.float64), np.asarray(masked, dtype=np.float64)
    if b.shape != m.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"paired: need two equal-length, non-empty sequences, got {b.shape} and {m.shape}")
    d = m - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(reps, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Paired(float(b.mean()), float(m.mean()), float(d.mean()), float(lo), float(hi), len(d))
