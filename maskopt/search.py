"""`maskopt search`: gradient-free search of per-bucket mask values against a reward, over a prompt set.

    cfg = resolve(recipe="recipes/default.yaml", budget=60)
    result = run_search(cfg)          # writes out/masks.json, journal.jsonl, report.md, *.png

The loop is nevergrad's ask/tell: a candidate is one value per (bucket, unit); its loss is minus
(mean reward over prompts x seeds + sparsity bonus). The all-ones baseline is evaluated first and
stays a candidate. Every evaluation is journaled before the next starts, so `--resume` replays the
journal into a fresh optimizer and continues. The best candidate and the baseline are then compared
on held-out prompts and unseen seeds; the gain is reported only when its 95% interval excludes 0.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .buckets import Buckets
from .config import SearchConfig
from .errors import MaskoptError
from .evaluate import Evaluation, Evaluator, TrajectoryCache
from .journal import Journal, read
from .maskset import MaskSet
from .prompts import read_prompts
from .space import DEFAULT_OPTIMIZER, close, decode, encode, optimizer, space
from .stats import Paired, paired

logger = logging.getLogger(__name__)

FAILED_LOSS = 1e6  # a candidate whose reward is NaN/inf: scored as failed, the search goes on
HOLDOUT_SEED0 = 1000  # validation seeds start here, far from the search seeds 0..S-1


@dataclass
class SearchResult:
    out: Path
    masks_path: Path
    best: dict[str, Any]  # the journal entry of the best candidate
    baseline: dict[str, Any]
    holdout: Paired
    evaluations: int


def prepare(cfg: SearchConfig) -> dict[str, Any]:
    """Check every input that can be checked before loading a model; returns the resolved inputs."""
    from . import default
    from .models import SCHEDULERS
    from .rewards import check_spec

    embedded = cfg.model is None
    if not embedded and not cfg.prompts:
        raise MaskoptError("--prompts is required with --model (the shipped prompts are for the embedded digits model)")
    prompts = read_prompts(cfg.prompts or default.PROMPTS_PATH)
    holdout_file = cfg.holdout_prompts or (default.HOLDOUT_PROMPTS_PATH if embedded and not cfg.prompts else None)
    holdout = read_prompts(holdout_file) if holdout_file else prompts
    reward = cfg.reward or ("digits" if embedded else "clip")
    check_spec(reward)
    if cfg.scheduler and cfg.scheduler not in SCHEDULERS:
        raise MaskoptError(f"unknown scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    # names a bad space, gate range or optimizer before any model loads
    close(optimizer(cfg.optimizer, space(cfg.space, cfg.buckets, 1, cfg.gate_range), cfg.space, cfg.budget, cfg.workers))
    out = Path(cfg.out)
    _check_out(out, cfg)
    return dict(prompts=prompts, holdout=holdout, holdout_file=holdout_file, reward=reward, out=out)


def _check_out(out: Path, cfg: SearchConfig) -> None:
    journal = out / "journal.jsonl"
    if out.exists() and not out.is_dir():
        raise MaskoptError(f"output folder {out} is a file")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not cfg.resume:
        raise MaskoptError(f"output folder {out} exists and is not empty; pass --resume to continue a search there, or choose another --out")
    if cfg.resume and busy:
        header, _, _ = read(journal)
        if header is None:
            raise MaskoptError(f"--resume: {out} holds no search journal ({journal.name} missing or empty)")
        before, now = header["config"], cfg.identity()
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if diff:
            k = diff[0]
            raise MaskoptError(
                f"--resume: journal in {out} is from a different configuration ({k}: {before.get(k)!r} there, {now.get(k)!r} now"
                + (f"; also {', '.join(diff[1:])}" if diff[1:] else "") + ")"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MaskoptError(f"output folder {out} is not writable ({e.strerror})") from None


def check_buckets(pipe: Any, buckets: Buckets, steps: int) -> None:
    """Every bucket must get at least one sampling step, or its values could never matter."""
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    seen = {buckets.index(float(t)) for t in sched.timesteps}
    empty = [k for k in range(len(buckets)) if k not in seen]
    if empty:
        k = empty[0]
        raise MaskoptError(
            f"bucket {k} {list(buckets.ranges[k])} gets no sampling step with {steps} steps of "
            f"{type(sched).__name__}: use fewer --buckets or more --steps"
        )


def run_search(cfg: SearchConfig, progress: Callable[[dict], None] | None = None) -> SearchResult:
    from .models import load_pipeline
    from .rewards import load_reward
    from .units import find_units

    # 1. Check inputs (cheap) before loading anything heavy.
    inputs = prepare(cfg)
    out: Path = inputs["out"]
    try:
        # 2. Model, units, buckets, reward.
        pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype, cfg.scheduler)
        groups = cfg.groups or (4 if cfg.space == "groups" else None)
        units = find_units(pipe.unet, cfg.targets, groups=groups)
        buckets = Buckets.uniform(cfg.buckets, int(pipe.scheduler.config.num_train_timesteps))
        check_buckets(pipe, buckets, cfg.steps)
        template = MaskSet.ones(pipe.unet, units, buckets, source=cfg.model or "maskopt:default")
        reward = load_reward(inputs["reward"], cfg.device)
        logger.info("%d units x %d buckets, reward %s", len(units), len(buckets), inputs["reward"])
    except BaseException:
        _remove_if_fresh(out, cfg)
        raise

    evaluator = Evaluator(pipe, reward, template, inputs["prompts"], range(cfg.seeds), cfg.steps, cfg.guidance,
                          cfg.size, TrajectoryCache(cfg.cache) if cfg.cache > 0 else None, cfg.batch_size)

    # 3. The ask/tell loop, journaled.
    header = {"config": cfg.identity(), "units": [u.to_dict() for u in units], "buckets": buckets.to_list(),
              "reward": inputs["reward"], "optimizer": cfg.optimizer or DEFAULT_OPTIMIZER[cfg.space]}
    journal = Journal(out / "journal.jsonl", header)
    _, entries, _ = read(journal.path)
    param = space(cfg.space, len(buckets), len(units), cfg.gate_range, cfg.seed)
    opt = optimizer(cfg.optimizer, param, cfg.space, cfg.budget, cfg.workers)
    for e in entries:  # --resume: replay what was already evaluated
        opt.tell(param.spawn_child(new_value=encode(np.asarray(e["values"]), cfg.space)), _loss(e))
    if entries:
        logger.info("resumed %d evaluations from %s", len(entries), journal.path)

    def record(values: np.ndarray, ev: Evaluation) -> dict:
        objective = ev.reward + cfg.sparsity * float((values == 0).sum()) / len(buckets)
        entry = {"i": len(entries), "values": values.tolist(), "reward": ev.reward, "objective": objective,
                 "failed": ev.failed, "rewards": ev.per_prompt(len(inputs["prompts"])) if not ev.failed else ev.rewards,
                 "seconds": round(ev.seconds, 3), "cache_hits": ev.cache_hits, "unet_calls": ev.unet_calls}
        journal.append(entry)  # flushed before the next evaluation starts
        entries.append(entry)
        if progress:
            progress(entry)
        return entry

    try:
        if not entries:  # the baseline first: it is always a candidate
            ones = np.ones((len(buckets), len(units)))
            opt.tell(param.spawn_child(new_value=encode(ones, cfg.space)), _loss(record(ones, evaluator(ones))))
        while len(entries) < cfg.budget:
            asked = [opt.ask() for _ in range(min(cfg.workers, cfg.budget - len(entries)))]
            for cand in asked:
                values = decode(cand.value, len(buckets), len(units))
                opt.tell(cand, _loss(record(values, evaluator(values))))
    finally:
        journal.close()
        close(opt)

    # 4. Best candidate vs baseline on held-out prompts and unseen seeds.
    baseline = entries[0]
    best = min((e for e in entries if not e["failed"]), key=_loss, default=baseline)
    holdout_eval = Evaluator(pipe, reward, template, inputs["holdout"],
                             range(HOLDOUT_SEED0, HOLDOUT_SEED0 + cfg.holdout_seeds), cfg.steps, cfg.guidance,
                             cfg.size, None, cfg.batch_size)
    base_ev = holdout_eval(np.asarray(baseline["values"]), keep_images=True)
    best_ev = holdout_eval(np.asarray(best["values"]), keep_images=True)
    if base_ev.failed or best_ev.failed:
        raise MaskoptError("the reward returned NaN or inf on the held-out images; no mask file written")
    holdout = paired(base_ev.rewards, best_ev.rewards)

    # 5. The mask file (the contract), then the report.
    masks = template.with_values(
        np.asarray(best["values"]),
        reward=inputs["reward"], optimizer=header["optimizer"], space=cfg.space, budget=cfg.budget,
        evaluations=len(entries), best_evaluation=best["i"], search_reward=best["reward"],
        baseline_search_reward=baseline["reward"], holdout=holdout.to_dict(),
        holdout_prompts=str(inputs["holdout_file"] or cfg.prompts or "search prompts"),
        config=cfg.to_dict(),
    )
    masks_path = masks.save(out / "masks.json")
    from .report import write_report

    write_report(out, cfg, masks, entries, holdout, inputs["holdout"], base_ev.images, best_ev.images)
    return SearchResult(out, masks_path, best, baseline, holdout, len(entries))


def _loss(entry: dict) -> float:
    return FAILED_LOSS if entry["failed"] else -entry["objective"]


def _remove_if_fresh(out: Path, cfg: SearchConfig) -> None:
    """Setup failed before the journal was started: leave no empty folder behind (never touch a resumed one)."""
    if not cfg.resume and out.is_dir() and not any(out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
