"""Applying masks to a live U-Net (`apply`; `per_sample` for a batch of candidates) and folding them
into a standalone variant (`bake`).

Both go through `bucket_scales`: every unit's value becomes a factor on some output rows of some
parameters, and the factors of all units touching one parameter multiply into one row-scale vector.
`apply` and `bake` then compute `original * scale` with the same op, so a baked variant's weights are
bit for bit the weights `apply` uses in that bucket.

Backbone units (FreeU's b, units.py) scale no parameter but some input channels of some modules:
`bucket_inputs` gives one channel-scale vector per module, which `apply` multiplies in through a pre hook,
and which a baked variant carries as a buffer with the same hook (`scale_input`). Every hook goes through
hooks.py, by name.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from . import hooks
from .buckets import scalar_timestep
from .errors import MaskoptError
from .maskset import MaskSet

logger = logging.getLogger(__name__)


def bucket_scales(unet: nn.Module, masks: MaskSet, bucket: int) -> dict[str, torch.Tensor]:
    """{parameter name: row-scale vector (out,)} for every parameter some unit scales by a value != 1."""
    params = dict(unet.named_parameters())
    scales: dict[str, torch.Tensor] = {}
    for unit, value in masks.row(bucket).items():
        if value == 1.0:
            continue
        for pname, rows in unit.scales(unet):
            p = params[pname]
            s = scales.setdefault(pname, torch.ones(p.shape[0], dtype=torch.float64))
            s[rows] *= value
    return {n: s.to(params[n].dtype) for n, s in scales.items()}


def bucket_inputs(unet: nn.Module, masks: MaskSet, bucket: int) -> dict[str, torch.Tensor]:
    """{module name: input-channel scale vector (in,)} for every module some backbone unit scales by a value != 1."""
    scales: dict[str, torch.Tensor] = {}
    for unit, value in masks.row(bucket).items():
        if value == 1.0:
            continue
        for name, channels in unit.inputs(unet):
            module = unet.get_submodule(name)
            s = scales.setdefault(name, torch.ones(module.in_channels, dtype=torch.float64))
            s[channels] *= value
    # float32 on the U-Net's device: no host-to-device copy at every resnet call, and a half-precision U-Net
    # is scaled as FreeU scales it (by the float, the product rounded once)
    p = next(unet.parameters())
    return {n: s.to(device=p.device, dtype=torch.float32) for n, s in scales.items()}


def _scale_first(args: tuple, kwargs: dict, scale: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) with the module's first input (a ResnetBlock2D's input_tensor) times `scale`, which
    broadcasts over it: (1 or batch, channels, 1, 1)."""
    if args:
        return (_times(args[0], scale), *args[1:]), kwargs
    return args, {**kwargs, "input_tensor": _times(kwargs["input_tensor"], scale)}


def _times(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * scale in x's dtype; a half-precision x is multiplied in float32 and rounded once, as FreeU's
    `x * b` with a Python float is (a float32 x: the same single multiply)."""
    if x.dtype == scale.dtype:
        return x * scale
    return (x.float() * scale.float()).to(x.dtype)


def scale_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward pre-hook of a baked variant's module: its input times its `maskopt_input_scale` buffer."""
    return _scale_first(args, kwargs, module.maskopt_input_scale)


def scaled(original: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """original with output row i multiplied by scale[i] (rows are dim 0 for Linear, Conv2d and biases)."""
    return original * scale.to(original.device).view(-1, *([1] * (original.dim() - 1)))


class Applied:
    """`apply(unet, masks)`: run `unet` with `masks`; each call uses the values of the bucket holding its timestep.

    Weights are rewritten only when the bucket changes (K writes per sampled image, none per step
    otherwise), no layer is computed twice, and on exit, also after an exception, every parameter is
    restored bit for bit from the copy taken on entry.

        >>> from maskopt import Buckets, MaskSet, find_units
        >>> from maskopt.models import load_pipeline
        >>> pipe = load_pipeline("maskopt:default")
        >>> masks = MaskSet.ones(pipe.unet, find_units(pipe.unet, "paper"), Buckets.uniform(4))
        >>> masks = masks.with_values(masks.values * 0.9)
        >>> with apply(pipe.unet, masks) as state:
        ...     _ = pipe("a handwritten 7", num_inference_steps=8)
        >>> state.loads   # weights were rewritten once per bucket the sampler visited
        4
    """

    def __init__(self, unet: nn.Module, masks: MaskSet, check: bool = True) -> None:
        if check:
            masks.check(unet)
        self.unet, self.masks = unet, masks
        self.bucket: int | None = None  # bucket whose weights are loaded; None = original weights
        self.loads = 0
        self._scales = [bucket_scales(unet, masks, k) for k in range(len(masks.buckets))]
        touched = sorted({n for s in self._scales for n in s})
        self._params = {n: unet.get_parameter(n) for n in touched}
        self._inputs = [{n: v.view(1, -1, 1, 1) for n, v in bucket_inputs(unet, masks, k).items()}
                        for k in range(len(masks.buckets))]
        self._original: dict[str, torch.Tensor] = {}
        self._hooks = hooks.Hooks()

    def __enter__(self) -> "Applied":
        if hooks.has(self.unet, "maskopt.bucket"):
            raise MaskoptError("masks are already applied to this U-Net; leave that `apply` block first")
        self._original = {n: p.detach().clone() for n, p in self._params.items()}
        self._hooks.add(self.unet, "maskopt.bucket", pre=self._pre_forward)
        for name in sorted({n for s in self._inputs for n in s}):  # backbone units: scaled inputs
            self._hooks.add(self.unet.get_submodule(name), "maskopt.inputs", pre=self._input_hook(name))
        return self

    def _input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            scale = self._inputs[self.bucket].get(name) if self.bucket is not None else None
            return None if scale is None else _scale_first(args, kwargs, scale)

        return hook

    def __exit__(self, *exc: Any) -> None:
        self._hooks.remove()
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(self._original[n])
        self._original, self.bucket = {}, None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.load(self.masks.buckets.index(scalar_timestep(timestep)))

    def load(self, bucket: int) -> None:
        """Put bucket `bucket`'s weights in place (no-op if they already are)."""
        if bucket == self.bucket:
            return
        scales = self._scales[bucket]
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(scaled(self._original[n], scales[n]) if n in scales else self._original[n])
        self.bucket = bucket
        self.loads += 1
        logger.debug("loaded bucket %d weights (%d parameters scaled)", bucket, len(scales))


class PerSample:
    """`per_sample(unet, masksets)`: run `unet` on a batch whose samples each use one of several mask sets (one batch, several candidates).

    `apply` rewrites weights, so one batch can only see one mask set. Here the weights stay as they
    are and forward hooks rescale the output of every touched layer per sample instead: a layer whose
    weight rows are scaled by s_w and bias rows by s_b outputs s_w * (y - b) + s_b * b, where y is its
    unmasked output. That is the same function; numbers agree with `apply` up to float rounding.
    Call `gate.select(bucket, owner)` before each forward: owner[i] is the mask set of sample i.
    """

    def __init__(self, unet: nn.Module, masksets: list[MaskSet]) -> None:
        self.bucket, self.owner = 0, torch.zeros(0, dtype=torch.long)
        self._hooks = hooks.Hooks()
        self._unet = unet
        n, k = len(masksets), len(masksets[0].buckets)
        per_param = [[bucket_scales(unet, m, b) for b in range(k)] for m in masksets]
        touched = sorted({p.rsplit(".", 1)[0] for rows in per_param for s in rows for p in s})
        self._layers: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        # backbone units: {module name: (input scales (k, n, in), active (k, n))}
        per_input = [[bucket_inputs(unet, m, b) for b in range(k)] for m in masksets]
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in sorted({i for rows in per_input for s in rows for i in s}):
            module = unet.get_submodule(name)
            si = torch.ones(k, n, module.in_channels, dtype=torch.float32)
            for c in range(n):
                for b in range(k):
                    if name in per_input[c][b]:
                        si[b, c] = per_input[c][b][name]
            self._inputs[name] = (si.to(next(unet.parameters()).device), (si != 1).any(-1))
        for name in touched:
            layer = unet.get_submodule(name)
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise MaskoptError(f"layer {name!r} is a {type(layer).__name__}: per-sample masks (--workers > 1) "
                                   "scale nn.Linear and nn.Conv2d outputs only")
            dtype, out = layer.weight.dtype, layer.weight.shape[0]
            sw = torch.ones(k, n, out, dtype=dtype)
            sb = torch.ones(k, n, out, dtype=dtype) if layer.bias is not None else None
            for c in range(n):
                for b in range(k):
                    s = per_param[c][b]
                    if f"{name}.weight" in s:
                        sw[b, c] = s[f"{name}.weight"]
                    if sb is not None and f"{name}.bias" in s:
                        sb[b, c] = s[f"{name}.bias"]
            active = (sw != 1).any(-1) | ((sb != 1).any(-1) if sb is not None else False)  # (k, n)
            if sb is not None and torch.equal(sw, sb):
                sb = None  # the whole output scales: no need to split off the bias
            device = layer.weight.device
            self._layers[name] = (layer, sw.to(device), None if sb is None else sb.to(device), active)

    def __enter__(self) -> "PerSample":
        for name, (layer, *_) in self._layers.items():
            self._hooks.add(layer, "maskopt.per_sample", post=self._hook(name))
        for name in self._inputs:
            self._hooks.add(self._unet.get_submodule(name), "maskopt.per_sample", pre=self._input_hook(name))
        return self

    def _input_hook(self, name: str) -> Any:
        scales, active = self._inputs[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            owner = self.owner
            if not active[self.bucket][owner].any():
                return None
            return _scale_first(args, kwargs, scales[self.bucket][owner.to(scales.device)].unsqueeze(-1).unsqueeze(-1))

        return hook

    def __exit__(self, *exc: Any) -> None:
        self._hooks.remove()

    def select(self, bucket: int, owner: torch.Tensor) -> None:
        self.bucket, self.owner = bucket, owner

    def _hook(self, name: str) -> Any:
        layer, sw, sb, active = self._layers[name]

        def hook(module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
            owner = self.owner
            if not active[self.bucket][owner].any():
                return None
            owner = owner.to(y.device)
            # output channels: dim 1 for Conv2d, the last dim for Linear
            shape = (len(owner), -1, 1, 1) if isinstance(layer, nn.Conv2d) else (len(owner),) + (1,) * (y.dim() - 2) + (-1,)
            w = sw[self.bucket][owner].view(shape)
            if sb is None:
                return y * w
            b = layer.bias.view(shape[1:])
            return (y - b) * w + b * sb[self.bucket][owner].view(shape)

        return hook


def apply(unet: nn.Module, masks: MaskSet, check: bool = True) -> Applied:
    """Masks on a live U-Net for a `with` block (see `Applied`)."""
    return Applied(unet, masks, check)


def per_sample(unet: nn.Module, masksets: list[MaskSet]) -> PerSample:
    """Several candidates' masks on one batch for a `with` block (see `PerSample`)."""
    return PerSample(unet, masksets)


def bake(unet: nn.Module, masks: MaskSet, bucket: int, drop: bool = False, check: bool = True) -> nn.Module:
    """A standalone copy of `unet` with bucket `bucket`'s values folded into its weights.

    Its output equals `apply`'s for timesteps in that bucket. With `drop=True`, what the values remove
    is not computed at all (see drop.py): the variant is cheaper, equal within float tolerance, and
    meant for inference and export (its state dict lacks the dropped layers).
    """
    if check:
        masks.check(unet)
    if not 0 <= bucket < len(masks.buckets):
        raise IndexError(f"bucket {bucket} out of range: the mask set has {len(masks.buckets)} buckets")
    if hooks.has(unet, "maskopt.bucket"):
        # inside `apply` the weights are some bucket's, not the originals: baking them would scale twice
        raise MaskoptError("cannot bake a U-Net while masks are applied to it; bake outside the `apply` block")
    variant = copy.deepcopy(unet)
    # Every module a backbone unit touches gets its scale, 1s included, so that all buckets' variants share one
    # graph (--refit loads each bucket's scales into one engine). Read off the original: drop may replace modules.
    inputs = bucket_inputs(unet, masks, bucket)
    p = next(unet.parameters())
    for name in sorted({n for u in masks.units for n, _ in u.inputs(unet)}):
        inputs.setdefault(name, torch.ones(unet.get_submodule(name).in_channels, dtype=torch.float32, device=p.device))
    with torch.no_grad():
        for n, s in bucket_scales(variant, masks, bucket).items():
            p = variant.get_parameter(n)
            p.copy_(scaled(p, s))
    if drop:
        from .drop import drop_removed

        drop_removed(variant, masks, bucket)
    for name, s in inputs.items():  # after drop: on the module that runs
        module = variant.get_submodule(name)
        # (1, C, 1, 1): a plain constant into the Mul of the exported graph. Not persistent: the state dict stays the U-Net's
        module.register_buffer("maskopt_input_scale", s.view(1, -1, 1, 1), persistent=False)
        hooks.register(module, "maskopt.input_scale", pre=scale_input)
    return variant.eval()
