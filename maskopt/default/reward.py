"""The default's reward: how surely a digit classifier sees the prompted digit, plus a Frechet check.

``DigitReward()(images, prompts)`` is the probability, under a CNN trained only on real
digits the diffusion model never saw, that each image shows the digit its prompt names.
Confidence alone can be gamed (one perfect 7 drawn every time scores 1.0), so
``frechet_distance`` compares the spread of the images' classifier features with that of
real held-out digits: a search that gains reward while this grows has traded realism or
diversity for confidence.

Reference points (measured 2026-11-26): the classifier reads 98.9% of the held-out digits
right; real held-out digits score 0.947 on average (label smoothing keeps it below 1); 120
real digits from another split sit at Frechet 4.3-6.3 from the held-out set. The shipped
pipeline, 30 prompts x 4 seeds with DDIM 15 steps: reward 0.932 / Frechet 9.1 at guidance
1.0, 0.978 / 10.3 at 2.0, 0.984 / 12.4 at 3.0.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import MaskoptError
from ..rewards.base import batched, check_inputs
from .classifier import FEATURE_DIM, load_classifier
from .data import DIGIT_WORDS, load_split

_DIGIT_NAMES = {word: i for i, word in enumerate(DIGIT_WORDS)} | {str(i): i for i in range(10)}


def digit_of(prompt: str) -> int:
    """The digit a prompt names, as a numeral ("a 7") or a word ("the digit seven").

    Raises MaskoptError (a ValueError) when the prompt names no digit or several different ones.
    """
    words = re.findall(r"[a-z]+|[0-9]+", prompt.lower())
    found = sorted({_DIGIT_NAMES[w] for w in words if w in _DIGIT_NAMES})
    if not found:
        raise MaskoptError(f"prompt {prompt!r} names no digit (0-9 or zero..nine)")
    if len(found) > 1:
        raise MaskoptError(f"prompt {prompt!r} names several digits {found}; the reward needs exactly one")
    return found[0]


class DigitReward:
    """P(prompted digit) under the shipped classifier; images float (B, 3, H, W) in [0, 1]."""

    name = "digits"
    batch_size = 512  # images per classifier call; a 32x32 CNN, so only memory bounds it

    def __init__(self, source: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = load_classifier(source, self.device).to(dtype)

    @torch.no_grad()
    def _probability(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = torch.tensor([digit_of(p) for p in prompts], dtype=torch.long, device=self.device)
        probs = self.model(images.to(self.device, self.dtype)).float().softmax(-1)
        return probs.gather(1, targets[:, None]).squeeze(1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) float32 CPU tensor: the probability of each prompt's digit in its image."""
        check_prompts(prompts)  # a prompt without a digit fails before any image is scored
        return batched(self._probability, images, prompts, self.batch_size)

    @torch.no_grad()
    def _map(self, fn, images: torch.Tensor, width: int) -> torch.Tensor:
        check_inputs(images, [""] * images.shape[0])
        out = [fn(images[i:i + self.batch_size].to(self.device, self.dtype)).float().cpu()
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, width)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 10) float32 CPU logits; argmax is the classifier's reading of each image."""
        return self._map(self.model, images, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 64) float32 CPU penultimate-layer features, the space ``frechet_distance`` works in."""
        return self._map(self.model.features, images, FEATURE_DIM)


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DigitReward:
    """The `digits` reward of a spec: the shipped classifier, or one at `source` (a safetensors file)."""
    return DigitReward(source, device, dtype)


def check_prompts(prompts: list[str]) -> None:
    """Every prompt must name exactly one digit: the reward scores that digit (MaskoptError naming the prompt)."""
    for prompt in prompts:
        try:
            digit_of(prompt)
        except MaskoptError as e:
            raise MaskoptError(f"{e} (the digits reward needs one digit per prompt)") from None


@lru_cache(maxsize=1)
def _shipped_reward() -> DigitReward:
    return DigitReward()


def frechet_distance(images: torch.Tensor, reference: torch.Tensor | None = None,
                     reward: DigitReward | None = None) -> float:
    """Frechet distance between images and reference images in the classifier's feature space.

    Both are float (N, 3, H, W) in [0, 1]; ``reference`` defaults to the real ``holdout``
    digits (360 images no model trained on), ``reward`` to the shipped classifier. Like any
    FID it is biased upwards for small N: compare values computed with the same N.
    """
    from ..measures import frechet

    reward = reward if reward is not None else _shipped_reward()
    if reference is None:
        reference, _ = load_split("holdout")
    return frechet(reward.features(images), reward.features(reference))
