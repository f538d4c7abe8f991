"""`maskopt search`: gradient-free search of per-bucket mask values against a reward, over a prompt set.

    cfg = resolve(recipe="recipes/default.yaml", budget=60)
    result = run_search(cfg)          # writes out/masks.json, journal.jsonl, report.md, *.png

The loop is nevergrad's ask/tell: a candidate is one value per (bucket, unit); its loss is minus
(mean reward over prompts x seeds + sparsity bonus). The all-ones baseline is evaluated first and
stays a candidate. The objective is exact (the same seeds for every candidate), so a candidate the
optimizer proposes again is told its known loss and costs no budget. Every evaluation is journaled
before the next starts, so `--resume` replays the journal into a fresh optimizer and continues. The
best candidate and the baseline are then compared on held-out prompts and unseen seeds; the gain is
reported only when its 95% interval excludes 0.
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
from .space import DEFAULT_OPTIMIZER, close, decode, encode, optimizer, space, tell
from .sweep import BucketSweep
from .stats import Paired, paired

logger = logging.getLogger(__name__)

FAILED_LOSS = 1e6  # a candidate whose reward is NaN/inf: scored as failed, the search goes on
HOLDOUT_SEED0 = 1000  # validation seeds start here, far from the search seeds 0..S-1
MAX_REPEATS = 1000  # already-evaluated proposals in a row after which a search counts as converged


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
    from .models import SCHEDULERS, check_device
    from .rewards import PYTHON_PREFIX, load_python, reward_names

    embedded = cfg.model is None
    if not embedded and not cfg.prompts:
        raise MaskoptError("--prompts is required with --model (the shipped prompts are for the embedded digits model)")
    prompts = read_prompts(cfg.prompts or default.PROMPTS_PATH)
    holdout_file = cfg.holdout_prompts or (default.HOLDOUT_PROMPTS_PATH if embedded and not cfg.prompts else None)
    holdout = read_prompts(holdout_file) if holdout_file else prompts
    reward = cfg.reward or ("digits" if embedded else "clip")
    names = reward_names(reward)
    for name in names:
        if name.startswith(PYTHON_PREFIX):
            load_python(name)  # imports the user's module: a missing module or function fails before the model loads
    if "digits" in names:
        _check_digit_prompts(cfg.prompts or default.PROMPTS_PATH, prompts, holdout_file, holdout)
    if cfg.scheduler and cfg.scheduler not in SCHEDULERS:
        raise MaskoptError(f"unknown scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    check_device(cfg.device)
    # names a bad space, gate range or optimizer before any model loads
    close(optimizer(cfg.optimizer, space(cfg.space, cfg.buckets, 1, cfg.gate_range), cfg.space, cfg.budget, cfg.workers))
    out = Path(cfg.out)
    fresh = not (out.is_dir() and any(out.iterdir()))
    created = _check_out(out, cfg, {"prompts": prompts, "holdout": holdout})
    return dict(prompts=prompts, holdout=holdout, holdout_file=holdout_file, reward=reward, out=out,
                fresh=fresh, created=created)


def _check_digit_prompts(path: Any, prompts: list[str], holdout_path: Any, holdout: list[str]) -> None:
    """The digits reward scores the digit a prompt names: every prompt must name exactly one."""
    from .default.reward import digit_of

    for file, ps in ((path, prompts), (holdout_path, holdout)):
        for prompt in ps:
            try:
                digit_of(prompt)
            except MaskoptError as e:
                raise MaskoptError(f"prompt file {file}: {e} (the digits reward needs one digit per prompt)") from None


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
        before = {**SearchConfig.from_dict(header["config"]).identity(), **{k: header.get(k) for k in prompts}}
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
    from .models import DEFAULT_SOURCE, load_pipeline
    from .units import find_units

    pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype, cfg.scheduler)
    units = find_units(pipe.unet, cfg.targets, groups=cfg.groups or (4 if cfg.space == "groups" else None))
    buckets = Buckets.uniform(cfg.buckets, int(pipe.scheduler.config.num_train_timesteps))
    return pipe, MaskSet.ones(pipe.unet, units, buckets, source=cfg.model or DEFAULT_SOURCE)


def run_search(cfg: SearchConfig, progress: Callable[[dict], None] | None = None) -> SearchResult:
    from .rewards import load_reward

    # 1. Check inputs (cheap) before loading anything heavy.
    inputs = prepare(cfg)
    out: Path = inputs["out"]
    try:
        # 2. Model, units, buckets, reward.
        pipe, template = load_model(cfg)
        units, buckets = template.units, template.buckets
        counts = bucket_steps(pipe, buckets, cfg.steps)
        reward = load_reward(inputs["reward"], cfg.device)
        logger.info("%d units x %d buckets, reward %s", len(units), len(buckets), inputs["reward"])
    except BaseException:
        if inputs["fresh"]:
            _clean_fresh(inputs)
        raise

    evaluator = Evaluator(pipe, reward, template, inputs["prompts"], range(cfg.seeds), cfg.steps, cfg.guidance,
                          cfg.size, TrajectoryCache(cfg.cache) if cfg.cache > 0 else None, cfg.batch_size)

    # 3. The ask/tell loop, journaled.
    header = {"config": cfg.settings(), "units": [u.to_dict() for u in units], "buckets": buckets.to_list(),
              "reward": inputs["reward"], "optimizer": cfg.optimizer or DEFAULT_OPTIMIZER[cfg.space],
              "strategy": cfg.strategy, "prompts": inputs["prompts"], "holdout": inputs["holdout"]}
    journal = Journal(out / "journal.jsonl", header)
    _, entries, _ = read(journal.path)
    # A change in bucket k re-runs the steps of k and of the buckets visited after it (lower timesteps).
    recompute = [sum(counts[: k + 1]) / sum(counts) for k in range(len(buckets))]
    try:
        opt, pending = _replay(lambda: _optimizer(cfg, len(buckets), len(units), recompute), entries, cfg)
    except BaseException:
        journal.close()
        raise
    if entries:
        logger.info("resumed %d evaluations from %s", len(entries), journal.path)
    chosen = getattr(opt, "_info", dict)().get("sub-optim")  # what NGOpt picked for this space, budget and workers
    if chosen:
        logger.info("%s runs %s", header["optimizer"], chosen)
    if chosen and cfg.workers > 1 and cfg.space == "gates" and cfg.optimizer is None:
        # measured on the embedded default (README): NGOpt's sequential pick, COBYLA, gained +0.057;
        # with 4 workers it picks MetaModel, which gained +0.008 in the same budget
        logger.warning("--workers %d: NGOpt cannot run COBYLA in parallel and picks %s, which found far smaller gains "
                       "on the embedded default than --workers 1; pass --optimizer to choose", cfg.workers, chosen)

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
            first = evaluator(ones)
            if first.failed:
                raise MaskoptError(f"the reward {inputs['reward']} returned NaN or inf for the unmasked baseline; "
                                   "every image needs a finite score to compare candidates against")
            baseline = opt.parametrization.spawn_child(new_value=encode(ones, cfg.space))
            tell(opt, baseline, _loss(record(ones, first)), cfg.space)
        evaluate = lambda group: [_loss(record(v, ev)) for v, ev in zip(group, evaluator.many(group))]
        if not ask_loop(opt, cfg, (len(buckets), len(units)), entries, pending, evaluate):
            logger.warning("the optimizer proposed only evaluated candidates %d times in a row: stopping at %d of %d "
                           "evaluations", MAX_REPEATS, len(entries), cfg.budget)
    except MaskoptError as e:
        if entries:  # what was evaluated stays, for --resume once the cause is fixed
            raise MaskoptError(f"{e}; {len(entries)} evaluations kept in {journal.path} (--resume continues)") from None
        raise
    finally:
        journal.close()
        close(opt)
        if not entries and inputs["fresh"]:
            _clean_fresh(inputs)

    # 4. Best candidate vs baseline on held-out prompts and unseen seeds.
    baseline = entries[0]
    best = min((e for e in entries if not e["failed"]), key=_loss, default=baseline)
    holdout_eval = Evaluator(pipe, reward, template, inputs["holdout"],
                             range(HOLDOUT_SEED0, HOLDOUT_SEED0 + cfg.holdout_seeds), cfg.steps, cfg.guidance,
                             cfg.size, None, cfg.batch_size)
    base_ev = holdout_eval(np.asarray(baseline["values"]), keep_images=True)
    best_ev = holdout_eval(np.asarray(best["values"]), keep_images=True)
    if base_ev.failed or best_ev.failed:
        raise MaskoptError("the reward returned NaN or inf on the held-out images; no mask file written "
                           f"({len(entries)} evaluations kept in {journal.path}: --resume validates again)")
    holdout = paired(base_ev.rewards, best_ev.rewards)

    # 5. The mask file (the contract), then the report.
    masks = template.with_values(
        np.asarray(best["values"]),
        reward=inputs["reward"], optimizer=header["optimizer"], optimizer_runs=chosen or header["optimizer"],
        strategy=cfg.strategy, space=cfg.space, budget=cfg.budget,
        evaluations=len(entries), best_evaluation=best["i"], search_reward=best["reward"],
        baseline_search_reward=baseline["reward"], holdout=holdout.to_dict(),
        holdout_prompts=str(inputs["holdout_file"] or cfg.prompts or "search prompts"),
        config=cfg.to_dict(),
    )
    masks_path = masks.save(out / "masks.json")
    from .report import write_report

    write_report(out, cfg, masks, entries, holdout, inputs["holdout"], base_ev.images, best_ev.images)
    return SearchResult(out, masks_path, best, baseline, holdout, len(entries))


def _optimizer(cfg: SearchConfig, n_buckets: int, n_units: int, recompute: list[float]) -> Any:
    """The search's optimizer: one nevergrad optimizer over every bucket at once (joint), or the bucket sweep."""
    if cfg.strategy == "sweep":
        return BucketSweep(cfg.optimizer, cfg.space, n_buckets, n_units, cfg.budget - 1, recompute,
                           cfg.workers, cfg.gate_range, cfg.seed)
    param = space(cfg.space, n_buckets, n_units, cfg.gate_range, cfg.seed)
    return optimizer(cfg.optimizer, param, cfg.space, cfg.budget, cfg.workers)


def _replay(make: Callable[[], Any], entries: list[dict], cfg: SearchConfig) -> tuple[Any, list]:
    """A fresh optimizer that has been told the journal; returns it and the candidates it asked past the journal.

    Exact when it can be: ask as the first run asked (same seed, same groups of --workers) and tell each
    journaled loss, so a resumed search goes on as if it had never stopped. If an ask differs from the
    journal (another --budget or --workers, a non-deterministic optimizer), every entry is told to a new
    optimizer as a point it did not ask for instead: the search still continues from what was learned.
    """
    opt = make()
    try:
        pending = _ask_along(opt, entries, cfg)
        if pending is None:
            logger.info("the optimizer no longer asks what the journal holds: replaying it as points not asked")
            close(opt)
            opt = make()
            for e in entries:
                _tell(opt, e, cfg.space)
            pending = []
        return opt, pending
    except BaseException:
        close(opt)
        raise


def ask_loop(opt: Any, cfg: SearchConfig, shape: tuple[int, int], entries: list[dict], pending: list,
             evaluate: Callable[[list[np.ndarray]], list[float]]) -> bool:
    """Ask, evaluate and tell until `entries` holds `cfg.budget` evaluations; False if it stopped early.

    Each group holds `cfg.workers` candidates not evaluated yet (`_ask_group`), evaluated together:
    `evaluate` scores a list of value arrays and appends their journal entries. `pending`: candidates
    asked before a resume and not yet told (`_ask_along`), the start of the first group.
    """
    known = {_key(e["values"]): _loss(e) for e in entries}
    while len(entries) < cfg.budget:
        # a group cut by a kill is taken as it was asked: asking more would change every group after it
        group, converged = (pending, False) if pending else \
            _ask_group(opt, cfg.space, shape, known, min(cfg.workers, cfg.budget - len(entries)))
        pending = []
        todo = {key: values for _, key, values in group if key not in known}  # a journal cut inside a group has some
        known.update(zip(todo, evaluate(list(todo.values())) if todo else []))
        for cand, key, _ in group:
            tell(opt, cand, known[key], cfg.space)
        if converged and not todo:
            return False
    return True


def _ask_group(opt: Any, kind: str, shape: tuple[int, int], known: dict[bytes, float], want: int) -> tuple[list, bool]:
    """Ask until the group holds `want` distinct candidates not evaluated yet; returns it and whether it converged.

    A proposal evaluated already is told its known loss at once and does not count (the objective is
    exact). nevergrad's discrete optimizers propose the current best again and again (a mutated choice
    weight often keeps its choice), so asking only `want` times would leave a group of 8 with 2 or 3 new
    candidates. An optimizer that proposes nothing new `MAX_REPEATS` times in a row has converged.
    Returns the group's (candidate, key, values), not told, in ask order.
    """
    group: list = []
    new: set[bytes] = set()
    repeats = twins = 0
    # twins: proposals of a candidate already in the group. Its result is not known yet, so asking on
    # cannot teach the optimizer anything; past a few the group goes with what it has.
    while len(new) < want and repeats < MAX_REPEATS and twins < 4 * want:
        cand = opt.ask()
        values = decode(cand.value, *shape)
        key = _key(values)
        if key in known:
            tell(opt, cand, known[key], kind)
            repeats += 1
            continue
        if key in new:
            twins += 1  # told once the group is evaluated
        else:
            repeats = 0
            new.add(key)
        group.append((cand, key, values))
    return group, repeats >= MAX_REPEATS


def _ask_along(opt: Any, entries: list[dict], cfg: SearchConfig) -> list | None:
    """Ask and tell along the journal as `ask_loop` did; the group in flight where it ends, or None if an ask differs."""
    if entries:
        _tell(opt, entries[0], cfg.space)  # the baseline, evaluated before the first ask
    shape = np.asarray(entries[0]["values"]).shape if entries else (0, 0)
    known = {_key(e["values"]): _loss(e) for e in entries[:1]}
    i = 1
    while i < len(entries) and i < cfg.budget:
        group, converged = _ask_group(opt, cfg.space, shape, known, min(cfg.workers, cfg.budget - i))
        todo = list(dict.fromkeys(key for _, key, _ in group if key not in known))
        for key, e in zip(todo, entries[i:]):
            if key != _key(e["values"]):
                return None
            known[key] = _loss(e)
        if i + len(todo) > len(entries):
            return group  # the journal ends inside this group: `ask_loop` evaluates the rest and tells it all
        i += len(todo)
        for cand, key, _ in group:
            tell(opt, cand, known[key], cfg.space)
        if converged and not todo:
            break
    return []


def _key(values: Any) -> bytes:
    return np.asarray(values, dtype=np.float64).ravel().tobytes()


def _tell(opt: Any, entry: dict, kind: str) -> None:
    """Tell a journaled evaluation as a point the optimizer did not ask."""
    tell(opt, opt.parametrization.spawn_child(new_value=encode(np.asarray(entry["values"]), kind)), _loss(entry), kind)


def _loss(entry: dict) -> float:
    return FAILED_LOSS if entry["failed"] else -entry["objective"]


def _clean_fresh(inputs: dict[str, Any]) -> None:
    """A search failed before it journaled any evaluation: leave the output folder as it was before it ran.

    Only a fresh search gets here (a resumed one has evaluations); its folder was empty or missing, so
    everything in it is its own. Folders it made are removed; a folder the user made stays, emptied.
    """
    out, made = inputs["out"], inputs["created"]
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
    elif out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
