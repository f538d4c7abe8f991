"""TensorRT engines from the ONNX variants, with Polygraphy's loaders; refit weight sets.

    >>> from pathlib import Path
    >>> from maskopt.export.onnx import export_onnx
    >>> from maskopt.export.shapes import Range, Signature, profile_for
    >>> from maskopt.models import load_unet
    >>> unet = load_unet("maskopt:default")                  # 32 px images, 8x8 latents
    >>> sig = Signature.from_unet(unet)
    >>> onnx_file, = export_onnx(unet, Path("unet.onnx"), sig, sig.random_inputs(sig.shapes(1, 8, 8, 16), 500.0))
    >>> profile = profile_for(Range(1, 1, 4), Range(16, 32, 64), classifier_free=False, vae_scale=4, seq=16, multiple=4)
    >>> settings = EngineSettings(profile, sig, fp16=True, timing_cache=Path("timing.cache"))
    >>> build_engine(onnx_file, Path("unet.plan"), settings).name          # needs TensorRT (skipped without it)
    'unet.plan'

Everything that only *describes* an engine (profiles, builder flags, refit weight sets) is plain data
and testable without TensorRT; `tensorrt` is imported only by the functions that build or run one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import MaskoptError
from ..lazy import lazy_import, require
from .shapes import OUTPUT, ShapeProfile, Signature

logger = logging.getLogger(__name__)

INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt"
MISSING = "TensorRT is not installed (it needs an NVIDIA GPU machine)"
trt = lazy_import("tensorrt", INSTALL, reason=MISSING)


def require_tensorrt() -> Any:
    """The tensorrt module, or a one-line MaskoptError saying how to install it (checks before any work)."""
    return require("tensorrt", INSTALL, reason=MISSING)


@dataclass(frozen=True)
class EngineSettings:
    """How to build every engine of one export (the same settings for all variants)."""

    profile: ShapeProfile
    sig: Signature
    fp16: bool = False
    optimization_level: int = 3  # TensorRT's default; 5 searches longest
    workspace_gb: float | None = None  # None: TensorRT's default (the GPU's memory)
    timing_cache: Path | None = None  # read before and merged after each build: variants share tactics
    refittable: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise MaskoptError(f"builder optimisation level {self.optimization_level}: must be 0..5")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise MaskoptError(f"--workspace {self.workspace_gb}: must be a positive number of GB")

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        return self.profile.shapes(self.sig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp16": self.fp16, "builder_optimization_level": self.optimization_level,
            "workspace_gb": self.workspace_gb, "refittable": self.refittable,
        }


def polygraphy_profile(shapes: dict[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> Any:
    """A polygraphy `Profile` (one TensorRT optimisation profile) from {name: (min, opt, max)}."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    return profile


def create_config(settings: EngineSettings) -> Any:
    """Polygraphy's lazy `CreateConfig` for these settings (TensorRT is needed only to call it)."""
    from polygraphy.backend.trt import CreateConfig

    pools = None
    if settings.workspace_gb is not None:
        # the pool key is a TensorRT enum
        pools = {trt.MemoryPoolType.WORKSPACE: int(settings.workspace_gb * 2**30)}
    cache = settings.timing_cache
    return CreateConfig(
        fp16=settings.fp16,
        profiles=[polygraphy_profile(settings.profile_shapes())],
        builder_optimization_level=settings.optimization_level,
        memory_pool_limits=pools,
        refittable=settings.refittable,
        load_timing_cache=str(cache) if cache is not None and cache.exists() else None,
    )


def engine_loader(onnx_path: Path, settings: EngineSettings) -> Any:
    """The lazy chain ONNX path -> network -> serialized engine; nothing runs until it is called."""
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath

    cache = settings.timing_cache
    return EngineBytesFromNetwork(
        NetworkFromOnnxPath(str(onnx_path)),  # by path, so external weight files are found
        config=create_config(settings),
        save_timing_cache=str(cache) if cache is not None else None,
    )


def build_engine(onnx_path: Path, plan_path: Path, settings: EngineSettings) -> Path:
    """Build and save one engine (`unet_b{k}.plan`)."""
    require_tensorrt()
    engine_bytes = engine_loader(onnx_path, settings)()
    Path(plan_path).write_bytes(engine_bytes)
    logger.info("built %s (%.1f MB)", plan_path, len(engine_bytes) / 1e6)
    return Path(plan_path)


def run_engine(engine_bytes: bytes) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function feeds -> outputs over a deserialized engine (Polygraphy's TrtRunner, kept active)."""
    require_tensorrt()
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(engine_bytes))
    runner.activate()
    # TensorRT drops network inputs that nothing reads (a variant whose masks removed every
    # cross-attention never reads encoder_hidden_states): feed only the inputs the engine has.
    names = list(runner.get_input_metadata())

    def infer(feeds: dict[str, Any]) -> dict[str, Any]:
        return runner.infer({n: feeds[n] for n in names})

    infer.runner = runner  # type: ignore[attr-defined]  # to deactivate, and for refit (runner.engine)
    infer.inputs = names  # type: ignore[attr-defined]
    return infer


def verify_engine(plan_path: Path, cases: Sequence[tuple], atol: float, rtol: float,
                  weights: dict[str, np.ndarray] | None = None) -> tuple[Any, list[str]]:
    """Like `verify.verify_onnx`, for an engine (refitted with `weights` first, for --refit).
    Also returns the engine's input names (Triton's config must list exactly those)."""
    from .verify import Verification, run_cases

    infer = run_engine(Path(plan_path).read_bytes())
    try:
        if weights:
            refit(infer.runner.engine, weights)
        checks = run_cases(cases, infer, atol, rtol)
    finally:
        infer.runner.deactivate()
    return Verification("tensorrt", "torch float32", atol, rtol, checks), list(infer.inputs)


# ---------------------------------------------------------------------------------------------------
# --refit: one refittable engine, K weight sets


def _initializers(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))  # external data is loaded from beside the file
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _structure(model: Any) -> list:
    """Everything of a graph but its initializer values: nodes (attributes included) and tensor specs."""
    g = model.graph
    nodes = [(n.op_type, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute)) for n in g.node]
    inits = sorted((t.name, tuple(t.dims), t.data_type) for t in g.initializer)
    return [nodes, inits, [i.SerializeToString() for i in g.input], [o.SerializeToString() for o in g.output]]


def refit_weight_sets(onnx_paths: Sequence[Path]) -> list[dict[str, np.ndarray]]:
    """For each variant, the values of every initializer that differs between any two variants.

    All sets have the same names, so loading set k over any other restores variant k exactly. The
    variants must share one graph (the same nodes and initializer names): baking only changes values,
    but `--drop` removes different layers per bucket, which no refit can express.
    """
    models, inits = zip(*(_initializers(p) for p in onnx_paths))
    first = _structure(models[0])
    for k, m in enumerate(models[1:], 1):
        if _structure(m) != first:
            raise MaskoptError(
                f"--refit needs every variant to share one graph, but unet_b{k} differs from unet_b0 "
                "(with --drop each bucket removes different layers: export without --drop, or without --refit)"
            )
    names = sorted(n for n in inits[0] if any(not np.array_equal(inits[0][n], i[n]) for i in inits[1:]))
    logger.info("refit: %d of %d initializers differ between variants", len(names), len(inits[0]))
    return [{n: np.ascontiguousarray(i[n]) for n in names} for i in inits]


def save_weights(path: Path, weights: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file(weights, str(path), metadata={"format": "maskopt.refit/1"})
    return Path(path)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def refit(engine: Any, weights: dict[str, np.ndarray]) -> None:
    """Load one weight set into a refittable engine (between inferences, never during one)."""
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    refittable = set(refitter.get_all_weights())
    missing = sorted(set(weights) - refittable)
    if missing:
        raise MaskoptError(f"refit: the engine has no refittable weight named {missing[0]!r} "
                           f"({len(missing)} of {len(weights)} names unknown)")
    arrays = [np.ascontiguousarray(a) for a in weights.values()]  # alive until refit_cuda_engine returns
    for name, a in zip(weights, arrays):
        if not refitter.set_named_weights(name, trt.Weights(a)):
            raise MaskoptError(f"refit: TensorRT rejected the weights for {name!r} ({a.dtype}, {a.shape})")
    if not refitter.refit_cuda_engine():
        raise MaskoptError(f"refit failed; weights still missing: {refitter.get_missing_weights()[:3]}")


__all__ = [
    "EngineSettings", "INSTALL", "OUTPUT", "build_engine", "create_config", "engine_loader", "load_weights",
    "polygraphy_profile", "refit", "refit_weight_sets", "require_tensorrt", "run_engine", "save_weights",
    "verify_engine",
]
