"""Timestep buckets: K contiguous, inclusive ranges of training timesteps covering 0 .. T-1.

Bucket 0 holds the lowest timesteps (the last, texture-refining denoising steps); a sampler visits the
buckets from K-1 down to 0.

    >>> b = Buckets.uniform(4)          # [[0, 249], [250, 499], [500, 749], [750, 999]]
    >>> b.index(500.7)                  # floats are floored, out-of-range values clamped
    2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import MaskoptError


@dataclass(frozen=True)
class Buckets:
    ranges: tuple[tuple[int, int], ...]
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        ranges = tuple((int(lo), int(hi)) for lo, hi in self.ranges)
        object.__setattr__(self, "ranges", ranges)
        if not ranges:
            raise MaskoptError("buckets: at least one bucket is needed")
        expected = 0
        for k, (lo, hi) in enumerate(ranges):
            if lo != expected:
                raise MaskoptError(f"buckets: bucket {k} starts at {lo}, expected {expected} (buckets must be contiguous from 0)")
            if hi < lo:
                raise MaskoptError(f"buckets: bucket {k} is empty ([{lo}, {hi}])")
            expected = hi + 1
        if expected != self.num_train_timesteps:
            raise MaskoptError(f"buckets: the last bucket ends at {expected - 1}, expected {self.num_train_timesteps - 1}")

    @classmethod
    def uniform(cls, k: int, num_train_timesteps: int = 1000) -> "Buckets":
        if not 1 <= k <= num_train_timesteps:
            raise MaskoptError(f"buckets: K={k} must be between 1 and {num_train_timesteps}")
        edges = [round(i * num_train_timesteps / k) for i in range(k + 1)]
        return cls(tuple((edges[i], edges[i + 1] - 1) for i in range(k)), num_train_timesteps)

    @classmethod
    def from_edges(cls, edges: Sequence[int], num_train_timesteps: int = 1000) -> "Buckets":
        """Buckets from their inner edges: `from_edges([300, 700])` -> [[0, 299], [300, 699], [700, 999]]."""
        bounds = [0, *sorted(int(e) for e in edges), num_train_timesteps]
        return cls(tuple((bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1)), num_train_timesteps)

    def __len__(self) -> int:
        return len(self.ranges)

    def index(self, t: float) -> int:
        """The bucket that holds timestep t (floored, clamped into 0 .. T-1)."""
        if not math.isfinite(float(t)):
            raise MaskoptError(f"timestep {float(t)} is not a finite number: it is in no bucket")
        t = min(max(math.floor(float(t)), 0), self.num_train_timesteps - 1)
        for k, (lo, hi) in enumerate(self.ranges):
            if lo <= t <= hi:
                return k
        raise AssertionError("unreachable: buckets cover every timestep")

    def to_list(self) -> list[list[int]]:
        return [list(r) for r in self.ranges]


def scalar_timestep(timestep: float | int | torch.Tensor) -> float:
    """The one timestep of a U-Net call; a batch that mixes timesteps is an error, not a guess."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise MaskoptError("timestep tensor is empty")
        flat = timestep.detach().flatten()
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise MaskoptError(
                f"this batch mixes timesteps {sorted(set(flat.tolist()))[:4]}...: masks are per bucket, "
                "so every sample of one U-Net call must share its timestep"
            )
        return float(flat[0])
    return float(timestep)
