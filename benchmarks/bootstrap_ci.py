"""Which bootstrap interval keeps the held-out figures honest: percentile or BCa, on the embedded default's data.

    python benchmarks/bootstrap_ci.py --masks RUN/masks.json          # a default search's masks (maskopt search)

1. Samples the baseline and the masks on the held-out prompts x seeds 1000..1000+S-1 (S = --seeds, 10:
   200 images) and takes the per-image reward differences as the population: its mean is the "true" gain.
2. Draws --trials samples of n pairs from that population (n = 20, 40, 80; 80 is what a search validates
   on: 20 held-out prompts x 4 seeds) and computes both 95% intervals on each.
3. Prints, per method and n: how often the interval holds the true gain (95% is honest), its mean width,
   and how often it excludes 0 (the search's "gain" verdict); then both intervals on all 200 pairs.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from maskopt.default import HOLDOUT_PROMPTS_PATH
from maskopt.default.reward import DigitReward
from maskopt.scoring import Evaluator
from maskopt.maskset import MaskSet
from maskopt.models import load_pipeline, model_for
from maskopt.prompts import read_prompts
from maskopt.stats import METHODS, interval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", required=True)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples per interval (the search uses 10000)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    masks = MaskSet.load(args.masks)
    s = masks.sampler
    pipe = load_pipeline(model_for(None, masks.source), scheduler=s.scheduler)
    ev = Evaluator(pipe, DigitReward(), masks, read_prompts(HOLDOUT_PROMPTS_PATH), range(1000, 1000 + args.seeds),
                   s.steps or 15, s.guidance if s.guidance is not None else 1.0, s.size)
    d = np.asarray(ev(masks.values).rewards) - np.asarray(ev(np.ones_like(masks.values)).rewards)
    truth = d.mean()
    skew = float(((d - truth) ** 3).mean() / d.std() ** 3)
    print(f"population: {len(d)} held-out pairs, mean difference {truth:+.4f}, sd {d.std():.4f}, skewness {skew:+.2f}")

    rng = np.random.default_rng(0)
    print(f"\n{'n':>4} {'method':>10} {'coverage':>9} {'width':>8} {'excludes 0':>11} {'s/interval':>11}")
    for n in (20, 40, 80):
        samples = [d[rng.integers(0, len(d), n)] for _ in range(args.trials)]
        for method in METHODS:
            t0 = time.perf_counter()
            cis = np.array([interval(x, args.reps, seed=i, method=method) for i, x in enumerate(samples)])
            sec = (time.perf_counter() - t0) / len(samples)
            cover = np.mean((cis[:, 0] <= truth) & (truth <= cis[:, 1]))
            print(f"{n:>4} {method:>10} {cover:9.3f} {np.mean(cis[:, 1] - cis[:, 0]):8.4f} "
                  f"{np.mean(cis[:, 0] > 0):11.3f} {sec:11.4f}")
    for method in METHODS:
        lo, hi = interval(d, 10_000, 0, method)
        print(f"all {len(d)} pairs, {method}: {truth:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}]")


if __name__ == "__main__":
    main()
