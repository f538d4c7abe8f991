"""Evaluations per minute with and without trajectory reuse, same search, same machine, same run.

    python benchmarks/search_reuse.py                    # embedded default, K=4, default optimizer
    python benchmarks/search_reuse.py --space binary --budget 40

Both runs use the same seed, so the optimizer asks the same candidates; rewards must agree exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from maskopt.config import resolve
from maskopt.search import run_search


def run(cache: int, args: argparse.Namespace) -> tuple[float, list[dict]]:
    out = Path(tempfile.mkdtemp(prefix="maskopt-reuse-")) / "run"
    cfg = resolve(args.recipe, budget=args.budget, buckets=args.buckets, space=args.space, cache=cache, out=str(out),
                  optimizer=args.optimizer, holdout_seeds=1)
    run_search(cfg)
    entries = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()[1:]]
    return sum(e["seconds"] for e in entries), entries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--space", default=None)
    ap.add_argument("--optimizer", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    t_off, off = run(0, args)
    t_on, on = run(4096, args)
    same = [a["rewards"] == b["rewards"] for a, b in zip(off, on)]
    hits = sum(e["cache_hits"] for e in on)
    calls = sum(e["unet_calls"] for e in on)
    print(f"{len(on)} evaluations, K={args.buckets}, space {args.space or 'default'}: "
          f"without reuse {60 * len(off) / t_off:.1f} evals/min, with reuse {60 * len(on) / t_on:.1f} evals/min, "
          f"ratio {t_off / t_on:.2f}x; U-Net calls replayed {hits}/{hits + calls}; identical rewards: {all(same)}")


if __name__ == "__main__":
    main()
