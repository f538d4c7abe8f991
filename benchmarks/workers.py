"""Evaluations per minute with `--workers W` (W candidates in one batch) against one candidate at a time.

    python benchmarks/workers.py                      # the embedded default, W = 2, 4, 8, 48 candidates
    python benchmarks/workers.py --workers 4 --candidates 96 --recipe recipes/sd15-paper.yaml --device cuda

Candidates are drawn at random from the search's space (gates uniform in its gate range, binary and
groups: each unit off with probability 0.1), without the trajectory cache, so only the batching differs.
Group by group, the same candidates are scored both ways, in alternating order, so a change in the
machine's load hits both alike. Prints evaluations per minute, the ratio, and the largest reward
difference between the two (float rounding: a group scales layer outputs per sample, one candidate
scales weights).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from maskopt.config import resolve
from search_reuse import evaluators


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--device", default=None)
    ap.add_argument("--space", default=None, help="groups (the default's), gates or binary")
    ap.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device in (None, "cpu"):
        torch.set_num_threads(2)

    cfg = resolve(args.recipe, device=args.device, space=args.space, dtype=args.dtype)
    evaluator = evaluators(cfg)(None)
    shape = evaluator.template.values.shape
    rng = np.random.default_rng(0)
    lo, hi = cfg.gate_range
    draw = (lambda: rng.uniform(lo, hi, shape)) if cfg.space == "gates" else (lambda: (rng.random(shape) > 0.1) * 1.0)
    candidates = [draw() for _ in range(args.candidates)]
    evaluator(candidates[0])  # warm-up
    print(f"{cfg.model or 'embedded default'}, {cfg.space}, K={shape[0]}, {shape[1]} units, "
          f"{len(evaluator.image_prompts)} images per candidate, device {cfg.device}, {cfg.dtype}")
    for w in args.workers:
        alone = together = 0.0
        diff = 0.0
        for g, start in enumerate(range(0, len(candidates), w)):
            group = candidates[start:start + w]
            for way in (("alone", "together") if g % 2 == 0 else ("together", "alone")):
                if way == "alone":
                    single = [evaluator(v) for v in group]
                    alone += sum(e.seconds for e in single)
                else:
                    batch = evaluator.score(group)
                    together += sum(e.seconds for e in batch)
            diff = max(diff, max(abs(a - b) for s, t in zip(single, batch) for a, b in zip(s.rewards, t.rewards)))
        n = len(candidates)
        print(f"--workers {w}: one at a time {60 * n / alone:.1f} evals/min, {w} per batch {60 * n / together:.1f} "
              f"evals/min, ratio {alone / together:.2f}x; largest reward difference {diff:.1e}")


if __name__ == "__main__":
    main()
