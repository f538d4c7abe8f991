"""`maskopt search`: gradient-free search of per-bucket mask values against a reward, over a prompt set.

    >>> from maskopt.config import resolve
    >>> cfg = resolve(budget=3, seeds=1, holdout_seeds=1, out="run")   # the embedded default, 3 evaluations
    >>> result = run_search(cfg)            # writes run/masks.json, journal.jsonl, report.md, *.png
    >>> result.evaluations, result.masks_path.as_posix()
    (3, 'run/masks.json')

A candidate is one value per (bucket, unit); its loss is minus (mean reward over prompts x seeds +
sparsity bonus). The ask/tell loop (`asktell.py`) evaluates the all-ones baseline first, then asks
the optimizer for candidates, evaluates each once and tells every result. Every evaluation is
journaled before the next starts, so `--resume` replays the journal and continues. The best
candidate and the baseline are then compared on held-out prompts and unseen seeds; the gain is
reported only when its 95% interval excludes 0. The mask file records the sampler the search ran
with, so generate and export default to it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .asktell import AskTell, choosable, entry_loss
from .buckets import Buckets
from .cluster import OFF
from .config import SearchConfig, complete
from .errors import MaskoptError
from .evaluate import UNSEEN_SEED0, Evaluation, Evaluator, TrajectoryCache
from .journal import Journal, read
from .maskset import MaskSet
from .objective import Objective
from .prompts import read_prompts
from .race import Against, Race, told_loss
from .sampler import Sampler
from . import starts
from .space import check_point, optimizer, space
from .stats import Paired, paired
from .sweep import BucketSweep

logger = logging.getLogger(__name__)



@dataclass
class SearchResult:
    out: Path
    masks_path: Path
    best: dict[str, Any]  # the journal entry of the best candidate
    baseline: dict[str, Any]
    holdout: Paired
    evaluations: int


@dataclass
class Inputs:
    """What `prepare` read and checked before any model loads."""

    prompts: list[str]
    holdout: list[str]
    out: Path
    fresh: bool  # the output folder was missing or empty: a failure before the first evaluation empties it again
    created: Path | None  # the topmost folder this search made, if any
    cfg: SearchConfig  # the settings, as the journal being resumed ran (racing off for a journal from before it)


def prepare(cfg: SearchConfig) -> Inputs:
    """Check every input that can be checked before loading a model: each part checks its own."""
    from . import rewards
    from .models import check_device
    from .space import check

    prompts = read_prompts(cfg.prompts)
    holdout = read_prompts(cfg.holdout_prompts) if cfg.holdout_prompts != cfg.prompts else prompts
    if len(holdout) * cfg.holdout_seeds < 2:  # one pair has no spread: its "interval" would be a single point
        raise MaskoptError(f"the held-out check needs at least 2 images: {len(holdout)} held-out prompt(s) x "
                           f"--holdout-seeds {cfg.holdout_seeds}; raise --holdout-seeds")
    objective = Objective.parse(cfg.reward, cfg.requires)
    for file, ps in ((cfg.prompts, prompts), (cfg.holdout_prompts, holdout)):
        rewards.check(objective.reward, ps, where=f"prompt file {file}")
    if objective.measures:
        _check_set_terms(objective, cfg, min(len(holdout) * cfg.holdout_seeds, len(prompts) * cfg.seeds))
    check(cfg.space, cfg.gate_range, cfg.optimizer, cfg.workers)
    for spec in cfg.init:
        starts.parse(spec)
    check_device(cfg.device)
    from .cluster import check as check_ray  # Ray itself is imported only with --ray

    check_ray(cfg.ray, cfg.evaluators, cfg.ray_gpus_per_evaluator)
    out = Path(cfg.out)
    fresh = not (out.is_dir() and any(out.iterdir()))
    header = read(out / "journal.jsonl")[0] if cfg.resume and out.is_dir() else None
    if header is not None and "race" not in header.get("config", {}) and cfg.race:
        logger.info("--resume: %s is from before racing and scored every image; it goes on that way", out)
        cfg = dataclasses.replace(cfg, race=False)
    created = _check_out(out, cfg, {"prompts": prompts, "holdout": holdout})
    return Inputs(prompts, holdout, out, fresh, created, cfg)


def _check_set_terms(objective: Objective, cfg: SearchConfig, images: int) -> None:
    """What the set-level terms need, named before any model loads."""
    from .features import image_files
    from .models import EMBEDDED
    from .sources import local_or_hub

    if "diversity" in objective.measures and min(cfg.seeds, cfg.holdout_seeds) < 2:
        raise MaskoptError("the diversity term compares the seeds of a prompt: it needs --seeds and --holdout-seeds "
                           f"of 2 or more (got {cfg.seeds} and {cfg.holdout_seeds})")
    if "frechet" in objective.measures:
        if cfg.reference == "none":
            raise MaskoptError("the frechet term needs --reference DIR, a folder of images to compare with")
        if cfg.reference != EMBEDDED:
            image_files(cfg.reference)
        if images < 2:
            raise MaskoptError("the frechet term needs at least 2 images per evaluation")
    if cfg.features != "digits":
        local_or_hub(cfg.features, "features model")


def set_measure(objective: Objective, cfg: SearchConfig, size: tuple[int, int]) -> Callable[[int], Any]:
    """`measure_for(n_prompts)`: a function from one candidate's images ((seed, prompt) order) to the set-level
    terms the objective uses, or None when it uses none. The feature model loads once, here."""
    if not objective.measures:
        return lambda n_prompts: None
    from .default.data import load_split
    from .features import load_features, load_images
    from .measures import diversity, frechet
    from .models import EMBEDDED

    features = load_features(cfg.features, cfg.device)
    reference = None
    if "frechet" in objective.measures:  # real held-out digits for the embedded default
        reference = features(load_split("holdout")[0] if cfg.reference == EMBEDDED else load_images(cfg.reference, size))

    def measure_for(n_prompts: int) -> Callable[[Any], dict[str, float]]:
        def measure(images: Any) -> dict[str, float]:
            if not torch.isfinite(images).all():  # NaN images: no measure (the candidate is failed)
                return {t: math.nan for t in objective.measures}
            f = features(images)
            out = {}
            if "diversity" in objective.measures:
                out["diversity"] = float(diversity(f, n_prompts).mean())
            if "frechet" in objective.measures:
                out["frechet"] = frechet(f, reference)
            return out

        return measure

    return measure_for


def _check_out(out: Path, cfg: SearchConfig, prompts: dict[str, list[str]]) -> Path | None:
    """Refuse an output folder this search may not write; make it. Returns the topmost folder made here, if any."""
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
        # journals of older versions left defaults unfilled: completed, they compare as they were meant
        # (a journal from before racing scored every image)
        settings = {"race": False, **header["config"]}
        before = {**complete(SearchConfig.from_dict(settings)).identity(), **{k: header.get(k) for k in prompts}}
        now = {**cfg.identity(), **prompts}
        keys = [*prompts, *sorted((set(before) | set(now)) - set(prompts))]  # the prompts named first
        diff = [k for k in keys if before.get(k) != now.get(k)]
        if diff:
            k = diff[0]
            what = (f"the {'search' if k == 'prompts' else 'held-out'} prompts differ from the journal's" if k in prompts
                    else f"{k}: {before.get(k)!r} there, {now.get(k)!r} now")
            raise MaskoptError(f"--resume: journal in {out} is from a different configuration ({what}"
                               + (f"; also {', '.join(diff[1:])}" if diff[1:] else "") + ")")
    made = next((a for a in reversed([out, *out.parents]) if not a.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        if made is not None and made.is_dir():
            shutil.rmtree(made, ignore_errors=True)
        raise MaskoptError(f"output folder {out} is not writable ({e.strerror})") from None
    return made


def bucket_steps(pipe: Any, buckets: Buckets, steps: int) -> list[int]:
    """Sampling steps per bucket; every bucket must get at least one, or its values could never matter."""
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    counts = [0] * len(buckets)
    for t in sched.timesteps:
        counts[buckets.index(float(t))] += 1
    if 0 in counts:
        k = counts.index(0)
        raise MaskoptError(
            f"bucket {k} {list(buckets.ranges[k])} gets no sampling step with {steps} steps of "
            f"{type(sched).__name__}: use fewer --buckets or more --steps"
        )
    return counts


def load_model(cfg: SearchConfig) -> tuple[Any, MaskSet]:
    """The pipeline `cfg` names and its all-ones mask set over the searched units and buckets."""
    from .models import load_pipeline
    from .units import find_units

    pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype, cfg.scheduler)
    units = find_units(pipe.unet, cfg.targets, groups=cfg.groups)
    buckets = Buckets.uniform(cfg.buckets, int(pipe.scheduler.config.num_train_timesteps))
    return pipe, MaskSet.ones(pipe.unet, units, buckets, source=cfg.model)


def run_search(cfg: SearchConfig, progress: Callable[[dict], None] | None = None) -> SearchResult:
    """Run the search `cfg` describes into `cfg.out`.

    Settings left None are filled (`config.complete`). A SearchConfig built in Python keeps the dataclass's
    own defaults; the embedded default's recipe (guidance 1.0, channel groups, ...) is a recipe layer, which
    `config.resolve` applies, as the command line does.
    """
    from .rewards import load_reward

    # 1. Check inputs (cheap) before loading anything heavy.
    inputs = prepare(complete(cfg))
    cfg, out = inputs.cfg, inputs.out
    try:
        # 2. Model, units, buckets, reward.
        pipe, template = load_model(cfg)
        units, buckets = template.units, template.buckets
        counts = bucket_steps(pipe, buckets, cfg.steps)
        objective = Objective.parse(cfg.reward, cfg.requires)
        reward = load_reward(objective.reward, cfg.device)
        measure_for = set_measure(objective, cfg, cfg.size)
        backbone = [j for j, u in enumerate(units) if u.kind == "backbone"]
        init = starts.points(cfg.init, template, pipe.unet)
        for spec, values in zip(cfg.init, init):  # each must be a point of the searched space
            check_point(values, cfg.space, cfg.gate_range, backbone, f"--init {spec}")
        logger.info("%d units x %d buckets, reward %s", len(units), len(buckets), cfg.reward)
    except BaseException:
        if inputs.fresh:
            _clean_fresh(inputs)
        raise

    if cfg.ray == OFF:
        evaluator = search_evaluator(cfg, inputs.prompts, pipe, template, reward, measure_for)
    else:  # actors that load their own pipeline, reward and cache (cluster.py); the driver keeps the rest
        from .cluster import RayEvaluators

        try:
            evaluator = RayEvaluators(cfg.ray, cfg.to_dict(), inputs.prompts, cfg.device, cfg.evaluators,
                                      cfg.ray_gpus_per_evaluator)
        except BaseException:
            if inputs.fresh:
                _clean_fresh(inputs)
            raise
        if cfg.workers < evaluator.alive:
            logger.warning("--workers %d asks fewer candidates at once than the %d evaluators: %d of them wait; "
                           "pass --workers %d", cfg.workers, evaluator.alive, evaluator.alive - cfg.workers, evaluator.alive)

    # 3. The ask/tell loop, journaled.
    header = {"config": cfg.settings(), "units": [u.to_dict() for u in units], "buckets": buckets.to_list(),
              "reward": cfg.reward, "optimizer": cfg.optimizer, "strategy": cfg.strategy,
              "prompts": inputs.prompts, "holdout": inputs.holdout}
    journal = Journal(out / "journal.jsonl", header)
    _, journaled, _ = read(journal.path)
    entries = list(journaled)  # every evaluation of this search: the journal's, then this run's
    shape = (len(buckets), len(units))
    # A change in bucket k re-runs the steps of k and of the buckets visited after it (lower timesteps).
    recompute = [sum(counts[: k + 1]) / sum(counts) for k in range(len(buckets))]

    n_images = len(inputs.prompts) * cfg.seeds
    plan = Race(tuple(cfg.race_looks)).plan(n_images, cfg.seed) if cfg.race else None  # one image order for all
    sparsity = lambda values: cfg.sparsity * float((values == 0).sum()) / len(buckets)
    scored = {"images": sum(e.get("images", n_images) for e in entries)}  # images scored so far, for the bar

    def record(values: np.ndarray, ev: Evaluation, incumbent: dict | None, group: list[int]) -> dict:
        reward_part = ev.reward + sparsity(values)
        partial = ev.stopped is not None
        entry = {"i": len(entries), "values": values.tolist(), "reward": ev.reward, "objective": reward_part,
                 "failed": ev.failed, "rewards": ev.rewards if ev.failed else ev.per_prompt(len(inputs.prompts)), "seconds": round(ev.seconds, 3), "cache_hits": ev.cache_hits,
                 "unet_calls": ev.unet_calls, "images": ev.images_scored}
        if plan is not None:  # per image: the incumbent's are what later candidates are paired with
            entry.update(image_rewards=ev.rewards, group=group)  # group: [first entry, size] of the group it raced in
        if partial:  # stopped by the race: told its paired estimate, never better than the incumbent (race.py)
            base = np.asarray(incumbent["image_rewards"])
            mask = np.asarray(ev.scored)
            estimate = incumbent["reward"] + float(np.mean(np.asarray(ev.rewards)[mask] - base[mask])) + sparsity(values)
            told = -told_loss(-estimate, entry_loss(incumbent)) if not ev.failed else reward_part
            entry.update(objective=told, partial={"images": ev.images_scored, "of": n_images, "estimate": estimate,
                                                  "incumbent": incumbent["i"], "reason": ev.stopped})
        elif objective.measures:  # set-level terms, each relative to the baseline's (the first entry)
            score = objective.score(reward_part, ev.measures, entries[0]["measures"] if entries else ev.measures)
            entry.update(objective=score.objective, measures=ev.measures, ratios=score.ratios,
                         feasible=score.feasible, violation=score.violation)
        journal.append(entry)  # flushed before the next evaluation starts
        entries.append(entry)
        scored["images"] += ev.images_scored
        if progress:
            progress({**entry, "images_done": scored["images"], "images_naive": cfg.budget * n_images,
                      **({"evaluators": evaluator.alive} if cfg.ray != OFF else {})})
        return entry

    def evaluate(group: list[np.ndarray]) -> list[float]:
        start, size = len(entries), len(group)
        last = entries[-1] if entries else {}
        if "group" in last and sum(last["group"]) > len(entries):  # the rest of a group a kill cut: as it began
            start, size = last["group"]
        incumbent = min(filter(choosable, entries[:start]), key=entry_loss, default=None)
        against = None
        if plan is not None and incumbent is not None:  # against the best candidate scored in full, same images
            margin = cfg.race_margin * float(np.std(entries[0]["image_rewards"], ddof=1))
            against = Against(Race(tuple(cfg.race_looks), cfg.race_alpha, margin), tuple(incumbent["image_rewards"]),
                              tuple(sparsity(v) - (incumbent["objective"] - incumbent["reward"]) for v in group))
        results = evaluator.score(group, plan, against)
        if not entries and results[0].failed:
            raise MaskoptError(f"the reward {cfg.reward} returned NaN or inf for the unmasked baseline; "
                               "every image needs a finite score to compare candidates against")
        return [entry_loss(record(v, ev, incumbent, [start, size])) for v, ev in zip(group, results)]

    driver = None
    try:
        driver = AskTell(lambda: make_optimizer(cfg, shape, recompute, backbone, len(init)), cfg.space, shape,
                         cfg.budget, cfg.workers, backbone, init)
        if entries:
            logger.info("resuming from %d evaluations in %s", len(entries), journal.path)
        chosen = driver.chosen  # what NGOpt picked for this space, budget and workers
        if chosen:
            logger.info("%s runs %s", cfg.optimizer, chosen)
        if chosen and cfg.workers > 1 and cfg.space == "gates" and cfg.optimizer == "NGOpt":
            # measured on the embedded default (docs/benchmarks.md): NGOpt's sequential pick, COBYLA, gained
            # +0.057; with 4 workers it picks MetaModel, which gained +0.008 in the same budget
            logger.warning("--workers %d: NGOpt cannot run COBYLA in parallel and picks %s, which found far smaller "
                           "gains on the embedded default than --workers 1; pass --optimizer to choose", cfg.workers, chosen)
        started = time.perf_counter()
        driver.run(evaluate, journaled)
        minutes = (time.perf_counter() - started) / 60
    except MaskoptError as e:
        if entries:  # what was evaluated stays, for --resume once the cause is fixed
            raise MaskoptError(f"{e}; {len(entries)} evaluations kept in {journal.path} (--resume continues)") from None
        raise
    finally:
        journal.close()
        if driver is not None:
            driver.close()
        if cfg.ray != OFF:
            evaluator.close()
        if not entries and inputs.fresh:
            _clean_fresh(inputs)

    # 4. Best candidate vs baseline on held-out prompts and unseen seeds.
    baseline = entries[0]
    best = min(filter(choosable, entries), key=entry_loss, default=baseline)
    holdout_eval = Evaluator(pipe, reward, template, inputs.holdout,
                             range(UNSEEN_SEED0, UNSEEN_SEED0 + cfg.holdout_seeds), cfg.steps, cfg.guidance,
                             cfg.size, None, cfg.batch_size, measure_for(len(inputs.holdout)))
    base_ev = holdout_eval(np.asarray(baseline["values"]), keep_images=True)
    best_ev = holdout_eval(np.asarray(best["values"]), keep_images=True)
    if base_ev.failed or best_ev.failed:
        raise MaskoptError("the reward returned NaN or inf on the held-out images; no mask file written "
                           f"({len(entries)} evaluations kept in {journal.path}: --resume validates again)")
    holdout = paired(base_ev.rewards, best_ev.rewards)

    # 5. The mask file (the contract), with the sampler it was searched with, then the report.
    prediction_type = str(pipe.scheduler.config.get("prediction_type", "epsilon"))
    sampler = Sampler.from_search_config({**cfg.to_dict(), "prediction_type": prediction_type})
    masks = template.with_sampler(sampler).with_values(
        np.asarray(best["values"]),
        reward=cfg.reward, optimizer=cfg.optimizer, optimizer_runs=chosen or cfg.optimizer,
        strategy=cfg.strategy, space=cfg.space, budget=cfg.budget,
        evaluations=len(entries), best_evaluation=best["i"], search_reward=best["reward"],
        baseline_search_reward=baseline["reward"], holdout=holdout.to_dict(),
        holdout_prompts=cfg.holdout_prompts, config=cfg.to_dict(),
        **({"holdout_measures": {t: {"baseline": base_ev.measures[t], "masked": best_ev.measures[t],
                                     "ratio": objective.score(0, best_ev.measures, base_ev.measures).ratios[t]}
                                 for t in objective.measures},
            "infeasible": sum(not e.get("feasible", True) for e in entries)} if objective.measures else {}),
    )
    masks_path = masks.save(out / "masks.json")
    from .report import write_report

    ran = len(entries) - len(journaled)
    notes = [f"{ran} evaluations this run in {minutes:.1f} min ({ran / max(minutes, 1e-9):.1f} per minute)"
             + (f", on {evaluator.alive} Ray evaluators ({evaluator.stats.started} started, "
                f"{evaluator.stats.deaths} died, {evaluator.stats.requeued} candidates scored again)" if cfg.ray != OFF else "")]
    write_report(out, cfg, masks, entries, holdout, inputs.holdout, base_ev.images, best_ev.images, notes)
    return SearchResult(out, masks_path, best, baseline, holdout, len(entries))


def search_evaluator(cfg: SearchConfig, prompts: list[str], pipe: Any = None, template: MaskSet | None = None,
                     reward: Any = None, measure_for: Callable[[int], Any] | None = None) -> Evaluator:
    """The Evaluator of a search's own images (its prompts x seeds, its cache); loads what is not given.
    A Ray actor (cluster.py) calls it with nothing loaded."""
    from .rewards import load_reward

    objective = Objective.parse(cfg.reward, cfg.requires)
    if pipe is None or template is None:
        pipe, template = load_model(cfg)
    reward = reward if reward is not None else load_reward(objective.reward, cfg.device)
    measure_for = measure_for or set_measure(objective, cfg, cfg.size)
    return Evaluator(pipe, reward, template, prompts, range(cfg.seeds), cfg.steps, cfg.guidance, cfg.size,
                     TrajectoryCache(cfg.cache) if cfg.cache > 0 else None, cfg.batch_size, measure_for(len(prompts)))


def make_optimizer(cfg: SearchConfig, shape: tuple[int, int], recompute: list[float], backbone: Sequence[int] = (),
                   starts: int = 0) -> Any:
    """The search's optimizer: one nevergrad optimizer over every bucket at once (joint), or the bucket sweep.

    `backbone`: the columns of backbone units; `starts`: how many starting points precede the optimizer's asks."""
    n_buckets, n_units = shape
    if cfg.strategy == "sweep":  # its stages share what the baseline and the starting points leave of the budget
        return BucketSweep(cfg.optimizer, cfg.space, n_buckets, n_units, max(cfg.budget - 1 - starts, 1), recompute,
                           cfg.workers, cfg.gate_range, cfg.seed, backbone)
    param = space(cfg.space, n_buckets, n_units, cfg.gate_range, cfg.seed, backbone)
    return optimizer(cfg.optimizer, param, cfg.space, cfg.budget, cfg.workers)


def _clean_fresh(inputs: Inputs) -> None:
    """A search failed before it journaled any evaluation: leave the output folder as it was before it ran.

    Only a fresh search gets here (a resumed one has evaluations); its folder was empty or missing, so
    everything in it is its own. Folders it made are removed; a folder the user made stays, emptied.
    """
    out, made = inputs.out, inputs.created
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
    elif out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
