"""Is an exported variant the model it came from? onnx.checker, then ONNX Runtime against PyTorch.

    >>> from pathlib import Path
    >>> from maskopt.export.onnx import export_onnx
    >>> from maskopt.export.shapes import Range, Signature, profile_for
    >>> from maskopt.models import load_unet
    >>> unet = load_unet("maskopt:default")
    >>> sig = Signature.from_unet(unet)
    >>> profile = profile_for(Range(1, 1, 4), Range(16, 32, 64), classifier_free=True, vae_scale=4, seq=16, multiple=4)
    >>> cases = reference_cases(unet, sig, profile, timestep=500.0, seed=0)   # random feeds, PyTorch's outputs
    >>> path, = export_onnx(unet, Path("unet.onnx"), sig, cases[0][0])
    >>> result = verify_onnx(path, cases, atol=1e-4, rtol=1e-3)
    >>> result.passed, len(result.checks), result.max_abs < 1e-4
    (True, 2, True)

The cases are computed once per variant, from the float32 PyTorch variant, and every export of that
variant (the ONNX file, the TensorRT engine) is compared against them.

The pass rule is Polygraphy's elementwise one: an element fails only when its absolute error exceeds
`atol` *and* its relative error exceeds `rtol`. It is computed here in a few lines of NumPy rather than
through `Comparator.compare_accuracy`, whose result classes changed shape across Polygraphy releases;
the numbers that end up in the manifest are plain floats either way.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import MaskoptError, first_line

logger = logging.getLogger(__name__)

# (atol, rtol) against the float32 PyTorch variant. fp16 keeps ~3 significant digits per op and
# errors add up over a U-Net's ~30 layers, hence the looser pair.
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-2, 5e-2)}
# Engines are checked against float32 PyTorch too; TensorRT's fp32 kernels reorder sums more than ORT's.
ENGINE_TOLERANCES = {"fp32": (1e-3, 1e-2), "fp16": TOLERANCES["fp16"]}


class ParityError(MaskoptError):
    """An exported variant does not reproduce the PyTorch variant within tolerance."""


@dataclass(frozen=True)
class OutputError:
    max_abs: float
    max_rel: float
    passed: bool


@dataclass(frozen=True)
class ShapeCheck:
    shapes: dict[str, list[int]]
    outputs: dict[str, OutputError]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs.values())


@dataclass(frozen=True)
class Verification:
    """Parity of one variant at a few input shapes (the manifest's `verify` entry)."""

    backend: str
    reference: str
    atol: float
    rtol: float
    checks: tuple[ShapeCheck, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for c in self.checks for o in c.outputs.values()), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for c in self.checks for o in c.outputs.values()), default=0.0)

    def summary(self) -> str:
        return f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} (atol {self.atol:g}, rtol {self.rtol:g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "reference": self.reference, "atol": self.atol, "rtol": self.rtol,
            "passed": self.passed, "max_abs": self.max_abs, "max_rel": self.max_rel,
            "checks": [{"shapes": c.shapes, "outputs": {n: asdict(o) for n, o in c.outputs.items()}} for c in self.checks],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verification":
        checks = tuple(
            ShapeCheck({n: list(s) for n, s in c["shapes"].items()}, {n: OutputError(**o) for n, o in c["outputs"].items()})
            for c in d.get("checks", [])
        )
        return cls(d["backend"], d["reference"], float(d["atol"]), float(d["rtol"]), checks)


def compare(reference: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> OutputError:
    """Max absolute and relative error of `got` against `reference`; NaN or inf in `got` always fails."""
    if reference.shape != got.shape:
        return OutputError(float("inf"), float("inf"), False)
    ref = reference.astype(np.float64)
    absdiff = np.abs(got.astype(np.float64) - ref)
    absdiff[~np.isfinite(absdiff)] = np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        reldiff = absdiff / np.abs(ref)
    reldiff[np.isnan(reldiff)] = 0.0  # 0 / 0: exact match on an exact zero
    bad = (absdiff > atol) & (reldiff > rtol)
    return OutputError(float(absdiff.max(initial=0.0)), float(reldiff.max(initial=0.0)), not bool(bad.any()))


def check_onnx(path: Path) -> None:
    """onnx.checker on the file (by path, so external data and >2 GB models work)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise MaskoptError(f"{Path(path).name} fails onnx.checker: {first_line(e)}") from None


Case = tuple  # (feeds: {input: array}, expected: {output: array}), the reference computed once per variant


def reference_cases(variant: Any, sig: Any, profile: Any, timestep: float, seed: int) -> list[Case]:
    """Random inputs at the profile's check shapes (`ShapeProfile.verify_shapes`), with the float32 PyTorch
    variant's outputs on them. The time embedding differs per bucket: give a timestep the variant serves."""
    import torch

    from .onnx import ExportWrapper
    from .shapes import OUTPUT

    wrapper = ExportWrapper(variant, sig.xl).eval()
    cases = []
    for i, (b, h, w) in enumerate(profile.verify_shapes()):
        feeds = sig.random_inputs(sig.shapes(b, h, w, profile.seq), timestep, seed=seed + i)
        with torch.no_grad():
            out = wrapper(*(torch.from_numpy(feeds[n]) for n in sig.input_names))
        cases.append((feeds, {OUTPUT: out.numpy()}))
    return cases


def tolerances(precision: str, engine: bool = False, atol: float | None = None,
               rtol: float | None = None) -> tuple[float, float]:
    """(atol, rtol) for a precision, the engines' or ONNX Runtime's; a given atol or rtol wins."""
    default_atol, default_rtol = (ENGINE_TOLERANCES if engine else TOLERANCES)[precision]
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


def run_cases(cases: Sequence[Case], infer: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
              atol: float, rtol: float) -> tuple[ShapeCheck, ...]:
    """Run `infer` on each case's feeds and compare every expected output."""
    checks = []
    for feeds, want in cases:
        got = infer(feeds)
        outputs = {n: compare(want[n], np.asarray(got[n]) if n in got else np.empty(0), atol, rtol) for n in want}
        checks.append(ShapeCheck({n: list(a.shape) for n, a in feeds.items()}, outputs))
    return tuple(checks)


def verify_onnx(path: Path, cases: Sequence[Case], atol: float, rtol: float,
                reference_name: str = "torch float32") -> Verification:
    """Check `path` with onnx.checker, then run it on each case with ONNX Runtime and compare outputs."""
    from . import ort

    check_onnx(path)
    session = ort.session(path)
    names = [o.name for o in session.get_outputs()]
    checks = run_cases(cases, lambda feeds: dict(zip(names, session.run(None, feeds))), atol, rtol)
    result = Verification("onnxruntime " + session.get_providers()[0], reference_name, atol, rtol, checks)
    logger.info("%s: %s", Path(path).name, result.summary())
    return result


def require_parity(result: Verification, what: str) -> None:
    if result.passed:
        return
    worst = next(c for c in result.checks if not c.passed)
    shape = "x".join(map(str, worst.shapes.get("sample", [])))
    raise ParityError(
        f"{what}: {result.backend} differs from {result.reference} by up to {result.max_abs:.3g} absolute / "
        f"{result.max_rel:.3g} relative (sample {shape}; tolerance atol {result.atol:g}, rtol {result.rtol:g}); "
        "nothing was written"
    )
