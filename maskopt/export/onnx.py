"""One baked U-Net variant -> one ONNX file with named inputs, dynamic shapes, folded constants.

    >>> from pathlib import Path
    >>> from maskopt import Buckets, MaskSet, bake, find_units
    >>> from maskopt.export.shapes import Signature
    >>> from maskopt.models import load_unet
    >>> unet = load_unet("maskopt:default")
    >>> masks = MaskSet.ones(unet, find_units(unet, "paper"), Buckets.uniform(2))
    >>> variant = bake(unet, masks.with_values(masks.values * 0.5), bucket=0)
    >>> sig = Signature.from_unet(unet)
    >>> example = sig.random_inputs(sig.shapes(2, 8, 8, 16), timestep=100.0)   # batch 2, 8x8 latents, 16 tokens
    >>> [p.name for p in export_onnx(variant, Path("unet_b0.onnx"), sig, example, opset=17, fp16=False)]
    ['unet_b0.onnx']

Steps, each a Polygraphy loader: torch.onnx.export (TorchScript exporter: fast, and ONNX Runtime matches
PyTorch to ~1e-6) -> FoldConstants -> (fp16) -> InferShapes -> SaveOnnx (weights in `<name>.data` once
the model passes the 2 GB protobuf limit).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MaskoptError
from .shapes import OUTPUT, Signature

logger = logging.getLogger(__name__)

MIN_OPSET = 17  # LayerNormalization (opset 17) keeps attention blocks in one node for TensorRT
MAX_OPSET = 20  # the TorchScript exporter's newest
PROTOBUF_LIMIT = 2**31 - 2**20  # a single protobuf must stay below 2 GiB; leave room for the graph
# Ops kept in float32 in fp16 exports: GroupNorm (exported as InstanceNormalization) sums squares of
# activations, which overflows fp16's 65504 on real SD activations (the classic SD fp16 NaN).
FP32_OPS = ("InstanceNormalization",)


class ExportWrapper(nn.Module):
    """The U-Net with a flat, named signature: positional tensors in, one tensor out."""

    def __init__(self, unet: nn.Module, xl: bool) -> None:
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.xl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise MaskoptError(f"--opset {opset}: supported opsets are {MIN_OPSET}..{MAX_OPSET}")


def export_onnx(
    variant: nn.Module,
    path: Path,
    sig: Signature,
    example: dict[str, np.ndarray],
    opset: int = MIN_OPSET,
    fp16: bool = False,
    keep_fp32: Sequence[str] = FP32_OPS,
    external_data_threshold: int = PROTOBUF_LIMIT,
) -> list[Path]:
    """Write `variant` to `path` (plus `path.name + '.data'` for big models); returns the files written."""
    from polygraphy.backend.onnx import FoldConstants, InferShapes, OnnxFromPath, SaveOnnx

    check_opset(opset)
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(variant, raw, sig, example, opset)
        with _quiet():
            # ONNX's shape inference between folding passes: ONNX Runtime's folds a few more shape ops
            # but takes several times as long (docs/benchmarks.md), and TensorRT folds the rest at build time.
            model = FoldConstants(OnnxFromPath(str(raw)), allow_onnxruntime_shape_inference=False)()
            if fp16:
                model = to_fp16(model, keep_fp32)
            model = InferShapes(model, allow_onnxruntime=False)()
            restore_inputs(model, sig, what=path.stem)
            big = model.ByteSize() >= external_data_threshold
            data = path.name + ".data"
            if big and (path.parent / data).exists():
                (path.parent / data).unlink()  # onnx refuses to append to an existing data file
            SaveOnnx(model, str(path), external_data_path=data if big else None)()
    files = [path] + ([path.parent / data] if big else [])
    logger.info("wrote %s (%s)", path, "external data" if big else "single file")
    return files


def _torch_export(variant: nn.Module, path: Path, sig: Signature, example: dict[str, np.ndarray], opset: int) -> None:
    args = tuple(torch.from_numpy(example[n]) for n in sig.input_names)
    wrapper = ExportWrapper(variant, sig.xl).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on sizes (upsample sizes, attention batch size); the
        # traced branch is right for every size in the profile (sides are multiples of the downsampling).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, args, str(path),
            input_names=list(sig.input_names), output_names=[OUTPUT],
            dynamic_axes=sig.dynamic_axes(), opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )


def restore_inputs(model, sig: Signature, what: str = "variant") -> None:
    """Put back inputs the exporter pruned because nothing reads them, in signature order.

    A variant whose masks remove every cross-attention (with --drop) never reads `encoder_hidden_states`,
    and torch.onnx.export then leaves it out; every variant must still take the same named inputs.
    """
    import onnx

    graph = model.graph
    present = {i.name: i for i in graph.input}
    missing = [n for n in sig.input_names if n not in present]
    if not missing:
        return
    logger.warning("%s: input(s) %s are not used (what reads them was dropped); kept for a stable signature",
                   what, ", ".join(missing))
    dims = sig.dims()
    for name in missing:
        present[name] = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(dims[name]))
    ordered = [present[n] for n in sig.input_names] + [i for i in graph.input if i.name not in sig.input_names]
    del graph.input[:]
    graph.input.extend(ordered)


def to_fp16(model, keep_fp32: Sequence[str] = FP32_OPS):
    """Weights and compute in float16, inputs and outputs kept float32 (the signature stays the same)."""
    # ONNX Runtime ships onnxconverter-common's converter; Polygraphy's ConvertToFp16 needs that package.
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    import onnx_graphsurgeon as gs

    model = convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32),
    )
    # The converter appends the input casts after the nodes that read them; ONNX wants topological order.
    graph = gs.import_onnx(model)
    graph.toposort()
    return gs.export_onnx(graph)


class _quiet:
    """Polygraphy, ONNX-GraphSurgeon and ONNX Runtime (used for folding) log to stdout: errors only, unless
    maskopt logs at INFO (`maskopt -v`), where their warnings (a folding pass that failed, say) show too."""

    def __enter__(self):
        import onnxruntime
        from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
        from polygraphy.logger import G_LOGGER

        verbose = logger.isEnabledFor(logging.INFO)
        onnxruntime.set_default_logger_severity(3)  # folding logs graph-optimiser notes
        self._ctx = G_LOGGER.verbosity(G_LOGGER.WARNING if verbose else G_LOGGER.ERROR)
        self._ctx.__enter__()
        self._gs_severity, GS_LOGGER.severity = GS_LOGGER.severity, GS_LOGGER.WARNING if verbose else GS_LOGGER.ERROR
        return self

    def __exit__(self, *exc):
        import onnxruntime
        from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER

        GS_LOGGER.severity = self._gs_severity
        self._ctx.__exit__(*exc)
        onnxruntime.set_default_logger_severity(2)
