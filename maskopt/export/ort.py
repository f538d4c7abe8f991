"""ONNX Runtime, imported only where used: the import check, the provider choice, sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..lazy import require

INSTALL = "pip install onnxruntime (or onnxruntime-gpu for the CUDA provider)"


def require_onnxruntime() -> Any:
    """The onnxruntime module, or a one-line MaskoptError saying how to install it."""
    return require("onnxruntime", INSTALL, reason="the onnxruntime backend needs ONNX Runtime, which is not installed")


def providers() -> list[str]:
    """CUDAExecutionProvider when this ONNX Runtime build has it, then CPU as the fallback."""
    available = require_onnxruntime().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session(path: Path, use: Sequence[str] | None = None) -> Any:
    """An inference session for `path` on `use` (default: `providers()`)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # graph-optimiser notes are not the user's business
    return ort.InferenceSession(str(path), sess_options=options, providers=list(use) if use else providers())
