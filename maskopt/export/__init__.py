"""`maskopt export`: one verified U-Net variant per timestep bucket, as ONNX, TensorRT engines and Triton models.

    >>> from pathlib import Path
    >>> from maskopt import Buckets, MaskSet, find_units
    >>> from maskopt.export import ExportConfig, export
    >>> from maskopt.export.manifest import Manifest
    >>> from maskopt.models import load_unet
    >>> unet = load_unet("maskopt:default")
    >>> masks = MaskSet.ones(unet, find_units(unet, "paper"), Buckets.uniform(2), source="maskopt:default")
    >>> _ = masks.with_values(masks.values * 0.8).save("masks.json")
    >>> manifest = export(ExportConfig(masks=Path("masks.json"), out=Path("export"), drop=True, triton=True))
    >>> Manifest.load("export").variant_for(999).files["onnx"].path    # the variant serving timestep 999
    'unet_b1.onnx'

`ExportConfig(..., trt=True, fp16=True)` builds TensorRT engines too.

The flow reads top to bottom in `export()`: check options (`config.py`) -> load masks -> load U-Net
(fingerprint checked) -> for each bucket: bake -> ONNX (`onnx.py`) -> verify (`verify.py`) -> (engine,
`trt.py`) -> (Triton, `triton.py`) -> manifest (`manifest.py`). Everything is written into a staging
folder beside `out` and renamed into place at the end (`staging.py`). The profiles default to the
sampler the masks were searched with: its size, and a doubled U-Net batch only where it ran
classifier-free guidance.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import MaskoptError
from .config import ExportConfig, build_profile, check_options
from .manifest import FileEntry, Manifest, Variant, sha256
from .shapes import Range, ShapeProfile, Signature
from .staging import staged
from .verify import Verification, reference_cases, require_parity, tolerances

logger = logging.getLogger(__name__)


@dataclass
class _Built:
    """What one bucket produced, before the manifest exists."""

    files: dict[str, Path] = field(default_factory=dict)
    verify: dict[str, Verification] = field(default_factory=dict)
    cases: list[tuple] = field(default_factory=list)  # (feeds, float32 PyTorch outputs) to check engines with
    engine_inputs: list[str] | None = None  # what the engine kept (TensorRT drops inputs nothing reads)


def export(config: ExportConfig, progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Export every bucket's variant into `config.out`; returns the manifest written there.

    `progress(done, total)` is called as variants finish (ONNX written and verified, engine built).
    """
    from ..maskset import MaskSet
    from ..models import load_unet, model_for

    # 1. Check options, before any work
    check_options(config)
    # 2. Masks and U-Net
    masks = MaskSet.load(config.masks)
    model = model_for(config.model, masks.source)
    unet = load_unet(model)
    try:
        masks.check(unet)
    except MaskoptError as e:
        raise MaskoptError(f"mask file {config.masks}: {e}") from None
    sig = Signature.from_unet(unet, time_ids=config.time_ids)
    profile = build_profile(config, unet, _geometry(model), masks.sampler)
    with staged(config.out) as staging:
        # 3. For each bucket: bake -> ONNX -> verify -> (engine)
        built = [_export_bucket(config, unet, masks, k, sig, profile, staging) for k in _each(masks, progress)]
        engine = _engines(config, sig, profile, staging, built, masks) if config.trt else None
        if not config.onnx:  # ONNX was only the way to the engines
            for b in built:
                for role in ("onnx", "onnx_data"):
                    if role in b.files:
                        b.files.pop(role).unlink()
        # 4. Mask file copy, Triton repository, manifest
        shutil.copyfile(config.masks, staging / "masks.json")
        seen: dict = {}  # hashes by inode: shared and hard-linked files are read once
        triton = _triton(config, sig, masks, staging, built, seen) if config.triton else None
        manifest = Manifest(
            variants=tuple(
                Variant(k, masks.buckets.ranges[k], {r: FileEntry.of(staging, p, seen) for r, p in b.files.items()},
                        b.verify)
                for k, b in enumerate(built)
            ),
            signature=sig, profile=profile, precision=config.precision, opset=config.opset, drop=config.drop,
            masks={"file": "masks.json", "sha256": sha256(staging / "masks.json"),
                   "bytes": (staging / "masks.json").stat().st_size,
                   "fingerprint": masks.fingerprint, "source": masks.source, "sampler": masks.sampler.to_dict()},
            model=model, num_train_timesteps=masks.buckets.num_train_timesteps,
            engine=engine, triton=triton,
        )
        manifest.save(staging)
    return manifest


def _geometry(model: str) -> tuple[int, int]:
    """(VAE scale factor, text length) of the pipeline around the U-Net; SD's (8, 77) when unreadable."""
    from ..models import pipeline_info

    try:
        info = pipeline_info(model)
    except MaskoptError as e:  # a U-Net folder alone, an offline hub: fall back to SD's numbers
        logger.warning("could not read the pipeline's configs (%s); assuming VAE factor 8, text length 77", e)
        return 8, 77
    return info.vae_scale, info.text_length


def _each(masks: Any, progress: Callable[[int, int], None] | None) -> Iterator[int]:
    """The bucket indices, reporting (variants done, total) before the first and after each."""
    total = len(masks.buckets)
    for k in range(total):
        if progress and k == 0:
            progress(0, total)
        yield k
        if progress:
            progress(k + 1, total)


def _export_bucket(config: ExportConfig, unet: Any, masks: Any, k: int, sig: Signature,
                   profile: ShapeProfile, staging: Path) -> _Built:
    from ..masking import bake
    from .onnx import PROTOBUF_LIMIT, export_onnx
    from .verify import verify_onnx

    lo, hi = masks.buckets.ranges[k]
    variant = bake(unet, masks, k, drop=config.drop, check=False)
    cases = reference_cases(variant, sig, profile, timestep=float((lo + hi) // 2), seed=10 * k)
    paths = export_onnx(variant, staging / f"unet_b{k}.onnx", sig, cases[0][0], opset=config.opset, fp16=config.fp16,
                        external_data_threshold=config.external_data_threshold or PROTOBUF_LIMIT)
    del variant  # one variant in memory at a time
    result = verify_onnx(paths[0], cases, *tolerances(config.precision, atol=config.atol, rtol=config.rtol))
    require_parity(result, f"unet_b{k} (timesteps {lo}..{hi})")
    built = _Built(files={"onnx": paths[0], **({"onnx_data": paths[1]} if len(paths) > 1 else {})},
                   verify={"onnx": result}, cases=cases)
    if config.trt and not config.refit:
        from .trt import build_engine

        built.files["plan"] = build_engine(paths[0], staging / f"unet_b{k}.plan", _settings(config, sig, profile, staging))
        _verify_engine(config, built, f"unet_b{k}.plan (timesteps {lo}..{hi})")
    return built


def _verify_engine(config: ExportConfig, built: _Built, what: str, weights: dict | None = None) -> None:
    from .trt import verify_engine

    result, inputs = verify_engine(built.files["plan"], built.cases,
                                   *tolerances(config.precision, engine=True, atol=config.atol, rtol=config.rtol),
                                   weights=weights)
    require_parity(result, what)
    built.verify["tensorrt"], built.engine_inputs = result, inputs


def _settings(config: ExportConfig, sig: Signature, profile: ShapeProfile, staging: Path) -> Any:
    from .trt import EngineSettings

    return EngineSettings(
        profile=profile, sig=sig, fp16=config.fp16, optimization_level=config.optimization_level,
        workspace_gb=config.workspace_gb, refittable=config.refit,
        timing_cache=Path(config.timing_cache) if config.timing_cache else staging / ".timing.cache",
    )


def _engines(config: ExportConfig, sig: Signature, profile: ShapeProfile, staging: Path, built: list[_Built],
             masks: Any) -> dict[str, Any]:
    """Per-variant engines were built bucket by bucket; --refit builds its one engine here, from all ONNX
    files, saves one weight set per bucket and checks the engine refitted with each."""
    from .trt import build_engine, refit_weight_sets, require_tensorrt, save_weights

    settings = _settings(config, sig, profile, staging)
    if config.refit:
        sets = refit_weight_sets([b.files["onnx"] for b in built])
        plan = build_engine(built[0].files["onnx"], staging / "unet_refit.plan", settings)
        for k, (b, weights) in enumerate(zip(built, sets)):
            b.files["plan"] = plan
            b.files["weights"] = save_weights(staging / f"unet_b{k}.refit.safetensors", weights)
            lo, hi = masks.buckets.ranges[k]
            _verify_engine(config, b, f"unet_refit.plan refitted for bucket {k} (timesteps {lo}..{hi})", weights)
    (staging / ".timing.cache").unlink(missing_ok=True)
    return {"tensorrt": str(require_tensorrt().__version__), "refit": config.refit, **settings.to_dict()}


def _triton(config: ExportConfig, sig: Signature, masks: Any, staging: Path, built: list[_Built],
            seen: dict) -> dict[str, Any]:
    from .triton import ROUTER, write_repository

    role = "plan" if config.trt and not config.refit else "onnx"
    root = staging / "triton"
    inputs = [b.engine_inputs if role == "plan" else None for b in built]
    written = write_repository(root, sig, masks.buckets.ranges, [b.files for b in built], role,
                               masks.buckets.num_train_timesteps, inputs, config.triton_instances)
    return {
        "repository": "triton", "model": ROUTER, "variants": [f"unet_b{k}" for k in range(len(built))],
        "backend": role, "router_instances": config.triton_instances, "files": [FileEntry.of(staging, p, seen).to_dict() for p in written],
    }


__all__ = ["ExportConfig", "Manifest", "Range", "check_options", "export"]
