"""What a finished search leaves: the best candidate checked on held-out prompts x unseen seeds, the mask file
(the contract with export, carrying the sampler the search ran with) and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import SearchConfig
from .errors import MaskoptError
from .evaluators import Loaded
from .journal import Entry
from .report import write_report
from .sampler import Sampler
from .scoring import UNSEEN_SEED0, Evaluator
from .stats import Paired, paired


@dataclass
class SearchResult:
    out: Path
    masks_path: Path
    best: Entry
    baseline: Entry
    holdout: Paired
    evaluations: int


def finish(cfg: SearchConfig, loaded: Loaded, entries: Sequence[Entry], holdout_prompts: list[str], out: Path,
           optimizer_runs: str, notes: Sequence[str]) -> SearchResult:
    """Check the best candidate against the baseline on held-out images, then write masks.json and the report."""
    # 1. Best candidate vs baseline on held-out prompts and unseen seeds
    baseline = entries[0]
    best = min((e for e in entries if e.choosable), key=lambda e: e.loss, default=baseline)
    check = Evaluator(loaded.pipe, loaded.reward, loaded.template, holdout_prompts,
                      range(UNSEEN_SEED0, UNSEEN_SEED0 + cfg.holdout_seeds), cfg.steps, cfg.guidance, cfg.size,
                      batch_size=cfg.batch_size, measure=loaded.measure_for(len(holdout_prompts)))
    base_ev = check(np.asarray(baseline.values), keep_images=True)
    best_ev = check(np.asarray(best.values), keep_images=True)
    if base_ev.failed or best_ev.failed:
        raise MaskoptError("the reward returned NaN or inf on the held-out images; no mask file written "
                           f"({len(entries)} evaluations kept in {out / 'journal.jsonl'}: --resume validates again)")
    holdout = paired(base_ev.rewards, best_ev.rewards)

    # 2. The mask file (the contract), with the sampler it was searched with
    objective = cfg.objective
    prediction_type = str(loaded.pipe.scheduler.config.get("prediction_type", "epsilon"))
    sampler = Sampler.from_search_config({**cfg.to_dict(), "prediction_type": prediction_type})
    measures: dict[str, Any] = {}
    if objective.measures:
        ratios = objective.score(0, best_ev.measures, base_ev.measures).ratios
        measures = {"holdout_measures": {t: {"baseline": base_ev.measures[t], "masked": best_ev.measures[t],
                                             "ratio": ratios[t]} for t in objective.measures},
                    "infeasible": sum(e.feasible is False for e in entries)}
    masks = loaded.template.with_sampler(sampler).with_values(
        np.asarray(best.values),
        reward=cfg.reward, optimizer=cfg.optimizer, optimizer_runs=optimizer_runs,
        strategy=cfg.strategy, space=cfg.space, budget=cfg.budget,
        evaluations=len(entries), best_evaluation=best.i, search_reward=best.reward,
        baseline_search_reward=baseline.reward, holdout=holdout.to_dict(),
        holdout_prompts=cfg.holdout_prompts, config=cfg.to_dict(), **measures,
    )
    masks_path = masks.save(out / "masks.json")

    # 3. The report
    write_report(out, cfg, masks, entries, holdout, holdout_prompts, base_ev.images, best_ev.images, notes)
    return SearchResult(out, masks_path, best, baseline, holdout, len(entries))
