"""Rewards: score a batch of generated images against their prompts, higher is better.

    >>> import torch
    >>> from maskopt.rewards import load_reward
    >>> reward = load_reward("digits")                   # the embedded default's classifier
    >>> images = torch.rand(2, 3, 32, 32)                # (B, 3, H, W) in [0, 1]
    >>> reward(images, ["a handwritten 7", "the digit three"]).shape    # (B,) float32 on the CPU
    torch.Size([2])

Other specs: "clip" (openai/clip-vit-large-patch14), "hpsv2@/models/HPS_v2.1_compressed.pt" (a local
checkpoint), "imagereward=1,hpsv2=5" (a weighted sum: 1 x ImageReward + 5 x HPSv2),
"python:my_rewards:brightness" (any function(images, prompts) -> scores).

Spec grammar:
    spec     := term | weighted
    weighted := term "=" weight ("," term "=" weight)*      e.g. "clip=1,aesthetic@/m/mlp.pth=0.5"
    term     := name | name "@" source | "python:" module ":" function
    source   := a hub id ("org/name", for single files "org/name/file.pt") or a local path
A source may not contain "," or "=". Each reward's default source and formula are in its module.

A reward is any object with ``name``, ``batch_size`` and ``__call__(images, prompts)`` (see
``base.Reward``). ``REWARDS`` maps each name to the module that holds it: its ``load(source | None,
device, dtype) -> reward``, and, for a reward that reads its prompts, an optional
``check_prompts(prompts)`` that ``check`` calls before any model loads (the digits reward needs a digit
in every prompt). Heavy imports (transformers) happen inside the loaders, so importing
this is cheap.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Sequence

import torch

from ..errors import MaskoptError
from .base import Reward
from .python import PREFIX as PYTHON_PREFIX
from .python import load as load_python
from .weighted import WeightedSum

logger = logging.getLogger(__name__)

REWARDS: dict[str, str] = {
    "aesthetic": "maskopt.rewards.aesthetic",
    "clip": "maskopt.rewards.clip",
    "digits": "maskopt.default.reward",  # the embedded default's digit classifier (a CNN)
    "digits-kernel": "maskopt.default.judge",  # its second judge: a kernel classifier on 8x8 pixels
    "hpsv2": "maskopt.rewards.hpsv2",
    "imagereward": "maskopt.rewards.imagereward",
    "pickscore": "maskopt.rewards.pickscore",
}


def valid_names() -> str:
    return ", ".join(sorted(REWARDS) + [f"{PYTHON_PREFIX}module:function"])


def _parse_term(term: str) -> tuple[str, str | None]:
    """(name, source) of one term; python terms come back whole as the name. Loads nothing."""
    if term.startswith(PYTHON_PREFIX):
        return term, None
    name, at, source = (part.strip() for part in term.partition("@"))
    if name not in REWARDS:
        raise MaskoptError(f"unknown reward '{name}'; valid: {valid_names()}")
    if at and not source:
        raise MaskoptError(f"reward '{term}' has nothing after '@': give a hub id or a local path, or drop the '@'")
    return name, source or None


def finite_weight(weight: str, term: str) -> float:
    """The weight of a `name=weight` term, a finite number; MaskoptError naming the term otherwise."""
    try:
        w = float(weight)
    except ValueError:
        w = math.nan
    if not math.isfinite(w):
        raise MaskoptError(f"bad weight '{weight}' in reward term '{term}': give a finite number")
    return w


def _parse_weighted(spec: str) -> list[tuple[str, float]]:
    terms = []
    for part in spec.split(","):
        if not part.strip():
            raise MaskoptError(f"empty term in reward '{spec}'; write it as name=weight,name=weight")
        term, eq, weight = (p.strip() for p in part.rpartition("="))
        if not eq or not term:
            raise MaskoptError(f"reward term '{part.strip()}' needs a name and a weight, e.g. 'clip=1,aesthetic=0.5'")
        terms.append((term, finite_weight(weight, part.strip())))
    specs = [t for t, _ in terms]
    if len(set(specs)) != len(specs):
        raise MaskoptError(f"reward '{spec}' names a term twice; merge the weights instead")
    return terms


def _load_term(term: str, device: str, dtype: torch.dtype) -> Reward:
    name, source = _parse_term(term)
    if name.startswith(PYTHON_PREFIX):
        return load_python(term)
    logger.info("loading reward %s from %s on %s (%s)", name, source or "its default source", device, dtype)
    return importlib.import_module(REWARDS[name]).load(source, device, dtype)


def check_spec(spec: str) -> list[tuple[str, float]]:
    """(term, weight) pairs of a spec, every name checked, nothing loaded: a typo fails in a second."""
    spec = spec.strip()
    if not spec:
        raise MaskoptError(f"empty reward spec; valid: {valid_names()}")
    terms = [(spec, 1.0)] if "," not in spec and "=" not in spec else _parse_weighted(spec)
    for term, _ in terms:
        _parse_term(term)
    return terms


def check(spec: str, prompts: Sequence[str], where: str = "prompts") -> None:
    """Everything about a spec that can fail before a model loads: its names, its sources (a local path that
    exists, or a hub id), the modules and functions of its python: terms (imported), and the prompts of
    every reward that reads them (`check_prompts`; its error is prefixed with `where`)."""
    from ..sources import local_or_hub

    for term, _ in check_spec(spec):
        name, source = _parse_term(term)
        if name.startswith(PYTHON_PREFIX):
            load_python(name)
            continue
        if source is not None:
            local_or_hub(source, f"reward {name}'s source", files=True)
        check_prompts = getattr(importlib.import_module(REWARDS[name]), "check_prompts", None)
        if check_prompts is not None:
            try:
                check_prompts(list(prompts))
            except MaskoptError as e:
                raise MaskoptError(f"{where}: {e}") from None


def load_reward(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Reward:
    """The reward a spec names (grammar above); MaskoptError (a ValueError) naming the bad part."""
    spec = spec.strip()
    terms = check_spec(spec)
    if "," not in spec and "=" not in spec:
        return _load_term(spec, device, dtype)
    return WeightedSum([(term, w, _load_term(term, device, dtype)) for term, w in terms], name=spec)


__all__ = ["PYTHON_PREFIX", "REWARDS", "Reward", "WeightedSum", "check", "check_spec", "load_python", "load_reward",
           "valid_names"]
