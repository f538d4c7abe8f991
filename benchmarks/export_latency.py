"""CPU latency of exported variants: ONNX Runtime versus PyTorch eager, and a --drop variant versus the full one.

    PYTHONPATH=. python benchmarks/export_latency.py            # ~1-2 minutes on 2 cores

An SD1.5-shaped U-Net at reduced width (same blocks, attention and resnets, 1/5 of the channels) stands
in for SD1.5. One bucket's masks zero a third of the paper units and of the resnet branches and scale
the rest; the variant is baked (`bake`) and baked with `drop=True`, both exported with maskopt's ONNX
path, and one U-Net call (batch 2 = one image with CFG, 32x32 latents, 77 tokens) is timed in each
runtime on the same inputs, with the same number of threads. Prints medians and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from maskopt import Buckets, MaskSet, bake, find_units  # noqa: E402
from maskopt.export.onnx import ExportWrapper, export_onnx  # noqa: E402
from maskopt.export.shapes import Signature  # noqa: E402
from tiny import SD15  # noqa: E402

CONFIG = {**SD15, "block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 128, "attention_head_dim": 4,
          "norm_num_groups": 16}


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per function, timing them in turn each round: on shared cores the load drifts, and
    interleaving spreads that drift over all of them instead of penalising whichever ran last."""
    for fn in fns.values():
        fn()  # warm-up (ORT's first run plans memory; torch's picks kernels)
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIG).eval()
    units = find_units(unet, ["paper", "resnets"])
    values = np.random.default_rng(0).uniform(0.6, 1.4, (1, len(units)))
    values[0, ::3] = 0.0
    masks = MaskSet.ones(unet, units, Buckets.uniform(1)).with_values(values)
    variants = {"full": bake(unet, masks, 0), "drop": bake(unet, masks, 0, drop=True)}
    params = {n: sum(p.numel() for p in v.parameters()) for n, v in variants.items()}

    sig = Signature.from_unet(unet)
    feeds = sig.random_inputs(sig.shapes(2, 32, 32, 77), timestep=500.0)
    torch_args = tuple(torch.from_numpy(feeds[n]) for n in sig.input_names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads

    fns = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, variant in variants.items():
            path = export_onnx(variant, Path(tmp) / f"{name}.onnx", sig, feeds)[0]
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            wrapper = ExportWrapper(variant, sig.xl)
            want, got = wrapper(*torch_args).numpy(), session.run(None, feeds)[0]
            assert np.abs(want - got).max() < 1e-3, "ONNX Runtime and PyTorch disagree"
            fns["torch", name] = lambda w=wrapper: w(*torch_args)
            fns["onnxruntime", name] = lambda s=session: s.run(None, feeds)
        ms = {k: 1e3 * v for k, v in interleaved(fns, args.repeats).items()}

    removed = sum(v == 0 for v in values[0])
    print(f"U-Net: SD1.5 blocks at width {CONFIG['block_out_channels']}, {params['full'] / 1e6:.1f}M parameters; "
          f"bucket removes {removed}/{len(units)} units (drop variant: {params['drop'] / 1e6:.1f}M parameters)")
    print(f"one call: batch 2, 4x32x32 latents, 77 tokens; {args.threads} threads; median of {args.repeats} "
          f"(interleaved); load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for runtime in ("torch", "onnxruntime"):
        print(f"  {runtime:<12} full {ms[runtime, 'full']:8.1f} ms   drop {ms[runtime, 'drop']:8.1f} ms")
    print(f"onnxruntime / torch: full {ms['onnxruntime', 'full'] / ms['torch', 'full']:.2f}x, "
          f"drop {ms['onnxruntime', 'drop'] / ms['torch', 'drop']:.2f}x  (<1: ONNX Runtime faster)")
    print(f"drop / full: torch {ms['torch', 'drop'] / ms['torch', 'full']:.2f}x, "
          f"onnxruntime {ms['onnxruntime', 'drop'] / ms['onnxruntime', 'full']:.2f}x  (<1: dropping saves time)")


if __name__ == "__main__":
    main()
