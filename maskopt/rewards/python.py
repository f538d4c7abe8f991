"""A reward written as a plain Python function: ``python:module:function``.

    >>> import sys, torch
    >>> from pathlib import Path
    >>> from maskopt.rewards import load_reward
    >>> _ = Path("my_rewards.py").write_text('''
    ... def brightness(images, prompts):       # images (b, 3, H, W) in [0, 1], prompts: b strings
    ...     return images.mean(dim=(1, 2, 3))  # b scores: a tensor, a numpy array or a list
    ... ''')
    >>> sys.path.insert(0, str(Path.cwd()))    # the module must be importable
    >>> reward = load_reward("python:my_rewards:brightness")   # --reward python:my_rewards:brightness
    >>> reward(torch.full((2, 3, 8, 8), 0.25), ["a cat", "a dog"])
    tensor([0.2500, 0.2500])

The module must be importable (on sys.path). The function sees slices of at most batch_size
images; whatever it returns is converted to a float32 CPU tensor and must hold one score per image.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from ..errors import MaskoptError
from .base import batched

PREFIX = "python:"


class PythonReward:
    def __init__(self, fn: Callable[[torch.Tensor, list[str]], Any], name: str, batch_size: int = 32):
        self.fn = fn
        self.name = name
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return batched(self._score, images, prompts, self.batch_size)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        result = self.fn(images, prompts)
        try:
            if isinstance(result, (list, tuple)):
                result = [float(x) for x in result]  # also unwraps 0-d tensors and numpy scalars
            scores = torch.as_tensor(result).detach().to(device="cpu", dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise MaskoptError(f"reward {self.name} returned {type(result).__name__}, not numbers: {err}") from err
        if scores.numel() != len(prompts):
            raise MaskoptError(
                f"reward {self.name} returned {scores.numel()} scores (shape {tuple(scores.shape)}) "
                f"for {len(prompts)} images"
            )
        return scores.reshape(-1)


def load(spec: str) -> PythonReward:
    """PythonReward for "python:module:function"; MaskoptError naming the part that fails."""
    parts = spec.removeprefix(PREFIX).split(":")
    if not spec.startswith(PREFIX) or len(parts) != 2 or not all(p.strip() for p in parts):
        raise MaskoptError(f"bad reward '{spec}': write it as python:module:function")
    module_name, fn_name = (p.strip() for p in parts)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise MaskoptError(f"reward '{spec}': cannot import module '{module_name}' ({err})") from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise MaskoptError(f"reward '{spec}': module '{module_name}' has no function '{fn_name}'")
    return PythonReward(fn, name=spec)
