"""Racing (race.py): the bound, and raced searches end to end on a tiny pipeline."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from maskopt.cli import main
from maskopt.race import Race, told_loss

TESTS = Path(__file__).parent


def test_plan_is_one_fixed_partition_of_the_images():
    race = Race(looks=(0.25, 0.5))
    a, b = race.plan(30, seed=3), race.plan(30, seed=3)
    assert [c.tolist() for c in a] == [c.tolist() for c in b]  # the same for every candidate
    assert sorted(np.concatenate(a).tolist()) == list(range(30)) and [len(c) for c in a] == [8, 7, 15]
    assert np.concatenate(a).tolist() != list(range(30))  # shuffled: a chunk is a sample of prompts and seeds
    assert [len(c) for c in Race(looks=(0.1, 0.2)).plan(3, seed=0)] == [1, 2]  # never an empty chunk


def _stop_rate(d: np.ndarray, race: Race, perms: int = 2000, seed: int = 0) -> float:
    """How often a candidate with per-image differences `d` is stopped at some look, over random image orders."""
    rng, n, stops = np.random.default_rng(seed), len(d), 0
    for _ in range(perms):
        seen = np.zeros(0, dtype=int)
        for chunk in race.plan(n, seed=int(rng.integers(1 << 30)))[:-1]:
            seen = np.concatenate([seen, chunk])
            if race.verdict(d[seen], n) is not None:
                stops += 1
                break
    return stops / perms


@pytest.mark.parametrize("shape", ["normal", "skewed", "sparse"])
def test_a_candidate_that_would_win_is_stopped_at_most_5_percent_of_the_time(shape):
    """Per-image differences with a positive mean over all 60 images (a winner, by a hair): over 2000 random
    image orders the default race stops it in at most 5% of them, and a clear loser of the same spread in most.
    skewed and sparse: a long right tail (the gain sits in a few images), where the t bound is optimistic:
    measured 1.0% (normal), 4.8% (skewed), 4.3% (sparse) at the default alpha 0.025, 3.6%, 8.8%, 4.9% at 0.05."""
    rng = np.random.default_rng(7)
    noise = {"normal": lambda: rng.standard_normal(60), "skewed": lambda: rng.gamma(2.0, 1.0, 60),
             "sparse": lambda: rng.gamma(0.5, 1.0, 60)}[shape]()
    d = 0.01 * (noise - noise.mean()) + 0.0005  # full mean +0.0005: it would beat the incumbent
    race = Race()  # the defaults: one look after a quarter of the images, alpha 0.025
    assert d.mean() > 0 and _stop_rate(d, race) <= 0.05
    assert _stop_rate(d - 0.01, race, perms=300) > 0.75  # a clear loser (full mean -0.0095) is stopped


def test_verdict_and_told_loss():
    race = Race(looks=(0.2,), alpha=0.05, margin=0.0)
    assert race.verdict(np.zeros(6), 30) is None  # identical so far: not worse
    assert race.verdict(np.full(30, -1.0), 30) is None  # scored in full: the search compares it exactly
    assert race.verdict(np.array([0.1]), 30) is None  # one image has no spread
    assert race.verdict(-0.1 + 0.01 * np.arange(6), 30, offset=0.0) is not None
    assert race.verdict(-0.1 + 0.01 * np.arange(6), 30, offset=0.2) is None  # a sparsity bonus can make up for it
    assert "below the margin" in Race(looks=(0.2,), margin=0.5).verdict(np.zeros(6), 30)
    assert told_loss(-0.5, -0.9) == -0.5  # the estimate, when it is worse than the incumbent
    assert -0.9 < told_loss(-0.95, -0.9) < -0.9 + 1e-6  # never better than the incumbent: strictly worse


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(f"a photo of thing {i}" for i in range(8)) + "\n")
    return p


def _args(pipe_dir, prompts, out, *extra, reward="python:reward_fns:brightness"):
    return ["search", "--prompts", str(prompts), "--model", str(pipe_dir), "--reward", reward, "--buckets", "2",
            "--steps", "4", "--seeds", "2", "--holdout-seeds", "1", "--space", "binary", "--race-looks", "0.25,0.5",
            "--out", str(out), *extra]


def _journal(out: Path) -> tuple[dict, list[dict]]:
    lines = (out / "journal.jsonl").read_text().splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def test_racing_finds_the_same_best_as_scoring_every_image(pipe_dir, prompts, tmp_path):
    """Brightness is clear: candidates that darken the images lose on every one of them. The raced search stops
    such candidates early, scores fewer images, and ends on the same best as the plain search, whose journal
    holds the same candidates up to where a stopped one changed what the optimizer was told."""
    plain, raced = tmp_path / "plain", tmp_path / "raced"
    for out, flag in ((plain, "--no-race"), (raced, "--race")):
        r = CliRunner().invoke(main, _args(pipe_dir, prompts, out, "--budget", "16", flag))
        assert r.exit_code == 0, r.output
    _, p = _journal(plain)
    header, q = _journal(raced)
    assert header["config"]["race"] is True and "race" in json.loads((plain / "journal.jsonl").read_text().splitlines()[0])["config"]
    stopped = [e for e in q if "partial" in e]
    assert stopped and all(e["partial"]["images"] < e["partial"]["of"] == 16 for e in stopped)
    assert sum(e["images"] for e in q) < sum(e["images"] for e in p) == 16 * 16
    best = lambda entries: max((e for e in entries if "partial" not in e), key=lambda e: e["objective"])
    assert best(q)["values"] == best(p)["values"]
    masks = json.loads((raced / "masks.json").read_text())
    assert masks["provenance"]["best_evaluation"] == best(q)["i"]
    # a stopped candidate is told worse than the incumbent it raced, and never becomes the best
    by_i = {e["i"]: e for e in q}
    assert all(e["objective"] < by_i[e["partial"]["incumbent"]]["objective"] for e in stopped)
    report = (raced / "report.md").read_text()
    assert f"{len(stopped)} of 16 candidates stopped early" in report


def test_a_raced_sweep_with_a_bound_and_a_group(pipe_dir, prompts, tmp_path):
    """Racing composes with the sweep, --require bounds (set terms measured on full scores only) and groups."""
    out = tmp_path / "run"
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, out, "--budget", "14", "--strategy", "sweep", "--workers", "3",
                                       "--require", "diversity>=0.5", "--features", "digits", "--holdout-seeds", "2"))
    assert r.exit_code == 0, r.output
    _, entries = _journal(out)
    stopped = [e for e in entries if "partial" in e]
    assert stopped and all("measures" not in e for e in stopped)
    assert all("measures" in e and "feasible" in e for e in entries if "partial" not in e)
    masks = json.loads((out / "masks.json").read_text())
    assert "partial" not in entries[masks["provenance"]["best_evaluation"]]


def test_racing_is_refused_with_weighted_set_terms_and_bad_settings(pipe_dir, prompts, tmp_path):
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, tmp_path / "a", "--race",
                                       reward="python:reward_fns:brightness=1,diversity=0.1"))
    assert r.exit_code != 0 and "--race: the reward weighs set-level terms (diversity)" in r.output
    for flag, value, message in (("--race-looks", "0.5,0.2", "--race-looks 0.5,0.2: give increasing shares"),
                                 ("--race-alpha", "1.5", "--race-alpha must be between 0 and 1"),
                                 ("--race-margin", "nan", "--race-margin must be 0 or more")):
        r = CliRunner().invoke(main, _args(pipe_dir, prompts, tmp_path / "b", flag, value))
        assert r.exit_code != 0 and message in r.output.strip().splitlines()[-1]
        assert not (tmp_path / "b").exists()


def test_resume_after_sigkill_inside_a_raced_evaluation(pipe_dir, prompts, tmp_path):
    """SIGKILL while scoring a chunk of a raced evaluation (the reward kills its own process on its 9th call: the
    baseline took 3, one per chunk, so inside a later candidate's race): resumed, the journal is the uninterrupted one's,
    stopped candidates included, and the report and mask file are written."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    flags = lambda folder: _args(pipe_dir, prompts, folder, "--budget", "12", reward="python:reward_fns:dies")
    env = {**os.environ, "PYTHONPATH": str(TESTS), "MASKOPT_TEST_DIE_AT": "9", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "maskopt.cli", *flags(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    before = (out / "journal.jsonl").read_text().splitlines()
    assert 2 <= len(before) < 13
    r = CliRunner().invoke(main, flags(out) + ["--resume"])
    assert r.exit_code == 0, r.output
    after = (out / "journal.jsonl").read_text().splitlines()
    assert after[: len(before)] == before
    assert CliRunner().invoke(main, flags(whole)).exit_code == 0
    strip = lambda e: {k: v for k, v in e.items() if k not in ("seconds", "cache_hits", "unet_calls")}
    _, resumed = _journal(out)
    _, first = _journal(whole)
    assert [strip(e) for e in resumed] == [strip(e) for e in first]
    assert any("partial" in e for e in resumed)  # the race stopped some: their entries were replayed too
    assert (out / "masks.json").exists() and "stopped early" in (out / "report.md").read_text()


def test_a_journal_from_before_racing_resumes_without_it(pipe_dir, prompts, tmp_path, caplog):
    """A journal whose header has no race setting was scored on every image: --resume goes on that way, also with
    racing on (the default); a raced journal resumed with --no-race is another search, and refused."""
    import logging

    out = tmp_path / "run"
    assert CliRunner().invoke(main, _args(pipe_dir, prompts, out, "--budget", "4", "--no-race")).exit_code == 0
    lines = (out / "journal.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    for k in ("race", "race_looks", "race_alpha", "race_margin"):
        del header["config"][k]
    (out / "journal.jsonl").write_text("\n".join([json.dumps(header), *lines[1:4]]) + "\n")
    for name in ("masks.json", "report.md"):
        (out / name).unlink()
    with caplog.at_level(logging.INFO, logger="maskopt.search"):
        r = CliRunner().invoke(main, _args(pipe_dir, prompts, out, "--budget", "6", "--resume"))
    assert r.exit_code == 0, r.output
    assert "is from before racing and scored every image" in caplog.text
    _, entries = _journal(out)
    assert len(entries) == 6 and not any("partial" in e for e in entries) and all(e["images"] == 16 for e in entries[3:])
    raced = tmp_path / "raced"
    assert CliRunner().invoke(main, _args(pipe_dir, prompts, raced, "--budget", "4")).exit_code == 0
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, raced, "--budget", "6", "--no-race", "--resume"))
    assert r.exit_code != 0 and "race: True there, False now" in r.output


def test_the_embedded_default_turns_racing_off_for_weighted_set_terms(tmp_path):
    """The recipe leaves racing at its default (on), so a weighted set-level term turns it off there too;
    asking for it explicitly with one is refused."""
    from maskopt.config import resolve
    from maskopt.errors import MaskoptError

    assert resolve(out=str(tmp_path / "a")).race is True
    assert resolve(reward="digits=1,diversity=0.2", out=str(tmp_path / "b")).race is False
    assert resolve(reward="digits", requires=["frechet<=1"], out=str(tmp_path / "c")).race is True  # bounds race
    with pytest.raises(MaskoptError, match="--race: the reward weighs set-level terms"):
        resolve(reward="digits=1,diversity=0.2", race=True, out=str(tmp_path / "d"))
