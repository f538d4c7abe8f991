"""GPU latency of an SD1.5-shaped U-Net: baseline vs baked vs dropped variant, eager and torch.compile.

    PYTHONPATH=. python benchmarks/gpu_unet.py                  # one command, ~3-6 minutes on one H100
    PYTHONPATH=. python benchmarks/gpu_unet.py --no-compile     # eager only, ~1 minute

SD1.5's U-Net config (tests/tiny.py's SD15, 860M parameters) with random weights, fp16 on CUDA; one
U-Net call on 64x64 latents, batch 2 (one 512x512 image with classifier-free guidance), 77 tokens.
One bucket's masks zero a third of the paper units and of the resnet branches and scale the rest:
`bake` folds the values in (same cost as the baseline: a check that baking adds nothing), `bake(drop=True)`
skips what is zeroed (should be cheaper). Each is timed with CUDA events (median), in eager mode and
compiled with torch.compile (compile time printed too); ratios to the baseline are printed at the end.
Stops compiling new variants once --budget seconds have passed, so the whole run stays under 10 minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from maskopt import Buckets, MaskSet, bake, find_units  # noqa: E402
from tiny import SD15  # noqa: E402


def cuda_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds after which no new compile starts")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark needs a GPU (see benchmarks/export_latency.py for the CPU one)")
    t0 = time.time()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SD15).half().eval()  # random weights: no download
    units = find_units(unet, ["paper", "resnets"])
    values = np.random.default_rng(0).uniform(0.6, 1.4, (1, len(units)))
    values[0, ::3] = 0.0
    masks = MaskSet.ones(unet, units, Buckets.uniform(1)).with_values(values)
    models = {"baseline": unet, "baked": bake(unet, masks, 0), "dropped": bake(unet, masks, 0, drop=True)}
    params = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in models.items()}

    g = torch.Generator(device="cuda").manual_seed(1)
    sample = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16, generator=g)
    context = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16, generator=g)
    t = torch.tensor(500, device="cuda")

    def call(model):
        return lambda: model(sample, t, context, return_dict=False)[0]

    with torch.inference_mode():
        ref = call(models["baked"])()
        drift = (call(models["dropped"])() - ref).abs().max().item()
        eager = {n: cuda_ms(call(m), 5, args.iters) for n, m in models.items()}
        compiled: dict[str, float] = {}
        compile_s: dict[str, float] = {}
        if not args.no_compile:
            for n, m in models.items():
                if time.time() - t0 > args.budget:
                    print(f"budget of {args.budget:.0f} s spent: not compiling {n}")
                    continue
                fn = call(torch.compile(m, mode=args.mode))
                start = time.time()
                fn()
                torch.cuda.synchronize()
                compile_s[n] = time.time() - start
                compiled[n] = cuda_ms(fn, 3, args.iters)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; SD1.5 U-Net, random weights, fp16, "
          f"batch 2 x 4x64x64, 77 tokens; median of {args.iters}")
    print(f"masks: {int((values == 0).sum())}/{len(units)} units zeroed (paper + resnets); "
          f"dropped variant |out - baked| max {drift:.3g}")
    print(f"{'variant':<10}{'params':>10}{'eager ms':>11}{'compiled ms':>13}{'compile s':>11}")
    for n in models:
        c = f"{compiled[n]:13.2f}{compile_s[n]:11.1f}" if n in compiled else f"{'-':>13}{'-':>11}"
        print(f"{n:<10}{params[n]:9.1f}M{eager[n]:11.2f}{c}")
    for mode, ms in (("eager", eager), ("compiled", compiled)):
        if "baseline" in ms:
            ratios = ", ".join(f"{n}/baseline {ms[n] / ms['baseline']:.3f}x" for n in ("baked", "dropped") if n in ms)
            print(f"{mode}: {ratios}")
    for n in compiled:
        print(f"compiled/eager {n}: {compiled[n] / eager[n]:.3f}x")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
