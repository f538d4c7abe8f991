"""`maskopt export`: one verified U-Net variant per timestep bucket, as ONNX, TensorRT engines and Triton models.

    from maskopt.export import ExportConfig, export
    manifest = export(ExportConfig(masks=Path("masks.json"), out=Path("out"), fp16=True, trt=True, triton=True))

The flow reads top to bottom in `export()`: check options -> load masks -> load U-Net (fingerprint
checked) -> for each bucket: bake -> ONNX -> verify -> (engine) -> (Triton) -> manifest. Everything is
written into a temporary sibling of `out` and renamed into place at the end, so a failure (a parity
failure, say) leaves no half folder and never destroys an existing one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import MaskoptError
from ..models import DEFAULT_SOURCE
from ..paths import check_writable, make_folder, remove_made
from .manifest import FileEntry, Manifest, Variant, sha256
from .shapes import OUTPUT, Range, ShapeProfile, Signature, downsampling, profile_for
from .verify import TOLERANCES, Verification, require_parity

logger = logging.getLogger(__name__)

# Engines are checked against float32 PyTorch too; TensorRT's fp32 kernels reorder sums more than ORT's.
ENGINE_TOLERANCES = {"fp32": (1e-3, 1e-2), "fp16": TOLERANCES["fp16"]}
DEFAULT_BATCH = Range(1, 1, 4)


@dataclass(frozen=True)
class ExportConfig:
    masks: Path
    out: Path
    model: str | None = None  # default: the mask file's source when it names a model, else the embedded default
    onnx: bool = True  # keep the ONNX variants (with trt=False this is the only output)
    trt: bool = False  # one TensorRT engine per variant (unet_b{k}.plan)
    fp16: bool = False
    opset: int = 17
    batch: Range = DEFAULT_BATCH  # images per call; the U-Net batch is twice that with CFG
    size: Range | None = None  # image side in pixels; default: half, one and two times the U-Net's native size
    cfg: bool = True  # classifier-free guidance doubles the U-Net batch
    drop: bool = False  # skip what the masks remove (cheaper variants; no --refit)
    refit: bool = False  # one refittable engine + one weight set per bucket instead of K engines
    triton: bool = False
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
    from ..models import load_unet

    # 1. Check options, before any work
    check_options(config)
    # 2. Masks and U-Net
    masks = MaskSet.load(config.masks)
    model = resolve_model(config.model, masks.source)
    unet = load_unet(model)
    try:
        masks.check(unet)
    except MaskoptError as e:
        raise MaskoptError(f"mask file {config.masks}: {e}") from None
    sig = Signature.from_unet(unet, time_ids=config.time_ids)
    profile = build_profile(config, unet, model)
    out = Path(config.out)
    made = make_folder(out.parent, "--out")
    staging = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"  # same disk as `out`: the rename is atomic
    make_folder(staging, "--out")
    try:
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
                   "fingerprint": masks.fingerprint, "source": masks.source},
            model=model, num_train_timesteps=masks.buckets.num_train_timesteps,
            engine=engine, triton=triton,
        )
        manifest.save(staging)
        # 5. Into place
        _install(staging, out)
    except BaseException:  # a failure or Ctrl-C: the folders this export made go too
        shutil.rmtree(staging, ignore_errors=True)
        remove_made(made, out.parent)
        raise
    return manifest


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
    if config.triton:
        from .triton import model_config_class

        model_config_class()
        if config.refit and not config.onnx:
            raise MaskoptError("Triton's TensorRT backend cannot refit: add --onnx to serve the ONNX variants, "
                               "or drop --refit")
    check_opset(config.opset)
    if config.timing_cache is not None and not Path(config.timing_cache).parent.is_dir():
        raise MaskoptError(f"--timing-cache {config.timing_cache}: its folder does not exist")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise MaskoptError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not config.force:
        raise MaskoptError(f"--out {out} exists and is not empty (add --force to replace it)")
    check_writable(out, "--out")  # the export is staged beside it
    if Path(config.masks).is_dir():
        raise MaskoptError(f"mask file {config.masks} is a folder; give its masks.json")
    if not Path(config.masks).is_file():
        raise MaskoptError(f"mask file {config.masks} does not exist")


def resolve_model(model: str | None, source: str | None) -> str | None:
    """The pipeline to load: `model` if given, else the mask file's source when it names one, else None
    (the embedded default). A source pointing at a pipeline's `unet` subfolder resolves to the pipeline."""
    if model:
        return model
    if not source or source == DEFAULT_SOURCE:
        return None
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() and (path.parent / "model_index.json").is_file():
            return str(path.parent)
        return str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("."):
        return source  # a hub id
    logger.warning("mask file source %r is not a folder here nor a hub id; using the embedded default", source)
    return None


def pipeline_geometry(model: str | None) -> tuple[int, int]:
    """(VAE scale factor, text length) of the pipeline around the U-Net; SD's (8, 77) when unknown."""
    from ..models import default_model

    def read(name: str) -> dict[str, Any] | None:
        try:
            folder = Path(model or default_model()).expanduser()
            if folder.exists():
                return json.loads((folder / name).read_text())
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(str(model), name)).read_text())
        except Exception as e:  # a U-Net folder alone, offline hub, ...: fall back to SD's numbers
            logger.debug("no %s for %s (%s)", name, model, e)
            return None

    vae = read("vae/config.json")
    tok = read("tokenizer/tokenizer_config.json")
    scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae and "block_out_channels" in vae else 8
    length = int(tok["model_max_length"]) if tok and int(tok.get("model_max_length", 0)) <= 4096 else 77
    if vae is None or tok is None:
        logger.warning("could not read the pipeline's VAE/tokenizer config; assuming VAE factor %d, text length %d",
                       scale, length)
    return scale, length


def build_profile(config: ExportConfig, unet: Any, model: str | None) -> ShapeProfile:
    vae_scale, seq = pipeline_geometry(model)
    multiple = downsampling(unet)
    size = config.size
    if size is None:
        step = vae_scale * multiple
        native = int(unet.config.sample_size) * vae_scale
        size = Range(max(native // 2 // step * step, step), native, native * 2)
    return profile_for(config.batch, size, cfg=config.cfg, vae_scale=vae_scale, seq=seq, multiple=multiple)


def _each(masks: Any, progress: Callable[[int, int], None] | None):
    """The bucket indices, reporting (variants done, total) before the first and after each."""
    total = len(masks.buckets)
    for k in range(total):
        if progress and k == 0:
            progress(0, total)
        yield k
        if progress:
            progress(k + 1, total)


def _cases(variant: torch.nn.Module, sig: Signature, profile: ShapeProfile, timestep: float, seed: int) -> list[tuple]:
    """Random inputs at the profile's check shapes and the float32 PyTorch variant's outputs on them:
    computed once, then every export of this variant (ONNX, engine) is compared against them."""
    from .onnx import ExportWrapper

    wrapper = ExportWrapper(variant, sig.xl).eval()
    cases = []
    for i, (b, h, w) in enumerate(profile.verify_shapes()):
        feeds = sig.random_inputs(sig.shapes(b, h, w, profile.seq), timestep, seed=seed + i)
        with torch.no_grad():
            out = wrapper(*(torch.from_numpy(feeds[n]) for n in sig.input_names))
        cases.append((feeds, {OUTPUT: out.numpy()}))
    return cases


def _tolerances(config: ExportConfig, table: dict[str, tuple[float, float]]) -> tuple[float, float]:
    atol, rtol = table[config.precision]
    return (config.atol if config.atol is not None else atol, config.rtol if config.rtol is not None else rtol)


def _export_bucket(config: ExportConfig, unet: Any, masks: Any, k: int, sig: Signature,
                   profile: ShapeProfile, staging: Path) -> _Built:
    from ..masking import bake
    from .onnx import PROTOBUF_LIMIT, export_onnx
    from .verify import verify_onnx

    lo, hi = masks.buckets.ranges[k]
    variant = bake(unet, masks, k, drop=config.drop, check=False)
    # the time embedding differs per bucket: check at a timestep the variant serves
    cases = _cases(variant, sig, profile, timestep=float((lo + hi) // 2), seed=10 * k)
    paths = export_onnx(variant, staging / f"unet_b{k}.onnx", sig, cases[0][0], opset=config.opset, fp16=config.fp16,
                        external_data_threshold=config.external_data_threshold or PROTOBUF_LIMIT)
    del variant  # one variant in memory at a time
    result = verify_onnx(paths[0], cases, *_tolerances(config, TOLERANCES))
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

    result, inputs = verify_engine(built.files["plan"], built.cases, *_tolerances(config, ENGINE_TOLERANCES),
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
                               masks.buckets.num_train_timesteps, inputs)
    return {
        "repository": "triton", "model": ROUTER, "variants": [f"unet_b{k}" for k in range(len(built))],
        "backend": role, "files": [FileEntry.of(staging, p, seen).to_dict() for p in written],
    }


def _install(staging: Path, out: Path) -> None:
    """Put the finished folder at `out`; an existing one (only with --force) is removed only after."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["ExportConfig", "Manifest", "Range", "check_options", "export", "resolve_model"]
