"""`maskopt search` end to end on a tiny saved pipeline, with a python reward (no model download)."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from maskopt import Buckets, MaskSet, find_units
from maskopt.cli import main
from maskopt.config import SearchConfig
from maskopt.scoring import Evaluator, TrajectoryCache
from maskopt.models import load_pipeline
from maskopt.rewards import load_reward
from maskopt.asktell import AskTell, ask_group
from maskopt.journal import Entry
from maskopt.search import make_optimizer
from maskopt.space import close, encode, space, tell
from tiny import tiny_pipeline

TESTS = Path(__file__).parent


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red cat\n\na blue dog\na red cat\n")  # blank line skipped, duplicate kept once
    return p


def args(pipe_dir, prompts, out, *extra):
    return ["search", "--prompts", str(prompts), "--model", str(pipe_dir), "--reward", "python:reward_fns:brightness",
            "--buckets", "2", "--steps", "4", "--seeds", "1", "--holdout-seeds", "2", "--out", str(out), *extra]


def journal_of(out: Path) -> tuple[dict, list[dict]]:
    """A search folder's journal: header and entries, every line parsed (a torn line fails the test)."""
    lines = (out / "journal.jsonl").read_text().splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def test_search_end_to_end(pipe_dir, prompts, tmp_path, caplog):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, args(pipe_dir, prompts, out, "--budget", "6", "--space", "binary"))
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"masks: {out / 'masks.json'}") and "held-out" in last
    header, entries = journal_of(out)
    assert header["config"]["space"] == "binary" and len(entries) == 6
    assert entries[0]["values"] == [[1.0] * len(entries[0]["values"][0])] * 2  # the baseline first
    assert all(len(e["rewards"]) == 2 for e in entries)  # per prompt: the duplicate was kept once
    assert "duplicate prompt 'a red cat' kept once" in caplog.text
    pipe = load_pipeline(str(pipe_dir))
    masks = MaskSet.load(out / "masks.json", unet=pipe.unet)
    best = max(entries, key=lambda e: e["objective"])
    assert np.array_equal(masks.values, np.asarray(best["values"]))  # the best candidate, baseline included
    prov = masks.provenance
    assert prov["reward"] == "python:reward_fns:brightness" and prov["optimizer"] == "DiscreteOnePlusOne"
    assert prov["optimizer_runs"] == "DiscreteOnePlusOne"  # not a portfolio: runs as named
    assert len({str(e["values"]) for e in entries}) == 6  # no candidate evaluated twice
    hits = sum(e["cache_hits"] for e in entries)  # the progress bar counts replayed U-Net calls of the whole run
    assert f"cache_hits={hits}/{hits + sum(e['unet_calls'] for e in entries)}" in r.stderr
    assert {"diff", "ci_low", "ci_high", "n"} <= prov["holdout"].keys() and prov["holdout"]["n"] == 4
    report = (out / "report.md").read_text()
    assert "95% CI" in report
    for png in ("progress.png", "values.png", "grid.png"):
        assert (out / png).stat().st_size > 1000


def test_trajectory_reuse_gives_the_same_rewards(pipe_dir):
    pipe = load_pipeline(str(pipe_dir))
    units = find_units(pipe.unet, "paper")
    template = MaskSet.ones(pipe.unet, units, Buckets.uniform(3))
    reward = load_reward("python:reward_fns:brightness")
    make = lambda cache: Evaluator(pipe, reward, template, ["a cat", "a dog"], [0, 1], 6, 5.0, cache=cache)
    cached, plain = make(TrajectoryCache(64)), make(None)
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1.5, (3, len(units)))
    b = a.copy()
    b[0] = 0.3  # differs only in bucket 0, the last visited: the first 2 buckets' steps replay
    c = a.copy()
    c[2] = 1.2  # differs in the first visited bucket: nothing replays
    results = [cached(v) for v in (a, b, c)]
    assert [r.cache_hits for r in results] == [0, 4, 0]  # 6 DDIM steps, 2 per bucket
    assert [r.unet_calls for r in results] == [6, 2, 6]
    for v, r in zip((a, b, c), results):
        assert r.rewards == plain(v).rewards  # bit for bit
    assert results[0].rewards != results[1].rewards


@pytest.mark.parametrize("preset,groups,xl", [("paper", None, False), ("branches", None, False), ("paper", 4, False),
                                              ("paper", None, True), (["freeu", "paper"], None, False)])
def test_candidates_evaluated_together_match_one_at_a_time(pipe_dir, tmp_path, preset, groups, xl):
    """--workers: several candidates share one batch under per-sample masks, and each replays its own cached steps.

    Units that scale weights only (paper: bias kept), whole branches (weight and bias), channel groups and
    FreeU's backbone units (scaled inputs); on SDXL, the added conditioning is split with the batch when only some candidates run a step.
    """
    pipe = load_pipeline(str(tiny_pipeline(tmp_path / "xl", xl=True) if xl else pipe_dir))
    units = find_units(pipe.unet, preset, groups=groups)
    template = MaskSet.ones(pipe.unet, units, Buckets.uniform(3))
    reward = load_reward("python:reward_fns:brightness")
    make = lambda cache: Evaluator(pipe, reward, template, ["a cat", "a dog"], [0, 1], 6, 5.0, cache=cache)
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1.5, (3, len(units)))
    b, c = a.copy(), a.copy()
    b[0], c[2] = 0.3, 1.2  # b replays a's first 2 buckets; c replays nothing
    plain = make(None)
    alone = np.asarray([plain(v).rewards for v in (a, b, c)])
    together = np.asarray([e.rewards for e in plain.score([a, b, c])])
    assert np.abs(together - alone).max() < 1e-6 < np.abs(alone[0] - alone[1]).max()  # rounding, not masks
    cached = make(TrajectoryCache(64))
    cached.score([a])
    group = cached.score([b, c])  # b's first 4 steps come from the cache while c runs them
    assert [e.cache_hits for e in group] == [4, 0] and [e.unet_calls for e in group] == [2, 6]
    assert np.abs(np.asarray([e.rewards for e in group]) - alone[1:]).max() < 1e-6


@pytest.mark.parametrize("device,inside", [("cuda", (False, False)), ("cpu", (True, True))])
def test_evaluations_on_cuda_run_fp32_without_tf32(device, inside):
    """TF32 made a candidate's rewards depend on its batch by 1e-2 on an H200; the evaluator turns it off for
    its own run on CUDA and gives the caller's settings back, also when the block raises."""
    from maskopt.scoring import full_fp32

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    saved = flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError):
            with full_fp32(torch.device(device)):
                assert flags() == inside
                raise RuntimeError
        assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no fp32_precision API")
def test_full_fp32_when_precision_was_set_through_torchs_newer_api():
    """After `fp32_precision = "tf32"` (a reward module, another library), torch refuses reads of the old flags."""
    from maskopt.scoring import full_fp32

    b = torch.backends
    saved = (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision)
    try:
        b.cuda.matmul.fp32_precision = b.cudnn.conv.fp32_precision = "tf32"
        with full_fp32(torch.device("cuda")):
            assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("ieee", "ieee")
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    finally:
        b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision = saved
    assert isinstance(b.cuda.matmul.allow_tf32, bool)  # the old flags read again: no other test is affected


def test_resume_after_sigkill(pipe_dir, prompts, tmp_path):
    """Killed with SIGKILL while scoring its 4th evaluation (the reward kills its own process), the search resumes
    as the uninterrupted one: the 3 journaled evaluations stay as they were, a torn line is dropped."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    flags = lambda folder: args(pipe_dir, prompts, folder, "--budget", "12", "--space", "gates", "--no-race",
                                "--reward", "python:reward_fns:dies")  # one reward call per evaluation (test_race.py races)
    # one thread, as this test process runs (conftest): the same sums in the same order, so the same rewards
    env = {**os.environ, "PYTHONPATH": str(TESTS), "MASKOPT_TEST_DIE_AT": "4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "maskopt.cli", *flags(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    journal = out / "journal.jsonl"
    before = journal.read_text().splitlines()
    assert len(before) == 1 + 3  # the header and the evaluations scored before the kill
    with open(journal, "a") as f:
        f.write('{"i": 99, "values": [[1.0')  # a torn line, as a kill mid-write leaves
    r = CliRunner().invoke(main, flags(out) + ["--resume"])
    assert r.exit_code == 0, r.output
    after = journal.read_text().splitlines()
    assert after[: len(before)] == before  # nothing journaled before the kill is lost or rewritten
    entries = [json.loads(x) for x in after[1:]]
    assert [e["i"] for e in entries] == list(range(12)) and (out / "masks.json").exists()
    assert CliRunner().invoke(main, flags(whole)).exit_code == 0
    strip = lambda e: {k: v for k, v in e.items() if k not in ("seconds", "cache_hits", "unet_calls")}
    assert [strip(e) for e in entries] == [strip(e) for e in journal_of(whole)[1]]


def test_recipe_and_override(pipe_dir, prompts, tmp_path, caplog):
    from maskopt.config import resolve

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(pipe_dir), "steps": 4, "buckets": 2, "space": "binary",
                                      "gate-range": "0.5:1.5", "size": "16x16", "targets": "resnets"}))
    cfg = resolve(str(recipe), steps=6, prompts=str(prompts))
    assert (cfg.steps, cfg.buckets, cfg.space, cfg.gate_range, cfg.size, cfg.targets) == (6, 2, "binary", (0.5, 1.5), (16, 16), ["resnets"])
    assert resolve(str(recipe), prompts=str(prompts)).steps == 4
    assert resolve(str(recipe), prompts=str(prompts), space="gates").gate_range == (0.5, 1.5)
    assert "gate-range" not in caplog.text
    resolve(str(recipe), prompts=str(prompts), gate_range="0.6:1.4")  # asked for on the command line, with the recipe's binary space
    assert "--gate-range bounds the gates space only; with --space binary it is not used" in caplog.text
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    with pytest.raises(Exception, match="unknown setting 'stepz'; valid: "):
        resolve(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("text, message", [
    (b"budget: abc\n", "setting 'budget' must be int, got 'abc'"),
    (b"steps: 4.5\n", "setting 'steps' must be int, got 4.5"),
    (b"resume: 'no'\n", "setting 'resume' must be bool, got 'no'"),
    (b"targets: 5\n", "targets 5: give a preset or glob"),
    (b"size: [0, -8]\n", "size 0x-8: height and width must be positive multiples of 8"),
    (b"1: 2\n", "must be a mapping of setting: value"),
    (b"\xff\xfe\x00budget", "is not UTF-8 text"),
    (b"steps: [4\n", "is not valid YAML"),
])
def test_bad_recipe_values(tmp_path, text, message):
    from maskopt.config import resolve
    from maskopt.errors import MaskoptError

    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text)
    with pytest.raises(MaskoptError, match=message.replace("[", "\\[")) as e:
        resolve(str(recipe))
    assert "\n" not in str(e.value)
    with pytest.raises(MaskoptError, match=message.replace("[", "\\[")):  # a flag over it does not hide it
        resolve(str(recipe), budget=3, steps=4, resume=True, targets=("paper",), size="32x32")
    assert resolve(None, guidance=7).guidance == 7.0  # an int where a float is due is fine


def test_shipped_recipes_parse(prompts):
    from maskopt.config import resolve

    recipes = sorted((TESTS.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for r in recipes:
        cfg = resolve(str(r), prompts=str(prompts))
        assert None not in cfg.to_dict().values(), r.name  # every default filled: the hub recipes name their sampler


def test_nan_rewards_are_failed_candidates(pipe_dir, prompts, tmp_path):
    out = tmp_path / "run"
    a = args(pipe_dir, prompts, out, "--budget", "5", "--no-race")  # one reward call per evaluation
    a[a.index("python:reward_fns:brightness")] = "python:reward_fns:flaky"
    import reward_fns

    reward_fns._calls["n"] = 0
    r = CliRunner().invoke(main, a)
    _, entries = journal_of(out)
    assert [e["failed"] for e in entries] == [False, True, False, True, False]
    assert entries[1]["reward"] is None and "NaN" not in (out / "journal.jsonl").read_text()  # strict JSON
    # the held-out check then hits a NaN too (call 6): no mask file, a one-line error
    assert r.exit_code != 0 and "NaN" in r.output and not (out / "masks.json").exists()


def _bad(tmp_path, pipe_dir, prompts, *extra, out=None):
    out = out or tmp_path / "bad-run"
    return CliRunner().invoke(main, args(pipe_dir, prompts, out, "--budget", "2", *extra))


@pytest.mark.parametrize("setup, extra, message", [
    (lambda p: p.unlink(), [], "prompt file .* does not exist"),
    (lambda p: p.write_text("\n  \n"), [], "holds no prompts"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00a cat"), [], "is not UTF-8 text"),
    (None, ["--reward", "clipp"], "unknown reward 'clipp'; valid: aesthetic, clip, digits"),
    (None, ["--optimizer", "NoSuchOpt"], "unknown optimizer 'NoSuchOpt'"),
    (None, ["--optimizer", "Cobyla", "--workers", "2"], "optimizer 'Cobyla' evaluates one candidate at a time: use --workers 1"),
    (None, ["--targets", "nope.*"], "'nope.\\*' matches no unit"),
    (None, ["--scheduler", "warp"], "unknown scheduler 'warp'; valid: ddim"),
    (None, ["--buckets", "5"], "--buckets 5 is larger than the number of sampling steps \\(4\\)"),
    (None, ["--gate-range", "1.2:1.5"], "must hold 1"),
    (lambda p: (p.unlink(), p.mkdir()), [], "prompt file .* is a folder"),
    (None, ["--size", "0x0"], "size 0x0: height and width must be positive multiples of 8"),
    (None, ["--size", "33x32"], "multiples of 8"),
    (None, ["--space", "groups", "--groups", "-1"], "--groups must be at least 1, got -1"),
    (None, ["--steps", "0"], "--steps must be at least 1, got 0"),
    (None, ["--cache", "-1"], "--cache must be 0"),
    (None, ["--device", "tpu0"], "unknown device 'tpu0'"),
    (None, ["--space", "bogus"], "Invalid value for '--space'"),
    (None, ["--reward", "python:reward_fns:raises"], "the reward python:reward_fns:raises raised RuntimeError: boom"),
    (None, ["--reward", "python:reward_fns:always_nan"], "NaN or inf for the unmasked baseline"),
    (None, ["--reward", "python:no_such_module:f"], "cannot import module 'no_such_module'"),
    (None, ["--reward", "clip@./missing-clip"], "reward clip's source './missing-clip' is not a path that exists"),
    (lambda p: p.write_text("a cat\n"), ["--holdout-seeds", "1"], "the held-out check needs at least 2 images"),
])
def test_bad_input(tmp_path, pipe_dir, prompts, setup, extra, message):
    if setup:
        setup(prompts)
    r = _bad(tmp_path, pipe_dir, prompts, *extra)
    assert r.exit_code != 0
    import re
    assert re.search(message, r.output), r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("Error:")
    assert not (tmp_path / "bad-run").exists()  # nothing half-written


def test_existing_output_folder(tmp_path, pipe_dir, prompts):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _bad(tmp_path, pipe_dir, prompts, out=out)
    assert r.exit_code != 0 and "exists and is not empty (pass --resume" in r.output
    r = _bad(tmp_path, pipe_dir, prompts, "--resume", out=out)
    assert r.exit_code != 0 and "holds no search journal" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_resume_with_other_configuration(tmp_path, pipe_dir, prompts):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, args(pipe_dir, prompts, out, "--budget", "2")).exit_code == 0
    r = CliRunner().invoke(main, args(pipe_dir, prompts, out, "--budget", "3", "--resume", "--steps", "6"))
    assert r.exit_code != 0 and "different configuration (steps: 4 there, 6 now)" in r.output


def test_resume_compares_prompts_not_spellings(tmp_path, pipe_dir, prompts):
    """A moved prompt file or the default optimizer named resumes; an edited prompt file does not."""
    out = tmp_path / "run"
    assert CliRunner().invoke(main, args(pipe_dir, prompts, out, "--budget", "2")).exit_code == 0
    moved = tmp_path / "elsewhere.txt"
    moved.write_text(prompts.read_text())
    r = CliRunner().invoke(main, args(pipe_dir, moved, out, "--budget", "3", "--resume", "--optimizer", "NGOpt"))
    assert r.exit_code == 0, r.output
    assert len(journal_of(out)[1]) == 3
    moved.write_text(prompts.read_text() + "a green bird\n")
    r = CliRunner().invoke(main, args(pipe_dir, moved, out, "--budget", "4", "--resume"))
    assert r.exit_code != 0 and "the search prompts differ from the journal's" in r.output
    assert len(journal_of(out)[1]) == 3  # nothing appended


def test_failed_setup_leaves_folders_as_they_were(tmp_path, pipe_dir, prompts):
    mine = tmp_path / "mine"
    mine.mkdir()  # the user's empty folder stays, empty
    assert _bad(tmp_path, pipe_dir, prompts, "--targets", "nope.*", out=mine).exit_code != 0
    assert mine.is_dir() and not any(mine.iterdir())
    # folders the search made are removed, parents included, with or without --resume
    for extra in ([], ["--resume"]):
        r = _bad(tmp_path, pipe_dir, prompts, "--targets", "nope.*", *extra, out=tmp_path / "a" / "b" / "c")
        assert r.exit_code != 0 and "matches no unit" in r.output
        assert not (tmp_path / "a").exists()


def test_reward_failing_mid_search_keeps_the_journal(tmp_path, pipe_dir, prompts):
    """Evaluations made before a reward raises stay journaled; --resume with a working reward continues."""
    import reward_fns

    out = tmp_path / "run"
    reward_fns._raise_after.update(n=0, at=4)  # calls 1-3 (the baseline and two candidates) score, call 4 raises
    a = args(pipe_dir, prompts, out, "--budget", "5", "--no-race")  # one reward call per evaluation
    a[a.index("python:reward_fns:brightness")] = "python:reward_fns:raises_later"
    r = CliRunner().invoke(main, a)
    last = r.output.strip().splitlines()[-1]  # after the progress bar: the error, one line
    assert r.exit_code != 0 and last.startswith("Error: the reward python:reward_fns:raises_later raised "
                                                 "RuntimeError: model server went away"), r.output
    assert "3 evaluations kept in" in last and "--resume continues" in last
    assert len(journal_of(out)[1]) == 3
    reward_fns._raise_after.update(n=0, at=10**9)
    r = CliRunner().invoke(main, a + ["--resume"])
    assert r.exit_code == 0, r.output
    assert len(journal_of(out)[1]) == 5 and (out / "masks.json").exists()


def test_unwritable_output(tmp_path, pipe_dir, prompts):
    (tmp_path / "file").write_text("x")
    r = _bad(tmp_path, pipe_dir, prompts, out=tmp_path / "file" / "sub")
    assert r.exit_code != 0 and f"--out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, not a folder" in r.output


def test_recast_optimizer_threads_are_stopped():
    """NGOpt may hand a small budget to scipy's COBYLA, which nevergrad runs in a non-daemon thread."""
    import threading

    from maskopt.space import close, optimizer, space

    param = space("gates", 2, 3)
    opt = optimizer("NGOpt", param, "gates", budget=40, workers=1)
    for _ in range(12):  # stop short of the budget, as a search whose optimizer wants more would
        c = opt.ask()
        opt.tell(c, float(np.sum(c.value)))
    threads = [t for t in threading.enumerate() if type(t).__name__ == "_MessagingThread" and t.is_alive()]
    assert threads, "this budget no longer starts a recast optimizer: the test needs another setting"
    threads[0].join(timeout=1)
    assert threads[0].is_alive()  # blocked, waiting for a loss that will never come
    close(opt)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_search_on_an_sdxl_pipeline(tmp_path, prompts):
    """SDXL's added conditioning goes through the same evaluation path (tiny saved SDXL pipeline)."""
    xl = tiny_pipeline(tmp_path / "xl", xl=True)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, args(xl, prompts, out, "--budget", "3", "--guidance", "3.0"))
    assert r.exit_code == 0, r.output
    pipe = load_pipeline(str(xl))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    masks = MaskSet.load(out / "masks.json", unet=pipe.unet)
    assert len(masks.units) == len(find_units(pipe.unet, "paper")) == 32


def test_search_on_an_sd21_pipeline(tmp_path, prompts):
    """SD2.1's shape (linear projections, upcast attention, v-prediction) through the search, one candidate and two at once."""
    sd21 = tiny_pipeline(tmp_path / "sd21", sd21=True)
    pipe = load_pipeline(str(sd21))
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.unet.config.use_linear_projection
    for workers in ("1", "2"):
        out = tmp_path / f"run{workers}"
        r = CliRunner().invoke(main, args(sd21, prompts, out, "--budget", "5", "--guidance", "3.0", "--workers", workers))
        assert r.exit_code == 0, r.output
        _, entries = journal_of(out)
        assert len(entries) == 5 and len({str(e["values"]) for e in entries}) == 5
        assert len(set(e["reward"] for e in entries)) > 1  # the masks change the images
    masks = MaskSet.load(out / "masks.json", unet=pipe.unet)
    assert len(masks.units) == len(find_units(pipe.unet, "paper")) > 0


@pytest.mark.parametrize("strategy,space,workers", [("joint", "gates", 1), ("sweep", "gates", 1), ("joint", "binary", 1),
                                                    ("joint", "gates", 3), ("joint", "groups", 3)])
def test_resume_goes_on_as_if_never_stopped(pipe_dir, prompts, tmp_path, strategy, space, workers, caplog):
    """The journal is replayed by asking as the first run asked: the resumed search is the uninterrupted one.

    binary: DiscreteOnePlusOne proposes evaluated candidates again and again, which are told, not journaled.
    workers 3: killed after 2 of a group of 3 were journaled; the third is asked again and evaluated alone,
    so its reward agrees to float rounding (one candidate runs under `apply`, a group under `per_sample`).
    """
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    opts = ("--strategy", strategy, "--space", space, "--workers", str(workers))
    assert CliRunner().invoke(main, args(pipe_dir, prompts, whole, "--budget", "9", *opts)).exit_code == 0
    # NGOpt's parallel pick found far less than its sequential one on the embedded default: said, not hidden
    assert ("NGOpt cannot run COBYLA in parallel" in caplog.text) == (workers > 1 and strategy == "joint" and space == "gates")
    lines = (whole / "journal.jsonl").read_text().splitlines()
    kept = 5 if workers == 1 else 4  # baseline + 4 evaluations, or baseline + 2 of the first group of 3
    cut.mkdir()
    (cut / "journal.jsonl").write_text("\n".join(lines[:kept]) + "\n")
    r = CliRunner().invoke(main, args(pipe_dir, prompts, cut, "--budget", "9", *opts, "--resume"))
    assert r.exit_code == 0, r.output
    # the same candidates and rewards (not the same timings or cache hits: the resumed run starts a new cache)
    _, resumed = journal_of(cut)
    _, first = journal_of(whole)
    assert [e["values"] for e in resumed] == [e["values"] for e in first]
    if workers == 1:
        strip = lambda e: {k: v for k, v in e.items() if k not in ("seconds", "cache_hits", "unet_calls")}
        assert [strip(e) for e in resumed] == [strip(e) for e in first]
    else:
        assert [e["rewards"] for e in resumed] == [pytest.approx(e["rewards"], abs=1e-6) for e in first]
    # another --workers asks other groups: the journal is then told as points not asked, and the search goes on
    more = tmp_path / "more"
    more.mkdir()
    (more / "journal.jsonl").write_text("\n".join(lines[:5]) + "\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskopt.asktell"):
        r = CliRunner().invoke(main, args(pipe_dir, prompts, more, "--budget", "9", "--strategy", strategy, "--space",
                                          space, "--workers", "2", "--resume"))
    assert r.exit_code == 0, r.output
    # A (1+1) optimizer (DiscreteOnePlusOne; COBYLA, NGOpt's pick for one worker) mutates what it was told
    # last, so asking two before telling either differs from the journal and the replay falls back.
    # MetaModel (NGOpt's pick for several workers on gates) asks the same first candidates in groups of 3
    # or 2: that journal replays exactly.
    assert ("told as points not asked" in caplog.text) == (not (space == "gates" and workers > 1))
    _, continued = journal_of(more)
    assert [e["i"] for e in continued] == list(range(9)) and len({str(e["values"]) for e in continued}) == 9


def test_sweep_replays_the_buckets_before_its_stage(pipe_dir, prompts, tmp_path):
    """--strategy sweep: one bucket per stage, first-visited first; a stage re-runs only its bucket's steps and later ones."""
    out = tmp_path / "run"
    # --no-race: one pipeline call per evaluation, so the counts below are per step (test_race.py races)
    r = CliRunner().invoke(main, args(pipe_dir, prompts, out, "--budget", "9", "--strategy", "sweep", "--no-race"))
    assert r.exit_code == 0, r.output
    header, entries = journal_of(out)
    assert header["strategy"] == "sweep"
    values = [np.asarray(e["values"]) for e in entries]
    first = next(i for i, v in enumerate(values) if not np.all(v[0] == 1))  # bucket 0: lowest timesteps, visited last
    assert first > 1 and all(np.all(v[0] == 1) for v in values[:first])  # stage 1 moved bucket 1 alone
    late = values[first:]
    assert all(np.array_equal(v[1], late[0][1]) for v in late)  # stage 2 holds bucket 1 at the best so far
    # 4 DDIM steps, 2 per bucket: every candidate of stage 2 replays bucket 1's 2 steps from the cache
    assert all(e["cache_hits"] == 2 and e["unet_calls"] == 2 for e in entries[first:])


@pytest.mark.parametrize("strategy,workers", [("joint", 1), ("sweep", 1), ("joint", 4)])
def test_binary_search_finds_the_units_worth_removing(strategy, workers):
    """A toy objective shaped like a mask search: removing most units costs reward, removing three gains it.

    It fails if the binary space draws its values at random (nevergrad's stochastic Choice: every candidate
    then removes about a third of the units and none beats all ones), or if an exact result is told once
    (nevergrad's (1+1) then keeps its parent).
    """
    shape, good = (3, 16), [(0, 3), (1, 7), (2, 11)]
    gain = -np.ones(shape)
    for k, u in good:
        gain[k, u] = 1.0
    objective = lambda v: -float((gain * (1 - v)).sum())  # a loss
    cfg = SearchConfig(space="binary", strategy=strategy, budget=120, buckets=3, workers=workers)
    driver = AskTell(lambda: make_optimizer(cfg, shape, recompute=[1 / 3, 2 / 3, 1.0]), "binary", shape, 120, workers)
    entries: list[dict] = []
    sizes: list[int] = []

    def evaluate(group):
        sizes.append(len(group))
        entries.extend({"values": v.tolist(), "failed": False, "objective": -objective(v)} for v in group)
        return [objective(v) for v in group]

    driver.run(evaluate)
    driver.close()
    assert not driver.converged
    assert len(entries) == 120 and len({str(e["values"]) for e in entries}) == 120  # nothing evaluated twice
    # every group is full: DiscreteOnePlusOne proposes its parent again and again, which must not thin the batch
    assert sizes[1:-1] == [workers] * (len(sizes) - 2) and sizes[-1] == 119 - workers * (len(sizes) - 2)
    best = np.asarray(max(entries, key=lambda e: e["objective"])["values"])
    assert sum(best[k, u] == 0 for k, u in good) >= 2 and (best == 0).sum() <= 4


def test_resume_inside_a_short_group_goes_on_as_if_never_stopped():
    """A group that stopped short of --workers new candidates (a small space: twins and repeats) is resumed as asked."""
    shape, gain = (2, 3), np.random.RandomState(101).randn(2, 3)
    objective = lambda v: -float((gain * (1 - v)).sum())
    cfg = SearchConfig(space="binary", budget=40, buckets=2, workers=8, seed=1)
    sizes: list[int] = []

    def run(journal):
        driver = AskTell(lambda: make_optimizer(cfg, shape, recompute=[1.0, 1.0]), "binary", shape, 40, 8)
        entries = list(journal)

        def evaluate(group):
            sizes.append(len(group))
            entries.extend(entry(v.tolist()) for v in group)
            return [objective(v) for v in group]

        driver.run(evaluate, journal)
        driver.close()
        return [e.values for e in entries]

    entry = lambda v: Entry.from_json({"values": v, "failed": False, "objective": -objective(np.asarray(v))})
    whole = run([])
    assert 1 < sizes[1] < 8  # the first group is short
    assert run([entry(v) for v in whole[:2]]) == whole


def test_a_group_does_not_wait_forever_for_new_candidates():
    """An optimizer that, told nothing yet, proposes one candidate again and again: the group goes with it alone."""
    param = space("binary", 2, 3)

    class Stuck:
        def ask(self):
            return param.spawn_child(new_value=encode(np.zeros((2, 3)), "binary"))

    group, converged = ask_group(Stuck(), "binary", (2, 3), {}, want=4)
    assert len({key for _, key, _ in group}) == 1 and len(group) == 1 + 16 and not converged


def test_groups_space_searches_channel_groups(pipe_dir, prompts, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, args(pipe_dir, prompts, out, "--budget", "5", "--space", "groups"))
    assert r.exit_code == 0, r.output
    header, entries = journal_of(out)
    assert header["optimizer"] == "DiscreteOnePlusOne" and all(u["kind"] == "group" for u in header["units"])
    values = np.asarray([e["values"] for e in entries])
    assert set(np.unique(values)) <= {0.0, 1.0} and len({v.tobytes() for v in values}) == 5
    # deterministic values: the stochastic Choice switched off a third of all groups in every candidate;
    # the (1+1) family flips a few (DiscreteOnePlusOne starts with larger, shrinking mutations)
    assert all((v == 0).mean() < 0.2 for v in values[1:])


def test_prepare_asks_each_part_to_check_itself_and_builds_nothing(monkeypatch, pipe_dir, prompts, tmp_path):
    """Spaces check optimizer names and worker support, rewards their prompts, without an optimizer or a model."""
    import dataclasses

    from maskopt.config import resolve
    from maskopt.errors import MaskoptError
    from maskopt.search import prepare

    def built(*a, **k):
        raise AssertionError("prepare built an optimizer or loaded a model")

    for target in ("maskopt.space.optimizer", "maskopt.models.load_pipeline", "maskopt.rewards.load_reward"):
        monkeypatch.setattr(target, built)
    cfg = resolve(None, model=str(pipe_dir), prompts=str(prompts), reward="python:reward_fns:brightness",
                  out=str(tmp_path / "ok"))
    assert prepare(cfg).prompts == ["a red cat", "a blue dog"]
    bad = [(dict(optimizer="NoSuchOpt"), "unknown optimizer 'NoSuchOpt'"),
           (dict(optimizer="Cobyla", workers=2), "evaluates one candidate at a time"),
           (dict(space="gates", gate_range=(1.1, 1.5)), "must hold 1"),
           (dict(reward="digits"), "prompt 'a red cat' names no digit"),
           (dict(reward="python:no_such_module:f"), "cannot import module 'no_such_module'")]
    for change, message in bad:
        with pytest.raises(MaskoptError, match=message):
            prepare(dataclasses.replace(cfg, out=str(tmp_path / "bad"), **change))
    assert not (tmp_path / "bad").exists()
