"""One evaluation of a candidate: sample every prompt x seed with its masks, score the images.

All prompts x seeds and the CFG pair go through the U-Net as one batch, every image draws its noise
from its own seeded generator (so an image depends on its seed, not on the batch around it), and the
same seeds serve every candidate (common random numbers).

Trajectory reuse: the sampler visits buckets from high to low timestep, so the U-Net's inputs at step i
depend only on the candidate's values in the buckets visited up to step i. `TrajectoryCache` keys every
U-Net output by (step, values of the buckets visited so far); a candidate that agrees with an earlier one
on its first j visited buckets replays those steps from the cache instead of running the U-Net, which
is exactly starting from the cached latents at the start of bucket j. Results are bit for bit the same
(for one candidate at a time; in a group, to float rounding, as the U-Net's batch differs).

Several candidates (`--workers W`) can share the batch too: W copies of the prompts x seeds, each
copy under its own masks (`per_sample`), each replaying its own cached steps. On a small U-Net this
fills the hardware better than W runs of one candidate each.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .buckets import scalar_timestep
from .errors import MaskoptError, first_line
from . import hooks
from .masking import PerSample, apply, per_sample
from .maskset import MaskSet

logger = logging.getLogger(__name__)

UNSEEN_SEED0 = 1000  # held-out checks and eval sample with seeds from here, far from a search's seeds 0..S-1


@dataclass
class Evaluation:
    reward: float  # mean over images (nan if the reward failed)
    rewards: list[float]  # per image, in (seed, prompt) order
    seconds: float
    cache_hits: int  # U-Net calls replayed from the cache
    unet_calls: int  # U-Net calls actually run
    images: torch.Tensor | None = None
    measures: dict[str, float] = field(default_factory=dict)  # set-level terms of its images (objective.py)
    scored: list[bool] | None = None  # racing: which images were scored (None: all); the others' rewards are NaN
    stopped: str | None = None  # racing: why it stopped before its last chunk (None: scored on every image)

    @property
    def failed(self) -> bool:
        """A reward or a set-level measure that is NaN or inf: the candidate cannot be compared."""
        scored = self.rewards if self.scored is None else [r for r, s in zip(self.rewards, self.scored) if s]
        return not all(math.isfinite(r) for r in [*scored, *self.measures.values()])

    @property
    def images_scored(self) -> int:
        return len(self.rewards) if self.scored is None else int(sum(self.scored))

    def per_prompt(self, n_prompts: int) -> list[float | None]:
        """Per prompt, the mean reward over its seeds; of a raced candidate stopped early, over the seeds it
        scored (None for a prompt with none)."""
        r = np.asarray(self.rewards, dtype=np.float64).reshape(-1, n_prompts)
        if self.scored is None:
            return r.mean(0).tolist()
        seen = np.asarray(self.scored).reshape(r.shape).sum(0)
        return [float(np.nansum(r[:, j]) / seen[j]) if seen[j] else None for j in range(n_prompts)]


class TrajectoryCache:
    """U-Net outputs keyed by (step, visited buckets' values); least recently used entries go first.

    Capacity is counted in U-Net outputs (of one pipeline call); the output of a chunk of a raced evaluation
    weighs its share of the images, so a raced search keeps as many candidates' trajectories as a plain one
    in the same memory."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._store: OrderedDict[tuple, tuple[torch.Tensor, float]] = OrderedDict()
        self._weight = 0.0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: tuple) -> torch.Tensor | None:
        item = self._store.get(key)
        if item is None:
            return None
        self._store.move_to_end(key)
        return item[0]

    def put(self, key: tuple, out: torch.Tensor, weight: float = 1.0) -> None:
        """Keep `out`, which holds `weight` of an evaluation's images (1: all of them)."""
        if self.max_entries <= 0:
            return
        if key in self._store:
            self._weight -= self._store[key][1]
        self._store[key] = (out, weight)
        self._weight += weight
        self._store.move_to_end(key)
        while self._weight > self.max_entries + 1e-9 and len(self._store) > 1:
            _, (_, w) = self._store.popitem(last=False)
            self._weight -= w


class Stepper:
    """Stands in for the U-Net's forward during one sampling run of `len(masksets)` candidates x `images` images each.

    The batch holds candidate 0's images, then candidate 1's, ... (twice over with classifier-free
    guidance). Per step, a candidate whose output for this step and visited values is cached is
    replayed; the others run through the U-Net together (with `gate` selecting their masks) and are
    cached. `tag` names the chunk of images, so chunks never share cache entries.
    """

    def __init__(self, forward: Callable, masksets: list[MaskSet], images: int, cache: TrajectoryCache | None = None,
                 tag: Any = 0, gate: PerSample | None = None, share: float = 1.0) -> None:
        self.forward, self.images, self.cache, self.tag, self.gate = forward, images, cache, tag, gate
        self.share = share  # this run's images, as a share of an evaluation's (the cache's unit)
        self.buckets = masksets[0].buckets
        self.rows = [[tuple(r) for r in m.values] for m in masksets]  # per candidate, per bucket
        self.candidates = len(masksets)
        self.step = 0  # U-Net calls so far in this run
        self.visited: list[int] = []  # buckets in the order the sampler reached them
        self.hits = [0] * self.candidates  # per candidate: steps replayed from the cache
        self.calls = [0] * self.candidates  # per candidate: steps run through the U-Net

    def keys(self) -> list[tuple]:
        """Per candidate, this step's cache key: (chunk, step, visited buckets, its values in each of them)."""
        visited = tuple(self.visited)
        return [(self.tag, self.step, visited, tuple(self.rows[c][b] for b in visited)) for c in range(self.candidates)]

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        k = self.buckets.index(scalar_timestep(timestep))
        if not self.visited or self.visited[-1] != k:
            self.visited.append(k)
        keys = self.keys()
        self.step += 1
        w, cache = self.candidates, self.cache
        big = sample.shape[0]
        owner = torch.arange(big) % (w * self.images) // self.images  # (big,) candidate of each batch row
        cached = [cache.get(key) if cache is not None else None for key in keys]
        todo = [c for c in range(w) if cached[c] is None]
        full = None
        if todo:
            if len(todo) == w:
                sub, ts, a, kw, own = sample, timestep, args, kwargs, owner
            else:
                idx = torch.isin(owner, torch.tensor(todo)).nonzero().squeeze(1)
                take = lambda x: _take(x, idx.to(sample.device), big)
                sub, ts, a, kw, own = take(sample), take(timestep), take(args), take(kwargs), owner[idx]
            if self.gate is not None:
                self.gate.select(k, own)
            out = self.forward(sub, ts, *a, **kw)
            y = out[0] if isinstance(out, tuple) else out.sample
            for c in todo:
                self.calls[c] += 1
                if cache is not None:
                    cache.misses += 1
                    cache.put(keys[c], y[(own == c).to(y.device)].detach(), self.share)
            full = y if len(todo) == w else y.new_empty((big,) + y.shape[1:])
            if len(todo) < w:
                full[idx.to(y.device)] = y
        for c in range(w):
            if cached[c] is not None:
                if w == 1:
                    full = cached[c]
                else:
                    if full is None:
                        full = cached[c].new_empty((big,) + cached[c].shape[1:])
                    full[(owner == c).to(full.device)] = cached[c]
                cache.hits += 1
                self.hits[c] += 1
        return _as_output(full, kwargs.get("return_dict", True))


@contextmanager
def stepping(unet: torch.nn.Module, masksets: list[MaskSet], images: int, cache: TrajectoryCache | None = None,
             tag: Any = 0, gate: PerSample | None = None, share: float = 1.0) -> Iterator[Stepper]:
    """The U-Net's forward replaced by a `Stepper` for one sampling run (hook `maskopt.stepper`); yields it (its
    per-candidate counts)."""
    stepper = Stepper(unet.forward, masksets, images, cache, tag, gate, share)
    with hooks.hooked(unet, "maskopt.stepper", around=stepper):
        yield stepper


def _take(x: Any, idx: torch.Tensor, big: int) -> Any:
    """x with its batch rows `idx` kept, for tensors (and tuples, dicts of them) whose first dim is the batch."""
    if torch.is_tensor(x):
        return x[idx] if x.dim() > 0 and x.shape[0] == big else x
    if isinstance(x, dict):
        return {k: _take(v, idx, big) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_take(v, idx, big) for v in x)
    return x


def _as_output(sample: torch.Tensor, return_dict: bool) -> Any:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


@contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """fp32 convolutions and matmuls in full fp32 on CUDA, not TF32, for as long as the block runs.

    Why: PyTorch lets cuDNN run fp32 convolutions in TF32 by default. Then a candidate's rewards depend on
    the batch it shares (`--workers`) by up to 1.1e-2 per image on the embedded default (one H200), against
    1.7e-5 in full fp32; the search's objective must not. fp16 and bf16 pipelines are not affected.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    try:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # precision was set through torch's newer fp32_precision API, which then refuses the old flags
        with _ieee_fp32():
            yield
        return
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def _ieee_fp32() -> Iterator[None]:
    """`full_fp32` through torch's fp32_precision settings (torch >= 2.9), restored as they were."""
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [s.fp32_precision for s in settings]
    for s in settings:
        s.fp32_precision = "ieee"
    try:
        yield
    finally:
        for s, value in zip(settings, saved):
            s.fp32_precision = value


class Evaluator:
    """Scores value matrices for one pipeline, prompt set, seed set and sampler setting.

    The one implementation of the evaluator protocol (`evaluators.py`) that runs the pipeline itself.
    """

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
        *,
        cache: TrajectoryCache | None = None,
        batch_size: int = 0,
        measure: Callable[[torch.Tensor], dict[str, float]] | None = None,
    ) -> None:
        self.pipe, self.reward, self.template = pipe, reward, template
        self.measure = measure  # images of one candidate -> its set-level terms (evaluators.set_measure)
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.steps, self.guidance, self.size = steps, guidance, size
        self.cache = cache
        self.batch_size = batch_size  # images per pipeline call; 0 = all at once
        # (seed, prompt) order: image i is prompt i % P with seed i // P
        self.image_prompts = [p for _ in self.seeds for p in self.prompts]
        self.image_seeds = [s for s in self.seeds for _ in self.prompts]

    alive = 1  # the evaluator protocol: evaluators scoring (evaluators.py)

    def close(self) -> None:
        """The evaluator protocol's close: nothing is held outside this process."""

    def __call__(self, values: np.ndarray, keep_images: bool = False) -> Evaluation:
        return self.score([values], keep_images=keep_images)[0]

    def score(self, candidates: Sequence[np.ndarray], plan: Sequence[np.ndarray] | None = None,
              against: Any = None, keep_images: bool = False) -> list[Evaluation]:
        """Evaluate candidates together: each pipeline call holds every candidate's images (`--workers`).

        `plan`: the image indices of each chunk, the same for every candidate (race.py); None: every image in one
        chunk, in order. After each chunk but the last, `against.stop(c, scored, rewards)` (race.Against: candidate
        c, the indices of its images scored so far and their rewards) says why candidate c stops there, or None;
        `against` None stops nothing (the baseline, a plain search). A candidate with a NaN or inf reward stops at
        once (it is failed whatever its other images score). The others go on together.

        One candidate runs under `apply` (its weights bit for bit those of `bake`); several share the batch
        under `per_sample`, equal up to float rounding. Each chunk's time is split evenly among the candidates
        that ran it.
        """
        masksets = [self.template.with_values(v) for v in candidates]
        w, n = len(masksets), len(self.image_prompts)
        # a raced chunk's cache entries weigh their share of the images; a whole evaluation's (its --batch-size
        # calls included) weigh 1, as --cache counts them
        chunks, weigh = (plan, True) if plan is not None else ([np.arange(n)], False)
        rewards = np.full((w, n), np.nan)
        scored = np.zeros((w, n), dtype=bool)
        hits, calls, seconds = [0] * w, [0] * w, [0.0] * w
        stopped: list[str | None] = [None] * w
        kept: list[list[tuple[np.ndarray, torch.Tensor]]] = [[] for _ in range(w)]  # set-level terms, keep_images
        active = list(range(w))
        with full_fp32(self.pipe.unet.device):  # sampling and scoring alike
            for j, chunk in enumerate(chunks):
                if not active:
                    break
                t0 = time.perf_counter()
                step = self.batch_size or len(chunk)
                parts = [chunk[s:s + step] for s in range(0, len(chunk), step)]
                # tags (chunk, offset): a chunk's cache entries serve the same chunk of later candidates
                per, h, cl = self._images([masksets[c] for c in active], parts,
                                          [(j, s) for s in range(0, len(chunk), step)], weigh)
                scores = self._score(torch.cat(per), [self.image_prompts[i] for i in chunk] * len(active))
                m = len(chunk)
                for a, c in enumerate(active):
                    rewards[c, chunk] = scores[a * m:(a + 1) * m].double().numpy()
                    scored[c, chunk] = True
                    hits[c], calls[c] = hits[c] + h[a], calls[c] + cl[a]
                    if self.measure is not None or keep_images:
                        kept[c].append((chunk, per[a]))
                dt = (time.perf_counter() - t0) / len(active)
                for c in active:
                    seconds[c] += dt
                if j == len(chunks) - 1:
                    break
                going = []
                for c in active:
                    idx = np.flatnonzero(scored[c])
                    if not np.isfinite(rewards[c, idx]).all():
                        stopped[c] = "a reward is NaN or inf"
                    elif against is not None:
                        stopped[c] = against.stop(c, idx, rewards[c, idx])
                    if stopped[c] is None:
                        going.append(c)
                active = going
        results = []
        for c in range(w):
            done = bool(scored[c].all())
            r = rewards[c][scored[c]]
            mean = float(r.mean()) if np.isfinite(r).all() else float("nan")
            images, measures = None, {}
            if done and kept[c]:
                order = np.concatenate([idx for idx, _ in kept[c]])
                images = torch.cat([im for _, im in kept[c]])[torch.as_tensor(np.argsort(order))]  # (seed, prompt) order
                if self.measure is not None:
                    measures = self.measure(images)
            results.append(Evaluation(mean, rewards[c].tolist(), seconds[c], hits[c], calls[c],
                                      images if keep_images else None, measures,
                                      None if done else scored[c].tolist(), stopped[c]))
        return results

    def _images(self, masksets: list[MaskSet], parts: Sequence[np.ndarray], tags: Sequence[Any], weigh: bool,
                ) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """Every candidate's images of the image indices in `parts` (one pipeline call each, cache tag
        `tags[i]`), concatenated per candidate; and per candidate its U-Net calls replayed and run.
        `weigh`: cache entries weigh their share of the images (else 1)."""
        w = len(masksets)
        unet = self.pipe.unet
        masking = apply(unet, masksets[0], check=False) if w == 1 else per_sample(unet, masksets)
        hits, calls = [0] * w, [0] * w
        images: list[list[torch.Tensor]] = [[] for _ in range(w)]
        with masking:
            for idx, tag in zip(parts, tags):
                m = len(idx)
                with stepping(unet, masksets, m, self.cache, tag, masking if w > 1 else None,
                              m / len(self.image_prompts) if weigh else 1.0) as run:
                    out = self._sample(idx, w)
                for c in range(w):
                    images[c].append(out[c * m:(c + 1) * m])
                    hits[c], calls[c] = hits[c] + run.hits[c], calls[c] + run.calls[c]
        return [torch.cat(chunks) for chunks in images], hits, calls

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The reward's scores; an exception inside a reward (often a user's function) becomes one line."""
        try:
            return torch.as_tensor(self.reward(images, prompts)).float().cpu()
        except MaskoptError:
            raise
        except Exception as e:
            logger.debug("the reward raised", exc_info=True)
            name = getattr(self.reward, "name", type(self.reward).__name__)
            raise MaskoptError(f"the reward {name} raised {type(e).__name__}: {first_line(e, empty='')} (-vv shows the traceback)") from e

    @torch.no_grad()
    def _sample(self, idx: np.ndarray, copies: int = 1) -> torch.Tensor:
        """The images of indices `idx`, `copies` times over (one copy per candidate), with the same latents in each."""
        device = self.pipe.unet.device
        generators = [torch.Generator(device="cpu").manual_seed(self.image_seeds[i]) for i in idx]
        kwargs = dict(height=self.size[0], width=self.size[1]) if self.size else {}
        # Latents drawn on the CPU per seed, so an image is the same on any device and in any batch.
        latents = self._latents(generators, kwargs).to(device)
        out = self.pipe(
            [self.image_prompts[i] for i in idx] * copies,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            latents=latents.repeat(copies, *([1] * (latents.dim() - 1))),
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

