"""Who scores a search's candidates: one protocol, a local and a Ray implementation, built by one factory.

The protocol (`Evaluators`): `score(group, plan, against) -> evaluations`, one `scoring.Evaluation` per
candidate of the group, in the group's order; `alive`, how many evaluators serve; `close()`. `plan` is the
racing plan (the image indices of each chunk, race.py) or None for every image at once; `against` what the
group races against (race.Against) or None. The local implementation is `scoring.Evaluator` itself, built by
`search_evaluator`; the Ray one is `cluster.RayEvaluators`, whose actors each build a local one here.
`cluster.search_evaluators` picks one of the two for a search.

This module sits below the search command and the cluster: the search driver, `maskopt eval` and the Ray
actors import from it, and it imports none of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from .buckets import Buckets
from .config import SearchConfig
from .maskset import MaskSet
from .scoring import Evaluation, Evaluator, TrajectoryCache

logger = logging.getLogger(__name__)


class Evaluators(Protocol):
    alive: int

    def score(self, group: Sequence[np.ndarray], plan: Sequence[np.ndarray] | None = None,
              against: Any = None) -> list[Evaluation]: ...

    def close(self) -> None: ...


@dataclass
class Loaded:
    """What a search loads once: the pipeline, the all-ones mask set over its units and buckets, the reward, and
    `measure_for(n_prompts)`, a candidate's images -> its set-level terms (None when the objective has none)."""

    pipe: Any
    template: MaskSet
    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]
    measure_for: Callable[[int], Any]

    @classmethod
    def load(cls, cfg: SearchConfig) -> "Loaded":
        from .rewards import load_reward

        pipe, template = load_model(cfg)
        return cls(pipe, template, load_reward(cfg.objective.reward, cfg.device), set_measure(cfg, cfg.size))


def load_model(cfg: SearchConfig) -> tuple[Any, MaskSet]:
    """The pipeline `cfg` names and its all-ones mask set over the searched units and buckets."""
    from .models import load_pipeline
    from .units import find_units

    pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype, cfg.scheduler)
    units = find_units(pipe.unet, cfg.targets, groups=cfg.groups)
    buckets = Buckets.uniform(cfg.buckets, int(pipe.scheduler.config.num_train_timesteps))
    return pipe, MaskSet.ones(pipe.unet, units, buckets, source=cfg.model)


def set_measure(cfg: SearchConfig, size: tuple[int, int]) -> Callable[[int], Any]:
    """`measure_for(n_prompts)`: a function from one candidate's images ((seed, prompt) order) to the set-level
    terms the objective uses, or None when it uses none. The feature model loads once, here."""
    objective = cfg.objective
    if not objective.measures:
        return lambda n_prompts: None
    from .default.data import load_split
    from .features import load_features, load_images
    from .measures import diversity, frechet
    from .models import EMBEDDED

    features = load_features(cfg.features, cfg.device)
    reference = None
    if "frechet" in objective.measures:  # real held-out digits for the embedded default
        reference = features(load_split("holdout")[0] if cfg.reference == EMBEDDED else load_images(cfg.reference, size))

    def measure_for(n_prompts: int) -> Callable[[Any], dict[str, float]]:
        def measure(images: Any) -> dict[str, float]:
            if not torch.isfinite(images).all():  # NaN images: no measure (the candidate is failed)
                return {t: math.nan for t in objective.measures}
            f = features(images)
            out = {}
            if "diversity" in objective.measures:
                out["diversity"] = float(diversity(f, n_prompts).mean())
            if "frechet" in objective.measures:
                out["frechet"] = frechet(f, reference)
            return out

        return measure

    return measure_for


def search_evaluator(cfg: SearchConfig, prompts: list[str], loaded: Loaded | None = None) -> Evaluator:
    """The local evaluator of a search's own images (its prompts x seeds, its cache); loads what is not given.
    A Ray actor (cluster.py) calls it with nothing loaded."""
    loaded = loaded or Loaded.load(cfg)
    return Evaluator(loaded.pipe, loaded.reward, loaded.template, prompts, range(cfg.seeds), cfg.steps, cfg.guidance,
                     cfg.size, cache=TrajectoryCache(cfg.cache) if cfg.cache > 0 else None, batch_size=cfg.batch_size,
                     measure=loaded.measure_for(len(prompts)))
