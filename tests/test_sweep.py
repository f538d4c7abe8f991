"""The bucket sweep: stage plan, candidates that change one bucket at a time, and a toy objective it improves."""

import numpy as np
import pytest

from maskopt.config import SearchConfig
from maskopt.asktell import AskTell
from maskopt.journal import Entry
from maskopt.search import make_optimizer
from maskopt.space import close, encode, tell
from maskopt.sweep import BucketSweep, plan

RECOMPUTE = [4 / 15, 8 / 15, 12 / 15, 1.0]  # DDIM 15 steps, K=4: steps 4, 4, 4, 3 from the lowest timesteps up


def test_plan_gives_each_stage_the_same_unet_time():
    stages = plan(299, RECOMPUTE)
    assert [k for k, _ in stages] == [3, 2, 1, 0]  # first-visited bucket (highest timesteps) first
    assert sum(n for _, n in stages) == 299
    cost = [n * RECOMPUTE[k] for k, n in stages]  # evaluations x fraction of steps each one re-runs
    assert max(cost) / min(cost) < 1.05
    assert plan(3, RECOMPUTE) == [(0, 3)]  # stages with no share are left out; the budget still sums


@pytest.mark.parametrize("kind", ["gates", "binary"])
def test_candidates_change_only_the_stage_bucket(kind):
    target = np.linspace(0.8, 1.2, 4 * 5).reshape(4, 5)
    if kind == "binary":
        target = (target > 1.0).astype(float)
    opt = BucketSweep(None if kind == "gates" else "DiscreteOnePlusOne", kind, 4, 5, budget=80, recompute=RECOMPUTE)
    ones = np.ones((4, 5))
    loss = lambda v: float(((v - target) ** 2).sum())
    opt.tell(opt.parametrization.spawn_child(new_value=ones.ravel() if kind == "gates" else tuple(ones.ravel())), loss(ones))
    seen, known = [], {ones.tobytes()}
    for _ in range(3000):
        if len(seen) == 80:
            break
        before, k = opt.best.copy(), None
        cand = opt.ask()
        values = np.asarray(cand.value, dtype=float).reshape(4, 5)
        changed = [b for b in range(4) if not np.array_equal(values[b], before[b])]
        assert len(changed) <= 1 and (not changed or changed[0] == opt.bucket)
        if values.tobytes() not in known:  # as the search does: a known candidate is told, not evaluated again
            seen.append(opt.bucket)
            known.add(values.tobytes())
        opt.tell(cand, loss(values))
    close(opt)
    assert [k for i, k in enumerate(seen) if i == 0 or seen[i - 1] != k] == [3, 2, 1, 0]  # one stage per bucket
    counts, planned = [seen.count(k) for k in (3, 2, 1, 0)], [n for _, n in plan(80, RECOMPUTE)]
    # binary: 5 units give 31 candidates besides the best, fewer than the last stage's share: it ends searched out
    assert counts == planned if kind == "gates" else all(c <= n for c, n in zip(counts, planned))
    assert loss(opt.best) < loss(ones) / 2  # it optimizes


def test_asks_past_the_plan_go_to_the_last_stage():
    """The search, not the sweep, counts the budget: an ask past the plan must not end a search without masks."""
    opt = BucketSweep(None, "gates", 2, 3, budget=4, recompute=[0.5, 1.0])
    for _ in range(4):
        c = opt.ask()
        opt.tell(c, float(np.sum(c.value)))
    assert opt.bucket == 0
    extra = np.asarray(opt.ask().value).reshape(2, 3)
    assert np.array_equal(extra[1], opt.best[1])  # it changes only the last stage's bucket


@pytest.mark.parametrize("kind", ["binary", "groups"])
def test_sweep_with_workers_spends_its_plan_on_evaluations(kind):
    """Twins within a group of asks and known candidates are not evaluated, so they spend none of a stage's share."""
    shape = (3, 16)
    gain = -np.ones(shape)
    gain[0, 3] = gain[1, 7] = gain[2, 11] = 1.0
    loss = lambda v: -float((gain * (1 - v)).sum())
    cfg = SearchConfig(space=kind, strategy="sweep", budget=120, buckets=3, workers=8)
    driver = AskTell(lambda: make_optimizer(cfg, shape, recompute=[1 / 3, 2 / 3, 1.0]), kind, shape, cfg.budget, cfg.workers)
    entries: list[dict] = []

    def evaluate(group):
        entries.extend({"values": v.tolist(), "failed": False, "objective": -loss(v)} for v in group)
        return [loss(v) for v in group]

    driver.run(evaluate)
    assert not driver.converged and len(entries) == 120
    opt = driver.opt
    assert opt.stage == len(opt.stages) - 1 and opt._asked <= opt.stages[-1][1] + cfg.workers  # the plan held
    close(opt)


def test_small_budget_is_named(caplog):
    close(BucketSweep(None, "gates", 4, 32, budget=299, recompute=RECOMPUTE))
    assert "smallest stage" not in caplog.text  # 37 evaluations for the first stage: enough for 32 units
    close(BucketSweep(None, "gates", 4, 32, budget=39, recompute=RECOMPUTE))
    assert "the smallest stage of the sweep gets 4 evaluations for 32 units; a budget of about 340" in caplog.text


def test_stage_gains_files_each_evaluation_under_its_first_changed_bucket():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("stage_gains", Path(__file__).parents[1] / "benchmarks" / "stage_gains.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ones = np.ones((4, 2))
    b3, b3b0, b3b0b2 = ones.copy(), ones.copy(), ones.copy()
    b3[3] = b3b0[3] = b3b0b2[3] = 0.8
    b3b0[0] = b3b0b2[0] = 1.2
    b3b0b2[2] = 0.9
    entry = lambda v, r, calls: Entry.from_json({"values": v.tolist(), "reward": r, "failed": False, "unet_calls": calls})
    g = mod.groups([entry(ones, 0.5, 15), entry(b3, 0.6, 15), entry(b3b0, 0.55, 4), entry(b3b0b2, 0.7, 8)])
    # b3b0 is compared with the best so far (b3): only bucket 0 differs, and it did not improve
    assert g == {"bucket 3": {"evaluations": 1, "unet_calls": 15, "gain": pytest.approx(0.1), "to_90": 1},
                 "bucket 0": {"evaluations": 1, "unet_calls": 4, "gain": 0.0, "to_90": 0},
                 "several, from 2": {"evaluations": 1, "unet_calls": 8, "gain": pytest.approx(0.1), "to_90": 1}}
