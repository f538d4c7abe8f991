"""The digit classifier behind the default reward: a small CNN, trained on real digits only.

It takes what the pipeline returns (float (B, 3, H, W) in [0, 1], any H and W) and does
its own preprocessing, so a caller never has to know the resolution it was trained at.
Trained by ``scripts/train_default.py`` on the ``classifier`` split of
``maskopt.default.data``; the ``holdout`` split measures it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 32
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """Three conv stages and a 64-wide feature layer; ``features`` is what the Frechet distance uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),  # (B, 64)
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 1, 32, 32) centred grey, the classifier's input."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            # antialias matters when shrinking a large render: plain bilinear would alias strokes away.
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return (x - 0.5) / 0.5

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 64) penultimate-layer features."""
        return self.body(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 10) logits."""
        return self.head(self.features(images))


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """The classifier with weights from ``path`` (a safetensors file; None = the shipped one), in eval mode."""
    from safetensors.torch import load_file

    from . import CLASSIFIER_PATH

    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not path.is_file():
        raise FileNotFoundError(f"no classifier weights at {path}; scripts/train_default.py writes them")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
