"""Searches on Ray (cluster.py): a local instance, a two-node test cluster on this machine, a killed evaluator,
resume across Ray and local, and --ray without Ray. Ray's start-up is slow: one instance serves the module."""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from maskopt.cli import main

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red cat\na blue dog\na green bird\n")
    return p


def _args(pipe_dir, prompts, out, *extra, reward="python:reward_fns:brightness"):
    return ["search", "--prompts", str(prompts), "--model", str(pipe_dir), "--reward", reward, "--buckets", "2",
            "--steps", "4", "--seeds", "2", "--holdout-seeds", "1", "--space", "gates", "--optimizer", "OnePlusOne",
            "--workers", "2", "--out", str(out), *extra]


def _journal(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()[1:]]


def _same(a: list[dict], b: list[dict]) -> None:
    """Two journals of one search: the same candidates, rewards equal to float rounding (an actor batches its share)."""
    assert [e["values"] for e in a] == [e["values"] for e in b]
    assert [e["reward"] for e in a] == [pytest.approx(e["reward"], abs=1e-5) for e in b]
    assert ["partial" in e for e in a] == ["partial" in e for e in b]


def test_ray_without_ray_installed_is_one_line(pipe_dir, prompts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, tmp_path / "run", "--ray"))
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1] == 'Error: --ray needs Ray: pip install -e ".[ray]" (or pip install "ray[default]")'
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, tmp_path / "run", "--evaluators", "2"))
    assert r.exit_code != 0 and "--evaluators and --ray-gpus-per-evaluator need --ray" in r.output


def test_maskopt_never_imports_ray_unless_asked():
    import subprocess

    code = "import sys, maskopt, maskopt.cli, maskopt.search, maskopt.cluster; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_candidates_go_to_the_evaluator_whose_cache_replays_most():
    """route(): the longest shared prefix of visited buckets (the last row first), each evaluator its share."""
    from maskopt.cluster import prefix, route

    a = np.ones((3, 4))
    b = a.copy()
    b[0, 1] = 0  # differs in the last-visited bucket: shares 2 buckets with a
    c = a.copy()
    c[2, 0] = 0  # differs in the first-visited bucket: shares none
    assert prefix(a, b) == 2 and prefix(a, c) == 0 and prefix(a, a) == 3
    assert route([b, c], [[c], [a]]) == [1, 0]  # b to the one that scored a, c to the one that scored c
    assert route([b, b], [[a], [c]]) == [0, 1]  # both would go to 0: each evaluator takes its share


if os.environ.get("MASKOPT_REQUIRE_RAY") == "1":  # .ci/run installs the extra: a missing Ray fails there
    import ray
else:
    ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')


def _alarm(seconds: int):
    """Ray can hang for minutes instead of failing (a driver connecting to a local cluster on a non-loopback address): a test that takes too long fails."""
    def fail(*_):
        raise TimeoutError(f"Ray did not answer within {seconds} s")

    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the module; its workers find tests/ and know the driver's pid."""
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "MASKOPT_TEST_DRIVER_PID": str(os.getpid()), "MASKOPT_TEST_DIE_MARKER": str(tmp_path_factory.mktemp("die") / "once"),
           "MASKOPT_TEST_DIE_AT": "4", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _alarm(120)
    ray.init(num_cpus=2, include_dashboard=False)
    signal.alarm(0)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_ray_search_journals_what_a_local_search_journals_and_resumes_across_both(local_ray, pipe_dir, prompts,
                                                                                   tmp_path):
    """2 evaluators on a local Ray instance, through the CLI: the journal is the local search's (same candidates,
    rewards to float rounding); a Ray journal cut short resumes locally, a local one on Ray, to the same journal."""
    _alarm(600)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert CliRunner().invoke(main, _args(pipe_dir, prompts, local, "--budget", "10")).exit_code == 0
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, on_ray, "--budget", "10", "--ray", "--evaluators", "2"))
    assert r.exit_code == 0, r.output
    _same(_journal(on_ray), _journal(local))
    assert "evaluators=2" in r.stderr  # the progress bar counts the evaluators alive
    report = (on_ray / "report.md").read_text()
    assert "on 2 Ray evaluators (2 started, 0 died" in report and "per minute" in report
    for source, flags in ((on_ray, []), (local, ["--ray", "--evaluators", "2"])):  # cut after 5, resumed the other way
        cut = tmp_path / f"cut-{source.name}"
        cut.mkdir()
        lines = (source / "journal.jsonl").read_text().splitlines()
        (cut / "journal.jsonl").write_text("\n".join(lines[:6]) + "\n")
        r = CliRunner().invoke(main, _args(pipe_dir, prompts, cut, "--budget", "10", "--resume", *flags))
        assert r.exit_code == 0, r.output
        _same(_journal(cut), _journal(local))
    signal.alarm(0)


def test_an_evaluator_killed_mid_search_loses_nothing(local_ray, pipe_dir, prompts, tmp_path):
    """One evaluator SIGKILLs itself inside its 4th reward call (reward_fns.dies_once): its candidates are scored
    again on the other, Ray restarts it, and the search completes with every evaluation journaled once."""
    _alarm(600)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, out, "--budget", "12", "--ray", "--evaluators", "2",
                                       reward="python:reward_fns:dies_once"))
    assert r.exit_code == 0, r.output
    assert Path(os.environ["MASKOPT_TEST_DIE_MARKER"]).exists()  # an evaluator did die
    entries = _journal(out)
    assert [e["i"] for e in entries] == list(range(12)) and len({str(e["values"]) for e in entries}) == 12
    report = (out / "report.md").read_text()
    assert "1 died" in report
    local = tmp_path / "local"
    assert CliRunner().invoke(main, _args(pipe_dir, prompts, local, "--budget", "12")).exit_code == 0
    _same(entries, _journal(local))  # the death changed nothing the search computed
    signal.alarm(0)


def test_a_reward_raising_in_an_evaluator_is_the_local_one_line_error(local_ray, pipe_dir, prompts, tmp_path):
    _alarm(300)
    r = CliRunner().invoke(main, _args(pipe_dir, prompts, tmp_path / "run", "--budget", "4", "--ray",
                                       reward="python:reward_fns:raises"))
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1].startswith("Error: the reward python:reward_fns:raises raised RuntimeError: boom")
    signal.alarm(0)


def test_two_node_cluster_one_evaluator_per_node(pipe_dir, prompts, tmp_path, local_ray):
    """Ray's own test cluster on this machine: a head and a second node of 1 CPU each, one evaluator on each,
    their scores those of a local Evaluator."""
    from ray.cluster_utils import Cluster

    from maskopt.cluster import RayEvaluators
    from maskopt.config import resolve
    from maskopt.evaluators import search_evaluator

    _alarm(300)
    ray.shutdown()  # the module's instance makes way for the cluster, and comes back after
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = resolve(None, model=str(pipe_dir), prompts=str(prompts), reward="python:reward_fns:brightness", buckets=2,
                      steps=4, seeds=2, space="gates", out=str(tmp_path / "x"))
        plist = [line for line in prompts.read_text().splitlines() if line]
        pool = RayEvaluators(cluster.address, cfg.to_dict(), plist, "cpu")
        try:
            assert pool.alive == 2  # one per CPU of the cluster: one per node
            nodes = {ray.get(a.node.remote()) for a in pool.actors}
            assert len(nodes) == 2
            local = search_evaluator(cfg, plist)
            shape = local.template.values.shape
            group = [np.ones(shape), np.clip(1 + 0.2 * np.random.default_rng(0).standard_normal(shape), 0.75, 1.25)]
            got = pool.score(group)
            want = local.score(group)
            assert [g.rewards for g in got] == [pytest.approx(w.rewards, abs=1e-5) for w in want]
        finally:
            pool.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.init(num_cpus=2, include_dashboard=False)
        signal.alarm(0)
