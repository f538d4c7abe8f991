"""Skipping what a bucket's values remove, for `bake(..., drop=True)`.

After the values are folded in, a removed unit computes a constant or nothing:

    nn.Linear / nn.Conv2d with an all-zero weight  ->  its (already scaled) bias, broadcast
    ResnetBlock2D branch at 0                      ->  the skip path only: shortcut(x) / output_scale_factor
    attn2 of a BasicTransformerBlock at 0          ->  None (the block then skips norm2 and attn2)
    attn1 / ff of a BasicTransformerBlock at 0     ->  zeros (the block adds them to its residual)
    Transformer2DModel at 0                        ->  identity (the residual alone)

Outputs equal the non-dropped baked variant within float tolerance (the dropped terms were exact zeros).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .maskset import MaskSet

logger = logging.getLogger(__name__)


class LinearBias(nn.Module):
    """A zeroed nn.Linear: its output is its bias, whatever the input."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.out_features = layer.out_features
        bias = layer.bias.detach().clone() if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: a zero-stride view makes some downstream CPU kernels (attention) several times slower
        return self.bias.to(x.dtype).expand(*x.shape[:-1], self.out_features).contiguous()


class Conv2dBias(nn.Module):
    """A zeroed nn.Conv2d: its bias, broadcast to the shape the convolution would have produced."""

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__()
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation
        if isinstance(self.padding, str):
            raise NotImplementedError("string padding")  # diffusers U-Nets use integer padding
        bias = layer.bias.detach().clone() if layer.bias is not None else layer.weight.new_zeros(layer.out_channels)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)
        )
        return self.bias.to(x.dtype).view(1, -1, 1, 1).expand(x.shape[0], -1, h, w).contiguous()


class ResnetSkip(nn.Module):
    """A ResnetBlock2D whose residual branch is removed: only the skip path is left."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.upsample, self.downsample = block.upsample, block.downsample
        self.conv_shortcut = block.conv_shortcut
        self.output_scale_factor = block.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if self.upsample is not None:
            input_tensor = self.upsample(input_tensor)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor / self.output_scale_factor


class ZeroBranch(nn.Module):
    """attn1 or ff removed: the block adds this to its residual, so it returns zeros of the input's shape."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class IdentityTransformer(nn.Module):
    """A Transformer2DModel whose branch is removed: its output is its input (the residual)."""

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return (hidden_states,) if not return_dict else Transformer2DModelOutput(sample=hidden_states)


def _replace(root: nn.Module, name: str, new: nn.Module | None) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def drop_removed(variant: nn.Module, masks: MaskSet, bucket: int) -> list[str]:
    """Swap in cheap stand-ins for what bucket `bucket` removes; returns the replaced module names."""
    removed = masks.removed(bucket)
    branches = sorted({u.name for u in removed if u.kind == "branch"})
    # A branch removed wholesale makes its inner layers irrelevant; drop outer ones first.
    dropped: list[str] = []
    for name in branches:
        if any(name.startswith(d + ".") for d in dropped):
            continue
        module = variant.get_submodule(name)
        kind, leaf = type(module).__name__, name.rsplit(".", 1)[-1]
        if kind == "ResnetBlock2D":
            _replace(variant, name, ResnetSkip(module))
        elif kind == "Transformer2DModel":
            _replace(variant, name, IdentityTransformer())
        elif leaf == "attn2":
            _replace(variant, name, None)
        else:  # attn1, ff
            _replace(variant, name, ZeroBranch())
        dropped.append(name)
    # Layers whose whole weight is now zero (weight units at 0, or all their groups at 0).
    layers = sorted({u.name for u in masks.units if u.kind in ("weight", "group")})
    for name in layers:
        if any(name.startswith(d + ".") for d in dropped):
            continue
        layer = variant.get_submodule(name)
        if bool((layer.weight == 0).all()):
            _replace(variant, name, LinearBias(layer) if isinstance(layer, nn.Linear) else Conv2dBias(layer))
            dropped.append(name)
    logger.info("bucket %d: dropped %d modules", bucket, len(dropped))
    return dropped
