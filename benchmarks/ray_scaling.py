"""Evaluations per minute on Ray with 1 and 2 evaluators, and Ray's own cost per evaluation.

    python benchmarks/ray_scaling.py                       # the embedded default, 24 candidates, CPU
    python benchmarks/ray_scaling.py --device cuda --candidates 64

1. Candidates: random points of the default search's space (groups, 4 buckets), the same for every run,
   scored with the trajectory cache off, so every run does the same work.
2. Local: one Evaluator in this process, one candidate at a time, on one CPU thread (as each Ray evaluator
   gets one CPU here).
3. Ray, 1 evaluator, then 2 (a fresh local instance of as many CPUs each time): the candidates in groups of
   that many, one per evaluator.
4. Ray's overhead per evaluation: Ray's time per candidate at 1 evaluator minus the local time, and the
   round trip of a call that does no work (the actor's pid).
Prints each rate, the scaling at 2 evaluators against 1, and the overhead as a share of an evaluation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from maskopt.config import resolve
from maskopt.evaluators import search_evaluator
from maskopt.search import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from maskopt.cluster import RayEvaluators

    cfg = resolve(None, out=tempfile.mkdtemp() + "/x", cache=0, device=args.device, race=False)
    prompts = prepare(cfg).prompts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local = search_evaluator(cfg, prompts)
    rng = np.random.default_rng(0)
    shape = local.template.values.shape
    group = [(rng.random(shape) > 0.05).astype(float) for _ in range(args.candidates)]
    local.score(group[:1])  # warm-up
    t0 = time.perf_counter()
    for v in group:
        local.score([v])
    local_s = (time.perf_counter() - t0) / len(group)
    torch.set_num_threads(threads)
    print(f"local, one thread: {local_s:.3f} s per evaluation, {60 / local_s:.0f} per minute")

    rates = {}
    for n in (1, 2):
        ray.init(num_cpus=n, include_dashboard=False)
        pool = RayEvaluators("local", cfg.to_dict(), prompts, args.device, n)
        pool.score(group[:n])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(group), n):
            pool.score(group[i:i + n])
        per = (time.perf_counter() - t0) / len(group)
        rates[n] = 60 / per
        if n == 1:
            actor = pool.actors[0]
            t0 = time.perf_counter()
            for _ in range(50):
                ray.get(actor.pid.remote())
            trip = (time.perf_counter() - t0) / 50
            overhead = per - local_s
        pool.close()
        ray.shutdown()
        print(f"Ray, {n} evaluator(s): {per:.3f} s per evaluation, {rates[n]:.0f} per minute")
    print(f"Ray's cost per evaluation: {overhead * 1e3:+.1f} ms against local ({overhead / local_s:+.1%} of one here); "
          f"a call that does no work: {trip * 1e3:.1f} ms")
    print(f"scaling at 2 evaluators: {rates[2] / rates[1]:.2f}x the 1-evaluator rate (goal >= 1.6x)")


if __name__ == "__main__":
    main()
