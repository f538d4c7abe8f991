"""One evaluation of a candidate: sample every prompt x seed with its masks, score the images.

All prompts x seeds and the CFG pair go through the U-Net as one batch, every image draws its noise
from its own seeded generator (so an image depends on its seed, not on the batch around it), and the
same seeds serve every candidate (common random numbers).

Trajectory reuse: the sampler visits buckets from high to low timestep, so the U-Net's inputs at step i
depend only on the candidate's values in the buckets visited up to step i. `TrajectoryCache` keys every
U-Net output by (step, values of the buckets visited so far); a candidate that agrees with an earlier one
on its first j visited buckets replays those steps from the cache instead of running the U-Net, which
is exactly starting from the cached latents at the start of bucket j. Results are bit for bit the same.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .buckets import scalar_timestep
from .masking import apply
from .maskset import MaskSet

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    reward: float  # mean over images (nan if the reward failed)
    rewards: list[float]  # per image, in (seed, prompt) order
    seconds: float
    cache_hits: int  # U-Net calls replayed from the cache
    unet_calls: int  # U-Net calls actually run
    images: torch.Tensor | None = None

    @property
    def failed(self) -> bool:
        return not all(math.isfinite(r) for r in self.rewards)

    def per_prompt(self, n_prompts: int) -> list[float]:
        return np.asarray(self.rewards).reshape(-1, n_prompts).mean(0).tolist()


class TrajectoryCache:
    """U-Net outputs keyed by (step, visited buckets' values); least recently used entries go first."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: tuple) -> torch.Tensor | None:
        out = self._store.get(key)
        if out is not None:
            self._store.move_to_end(key)
        return out

    def put(self, key: tuple, out: torch.Tensor) -> None:
        if self.max_entries <= 0:
            return
        self._store[key] = out
        self._store.move_to_end(key)
        while len(self._store) > self.max_entries:
            self._store.popitem(last=False)

    @contextmanager
    def replaying(self, unet: torch.nn.Module, masks: MaskSet, tag: Any = 0) -> Iterator[dict]:
        """Patch `unet.forward` for one sampling run (`tag` names its batch): replay cached steps, record new ones."""
        forward = unet.forward
        rows = [tuple(r) for r in masks.values]
        run = {"step": 0, "visited": [], "hits": 0, "calls": 0}

        def cached_forward(sample, timestep, *args, **kwargs):
            k = masks.buckets.index(scalar_timestep(timestep))
            if not run["visited"] or run["visited"][-1] != k:
                run["visited"].append(k)
            key = (tag, run["step"], tuple(run["visited"]), tuple(rows[b] for b in run["visited"]))
            run["step"] += 1
            hit = self.get(key)
            if hit is not None:
                self.hits += 1
                run["hits"] += 1
                return _as_output(hit, kwargs.get("return_dict", True))
            self.misses += 1
            run["calls"] += 1
            out = forward(sample, timestep, *args, **kwargs)
            self.put(key, (out[0] if isinstance(out, tuple) else out.sample).detach())
            return out

        unet.forward = cached_forward
        try:
            yield run
        finally:
            del unet.forward  # back to the class's forward


def _as_output(sample: torch.Tensor, return_dict: bool) -> Any:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


class Evaluator:
    """Scores value matrices for one pipeline, prompt set, seed set and sampler setting."""

    def __init__(
        self,
        pipe: Any,
        reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
        template: MaskSet,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        size: tuple[int, int] | None = None,
        cache: TrajectoryCache | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.pipe, self.reward, self.template = pipe, reward, template
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.steps, self.guidance, self.size = steps, guidance, size
        self.cache = cache
        self.batch_size = batch_size  # images per pipeline call; None = all at once
        # (seed, prompt) order: image i is prompt i % P with seed i // P
        self.image_prompts = [p for _ in self.seeds for p in self.prompts]
        self.image_seeds = [s for s in self.seeds for _ in self.prompts]

    def __call__(self, values: np.ndarray, keep_images: bool = False) -> Evaluation:
        t0 = time.perf_counter()
        masks = self.template.with_values(values)
        hits = calls = 0
        images = []
        n = len(self.image_prompts)
        step = self.batch_size or n
        with apply(self.pipe.unet, masks, check=False):
            for start in range(0, n, step):
                chunk = slice(start, start + step)
                if self.cache is not None:
                    with self.cache.replaying(self.pipe.unet, masks, tag=start) as run:
                        images.append(self._sample(chunk))
                    hits, calls = hits + run["hits"], calls + run["calls"]
                else:
                    images.append(self._sample(chunk))
                    calls += self.steps
        images_t = torch.cat(images)
        with torch.no_grad():
            scores = self.reward(images_t, self.image_prompts).float().cpu()
        rewards = [float(r) for r in scores]
        finite = [r for r in rewards if math.isfinite(r)]
        mean = float(np.mean(rewards)) if len(finite) == len(rewards) else float("nan")
        return Evaluation(mean, rewards, time.perf_counter() - t0, hits, calls, images_t if keep_images else None)

    @torch.no_grad()
    def _sample(self, chunk: slice) -> torch.Tensor:
        device = self.pipe.unet.device
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in self.image_seeds[chunk]]
        kwargs = dict(height=self.size[0], width=self.size[1]) if self.size else {}
        # Latents drawn on the CPU per seed, so an image is the same on any device and in any batch.
        latents = self._latents(generators, kwargs).to(device)
        out = self.pipe(
            self.image_prompts[chunk],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            latents=latents,
            output_type="pt",
            **kwargs,
        )
        return out.images.float().cpu()

    def _latents(self, generators: list[torch.Generator], kwargs: dict) -> torch.Tensor:
        pipe = self.pipe
        scale = getattr(pipe, "vae_scale_factor", 8)
        h = kwargs.get("height") or pipe.unet.config.sample_size * scale
        w = kwargs.get("width") or pipe.unet.config.sample_size * scale
        shape = (pipe.unet.config.in_channels, h // scale, w // scale)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return noise.to(pipe.unet.dtype)

