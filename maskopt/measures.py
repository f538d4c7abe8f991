"""Measures of a set of images rather than of one: realism (Frechet distance) and diversity, in a feature space.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 3
    >>> frechet(a, a) < 1e-9, frechet(a, b) > 8 * 9 * 0.9       # about |mean difference|^2 = 8 x 3^2
    (True, True)
    >>> f = torch.randn(3 * 4, 8, generator=g)                # 3 seeds x 4 prompts, (seed, prompt) order
    >>> diversity(f, n_prompts=4).shape                       # one value per prompt
    torch.Size([4])

Features are whatever a caller extracts (a classifier's penultimate layer, CLIP or DINOv2 image
embeddings): these functions only see (N, D) tensors. Images of an evaluation come in (seed, prompt)
order: image i is prompt i % P under seed i // P, as `evaluate.Evaluator` makes them.
"""

from __future__ import annotations

import torch


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    Computed in float64 through symmetric eigendecompositions, which stay real and stable where a
    general matrix square root of a rank-deficient covariance does not. Like any FID it is biased
    upwards for small N: compare values computed with the same N.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) = tr sqrt(sqrt(A) B sqrt(A)), and the latter is symmetric PSD.
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(distance.clamp(min=0))


def diversity(features: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """(P,) per prompt: the mean Euclidean distance between the features of its images under different seeds.

    `features` is (S * P, D) in (seed, prompt) order. A search that buys reward by drawing every seed of a
    prompt alike lowers it; compare it with the baseline's on the same prompts and seeds.
    """
    n = features.shape[0]
    if features.ndim != 2 or n_prompts < 1 or n % n_prompts:
        raise ValueError(f"features must be (seeds x {n_prompts} prompts, D), got {tuple(features.shape)}")
    seeds = n // n_prompts
    if seeds < 2:
        raise ValueError(f"diversity needs at least 2 seeds per prompt, got {seeds}")
    per_prompt = features.double().reshape(seeds, n_prompts, -1).transpose(0, 1)  # (P, S, D)
    d = torch.cdist(per_prompt, per_prompt)  # (P, S, S)
    i, j = torch.triu_indices(seeds, seeds, 1)
    return d[:, i, j].mean(1).float()
