"""Which nevergrad optimizer wins on the embedded default, per space: the measurement behind space.DEFAULT_OPTIMIZER.

    python benchmarks/optimizers.py --space gates                      # NGOpt, CMA, OnePlusOne, TwoPointsDE, PSO
    python benchmarks/optimizers.py --space groups --optimizers DiscreteOnePlusOne NGOpt
    python benchmarks/optimizers.py --space binary --budget 150 --seeds 5

1. FreeU's grid (as in testbed_gain.py) on the held-out prompts x unseen seeds, once.
2. Per optimizer: the default search with only `--optimizer` changed (same budget, prompts, seeds), then
   its masks on the same held-out images.
3. One row per optimizer, printed as it finishes: search time (the journal's evaluation seconds), held-out
   gain over the baseline with its bootstrap 95% CI, the Frechet distance to real digits, and the paired
   differences to FreeU's best setting and to the first optimizer listed (the space's default).
With `--out`, each search's folder is kept; a later run with the same `--out` scores the kept masks
again instead of searching (to add a column or an optimizer without redoing the others).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from maskopt.config import resolve
from maskopt.journal import read
from maskopt.maskset import MaskSet
from maskopt.models import load_pipeline
from maskopt.search import run_search
from maskopt.stats import paired
from testbed_gain import freeu_rows, held_out, pick_freeu, versus

CANDIDATES = {
    "gates": ["NGOpt", "CMA", "OnePlusOne", "TwoPointsDE", "PSO"],
    "binary": ["DiscreteOnePlusOne", "DiscreteLenglerOnePlusOne", "NGOpt"],
    "groups": ["DiscreteOnePlusOne", "DiscreteLenglerOnePlusOne", "NGOpt"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="gates", choices=sorted(CANDIDATES))
    ap.add_argument("--optimizers", nargs="+", default=None, help="nevergrad registry names (default: a list per space)")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=10, help="unseen seeds per held-out prompt")
    ap.add_argument("--out", default=None, help="keep every search's folder here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    root = Path(args.out or tempfile.mkdtemp(prefix="maskopt-optimizers-"))
    cfg = resolve(None, space=args.space, budget=args.budget, out=str(root / "unused"))
    pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype, cfg.scheduler)
    names = args.optimizers or CANDIDATES[args.space]

    ev = first = None
    print(f"{args.space}, {cfg.budget} evaluations each, held-out: {args.seeds} unseen seeds per prompt; "
          f"search s: the journal's evaluation time")
    print(f"{'optimizer':26} {'runs':26} {'search s':>8} {'gain vs baseline [95% CI]':>30} {'Frechet':>8} "
          f"{'minus best FreeU [95% CI]':>30} {'minus ' + names[0] + ' [95% CI]':>34}")
    for name in names:
        folder = root / name
        if not (folder / "masks.json").exists():  # a search kept from an earlier run is scored again, not redone
            run_search(resolve(None, space=args.space, budget=args.budget, optimizer=name, out=str(folder)))
        masks = MaskSet.load(folder / "masks.json", unet=pipe.unet)
        seconds = sum(e.seconds for e in read(folder / "journal.jsonl")[1])
        if ev is None:  # the baseline and FreeU's grid, once, on the same held-out images as every row
            ev = held_out(pipe, masks, cfg, args.seeds)
            base = ev(np.ones_like(masks.values), keep_images=True)
            picked = pick_freeu(pipe, masks, cfg)  # on the search prompts x seeds, never on the held-out images
            freeu = next(row for row in freeu_rows(pipe, ev) if row[0] == picked)
            pf, ff = versus(base, freeu[1])
            print(f"{'(baseline Frechet ' + format(versus(base, base)[1], '.3f') + ')':26} "
                  f"{'best FreeU: ' + freeu[0][6:]:26} {'':>8} {pf.diff:+.4f} [{pf.ci_low:+.4f}, {pf.ci_high:+.4f}] "
                  f"{ff:8.3f}", flush=True)
        r = ev(masks.values, keep_images=True)
        first = first or r
        p, fd = versus(base, r)
        q, d = paired(freeu[1].rewards, r.rewards), paired(first.rewards, r.rewards)
        chosen = masks.provenance.get("optimizer_runs", name)
        print(f"{name:26} {chosen:26} {seconds:8.0f} {p.diff:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}] {fd:8.3f} "
              f"{q.diff:+.4f} [{q.ci_low:+.4f}, {q.ci_high:+.4f}] {d.diff:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]",
              flush=True)


if __name__ == "__main__":
    main()
