"""A weighted sum of rewards: ``imagereward=1,hpsv2=5``.

Each term scores the whole batch (batching inside itself); the sum is sum_i w_i * term_i.
"""

from __future__ import annotations

import torch

from .base import Reward, check_inputs


class WeightedSum:
    def __init__(self, terms: list[tuple[str, float, Reward]], name: str):
        self.terms = terms  # (spec, weight, reward)
        self.name = name
        self.weights = {spec: weight for spec, weight, _ in terms}

    @property
    def batch_size(self) -> int:
        return min(reward.batch_size for _, _, reward in self.terms)

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        for _, _, reward in self.terms:
            reward.batch_size = value

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for _, weight, reward in self.terms:
            total += weight * reward(images, prompts).to(device="cpu", dtype=torch.float32)
        return total
