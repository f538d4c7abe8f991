"""The embedded default's second judge, `digits-kernel`: P(prompted digit) under an RBF-kernel classifier on 8x8 pixels.

    >>> from maskopt.default.data import load_split
    >>> from maskopt.default.judge import KernelJudge
    >>> images, labels = load_split("holdout")              # real digits neither judge trained on
    >>> judge = KernelJudge()
    >>> accuracy = float((judge.probabilities(images).argmax(1) == labels).float().mean())
    >>> accuracy > 0.98
    True
    >>> judge(images[:2], [f"a handwritten {d}" for d in labels[:2].tolist()]).shape
    torch.Size([2])

A judge the search never optimised, unlike the `digits` reward in every way that can be chosen here:
another model family (a kernel machine: scikit-learn's Nystroem approximation of an RBF kernel and a
logistic regression, no convolutions), another input (the image averaged down to the digits' own 8x8
grid), another training split (`diffusion`; the reward's CNN trained on `classifier`). Trained by
`scripts/train_judge.py` (settings picked by cross-validation on its training split; held-out accuracy
0.989); inference is recomputed here in torch, in float64, from the shipped arrays.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..rewards.base import batched, check_inputs
from .reward import check_prompts, digit_of

JUDGE_PATH = Path(__file__).resolve().parent / "judge.safetensors"


def pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, 64) float64: grey, averaged down to 8x8 (the digits' own grid)."""
    x = images.double().mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(x, 8).reshape(len(x), -1)


class KernelJudge:
    """Images float (B, 3, H, W) in [0, 1], one prompt naming a digit each -> P(that digit)."""

    name = "digits-kernel"
    batch_size = 1024

    def __init__(self, source: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from safetensors.torch import load_file

        path = Path(source) if source is not None else JUDGE_PATH
        if not path.is_file():
            raise FileNotFoundError(f"no judge weights at {path}; scripts/train_judge.py writes them")
        t = load_file(str(path))  # a few hundred KB: kept on the CPU, in float64, whatever the device
        self.landmarks, self.normalization = t["landmarks"], t["normalization"]  # (L, 64), (L, L)
        self.gamma = float(t["gamma"][0])
        self.coef, self.intercept = t["coef"], t["intercept"]  # (10, L), (10,)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 10) float64 logits, as scikit-learn's decision_function."""
        check_inputs(images, [""] * images.shape[0])
        x = pixels(images.cpu())
        kernel = torch.exp(-self.gamma * torch.cdist(x, self.landmarks).square())  # (B, L)
        features = kernel @ self.normalization.T
        return features @ self.coef.T + self.intercept

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 10) float32 probabilities of each digit."""
        return self.logits(images).softmax(-1).float()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = torch.tensor([digit_of(p) for p in prompts])
        return self.probabilities(images).gather(1, targets[:, None]).squeeze(1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) float32 CPU tensor: the probability of each prompt's digit in its image."""
        check_prompts(prompts)
        return batched(self._score, images, prompts, self.batch_size)


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> KernelJudge:
    """The `digits-kernel` reward of a spec: the shipped judge, or one at `source` (a safetensors file)."""
    return KernelJudge(source, device, dtype)


__all__ = ["JUDGE_PATH", "KernelJudge", "check_prompts", "load", "pixels"]
