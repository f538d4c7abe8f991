"""What every reward shares: the contract, input checks, batching, and finding weight files.

A reward is any object with ``name: str``, ``batch_size: int`` and
``__call__(images (B, 3, H, W) float in [0, 1], prompts: B strings) -> (B,) float32 CPU tensor``,
higher is better. ``Reward`` below writes that down for type checkers; nothing subclasses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from ..errors import MaskoptError, first_line
from ..sources import local_or_hub


class Reward(Protocol):
    name: str
    batch_size: int

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


def check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise MaskoptError unless images is (B, 3, H, W) floating point and there are B prompts."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MaskoptError(f"reward images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise MaskoptError(f"reward images must be float in [0, 1] (output_type='pt'), got {images.dtype}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise MaskoptError(f"reward needs one prompt per image: {images.shape[0]} images, {got}")


def batched(
    score: Callable[[torch.Tensor, list[str]], torch.Tensor],
    images: torch.Tensor,
    prompts: Sequence[str],
    batch_size: int,
) -> torch.Tensor:
    """Check the inputs, call score on slices of at most batch_size, return (B,) float32 on CPU.

    Slicing here bounds peak memory (a ViT-H forward on 64 images at 224 px is several GiB).
    """
    check_inputs(images, prompts)
    if batch_size < 1:
        raise MaskoptError(f"reward batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    out = []
    for i in range(0, len(prompts), batch_size):
        scores = score(images[i : i + batch_size], prompts[i : i + batch_size])
        out.append(scores.detach().reshape(-1).to(device="cpu", dtype=torch.float32))
    return torch.cat(out) if out else torch.zeros(0)


def resolve_checkpoint(source: str | None, default: str, suffixes: tuple[str, ...] = (".pt", ".pth")) -> str:
    """Local path of a single-file checkpoint (a .pt/.pth state dict).

    source is one of:
    - None: ``default``, a hub file spelled "org/name/path/in/repo.pt";
    - an existing file: itself;
    - an existing directory: the one file in it ending in one of ``suffixes``;
    - "org/name/path/in/repo.pt": that file of that hub repo (``hf_hub_download``);
    - "org/name": that hub repo, with the file name of ``default``.
    Anything else (a local path that does not exist) is refused by `sources.local_or_hub`.
    """
    where = local_or_hub(default if source is None else source, "checkpoint", files=True)
    if isinstance(where, Path):
        if where.is_file():
            return str(where)
        found = sorted(f for f in os.listdir(where) if f.endswith(suffixes))
        if len(found) != 1:
            raise MaskoptError(
                f"directory {source} must hold exactly one {'/'.join(suffixes)} checkpoint, found {found or 'none'}"
            )
        return str(where / found[0])
    parts = where.split("/")
    filename = "/".join(parts[2:]) or default.split("/", 2)[2]
    from huggingface_hub import hf_hub_download  # lazy: importing maskopt.rewards stays cheap

    return hf_hub_download("/".join(parts[:2]), filename)


def optional_file(source: str, filename: str) -> str | None:
    """Local path of filename in a local directory or hub repo, or None when the repo lacks it."""
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        path = os.path.join(expanded, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(source, filename)
    except LocalEntryNotFoundError:
        raise  # offline and not cached: we cannot tell whether the repo has it, so do not guess
    except EntryNotFoundError:
        return None


def base_model_source(source: str | None, default: str) -> str:
    """Where the CLIP model that goes with a bare checkpoint comes from (config, tokenizer, preprocessing).

    A local directory that holds a config.json provides its own; anything else uses ``default``,
    so ``hpsv2@/models/HPS_v2.1_compressed.pt`` still finds ViT-H-14's config on the hub.
    """
    if source is not None:
        expanded = os.path.expanduser(source)
        if os.path.isfile(os.path.join(expanded, "config.json")):
            return expanded
    return default


def reward_name(kind: str, source: str | None) -> str:
    """The spec that loads this reward again: "clip" or "clip@/models/clip"."""
    return kind if source is None else f"{kind}@{source}"


def load_checkpoint(path: str, what: str) -> Any:
    """torch.load(path, weights_only=True): tensors and plain containers only, never code. A pickle that
    needs more (or a file that is no checkpoint) is a one-line error naming it."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise MaskoptError(f"{what} checkpoint {path} cannot be loaded as plain tensors "
                           f"(torch.load weights_only=True): {first_line(e)[:200]}") from None


def fit(state: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
    """How a state dict misses a model's: (keys not filled, keys it lacks, keys of another shape), each sorted."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    return missing, extra, wrong
