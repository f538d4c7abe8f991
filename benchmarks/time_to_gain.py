"""Time to a mask of a given quality: the default search with racing and without, same seeds, same machine.

    python benchmarks/time_to_gain.py                        # budget 400 plain, up to 600 raced (about 15 min)
    python benchmarks/time_to_gain.py --budget 100 --holdout-seeds 4 --no-previous

1. The plain search (--no-race) runs with --budget; its final search reward is the target.
2. The raced search runs with the same settings and seed and --race-budget candidates (1.5x the plain
   search's by default: a stopped candidate is one of them). With --previous (the default) the plain search
   also runs at --workers 1, as the default search ran before racing (the recipe now races groups of 4). Time to the target: the evaluation seconds, summed in
   journal order, up to the first candidate scored in full whose search reward reaches the target.
3. Images scored by each; the held-out gain of each best over the baseline (unseen seeds); the paired 95% CI
   of raced - plain on those held-out images.
4. False stops: up to --recheck stopped candidates are scored on every image; how many would have beaten the
   incumbent they were stopped against (by more than the margin) is the measured error of the bound.
5. The physical limit: the U-Net time of one image-step, measured, times the U-Net calls each search ran
   (after reuse), against its wall time; and times images x steps (no reuse, no racing).
The ratio of the raced time to the plain time is printed last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from maskopt.config import resolve
from maskopt.scoring import UNSEEN_SEED0, Evaluator
from maskopt.journal import read
from maskopt.rewards import load_reward
from maskopt.evaluators import load_model
from maskopt.search import prepare, run_search
from maskopt.stats import paired


def search(args: argparse.Namespace, root: Path, race: bool, budget: int, workers: int | None = None,
           ) -> tuple[list[dict], float]:
    out = root / (("race" if race else "plain") + (f"-w{workers}" if workers else ""))
    cfg = resolve(args.recipe, budget=budget, out=str(out), race=race, seed=args.seed, holdout_seeds=1,
                  race_margin=args.margin, race_alpha=args.alpha, race_looks=args.looks, workers=workers)
    t0 = time.perf_counter()
    run_search(cfg)
    wall = time.perf_counter() - t0
    _, entries, _ = read(out / "journal.jsonl")
    return entries, wall


def time_to(entries: list[dict], target: float) -> float | None:
    """Evaluation seconds summed in journal order up to the first full score reaching `target`."""
    spent = 0.0
    for e in entries:
        spent += e.seconds
        if e.choosable and e.reward >= target - 1e-12:
            return spent
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--race-budget", type=int, default=None, help="default: 1.5x --budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin", type=float, default=None, help="--race-margin (default: the search's)")
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--looks", default=None, help="--race-looks (default: the search's)")
    ap.add_argument("--holdout-seeds", type=int, default=10)
    ap.add_argument("--recheck", type=int, default=40, help="stopped candidates re-scored in full")
    ap.add_argument("--previous", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the plain search at --workers 1 (the default before racing)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="maskopt-race-"))

    plain, plain_wall = search(args, root, False, args.budget)
    target = max(e.reward for e in plain if e.choosable)
    raced, race_wall = search(args, root, True, args.race_budget or args.budget * 3 // 2)
    one = search(args, root, False, args.budget, workers=1) if args.previous else None
    cfg = resolve(args.recipe, out=tempfile.mkdtemp(), seed=args.seed, race_margin=args.margin,
                  race_alpha=args.alpha, race_looks=args.looks)

    # Evaluators of the search's images (for rechecks and the per-call time) and of held-out images
    inputs = prepare(cfg)
    n = len(inputs.prompts) * cfg.seeds
    pipe, template = load_model(cfg)
    reward = load_reward(cfg.reward, cfg.device)
    make = lambda prompts, seeds: Evaluator(pipe, reward, template, prompts, seeds, cfg.steps, cfg.guidance, cfg.size)
    search_eval = make(inputs.prompts, range(cfg.seeds))
    held = make(inputs.holdout, range(UNSEEN_SEED0, UNSEEN_SEED0 + args.holdout_seeds))

    best = lambda entries: min((e for e in entries if e.choosable), key=lambda e: -e.objective)
    ones = np.ones(template.values.shape)
    base_h = held(ones).rewards
    plain_h, race_h = held(np.asarray(best(plain).values)).rewards, held(np.asarray(best(raced).values)).rewards

    # false stops: stopped candidates scored in full, against the incumbent they were stopped against
    by_i = {e.i: e for e in raced}
    stopped = [e for e in raced if e.partial is not None and not e.failed]
    rng = np.random.default_rng(0)
    sample = [stopped[i] for i in sorted(rng.choice(len(stopped), min(args.recheck, len(stopped)), replace=False))]
    margin_abs = cfg.race_margin * float(np.std(raced[0].image_rewards, ddof=1))
    false = 0
    for e in sample:
        full = search_eval(np.asarray(e.values)).reward
        inc = by_i[e.partial["incumbent"]]
        gain = full - inc.reward  # the default recipe has no sparsity term
        false += gain > margin_abs

    # the physical limit: the U-Net's own time per image-step, timed by hooks inside one uncached evaluation
    unet_s, eval_s = [], []
    for _ in range(2):  # twice, the faster kept
        spent = [0.0]
        pre = pipe.unet.register_forward_pre_hook(lambda *a: spent.__setitem__(0, spent[0] - time.perf_counter()))
        post = pipe.unet.register_forward_hook(lambda *a: spent.__setitem__(0, spent[0] + time.perf_counter()))
        t0 = time.perf_counter()
        search_eval(ones)
        eval_s.append(time.perf_counter() - t0)
        pre.remove(), post.remove()
        unet_s.append(spent[0])
    unet = min(unet_s) / (n * cfg.steps)  # seconds per image per sampling step, the U-Net alone
    whole = min(eval_s) / (n * cfg.steps)

    def row(name: str, entries: list[dict], wall: float) -> dict:
        images = sum(e.get("images", n) for e in entries)
        return {"search": name, "evaluations": len(entries), "best": max(e.reward for e in entries if e.choosable),
                "images": images, "naive_images": n * len(entries), "wall_s": round(wall, 1),
                "eval_s": round(sum(e.seconds for e in entries), 1), "time_to_target_s": time_to(entries, target),
                "limit_s": round(images * cfg.steps * unet, 1)}

    rows = [row("plain", plain, plain_wall), row("raced", raced, race_wall)]
    if one is not None:
        rows.append(row("plain, --workers 1", one[0], one[1]))
    for r in rows:
        print(json.dumps(r))
    gains = {"plain": paired(base_h, plain_h), "raced": paired(base_h, race_h), "raced - plain": paired(plain_h, race_h)}
    if one is not None:
        one_h = held(np.asarray(best(one[0]).values)).rewards
        gains.update({"plain, --workers 1": paired(base_h, one_h), "raced - plain at --workers 1": paired(one_h, race_h)})
    for k, p in gains.items():
        print(f"held-out ({len(base_h)} images) {k}: {p.describe()}")
    print(f"per image-step: U-Net {unet * 1e3:.3f} ms, a whole evaluation {whole * 1e3:.3f} ms (sampler, VAE, reward); "
          f"limit of the plain search (images x steps x U-Net) {rows[0]['limit_s']:.0f} s, its wall "
          f"{rows[0]['wall_s'] / rows[0]['limit_s']:.2f}x that; raced {rows[1]['wall_s'] / rows[1]['limit_s']:.2f}x its own")
    print(f"false stops: {false} of {len(sample)} stopped candidates re-scored in full beat their incumbent by more than "
          f"the margin ({margin_abs:.2g}); {len(stopped)} of {len(raced)} raced candidates stopped early")
    t_plain, t_race = rows[0]["time_to_target_s"], rows[1]["time_to_target_s"]
    if t_race is None:
        print(f"the raced search did not reach the plain search's {target:.4f} in {len(raced)} evaluations "
              f"(best {rows[1]['best']:.4f}); time ratio: not reached")
    else:
        if one is not None and rows[2]["time_to_target_s"] is not None:
            print(f"plain at --workers 1 reached it in {rows[2]['time_to_target_s']:.0f} s: raced / that "
                  f"{t_race / rows[2]['time_to_target_s']:.2f}")
        print(f"time to the plain search's final reward {target:.4f}: plain {t_plain:.0f} s, raced {t_race:.0f} s; "
              f"ratio raced / plain: {t_race / t_plain:.2f}")


if __name__ == "__main__":
    main()
