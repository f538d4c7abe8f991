"""Constant folding of an exported variant: ONNX's shape inference (what export uses) versus ONNX Runtime's.

    PYTHONPATH=. python benchmarks/onnx_folding.py              # ~1 minute on 2 cores

The embedded default's U-Net, one bucket's masks at 0.5, is exported with torch.onnx.export as
`export_onnx` does; then Polygraphy's FoldConstants runs on it with `allow_onnxruntime_shape_inference`
off and on, in turn each round. Prints the median seconds and the node count each leaves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from polygraphy.backend.onnx import FoldConstants, OnnxFromPath

from maskopt import Buckets, MaskSet, bake, find_units
from maskopt.export.onnx import _quiet, _torch_export
from maskopt.export.shapes import Signature
from maskopt.models import load_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="maskopt:default")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    unet = load_unet(args.model)
    masks = MaskSet.ones(unet, find_units(unet, "paper"), Buckets.uniform(2))
    variant = bake(unet, masks.with_values(masks.values * 0.5), bucket=0)
    sig = Signature.from_unet(unet)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(variant, raw, sig, sig.random_inputs(sig.shapes(2, 8, 8, 16), timestep=100.0), opset=17)
        times: dict[bool, list[float]] = {False: [], True: []}
        nodes = {}
        for _ in range(args.repeats):
            for onnxruntime in times:
                with _quiet():
                    t = time.perf_counter()
                    model = FoldConstants(OnnxFromPath(str(raw)), allow_onnxruntime_shape_inference=onnxruntime)()
                    times[onnxruntime].append(time.perf_counter() - t)
                nodes[onnxruntime] = len(model.graph.node)
    onnx_s, ort_s = (statistics.median(times[k]) for k in (False, True))
    print(f"{args.model}: ONNX shape inference {onnx_s:.2f} s ({nodes[False]} nodes), "
          f"ONNX Runtime's {ort_s:.2f} s ({nodes[True]} nodes): {ort_s / onnx_s:.1f}x the time")


if __name__ == "__main__":
    main()
