"""What an exported U-Net variant takes and returns, and the shape ranges it is built for.

Every variant has the same signature (names are the contract with runtimes, Triton and TensorRT):

    sample                 (B, C_in, H, W)   float32   latents, H and W in latent units
    timestep               (1,)              float32   one timestep per call: masks are per bucket
    encoder_hidden_states  (B, S, D)         float32   text embeddings
    text_embeds            (B, E)            float32   SDXL only (pooled text embedding)
    time_ids               (B, 6)            float32   SDXL only (size/crop conditioning)
    -> out_sample          (B, C_out, H, W)  float32

B, S, H and W are dynamic in the ONNX files. A `ShapeProfile` is the box of U-Net-call shapes an
engine is optimised for: batch already doubled for classifier-free guidance (the pipeline runs the
conditional and unconditional halves in one call), sizes in latent units.

    >>> p = profile_for(Range(1, 1, 4), Range(256, 512, 1024), classifier_free=True, vae_scale=8, seq=77, multiple=8)
    >>> p.batch, p.height
    (Range(min=2, opt=2, max=8), Range(min=32, opt=64, max=128))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MaskoptError

OUTPUT = "out_sample"
BASE_INPUTS = ("sample", "timestep", "encoder_hidden_states")
XL_INPUTS = ("text_embeds", "time_ids")
SDXL_TIME_IDS = 6  # original size (2) + crop top-left (2) + target size (2); the refiner's 5 is not handled


@dataclass(frozen=True)
class Range:
    """An inclusive min/opt/max range of one dimension (TensorRT's optimisation-profile triple)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 < self.min <= self.opt <= self.max:
            raise MaskoptError(f"range {self}: need 0 < min <= opt <= max")

    @classmethod
    def parse(cls, text: str, what: str = "range") -> "Range":
        """`"1:2:4"` -> Range(1, 2, 4); `"4"` -> Range(4, 4, 4)."""
        parts = str(text).split(":")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise MaskoptError(f"{what} {text!r}: expected MIN:OPT:MAX or one number, e.g. 1:1:4") from None
        if len(nums) == 1:
            nums *= 3
        if len(nums) != 3:
            raise MaskoptError(f"{what} {text!r}: expected MIN:OPT:MAX or one number, e.g. 1:1:4")
        if not 0 < nums[0] <= nums[1] <= nums[2]:
            raise MaskoptError(f"{what} {text!r}: need 0 < MIN <= OPT <= MAX")
        return cls(*nums)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def span(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}..{self.max}"

    def scaled(self, factor: int) -> "Range":
        return Range(self.min * factor, self.opt * factor, self.max * factor)

    def divided(self, factor: int) -> "Range":
        return Range(self.min // factor, self.opt // factor, self.max // factor)

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    @classmethod
    def from_list(cls, values: Any) -> "Range":
        return cls(*map(int, values))


@dataclass(frozen=True)
class Signature:
    """The inputs and output of a variant, derived from the U-Net's config."""

    in_channels: int
    out_channels: int
    context_dim: int
    text_embeds_dim: int | None = None  # SDXL: pooled text embedding width
    time_ids_dim: int | None = None  # SDXL: number of size/crop conditioning values

    @classmethod
    def from_unet(cls, unet: Any, time_ids: int = SDXL_TIME_IDS) -> "Signature":
        cfg = unet.config
        kw: dict[str, Any] = {}
        if cfg.addition_embed_type == "text_time":
            # diffusers packs [text_embeds, time embedding of each time id] into projection_class_embeddings_input_dim
            kw = dict(
                text_embeds_dim=cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim,
                time_ids_dim=time_ids,
            )
        elif cfg.addition_embed_type is not None or cfg.class_embed_type is not None or cfg.time_cond_proj_dim:
            raise MaskoptError(
                f"export handles SD- and SDXL-style U-Nets; this one has addition_embed_type="
                f"{cfg.addition_embed_type!r}, class_embed_type={cfg.class_embed_type!r}, "
                f"time_cond_proj_dim={cfg.time_cond_proj_dim!r}"
            )
        return cls(cfg.in_channels, cfg.out_channels, cfg.cross_attention_dim, **kw)

    @property
    def xl(self) -> bool:
        return self.text_embeds_dim is not None

    @property
    def input_names(self) -> tuple[str, ...]:
        return BASE_INPUTS + (XL_INPUTS if self.xl else ())

    def dims(self) -> dict[str, tuple[int | str, ...]]:
        """Every input's and the output's dims; strings name the dynamic ones."""
        d: dict[str, tuple[int | str, ...]] = {
            "sample": ("B", self.in_channels, "H", "W"),
            "timestep": (1,),
            "encoder_hidden_states": ("B", "S", self.context_dim),
        }
        if self.xl:
            d.update(text_embeds=("B", self.text_embeds_dim), time_ids=("B", self.time_ids_dim))
        d[OUTPUT] = ("B", self.out_channels, "H", "W")
        return d

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For torch.onnx.export: {name: {axis: symbol}}."""
        return {n: {i: s for i, s in enumerate(dims) if isinstance(s, str)} for n, dims in self.dims().items()
                if any(isinstance(s, str) for s in dims)}

    def shapes(self, batch: int, height: int, width: int, seq: int) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes of one U-Net call (no output)."""
        sizes = {"B": batch, "H": height, "W": width, "S": seq}
        return {n: tuple(sizes[s] if isinstance(s, str) else s for s in dims)
                for n, dims in self.dims().items() if n != OUTPUT}

    def random_inputs(self, shapes: dict[str, tuple[int, ...]], timestep: float, seed: int = 0) -> dict[str, np.ndarray]:
        """Random float32 inputs of these shapes (timestep set to `timestep`), for parity checks."""
        rng = np.random.default_rng(seed)
        feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items() if n != "timestep"}
        feeds["timestep"] = np.full(shapes["timestep"], timestep, dtype=np.float32)
        return {n: feeds[n] for n in self.input_names}

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [{"name": n, "dtype": "float32", "shape": list(self.dims()[n])} for n in self.input_names],
            "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": list(self.dims()[OUTPUT])}],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Signature":
        shape = {i["name"]: i["shape"] for i in [*d["inputs"], *d["outputs"]]}
        xl = "text_embeds" in shape
        return cls(
            in_channels=int(shape["sample"][1]),
            out_channels=int(shape[OUTPUT][1]),
            context_dim=int(shape["encoder_hidden_states"][2]),
            text_embeds_dim=int(shape["text_embeds"][1]) if xl else None,
            time_ids_dim=int(shape["time_ids"][1]) if xl else None,
        )


@dataclass(frozen=True)
class ShapeProfile:
    """The U-Net-call shapes an engine accepts: batch (CFG doubling included) and latent height/width."""

    batch: Range
    height: Range
    width: Range
    seq: int
    vae_scale: int = 8  # pixels per latent, to name ranges in image sizes in errors

    def shapes(self, sig: Signature) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min shape, opt shape, max shape)}: what a TensorRT optimisation profile holds."""
        lo = sig.shapes(self.batch.min, self.height.min, self.width.min, self.seq)
        opt = sig.shapes(self.batch.opt, self.height.opt, self.width.opt, self.seq)
        hi = sig.shapes(self.batch.max, self.height.max, self.width.max, self.seq)
        return {n: (lo[n], opt[n], hi[n]) for n in sig.input_names}

    def verify_shapes(self) -> list[tuple[int, int, int]]:
        """Two (batch, height, width) points inside the profile to check parity at: the optimum, and a
        non-square one at another batch size where the profile allows it."""
        first = (self.batch.opt, self.height.opt, self.width.opt)
        batch = self.batch.min if self.batch.min != self.batch.opt else self.batch.max
        second = (batch, self.height.min, self.width.opt)
        return [first] if second == first else [first, second]

    def check(self, batch: int, height: int, width: int, seq: int | None = None) -> None:
        """Refuse a U-Net call outside the profile, naming the allowed ranges."""
        bad = []
        if not self.batch.min <= batch <= self.batch.max:
            bad.append(f"batch {batch} (U-Net batch, CFG doubled) is outside {self.batch.span()}")
        for what, value, r in (("height", height, self.height), ("width", width, self.width)):
            if not r.min <= value <= r.max:
                bad.append(f"{what} {value * self.vae_scale} px (latent {value}) is outside "
                           f"{r.min * self.vae_scale}..{r.max * self.vae_scale} px (latent {r.span()})")
        if seq is not None and seq != self.seq:
            bad.append(f"text length {seq} is not the engine's {self.seq}")
        if bad:
            raise MaskoptError("shape outside the engine's profile: " + "; ".join(bad))

    def to_dict(self, sig: Signature | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "batch": self.batch.to_list(), "height": self.height.to_list(), "width": self.width.to_list(),
            "seq": self.seq, "vae_scale": self.vae_scale,
        }
        if sig is not None:
            d["shapes"] = {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in self.shapes(sig).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapeProfile":
        return cls(Range.from_list(d["batch"]), Range.from_list(d["height"]), Range.from_list(d["width"]),
                   int(d["seq"]), int(d.get("vae_scale", 8)))


def profile_for(batch: Range, size: Range, *, classifier_free: bool, vae_scale: int, seq: int,
                multiple: int, width: Range | None = None) -> ShapeProfile:
    """The profile for `batch` images per call, `size` pixels high and `width` (default: `size`) wide.

    With classifier-free guidance the pipeline runs the conditional and unconditional halves in one
    U-Net call, so the U-Net batch is twice the image batch. Sizes must be multiples of
    vae_scale * multiple (the U-Net's total downsampling), or its skip connections would not line up.
    """
    step = vae_scale * multiple
    width = width or size
    for value in size.to_list() + width.to_list():
        if value % step:
            raise MaskoptError(f"size {value} px: image sides must be multiples of {step} "
                               f"(VAE factor {vae_scale} x U-Net downsampling {multiple})")
    return ShapeProfile(batch=batch.scaled(2 if classifier_free else 1), height=size.divided(vae_scale),
                        width=width.divided(vae_scale), seq=seq, vae_scale=vae_scale)


def downsampling(unet: Any) -> int:
    """How much the U-Net shrinks its input: 2 per down block that has a downsampler (all but the last)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)
