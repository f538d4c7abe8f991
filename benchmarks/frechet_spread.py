"""How much the embedded default's Frechet distance moves between sets of held-out images.

    python benchmarks/frechet_spread.py runs/a/masks.json runs/b/masks.json --sets 4

For the baseline and each mask file: the Frechet distance to real held-out digits (classifier features) on
`--sets` disjoint sets of 20 held-out prompts x 10 unseen seeds (seeds 1000.., 1010.., ...), with the mean and
standard deviation over sets. benchmarks/testbed_gain.py reports one such set; this says how far to trust it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from maskopt.config import resolve
from maskopt.default import HOLDOUT_PROMPTS_PATH
from maskopt.default.reward import DigitReward, frechet_distance
from maskopt.scoring import Evaluator
from maskopt.maskset import MaskSet
from maskopt.models import load_pipeline
from maskopt.prompts import read_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("masks", nargs="+", help="mask files found on the embedded default")
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=10, help="seeds per set")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = resolve(None)  # the embedded default's recipe: its sampler settings
    pipe = load_pipeline(cfg.model, scheduler=cfg.scheduler)
    prompts = read_prompts(HOLDOUT_PROMPTS_PATH)
    masks = [MaskSet.load(p, unet=pipe.unet) for p in args.masks]
    rows = [("baseline", masks[0], np.ones_like(masks[0].values))] + [(p, m, m.values) for p, m in zip(args.masks, masks)]
    reward = DigitReward()
    for name, template, values in rows:
        fds = []
        for k in range(args.sets):
            seeds = range(1000 + k * args.seeds, 1000 + (k + 1) * args.seeds)
            ev = Evaluator(pipe, reward, template, prompts, seeds, cfg.steps, cfg.guidance, cfg.size)
            fds.append(frechet_distance(ev(values, keep_images=True).images))
        print(f"{name}: Frechet per set {' '.join(f'{f:.3f}' for f in fds)}; mean {np.mean(fds):.3f}, "
              f"sd {np.std(fds, ddof=1):.3f}")


if __name__ == "__main__":
    main()
