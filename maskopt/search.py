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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import race, starts
from .asktell import AskTell
from .buckets import Buckets
from .cluster import OFF, search_evaluators
from .config import SearchConfig, complete
from .errors import MaskoptError
from .evaluators import Evaluators, Loaded
from .journal import Entry, Journal, read
from .outcome import SearchResult, finish
from .paths import check_out
from .prompts import read_prompts
from .scoring import Evaluation
from .space import check_point, optimizer, space
from .sweep import BucketSweep

logger = logging.getLogger(__name__)


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
    objective = cfg.objective
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


def _check_set_terms(objective: Any, cfg: SearchConfig, images: int) -> None:
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


def _check_out(out: Path, cfg: SearchConfig, prompts: dict[str, list[str]]) -> Path | None:
    """Refuse an output folder this search may not write; make it. Returns the topmost folder made here, if any."""
    journal = out / "journal.jsonl"
    busy = check_out(out, "pass --resume to continue a search there, or choose another --out", cfg.resume)
    if busy:
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


@dataclass
class Progress:
    """What the progress callback sees after each evaluation."""

    entry: Entry
    images_done: int  # images scored so far, this search's journal included
    images_naive: int  # every candidate of the budget on every image
    evaluators: int | None  # Ray evaluators alive (None: a local search)


class Evaluations:
    """The search's evaluations: a group of candidates scored by the evaluators, raced against the incumbent,
    turned into journal entries (flushed before the next group) and into the losses the optimizer is told."""

    def __init__(self, cfg: SearchConfig, inputs: "Inputs", journal: Journal, evaluators: Evaluators,
                 progress: Callable[[Progress], None] | None) -> None:
        self.cfg, self.journal, self.evaluators, self.progress = cfg, journal, evaluators, progress
        self.entries = list(read(journal.path)[1])  # every evaluation of this search: the journal's, then this run's
        self.journaled = len(self.entries)
        self.n_prompts = len(inputs.prompts)
        self.n_images = self.n_prompts * cfg.seeds
        # one image order for every candidate (race.py)
        self.plan = race.Race(tuple(cfg.race_looks)).plan(self.n_images, cfg.seed) if cfg.race else None
        self.images_done = sum(self.n_images if e.images is None else e.images for e in self.entries)

    def sparsity(self, values: np.ndarray) -> float:
        return self.cfg.sparsity * float((values == 0).sum()) / values.shape[0]

    def __call__(self, group: list[np.ndarray]) -> list[float]:
        """The losses of a group's candidates, in order; each journaled before this returns."""
        start, size = race.group_of(self.entries, len(group))
        incumbent = race.incumbent_of(self.entries, start)
        against = None
        if self.plan is not None and incumbent is not None:  # against the best candidate scored in full, same images
            rules = race.Race(tuple(self.cfg.race_looks), self.cfg.race_alpha, self.cfg.race_margin)
            against = race.against(rules, incumbent, [self.sparsity(v) for v in group], self.entries[0])
        results = self.evaluators.score(group, self.plan, against)
        if not self.entries and results[0].failed:
            raise MaskoptError(f"the reward {self.cfg.reward} returned NaN or inf for the unmasked baseline; "
                               "every image needs a finite score to compare candidates against")
        return [self.record(v, ev, incumbent, [start, size]).loss for v, ev in zip(group, results)]

    def record(self, values: np.ndarray, ev: Evaluation, incumbent: Entry | None, group: list[int]) -> Entry:
        reward = ev.reward + self.sparsity(values)
        entry = Entry(i=len(self.entries), values=values.tolist(), reward=ev.reward, objective=reward, failed=ev.failed,
                      rewards=ev.rewards if ev.failed else ev.per_prompt(self.n_prompts), seconds=round(ev.seconds, 3),
                      cache_hits=ev.cache_hits, unet_calls=ev.unet_calls, images=ev.images_scored)
        if self.plan is not None:  # per image: the incumbent's are what later candidates are paired with
            entry.image_rewards, entry.group = ev.rewards, group
        if ev.stopped is not None:
            race.stopped(entry, ev.scored, incumbent, self.sparsity(values), ev.stopped, self.n_images)
        elif self.cfg.objective.measures:  # set-level terms, each relative to the baseline's (the first entry)
            score = self.cfg.objective.score(reward, ev.measures, self.entries[0].measures if self.entries else ev.measures)
            entry.objective, entry.measures, entry.ratios = score.objective, ev.measures, score.ratios
            entry.feasible, entry.violation = score.feasible, score.violation
        self.journal.append(entry)  # flushed before the next evaluation starts
        self.entries.append(entry)
        self.images_done += ev.images_scored
        if self.progress:
            self.progress(Progress(entry, self.images_done, self.cfg.budget * self.n_images,
                                   self.evaluators.alive if self.cfg.ray != OFF else None))
        return entry


def run_search(cfg: SearchConfig, progress: Callable[[Progress], None] | None = None) -> SearchResult:
    """Run the search `cfg` describes into `cfg.out`.

    Settings left None are filled (`config.complete`). A SearchConfig built in Python keeps the dataclass's
    own defaults; the embedded default's recipe (guidance 1.0, channel groups, ...) is a recipe layer, which
    `config.resolve` applies, as the command line does.
    """
    # 1. Check inputs (cheap) before loading anything heavy.
    inputs = prepare(complete(cfg))
    cfg, out = inputs.cfg, inputs.out
    evaluators = None
    try:
        # 2. Model, units, buckets, reward; the starting points; the evaluators.
        loaded = Loaded.load(cfg)
        units, buckets = loaded.template.units, loaded.template.buckets
        counts = bucket_steps(loaded.pipe, buckets, cfg.steps)
        backbone = [j for j, u in enumerate(units) if u.kind == "backbone"]
        init = starts.points(cfg.init, loaded.template, loaded.pipe.unet)
        for spec, values in zip(cfg.init, init):  # each must be a point of the searched space
            check_point(values, cfg.space, cfg.gate_range, backbone, f"--init {spec}")
        logger.info("%d units x %d buckets, reward %s", len(units), len(buckets), cfg.reward)
        evaluators = search_evaluators(cfg, inputs.prompts, loaded)
    except BaseException:
        if inputs.fresh:
            _clean_fresh(inputs)
        raise

    # 3. The ask/tell loop, journaled.
    header = {"config": cfg.settings(), "units": [u.to_dict() for u in units], "buckets": buckets.to_list(),
              "reward": cfg.reward, "optimizer": cfg.optimizer, "strategy": cfg.strategy,
              "prompts": inputs.prompts, "holdout": inputs.holdout}
    journal = Journal(out / "journal.jsonl", header)
    evaluations = Evaluations(cfg, inputs, journal, evaluators, progress)
    # a change in bucket k re-runs the steps of k and of the buckets visited after it (lower timesteps)
    recompute = [sum(counts[: k + 1]) / sum(counts) for k in range(len(buckets))]
    shape = (len(buckets), len(units))
    driver = None
    try:
        driver = AskTell(lambda: make_optimizer(cfg, shape, recompute, backbone, len(init)), cfg.space, shape,
                         cfg.budget, cfg.workers, backbone, init)
        _log_start(cfg, driver, evaluations)
        started = time.perf_counter()
        driver.run(evaluations, evaluations.entries[:evaluations.journaled])
        minutes = (time.perf_counter() - started) / 60
    except MaskoptError as e:
        if evaluations.entries:  # what was evaluated stays, for --resume once the cause is fixed
            raise MaskoptError(f"{e}; {len(evaluations.entries)} evaluations kept in {journal.path} "
                               "(--resume continues)") from None
        raise
    finally:
        journal.close()
        if driver is not None:
            driver.close()
        evaluators.close()
        if not evaluations.entries and inputs.fresh:
            _clean_fresh(inputs)

    # 4. Held-out check, mask file, report.
    ran = len(evaluations.entries) - evaluations.journaled
    notes = [f"{ran} evaluations this run in {minutes:.1f} min ({ran / max(minutes, 1e-9):.1f} per minute)"
             + (f", on {evaluators.alive} Ray evaluators ({evaluators.stats.started} started, "
                f"{evaluators.stats.deaths} died, {evaluators.stats.requeued} candidates scored again)"
                if cfg.ray != OFF else "")]
    return finish(cfg, loaded, evaluations.entries, inputs.holdout, out, driver.chosen or cfg.optimizer, notes)


def _log_start(cfg: SearchConfig, driver: AskTell, evaluations: Evaluations) -> None:
    if evaluations.journaled:
        logger.info("resuming from %d evaluations in %s", evaluations.journaled, evaluations.journal.path)
    chosen = driver.chosen  # what NGOpt picked for this space, budget and workers
    if chosen:
        logger.info("%s runs %s", cfg.optimizer, chosen)
    if chosen and cfg.workers > 1 and cfg.space == "gates" and cfg.optimizer == "NGOpt":
        # NGOpt's sequential pick, COBYLA, found far larger gains on the embedded default than the MetaModel it
        # picks with 4 workers (docs/benchmarks.md)
        logger.warning("--workers %d: NGOpt cannot run COBYLA in parallel and picks %s, which found far smaller "
                       "gains on the embedded default than --workers 1; pass --optimizer to choose", cfg.workers, chosen)


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
