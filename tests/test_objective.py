"""Set-level objective terms: diversity and Frechet as ratios to the baseline, in weighted sums and as bounds."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from maskopt.journal import FAILED_LOSS, Entry
from maskopt.cli import main
from maskopt.errors import MaskoptError
from maskopt.objective import INFEASIBLE_LOSS, Objective, parse_bound
from tiny import tiny_pipeline
from tiny_clip import save_tiny_clip


def test_objective_parse_and_score():
    o = Objective.parse("python:m:f=1,frechet=-0.5", ["diversity>=0.9"])
    assert (o.reward, o.weights, o.measures) == ("python:m:f=1", {"frechet": -0.5}, ("diversity", "frechet"))
    s = o.score(0.5, {"diversity": 3.0, "frechet": 2.0}, {"diversity": 4.0, "frechet": 4.0})
    assert (s.objective, s.feasible, s.violation) == (0.25, False, pytest.approx(0.15))  # 0.5 - 0.5 x 0.5; 0.9 - 0.75
    plain = Objective.parse("digits")
    assert plain.measures == () and plain.score(0.7, {}, {}).objective == 0.7
    for spec, requires, message in [
        ("diversity=1", (), "holds only set-level terms"),
        ("digits=1,diversity=x", (), "bad weight 'x'"),
        ("digits", ("diversity>0.9",), "write TERM>=RATIO or TERM<=RATIO"),
        ("digits", ("sharpness>=0.9",), "TERM one of diversity, frechet"),
        ("digits", ("diversity>=1.05",), "the unmasked baseline (ratio 1) breaks it"),
        ("digits", ("frechet<=0.9",), "the unmasked baseline (ratio 1) breaks it"),
    ]:
        with pytest.raises(MaskoptError, match=message.replace("(", "\\(").replace(")", "\\)")):
            Objective.parse(spec, requires)
    assert str(parse_bound(" frechet <= 1 ")) == "frechet<=1"


def test_an_infeasible_candidate_is_told_worse_than_any_feasible_one():
    entry = lambda **kw: Entry.from_json({"failed": False, **kw})
    feasible = entry(objective=-50.0)
    infeasible = entry(objective=10.0, feasible=False, violation=0.2)
    worse = entry(objective=10.0, feasible=False, violation=0.3)
    assert feasible.loss < infeasible.loss == INFEASIBLE_LOSS + 0.2 < worse.loss < FAILED_LOSS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    pipe = tiny_pipeline(root / "sd")
    (root / "p.txt").write_text("a red cat\na blue dog\na red dog\n")
    save_tiny_clip(root / "clip")
    (root / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    return root, pipe


def search(root, pipe, out, *extra):
    return CliRunner().invoke(main, ["search", "--prompts", str(root / "p.txt"), "--model", str(pipe), "--buckets", "2",
                                     "--steps", "4", "--guidance", "3", "--seeds", "2", "--holdout-seeds", "2",
                                     "--space", "binary", "--features", str(root / "clip"),
                                     "--out", str(out), *extra])


def test_a_search_with_set_terms_journals_them_and_never_chooses_an_infeasible_candidate(setup, tmp_path):
    root, pipe = setup
    out = tmp_path / "run"
    r = search(root, pipe, out, "--budget", "12", "--reward", "python:reward_fns:brightness=1,diversity=0.05",
               "--require", "diversity>=0.995", "--require", "frechet<=1.001", "--reference", str(root / "ref"))
    assert r.exit_code == 0, r.output
    header, *entries = (json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines())
    assert header["config"]["requires"] == ["diversity>=0.995", "frechet<=1.001"]
    assert entries[0]["ratios"] == {"diversity": 1.0, "frechet": 1.0} and entries[0]["feasible"]
    for e in entries:  # the objective is the reward plus the weighted ratio; feasibility follows the bounds
        assert e["objective"] == pytest.approx(e["reward"] + 0.05 * e["ratios"]["diversity"])
        broken = (max(0, 0.995 - e["ratios"]["diversity"]) + max(0, e["ratios"]["frechet"] - 1.001))
        assert e["feasible"] == (broken == 0) and e["violation"] == pytest.approx(broken)
    infeasible = [e for e in entries if not e["feasible"]]
    assert infeasible, "no candidate broke a bound: the test needs a tighter one"
    prov = json.loads((out / "masks.json").read_text())["provenance"]
    best = entries[prov["best_evaluation"]]
    assert best["feasible"] and best["objective"] == max(e["objective"] for e in entries if e["feasible"])
    assert prov["infeasible"] == len(infeasible) and set(prov["holdout_measures"]) == {"diversity", "frechet"}
    assert "candidates broke them (never chosen)" in (out / "report.md").read_text()
    # resumed with the same bounds it goes on; with other bounds it is another search
    r = search(root, pipe, out, "--budget", "13", "--reward", "python:reward_fns:brightness=1,diversity=0.05",
               "--require", "diversity>=0.995", "--require", "frechet<=1.001", "--reference", str(root / "ref"), "--resume")
    assert r.exit_code == 0, r.output
    r = search(root, pipe, out, "--budget", "14", "--reward", "python:reward_fns:brightness=1,diversity=0.05",
               "--require", "diversity>=0.9", "--reference", str(root / "ref"), "--resume")
    assert r.exit_code == 1 and "different configuration (requires:" in r.output


@pytest.mark.parametrize("extra, message", [
    (["--require", "frechet<=1"], "the frechet term needs --reference DIR"),
    (["--require", "diversity>=0.9", "--seeds", "1"], "the diversity term compares the seeds of a prompt"),
    (["--require", "diversity=0.9"], "write TERM>=RATIO or TERM<=RATIO"),
    (["--require", "frechet<=1", "--reference", "missing-folder"], "reference folder missing-folder does not exist"),
    (["--reward", "diversity"], "holds only set-level terms"),
])
def test_bad_set_terms_are_one_line_before_the_model_loads(setup, tmp_path, monkeypatch, extra, message):
    root, pipe = setup
    monkeypatch.chdir(tmp_path)
    r = search(root, pipe, tmp_path / "bad", "--budget", "2", "--reward", "python:reward_fns:brightness", *extra)
    assert r.exit_code == 1 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
