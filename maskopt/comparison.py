"""`maskopt eval`: mask files judged against the baseline and FreeU's best setting, on any judges.

    >>> from pathlib import Path
    >>> from maskopt import Buckets, MaskSet, find_units
    >>> from maskopt.default import HOLDOUT_PROMPTS_PATH
    >>> from maskopt.models import load_unet
    >>> from maskopt.sampler import Sampler
    >>> unet = load_unet("maskopt:default")
    >>> masks = MaskSet.ones(unet, find_units(unet, "paper"), Buckets.uniform(4), source="maskopt:default")
    >>> _ = masks.with_values(masks.values * 0.9).with_sampler(Sampler(steps=15, guidance=1.0)).save("masks.json")
    >>> data = run_eval(EvalConfig(masks=(Path("masks.json"),), out=Path("eval"), prompts=HOLDOUT_PROMPTS_PATH,
    ...                            seeds=2, freeu="1.3,1.6,1,1", rewards=("digits", "digits-kernel")))
    >>> [c["name"] for c in data["conditions"]]
    ['baseline', 'FreeU b1=1.3 b2=1.6 s1=1 s2=1', 'masks.json']

For each condition (the baseline, FreeU's setting, each mask file), on the evaluation prompts x unseen
seeds 1000..1000+N-1 with the same noise for every condition:
- every judge's score per image (the searched reward and any other reward spec);
- diversity: per prompt, the mean feature distance between the images of its seeds;
- realism: the Frechet distance of all its images' features to a reference set's.
Then each condition against the baseline, and each mask file against FreeU, as paired differences:
a BCa 95% interval over images for a judge, over prompts for diversity, and for the Frechet distance
the p-value of a paired permutation test (FRECHET_REPS swaps; see `_frechet_diff` for why not an interval).

FreeU's setting with `--freeu grid` is the best of `freeu.GRID` on the search prompts x seeds under the
search's own objective (its reward, set-level terms and bounds), as the masks were picked: never on the
images it is judged on. The sampler is the mask files' own (they must agree); the features and the
reference default to the embedded default's classifier and its real held-out digits.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import permutation_test

from . import rewards
from .errors import MaskoptError
from .scoring import UNSEEN_SEED0, Evaluator
from .features import image_files, load_features, load_images
from .freeu import GRID, FreeU, enabled, recommended
from .maskset import MaskSet
from .measures import diversity, frechet
from .models import EMBEDDED, check_device, load_pipeline, model_for
from .objective import Objective
from .paths import check_out, make_folder
from .prompts import read_prompts
from .report import save_grid
from .sources import local_or_hub
from .stats import paired

logger = logging.getLogger(__name__)

FRECHET_REPS = 200
FORMAT = "maskopt.eval/1"


@dataclass(frozen=True)
class EvalConfig:
    masks: tuple[Path, ...]
    out: Path
    prompts: Path | None = None  # default: the first mask file's held-out prompts
    seeds: int = 10  # per prompt, at least 2 (diversity is measured between them)
    rewards: tuple[str, ...] = ()  # judges; default: the searched reward, plus digits-kernel on the embedded default
    freeu: str = "grid"  # none | default | grid | B1,B2,S1,S2
    features: str | None = None  # default: digits on the embedded default, else CLIP ViT-L/14 (features.py)
    reference: Path | None = None  # images for the Frechet distance; default: real held-out digits on the embedded default
    model: str | None = None  # default: the mask files' source
    device: str = "cpu"
    batch_size: int = 0  # images per pipeline call; 0: all at once
    force: bool = False  # replace a non-empty --out


@dataclass
class Condition:
    name: str
    kind: str  # baseline | freeu | masks
    freeu: FreeU | None = None
    masks: Any = None  # the MaskSet (kind "masks")
    scores: dict[str, list[float]] = field(default_factory=dict)  # judge -> per image, (seed, prompt) order
    diversity: np.ndarray | None = None  # per prompt
    features: torch.Tensor | None = None
    images: torch.Tensor | None = None


def run_eval(config: EvalConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Judge every condition and write eval.json, report.md and grid.png into `config.out`; returns eval.json's data.

    `progress(done, total)` counts evaluations of prompts x seeds: FreeU's grid on the search data, then
    one per condition.
    """
    # 1. Check inputs, before any model loads
    mask_sets = _load_masks(config.masks)
    first = mask_sets[0]
    if config.seeds < 2:
        raise MaskoptError(f"--seeds must be at least 2 (diversity is measured between the seeds of a prompt), "
                           f"got {config.seeds}")
    if config.batch_size < 0:
        raise MaskoptError(f"--batch-size must be 0 (all at once) or more, got {config.batch_size}")
    searched = first.provenance.get("config") or {}
    prompt_file = config.prompts or searched.get("holdout_prompts")
    if prompt_file is None:
        raise MaskoptError(f"mask file {config.masks[0]} records no held-out prompts: give --prompts FILE")
    prompts = read_prompts(prompt_file)
    model = model_for(config.model, first.source)
    embedded = model == EMBEDDED
    judges = list(config.rewards) or _default_judges(first, embedded)
    for spec in judges:
        rewards.check(spec, prompts, where=f"prompt file {prompt_file}")
    setting, grid = _freeu_choice(config, first, searched)
    feature_source = config.features or ("digits" if embedded else None)
    if feature_source not in (None, "digits"):
        local_or_hub(feature_source, "features model")
    if config.reference is not None:
        image_files(config.reference)  # a missing folder, one without images, an unreadable image: fail now
    elif not embedded:
        logger.warning("no --reference: the Frechet distance is not computed (diversity still is)")
    check_out(Path(config.out), "add --force to replace what eval writes there", config.force)
    check_device(config.device)

    # 2. Pipeline, judges, features
    sampler = first.sampler
    steps = sampler.filled().steps
    guidance = sampler.filled().guidance
    pipe = load_pipeline(model, device=config.device, scheduler=sampler.scheduler)
    for path, m in zip(config.masks, mask_sets):
        try:
            m.check(pipe.unet)
        except MaskoptError as e:
            raise MaskoptError(f"mask file {path}: {e}") from None
    size = sampler.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    loaded = {spec: rewards.load_reward(spec, config.device) for spec in judges}
    features = load_features(feature_source, config.device)
    reference = _reference(config.reference, size, embedded)
    reference_features = features(reference) if reference is not None else None
    sample = lambda template, ps, seeds, reward, measure=None: Evaluator(
        pipe, reward, template, ps, seeds, steps, guidance, size, batch_size=config.batch_size, measure=measure)

    # 3. FreeU's setting: given, diffusers' for the U-Net's family, or the grid's best on the search data
    with_freeu = config.freeu.strip().lower() != "none"
    picks = len(grid["settings"]) + bool(grid["objective"].measures) if grid else 0
    tick = _counter(picks + 1 + with_freeu + len(mask_sets), progress)
    if config.freeu.strip().lower() == "default":
        setting = recommended(pipe.unet)
    if grid is not None:
        setting = _pick_freeu(grid, first, pipe, sample, loaded, size, config.device, tick)

    # 4. Every condition on the same prompts x unseen seeds
    conditions = [Condition("baseline", "baseline")]
    if setting is not None:
        conditions.append(Condition(f"FreeU {setting}", "freeu", freeu=setting))
    conditions += [Condition(name, "masks", masks=m) for name, m in zip(_names(config.masks), mask_sets)]
    seeds = range(UNSEEN_SEED0, UNSEEN_SEED0 + config.seeds)
    for c in conditions:
        ev = sample(c.masks if c.masks is not None else first, prompts, seeds, loaded[judges[0]])
        values = c.masks.values if c.masks is not None else np.ones_like(first.values)
        result = _with_freeu(pipe, c.freeu, lambda: ev(values, keep_images=True))
        c.images, c.scores = result.images, {judges[0]: result.rewards}
        for spec in judges[1:]:
            c.scores[spec] = [float(x) for x in loaded[spec](result.images, ev.image_prompts)]
        for spec, scores in c.scores.items():
            if not all(math.isfinite(x) for x in scores):
                raise MaskoptError(f"the judge {spec} returned NaN or inf for {c.name}")
        c.features = features(result.images)
        c.diversity = diversity(c.features, len(prompts)).numpy()
        tick()

    # 5. Statistics, then the files
    data = _summarise(config, conditions, judges, reference_features, grid, prompts, steps, guidance, size,
                      model, features.name)
    data["settings"].update(prompts=str(Path(prompt_file).resolve()), scheduler=sampler.scheduler)
    _write(Path(config.out), data, conditions, prompts)
    return data


def _pick_freeu(grid: dict, first: Any, pipe: Any, sample: Callable, loaded: dict, size: tuple[int, int],
                device: str, tick: Callable[[], None]) -> FreeU:
    """The grid's best setting on the search prompts x seeds, under the search's own objective: its reward, its
    set-level terms and its bounds (a setting that breaks a bound is not picked), as the masks were picked."""
    from .config import SearchConfig, complete
    from .evaluators import set_measure

    objective = grid["objective"]
    reward = loaded.get(objective.reward) or rewards.load_reward(objective.reward, device)
    measure = None
    if objective.measures:  # the search's features and reference, from its recorded settings
        measure = set_measure(complete(SearchConfig.from_dict(grid["config"])), size)(len(grid["prompts"]))
    picker = sample(first, grid["prompts"], grid["seeds"], reward, measure)
    ones = np.ones_like(first.values)
    base = picker(ones) if objective.measures else None  # the set terms are ratios to the baseline's
    if base is not None:
        tick()
    grid["means"], grid["feasible"] = {}, {}
    for s in grid["settings"]:
        ev = _with_freeu(pipe, s, lambda: picker(ones))
        score = objective.score(ev.reward, ev.measures, base.measures if base is not None else {})
        grid["means"][str(s)], grid["feasible"][str(s)] = score.objective, score.feasible and not ev.failed
        tick()
    feasible = [s for s in grid["settings"] if grid["feasible"][str(s)]]
    if not feasible:
        raise MaskoptError("no FreeU setting of the grid meets the search's bounds on the search data: "
                           "give --freeu B1,B2,S1,S2 or none")
    return max(feasible, key=lambda s: grid["means"][str(s)])


def _load_masks(paths: tuple[Path, ...]) -> list[Any]:
    """The mask files, which must share one U-Net architecture and one sampler to be compared."""
    if not paths:
        raise MaskoptError("give at least one --masks FILE")
    sets = [MaskSet.load(p) for p in paths]
    first = sets[0]
    for path, m in zip(paths[1:], sets[1:]):
        if m.fingerprint != first.fingerprint:
            raise MaskoptError(f"mask file {path} was made for another U-Net than {paths[0]} "
                               f"(fingerprint {m.fingerprint[:12]}, not {first.fingerprint[:12]})")
        regime = lambda s: (s.scheduler, s.steps, s.guidance, s.size)  # None (not recorded) must match too
        if regime(m.sampler) != regime(first.sampler):
            raise MaskoptError(f"mask file {path} was searched with another sampler than {paths[0]} "
                               f"({m.sampler.describe()}, not {first.sampler.describe()}): conditions must share one "
                               "sampler to be compared")
    return sets


def _counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    done = [0]
    if progress:
        progress(0, total)

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    return tick


def _default_judges(masks: Any, embedded: bool) -> list[str]:
    """The searched reward's per-image part (set-level terms are measured anyway), then on the embedded
    default its two judges; a single term of weight 1 ('digits=1') is named as itself."""
    searched = masks.provenance.get("reward")
    judges = []
    if searched:
        reward = Objective.parse(searched).reward
        terms = rewards.check_spec(reward)
        judges.append(terms[0][0] if len(terms) == 1 and terms[0][1] == 1.0 else reward)
    if embedded:
        judges += [j for j in ("digits", "digits-kernel") if j not in judges]
    if not judges:
        raise MaskoptError("the mask file records no reward: give the judges with --reward SPEC")
    return judges


def _freeu_choice(config: EvalConfig, masks: Any, searched: dict) -> tuple[FreeU | None, dict | None]:
    """(the setting, None), or (None, what the grid is picked on) for `--freeu grid`."""
    mode = config.freeu.strip().lower()
    if mode in ("none", "default"):  # default: diffusers' setting for the U-Net's family, once it is loaded
        return None, None
    if mode != "grid":
        return FreeU.parse(config.freeu), None

    file, seeds, reward = searched.get("prompts"), searched.get("seeds"), masks.provenance.get("reward")
    if not (file and seeds and reward) or not Path(file).is_file():
        raise MaskoptError(f"--freeu grid picks FreeU's best on the search prompts x seeds, which {config.masks[0]} "
                           "does not record (or its prompt file is not here): give --freeu B1,B2,S1,S2 or default")
    objective = Objective.parse(reward, searched.get("requires") or [])
    return None, {"settings": list(GRID), "prompts": read_prompts(file), "seeds": range(int(seeds)), "reward": reward,
                  "prompt_file": str(Path(file).resolve()), "objective": objective, "config": searched}


def _with_freeu(pipe: Any, setting: FreeU | None, run: Callable[[], Any]) -> Any:
    with enabled(pipe.unet, setting):
        return run()


def _reference(folder: Path | None, size: tuple[int, int], embedded: bool) -> torch.Tensor | None:
    if folder is not None:
        return load_images(folder, size)
    if embedded:
        from .default.data import load_split

        return load_split("holdout")[0]  # real digits neither the diffusion model nor the judges trained on
    return None


def _names(paths: tuple[Path, ...]) -> list[str]:
    """Short, distinct names: the parent folder of each masks.json (a search's folder), else the file's name."""
    names = [p.parent.name if p.name == "masks.json" and p.parent.name else p.name for p in map(Path, paths)]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def _frechet_diff(base: torch.Tensor, other: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """FD(other) - FD(base) to the reference, and the p-value of a paired permutation test of it.

    Not a bootstrap interval: resampling images with replacement duplicates them, which inflates a
    Frechet distance, so such intervals are off at the sizes eval runs at. Swapping the two images of a
    pair (same prompt, same seed) is exact under "no difference" and needs no correction.
    """
    # scipy permutes the rows' indices within each pair; the statistic reads whole feature rows by them
    both = torch.cat([base, other])
    index = np.arange(len(base))
    fd = lambda a, b: frechet(both[torch.from_numpy(b)], reference) - frechet(both[torch.from_numpy(a)], reference)
    test = permutation_test((index, index + len(base)), fd, permutation_type="samples", vectorized=False,
                            n_resamples=FRECHET_REPS, alternative="two-sided", random_state=0)
    return {"diff": float(test.statistic), "p": float(test.pvalue)}


def _summarise(config: EvalConfig, conditions: list[Condition], judges: list[str], reference: torch.Tensor | None,
               grid: dict | None, prompts: list[str], steps: int, guidance: float, size: tuple[int, int], model: str,
               features: str) -> dict[str, Any]:
    base = conditions[0]
    peer = next((c for c in conditions if c.kind == "freeu"), None)
    rows = []
    for c in conditions:
        row: dict[str, Any] = {"name": c.name, "kind": c.kind, "judges": {}}
        if c.freeu is not None:
            row["freeu"] = c.freeu.to_dict()
        # each condition against the baseline; each mask file against FreeU too
        versus = [("vs_baseline", base)] * (c is not base) + [("vs_freeu", peer)] * (c.kind == "masks" and peer is not None)
        for spec in judges:
            j: dict[str, Any] = {"mean": float(np.mean(c.scores[spec])), "scores": [float(x) for x in c.scores[spec]]}
            for key, other in versus:
                j[key] = paired(other.scores[spec], c.scores[spec]).to_dict()
            row["judges"][spec] = j
        scale = float(base.diversity.mean())
        div: dict[str, Any] = {"mean": float(c.diversity.mean()), "ratio": float(c.diversity.mean()) / scale,
                               "per_prompt": [float(x) for x in c.diversity]}
        for key, other in versus:  # the per-prompt paired difference, also in units of the baseline's mean
            p = paired(other.diversity, c.diversity)
            div[key] = {**p.to_dict(), "in_baseline_units": [p.diff / scale, p.ci_low / scale, p.ci_high / scale]}
        row["diversity"] = div
        if reference is not None:
            fd: dict[str, Any] = {"value": frechet(c.features, reference)}
            for key, other in versus:
                fd[key] = _frechet_diff(other.features, c.features, reference)
            row["frechet"] = fd
        rows.append(row)
    settings = {"masks": [str(p) for p in config.masks], "prompts": str(config.prompts) if config.prompts else None,
                "n_prompts": len(prompts), "seeds": [UNSEEN_SEED0, UNSEEN_SEED0 + config.seeds - 1],
                "images_per_condition": len(prompts) * config.seeds, "judges": judges, "features": features,
                "reference": str(config.reference) if config.reference else ("maskopt:default held-out digits"
                                                                              if reference is not None else None),
                "model": model, "sampler": {"steps": steps, "guidance": guidance, "size": list(size)},
                "freeu": config.freeu}
    freeu = None
    if peer is not None:
        freeu = {"setting": peer.freeu.to_dict(), "mode": config.freeu}
        if grid:
            freeu.update(picked_on=f"{grid['prompt_file']} x seeds 0..{len(grid['seeds']) - 1}",
                         picked_by=grid["reward"], requires=[str(b) for b in grid["objective"].bounds],
                         search_means=grid["means"], search_feasible=grid["feasible"])
    return {"format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, "freeu": freeu, "conditions": rows}


def _write(out: Path, data: dict[str, Any], conditions: list[Condition], prompts: list[str]) -> None:
    make_folder(out, "--out")
    (out / "eval.json").write_text(json.dumps(data, indent=1) + "\n")
    n = min(8, len(prompts))
    save_grid([c.images[:n] for c in conditions], out / "grid.png")  # seed 1000 of the first prompts, a row each
    (out / "report.md").write_text(report(data, prompts[:n]))


def report(data: dict[str, Any], shown: list[str]) -> str:
    """report.md: one table of every condition against the baseline, one of each mask file against FreeU."""
    judges = data["settings"]["judges"]
    fd = any("frechet" in r for r in data["conditions"])
    ci = lambda p: f"{p['diff']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"
    div = lambda p: "{:+.3f} [{:+.3f}, {:+.3f}]".format(*p["in_baseline_units"])
    frechet_cell = lambda p: f"{p['diff']:+.3f} (p {p['p']:.3f})"

    def table(rows: list[dict], key: str, first: str) -> str:
        head = [first] + judges + ["diversity"] + (["Frechet"] if fd else [])
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in rows:
            cells = [r["name"]]
            for j in judges:
                s = r["judges"][j]
                cells.append(f"{s['mean']:.4f}" + (f" ({ci(s[key])})" if key in s else ""))
            d = r["diversity"]
            cells.append(f"{d['ratio']:.3f}" + (f" ({div(d[key])})" if key in d else ""))
            if fd:
                f = r["frechet"]
                cells.append(f"{f['value']:.3f}" + (f" ({frechet_cell(f[key])})" if key in f else ""))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    s = data["settings"]
    text = [f"# maskopt eval\n",
            f"{s['n_prompts']} prompts x seeds {s['seeds'][0]}..{s['seeds'][1]} = {s['images_per_condition']} images per "
            f"condition, the same noise for each; sampler {s['sampler']['steps']} steps, guidance "
            f"{s['sampler']['guidance']:g}, {s['sampler']['size'][0]}x{s['sampler']['size'][1]}; features `{s['features']}`"
            + (f", reference `{s['reference']}`" if s["reference"] else "") + ".\n",
            "Each cell: the condition's value, then its paired difference with 95% interval. Judges: mean score, "
            "interval over images (the seeds of one prompt are not independent, so it is narrower than one over "
            "new prompts would be). Diversity: share of the baseline's, difference in units of the baseline's, "
            "interval over prompts. Frechet: distance to the reference, difference and the p-value of a paired "
            "permutation test. An interval that includes 0, or a p above 0.05, is no difference.\n",
            "## Against the baseline\n", table(data["conditions"], "vs_baseline", "condition")]
    freeu = data["freeu"]
    if freeu is not None:
        picked = (f" picked on {freeu['picked_on']} under `{freeu['picked_by']}` (and its bounds), never on the images "
                  "above" if "picked_on" in freeu else f" (--freeu {freeu['mode']})")
        text += [f"## Each mask file against FreeU\n\nFreeU's setting: "
                 f"{' '.join(f'{k}={v:g}' for k, v in freeu['setting'].items())},{picked}.\n",
                 table([r for r in data["conditions"] if r["kind"] == "masks"], "vs_freeu", "mask file")]
    text.append("## Images\n\nRows: " + ", ".join(r["name"] for r in data["conditions"]) + "; columns: "
                + ", ".join(f"`{p}`" for p in shown) + f" (seed {s['seeds'][0]}).\n\n![grid](grid.png)\n")
    return "\n".join(text)
