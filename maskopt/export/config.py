"""What an export is asked to build (`ExportConfig`), every refusal that needs no model, and its shape profile."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MaskoptError
from ..paths import check_out
from ..sampler import Sampler, classifier_free
from .shapes import Range, ShapeProfile, downsampling, profile_for

logger = logging.getLogger(__name__)

DEFAULT_BATCH = Range(1, 1, 4)


@dataclass(frozen=True)
class ExportConfig:
    masks: Path
    out: Path
    model: str | None = None  # default: the mask file's source (models.model_for)
    onnx: bool = True  # keep the ONNX variants (with trt=False this is the only output)
    trt: bool = False  # one TensorRT engine per variant (unet_b{k}.plan)
    fp16: bool = False
    opset: int = 17
    batch: Range = DEFAULT_BATCH  # images per call; the U-Net batch is twice that with classifier-free guidance
    size: Range | None = None  # image side in pixels, both sides; default: half, one and two times the searched ones
    classifier_free: bool | None = None  # profiles for a doubled U-Net batch; default: as searched (guidance > 1)
    drop: bool = False  # skip what the masks remove (cheaper variants; no --refit)
    refit: bool = False  # one refittable engine + one weight set per bucket instead of K engines
    triton: bool = False
    triton_instances: int = 4  # router instances: requests served at once (each waits on its variant's answer)
    workspace_gb: float | None = None
    timing_cache: Path | None = None  # shared by all variants' builds; kept only when given
    optimization_level: int = 3
    force: bool = False  # replace an existing, non-empty `out`
    atol: float | None = None  # parity tolerances; default per precision (verify.TOLERANCES)
    rtol: float | None = None
    time_ids: int = 6  # SDXL's conditioning values (the refiner's 5 would go here)
    external_data_threshold: int | None = None  # bytes; default: the 2 GB protobuf limit

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"


def check_options(config: ExportConfig) -> None:
    """Every refusal that needs no model: fail at once, before any export work."""
    from .onnx import check_opset

    if not config.onnx and not config.trt:
        raise MaskoptError("nothing to export: ask for --onnx and/or --trt")
    if config.refit and not config.trt:
        raise MaskoptError("--refit builds one refittable TensorRT engine: add --trt")
    if config.refit and config.drop:
        raise MaskoptError("--refit needs one graph for every bucket, but --drop removes different layers per bucket")
    if config.trt:
        from .trt import require_tensorrt

        require_tensorrt()
    if config.triton_instances < 1:
        raise MaskoptError(f"--triton-instances must be at least 1, got {config.triton_instances}")
    if config.triton:
        from .triton import model_config_module

        model_config_module()
        if config.refit and not config.onnx:
            raise MaskoptError("Triton's TensorRT backend cannot refit: add --onnx to serve the ONNX variants, "
                               "or drop --refit")
    check_opset(config.opset)
    if config.timing_cache is not None and not Path(config.timing_cache).parent.is_dir():
        raise MaskoptError(f"--timing-cache {config.timing_cache}: its folder does not exist")
    check_out(Path(config.out), "add --force to replace it", config.force)  # the export is staged beside it
    if Path(config.masks).is_dir():
        raise MaskoptError(f"mask file {config.masks} is a folder; give its masks.json")
    if not Path(config.masks).is_file():
        raise MaskoptError(f"mask file {config.masks} does not exist")


def doubles_batch(config: ExportConfig, searched: Sampler, unet: Any) -> bool:
    """Whether the profiles double the U-Net batch: as asked, else as the masks were searched, else yes (unknown).

    A choice that departs from the searched guidance gets one warning: a pipeline that runs the masks as
    searched calls the U-Net with the other batch, which the engines' profile would refuse.
    """
    was = None if searched.guidance is None else classifier_free(searched.guidance, unet.config)
    if config.classifier_free is None:
        if was is None:
            logger.info("the mask file records no guidance: profiles for classifier-free guidance "
                        "(--no-classifier-free for none)")
        return True if was is None else was
    if was is not None and config.classifier_free != was:
        flag = "--classifier-free" if config.classifier_free else "--no-classifier-free"
        logger.warning("%s: the masks were searched at guidance %g, so a pipeline that samples as searched runs %s "
                       "classifier-free guidance", flag, searched.guidance, "with" if was else "without")
    return config.classifier_free


def build_profile(config: ExportConfig, unet: Any, geometry: tuple[int, int], searched: Sampler) -> ShapeProfile:
    """The engines' shape box: --batch and --size (both sides), or, per side, half, one and two times the
    searched height and width (the U-Net's own size when the mask file records none); the U-Net batch
    doubled as `doubles_batch` decides."""
    vae_scale, seq = geometry
    multiple = downsampling(unet)
    step = vae_scale * multiple
    if config.size is not None:
        height = width = config.size
    else:
        native = int(unet.config.sample_size) * vae_scale
        h, w = searched.size or (native, native)
        snapped = (-(-h // step) * step, -(-w // step) * step)  # up to a side the U-Net's skip connections take
        if snapped != (h, w):
            logger.warning("the masks were searched at %dx%d px, which this U-Net runs only at multiples of %d px: "
                           "the profile is built around %dx%d (--size sets it)", h, w, step, *snapped)
        height, width = (Range(max(s // 2 // step * step, step), s, 2 * s) for s in snapped)
    return profile_for(config.batch, height, width=width, classifier_free=doubles_batch(config, searched, unet),
                       vae_scale=vae_scale, seq=seq, multiple=multiple)
