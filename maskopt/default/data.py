"""The real data behind the embedded default: scikit-learn's 1797 handwritten digits.

One place decides how the digits are split and shaped, so the training script, the
tests and the Frechet reference can never disagree about which digits a model saw.

The split (stratified by digit, fixed seed) has three disjoint parts:

- ``diffusion`` (60%, 1078 digits): the VAE, text encoder and U-Net train on these only.
- ``classifier`` (20%, 359 digits): the reward's classifier trains on these only.
- ``holdout`` (20%, 360 digits): neither model trains on them; the classifier's accuracy
  and the Frechet reference come from here.

Images are the 8x8 digits (ink 0..16) scaled to [0, 1] with ink bright, upsampled
bilinearly to ``IMAGE_SIZE`` and repeated to 3 channels, the shape an SD pipeline's
``output_type="pt"`` returns: float (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
SPLIT_SEED = 0
SPLITS = ("diffusion", "classifier", "holdout")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def upsample(digits8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 8, 8) ink in [0, 16] -> (N, 3, size, size) float32 in [0, 1]."""
    x = (digits8.float() / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    # Bilinear, not nearest: the 8x8 grid is a sensor artefact, not the shape of a stroke.
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    index = np.arange(len(labels))
    diffusion, rest = train_test_split(index, train_size=0.6, stratify=labels, random_state=SPLIT_SEED)
    classifier, holdout = train_test_split(rest, train_size=0.5, stratify=labels[rest], random_state=SPLIT_SEED)
    return {"diffusion": np.sort(diffusion), "classifier": np.sort(classifier), "holdout": np.sort(holdout)}


@lru_cache(maxsize=len(SPLITS) * 2)
def _load(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = _split_indices()[split]
    images = upsample(torch.from_numpy(digits.images[idx]), size)
    labels = torch.from_numpy(digits.target[idx]).long()
    return images, labels


def load_split(split: str, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, size, size) float32 in [0, 1] and labels (N,) int64 of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    images, labels = _load(split, size)
    # Clones, so a caller that edits its tensors in place cannot corrupt the cache.
    return images.clone(), labels.clone()
