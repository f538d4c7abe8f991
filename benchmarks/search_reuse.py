"""Evaluations per minute with and without trajectory reuse, on one search's own candidates, same run.

    python benchmarks/search_reuse.py                          # runs the default search (K=4), then times it
    python benchmarks/search_reuse.py --journal runs/x/journal.jsonl   # times the candidates of a finished search
    python benchmarks/search_reuse.py --strategy joint --budget 300

1. A search with the given settings (or the journal of one) gives the candidates, in the order it asked them.
2. Two evaluators score every candidate in that order: one with the trajectory cache (so it replays exactly
   what the search replayed), one without. Their calls alternate, candidate by candidate, so a change in
   the machine's load hits both alike: two back-to-back searches on shared cores drifted by 10-20% here.
3. Prints evaluations per minute of each, the ratio, the U-Net calls replayed, and whether every reward
   agrees bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from maskopt.config import SearchConfig, complete, resolve
from maskopt.scoring import Evaluator, TrajectoryCache
from maskopt.journal import read
from maskopt.rewards import load_reward
from maskopt.evaluators import load_model
from maskopt.search import prepare, run_search


def search_journal(args: argparse.Namespace) -> Path:
    out = Path(tempfile.mkdtemp(prefix="maskopt-reuse-")) / "run"
    cfg = resolve(args.recipe, budget=args.budget, buckets=args.buckets, space=args.space, out=str(out),
                  optimizer=args.optimizer, strategy=args.strategy, device=args.device, holdout_seeds=1)
    t0 = time.perf_counter()
    run_search(cfg)
    print(f"search: {cfg.budget} evaluations ({cfg.strategy}) in {time.perf_counter() - t0:.0f} s -> {out}")
    return out / "journal.jsonl"


def evaluators(cfg: SearchConfig, header: dict | None = None) -> Callable[[TrajectoryCache | None], Evaluator]:
    """make(cache) -> an Evaluator of the search `cfg` describes (its model, units, buckets, prompts, seeds, reward)."""
    inputs = prepare(dataclasses.replace(cfg, out=tempfile.mkdtemp(), resume=False))  # the prompts and reward spec
    pipe, template = load_model(cfg)
    if header is not None:
        assert [u.to_dict() for u in template.units] == header["units"], "the journal is for other units"
        assert template.buckets.to_list() == header["buckets"], "the journal is for other buckets"
    reward = load_reward(cfg.reward, cfg.device)
    return lambda cache: Evaluator(pipe, reward, template, inputs.prompts, range(cfg.seeds), cfg.steps,
                                   cfg.guidance, cfg.size, cache=cache, batch_size=cfg.batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--journal", type=Path, default=None, help="time the candidates of this search instead")
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--buckets", type=int, default=None)
    ap.add_argument("--space", default=None)
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--strategy", default=None)
    ap.add_argument("--device", default=None, help="cpu (2 threads, as docs/benchmarks.md's figures) or cuda")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device in (None, "cpu"):
        torch.set_num_threads(2)

    journal = args.journal or search_journal(args)
    header, entries, _ = read(journal)
    cfg = complete(SearchConfig.from_dict(header["config"]))  # a journal of an older maskopt left defaults unfilled
    if args.device is not None:
        cfg = dataclasses.replace(cfg, device=args.device)
    make = evaluators(cfg, header)
    cached, plain = make(TrajectoryCache(SearchConfig.cache)), make(None)

    seconds = {"cached": 0.0, "plain": 0.0}
    hits = calls = 0
    same = True
    for i, e in enumerate(entries):
        values = np.asarray(e.values)
        order = ("cached", "plain") if i % 2 == 0 else ("plain", "cached")
        for name in order:
            ev = (cached if name == "cached" else plain)(values)
            seconds[name] += ev.seconds
            if name == "cached":
                hits, calls, r_cached = hits + ev.cache_hits, calls + ev.unet_calls, ev.rewards
            else:
                r_plain = ev.rewards
        same &= r_cached == r_plain
    n = len(entries)
    print(f"{n} evaluations, K={len(header['buckets'])}, {header['config']['space']}, {header.get('strategy', 'joint')}, "
          f"{header['optimizer']}: without reuse {60 * n / seconds['plain']:.1f} evals/min, with reuse "
          f"{60 * n / seconds['cached']:.1f} evals/min, ratio {seconds['plain'] / seconds['cached']:.2f}x; "
          f"U-Net calls replayed {hits}/{hits + calls}; identical rewards: {same}")


if __name__ == "__main__":
    main()
