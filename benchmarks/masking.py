"""Cost of masks at inference, on the CPU: `apply` versus the plain U-Net, and baked versus dropped variants.

    python benchmarks/masking.py            # ~2 minutes on 2 cores

1. A full DDIM sampling run (20 steps, K=4 buckets, random gates on the paper units) with and without
   `maskopt.apply`: apply rewrites weights K times per run, so its overhead should be within noise.
2. One U-Net forward of bucket variants: `bake` (values folded in) versus `bake(drop=True)` with half the
   units at 0 (paper units + resnet/attention branches): dropped layers are not computed.
Prints medians over repeats and the ratios. An SD1.5-shaped U-Net at reduced width stands in for SD1.5.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import maskopt  # noqa: E402
from maskopt import Buckets, MaskSet  # noqa: E402
from tiny import SD15  # noqa: E402

torch.set_num_threads(2)
CONFIG = {**SD15, "block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 128, "attention_head_dim": 4,
          "norm_num_groups": 16}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _apply_only(unet, masks) -> None:
    with maskopt.apply(unet, masks) as state:
        for k in reversed(range(len(masks.buckets))):
            state.load(k)


def main() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIG).eval()
    x = torch.randn(2, 4, 32, 32)
    ctx = torch.randn(2, 77, CONFIG["cross_attention_dim"])
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)

    @torch.no_grad()
    def sample():
        lat = x.clone()
        for t in sched.timesteps:
            lat = sched.step(unet(lat, t, ctx).sample, t, lat).prev_sample

    units = maskopt.find_units(unet, "paper")
    gates = np.random.default_rng(0).uniform(0.5, 1.5, (4, len(units)))
    masks = MaskSet.ones(unet, units, Buckets.uniform(4)).with_values(gates)

    def sample_applied():
        with maskopt.apply(unet, masks):
            sample()

    # Interleaved pairs, so drifts in machine load hit both sides alike.
    sample(), sample_applied()
    pairs = [(timed(sample, 1), timed(sample_applied, 1)) for _ in range(8)]
    plain, applied = statistics.median(p for p, _ in pairs), statistics.median(a for _, a in pairs)
    spread = statistics.pstdev(p for p, _ in pairs) / plain
    own = timed(lambda: _apply_only(unet, masks), 5)
    print(f"sampling run, 20 DDIM steps, K=4, {len(units)} paper units: plain {plain * 1e3:.0f} ms, "
          f"with apply {applied * 1e3:.0f} ms, ratio {applied / plain:.3f} (run-to-run spread of plain: "
          f"{100 * spread:.1f}%); apply's own work (enter, 4 loads, exit) {own * 1e3:.1f} ms = "
          f"{100 * own / plain:.1f}% of a run")

    units = maskopt.find_units(unet, ["paper", "branches"])
    rng = np.random.default_rng(1)
    half = (rng.uniform(size=(1, len(units))) > 0.5).astype(float)
    masks = MaskSet.ones(unet, units, Buckets.uniform(1)).with_values(half)
    baked, dropped = maskopt.bake(unet, masks, 0), maskopt.bake(unet, masks, 0, drop=True)
    t = torch.tensor(500)

    with torch.no_grad():
        err = (baked(x, t, ctx).sample - dropped(x, t, ctx).sample).abs().max().item()
        fb = timed(lambda: baked(x, t, ctx), 10)
        fd = timed(lambda: dropped(x, t, ctx), 10)
        fo = timed(lambda: unet(x, t, ctx), 10)
    print(f"one forward, batch 2, 32x32 latents, {int(half.sum())}/{len(units)} units at 0: original {fo * 1e3:.1f} ms, "
          f"baked {fb * 1e3:.1f} ms, dropped {fd * 1e3:.1f} ms; dropped/baked {fd / fb:.3f} (max |diff| {err:.1e})")


if __name__ == "__main__":
    main()
