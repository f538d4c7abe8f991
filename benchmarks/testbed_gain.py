"""The search's claim, measured on the embedded default (digits pipeline + classifier reward), beside FreeU.

    python benchmarks/testbed_gain.py                       # the default search (recipes/default.yaml)
    python benchmarks/testbed_gain.py --recipe R.yaml --budget 150 --seeds 10
    python benchmarks/testbed_gain.py --strategy sweep --budget 400 --seeds 10
    python benchmarks/testbed_gain.py --masks RUN/masks.json --seeds 10      # judge a finished search
    python benchmarks/testbed_gain.py --targets freeu paper --init freeu     # FreeU's b factors in the search, from FreeU

1. Runs `maskopt search` with the default settings (or a recipe) into a temporary folder.
2. On the held-out prompts x unseen seeds (1000..1000+S-1), samples baseline, maskopt's masks, and
   FreeU (diffusers' `enable_freeu`) for every setting of a small grid, all with the same noise.
3. Prints mean reward, the paired difference to the baseline with its bootstrap 95% CI, and the Frechet
   distance to real held-out digits (classifier features) for each; then maskopt beside FreeU's best
   setting, picked on the search prompts x seeds (as the masks were), never on the held-out images.
4. Judges baseline, FreeU's best and maskopt again on the same images with a judge the search never saw
   (`digits-kernel`) and as sets: diversity between the seeds of each prompt, as a ratio to the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskopt.config import SearchConfig, complete, resolve
from maskopt.default import HOLDOUT_PROMPTS_PATH
from maskopt.default.reward import DigitReward, frechet_distance
from maskopt.scoring import Evaluation, Evaluator
from maskopt.freeu import GRID, enabled
from maskopt.maskset import MaskSet
from maskopt.models import load_pipeline
from maskopt.prompts import read_prompts
from maskopt.search import run_search
from maskopt.stats import Paired, paired



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", default=None, help="judge this mask file instead of running a search")
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=10, help="unseen seeds per held-out prompt")
    ap.add_argument("--out", default=None)
    ap.add_argument("--space", default=None)
    ap.add_argument("--targets", nargs="*", default=None, help="e.g. --targets freeu paper: FreeU's b factors beside the masks")
    ap.add_argument("--init", nargs="*", default=None, help="starting points, e.g. --init freeu")
    ap.add_argument("--require", nargs="*", default=None, help="bounds on set-level terms, e.g. --require 'diversity>=0.97'")
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--strategy", default=None, help="joint (default) or sweep")
    ap.add_argument("--workers", type=int, default=None, help="candidates evaluated together")
    ap.add_argument("--device", default=None, help="cpu (2 threads, as docs/benchmarks.md's figures) or cuda")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device in (None, "cpu"):
        torch.set_num_threads(2)

    if args.masks:  # judge a finished search: its settings are in the mask file's provenance
        masks_path = Path(args.masks)
        cfg = complete(SearchConfig.from_dict(MaskSet.load(masks_path).provenance["config"]))
        if args.device:
            cfg = dataclasses.replace(cfg, device=args.device)
        print(f"masks: {masks_path} ({cfg.space}, {cfg.strategy}, K={cfg.buckets}, {cfg.steps} steps, guidance {cfg.guidance})")
    else:
        out = args.out or tempfile.mkdtemp(prefix="maskopt-testbed-")
        cfg = resolve(args.recipe, budget=args.budget, out=out, space=args.space,
                      targets=tuple(args.targets) if args.targets else None, optimizer=args.optimizer,
                      init=tuple(args.init) if args.init else None, requires=tuple(args.require) if args.require else None,
                      strategy=args.strategy, workers=args.workers, device=args.device)
        t0 = time.perf_counter()
        masks_path = run_search(cfg).masks_path
        print(f"search: {cfg.budget} evaluations in {time.perf_counter() - t0:.0f} s ({cfg.space}, {cfg.strategy}, "
              f"{cfg.targets}, --workers {cfg.workers}, K={cfg.buckets}, {cfg.steps} steps, guidance {cfg.guidance}) "
              f"-> {masks_path}")

    pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype, cfg.scheduler)
    masks = MaskSet.load(masks_path, unet=pipe.unet)
    ev = held_out(pipe, masks, cfg, args.seeds)
    base = ev(np.ones_like(masks.values), keep_images=True)
    rows = [("baseline", base), ("maskopt", ev(masks.values, keep_images=True))] + freeu_rows(pipe, ev)
    print(f"\nheld-out: {len(ev.prompts)} prompts x {args.seeds} unseen seeds = {len(base.rewards)} images, "
          "same noise for every row")
    print(f"{'':42} {'reward':>7} {'diff vs baseline [95% CI]':>32} {'Frechet':>8}")
    results = {}
    for name, r in rows:
        p, fd = versus(base, r)
        results[name] = (p, fd)
        ci = f"{p.diff:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}]" if name != "baseline" else ""
        print(f"{name:42} {np.mean(r.rewards):7.4f} {ci:>32} {fd:8.3f}")
    # FreeU's best is picked on the search's own prompts and seeds, as the masks were: never on the images it is
    # judged on. The setting best on the held-out images themselves is printed too, as FreeU's upper bound.
    picked = pick_freeu(pipe, masks, cfg)
    upper = max((k for k in results if k.startswith("FreeU")), key=lambda k: results[k][0].diff)
    (pm, fm), (pf, ff) = results["maskopt"], results[picked]
    _, fb = results["baseline"]
    evals = dict(rows)
    print(f"\nmaskopt: {pm.describe()}; Frechet {fb:.3f} -> {fm:.3f}")
    print(f"best FreeU, picked on the search prompts x seeds ({picked}): {pf.describe()}; Frechet {ff:.3f}")
    print(f"maskopt - best FreeU: {paired(evals[picked].rewards, evals['maskopt'].rewards).describe()}")
    print(f"(FreeU's best on these held-out images themselves, {upper}: maskopt - it "
          f"{paired(evals[upper].rewards, evals['maskopt'].rewards).describe()})")
    goal = pm.ci_low > 0 and pm.diff >= 0.05 and fm <= fb
    print(f"goal (gain >= 0.05, CI above 0, Frechet not worse): {'met' if goal else 'NOT met'}")
    judged(evals["baseline"], evals[picked], evals["maskopt"], ev, cfg)


def judged(base: Evaluation, freeu: Evaluation, masked: Evaluation, ev: Evaluator, cfg: SearchConfig) -> None:
    """The same images under a judge the search never saw (digits-kernel) and as sets: diversity between the
    seeds of each prompt (classifier features, and the 8x8 pixels the judge reads), ratio to the baseline."""
    from maskopt.default.judge import KernelJudge, pixels
    from maskopt.measures import diversity

    judge, reward = KernelJudge(), DigitReward(device=cfg.device)
    prompts = ev.image_prompts
    rows = {"baseline": base, "best FreeU": freeu, "maskopt": masked}
    scores = {k: judge(r.images, prompts).tolist() for k, r in rows.items()}
    spread = lambda r, f: float(diversity(f(r.images), len(ev.prompts)).mean())
    print(f"\n{'':12} {'reward':>7} {'judge':>7} {'diversity (features / pixels) vs baseline':>44}")
    for k, r in rows.items():
        ratio = [spread(r, f) / spread(base, f) for f in (reward.features, lambda x: pixels(x).float())]
        print(f"{k:12} {np.mean(r.rewards):7.4f} {np.mean(scores[k]):7.4f} {ratio[0]:21.3f} / {ratio[1]:.3f}")
    print(f"judge digits-kernel, maskopt - baseline: {paired(scores['baseline'], scores['maskopt']).describe()}")
    print(f"judge digits-kernel, maskopt - best FreeU: {paired(scores['best FreeU'], scores['maskopt']).describe()}")


def held_out(pipe, masks: MaskSet, cfg: SearchConfig, seeds: int) -> Evaluator:
    """An evaluator on the held-out prompts x unseen seeds 1000..1000+seeds-1, with the search's sampler settings."""
    prompts = read_prompts(cfg.holdout_prompts or HOLDOUT_PROMPTS_PATH)
    return Evaluator(pipe, DigitReward(device=cfg.device), masks, prompts, range(1000, 1000 + seeds), cfg.steps, cfg.guidance, cfg.size)


def freeu_rows(pipe, ev: Evaluator) -> list[tuple[str, Evaluation]]:
    """The all-ones U-Net under every FreeU setting of maskopt.freeu.GRID (the grid `maskopt eval` picks from)."""
    rows = []
    for setting in GRID:
        with enabled(pipe.unet, setting):
            rows.append((f"FreeU {setting}", ev(np.ones_like(ev.template.values), keep_images=True)))
    return rows


def pick_freeu(pipe, masks: MaskSet, cfg: SearchConfig) -> str:
    """The grid's best setting on the search prompts x seeds under the search's reward, never on held-out images."""
    from maskopt.rewards import load_reward

    search_ev = Evaluator(pipe, load_reward(cfg.reward, cfg.device), masks, read_prompts(cfg.prompts),
                          range(cfg.seeds), cfg.steps, cfg.guidance, cfg.size)
    return max(freeu_rows(pipe, search_ev), key=lambda row: np.mean(row[1].rewards))[0]


def versus(base: Evaluation, r: Evaluation) -> tuple[Paired, float]:
    """(paired difference to the baseline with its bootstrap CI, Frechet distance to real digits) of one row."""
    return paired(base.rewards, r.rewards), frechet_distance(r.images)


if __name__ == "__main__":
    main()
