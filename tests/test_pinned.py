"""Searches pinned from before the redesign of issue 23: the same settings write the same journal and masks.

The journals and mask values in tests/data/pinned/ were written by `maskopt search` before the search command
was restructured (commit fb83608). A redesign that keeps behaviour writes them again, evaluation for
evaluation: the same candidates in the same order, the same rewards, the same racing stops, the same
set-level measures. Only the wall-clock seconds differ. A journal from before resumes to the same end.
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maskopt.cli import main

PINNED = Path(__file__).parent / "data" / "pinned"
PROMPTS = str(PINNED / "prompts.txt")
CASES = {  # on the embedded default: its recipe (groups space, racing, workers 4) under these flags
    "raced": ["--budget", "12", "--seeds", "4", "--holdout-seeds", "2", "--workers", "2", "--targets", "paper",
              "--targets", "freeu", "--init", "freeu"],
    "sweep": ["--budget", "6", "--seeds", "2", "--holdout-seeds", "2", "--space", "gates", "--strategy", "sweep",
              "--reward", "digits=1,diversity=0.1", "--require", "frechet<=1.2"],
}


@pytest.fixture(autouse=True)
def two_threads():
    """As the pinned searches ran, from the command line on a 2-core machine: the same sums in the same order
    (tests/conftest.py sets 1 thread for the tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def entries(path: Path) -> list[dict]:
    """A journal's evaluations without their timing, the only field that may differ between runs."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "seconds"} for e in lines[1:]]


def search(out: Path, case: str, *extra: str) -> None:
    r = CliRunner().invoke(main, ["search", "--prompts", PROMPTS, *CASES[case], "--out", str(out), *extra])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_search_writes_the_pinned_journal_and_masks(case, tmp_path):
    search(tmp_path / "run", case)
    pinned = entries(PINNED / f"{case}-journal.jsonl")
    assert entries(tmp_path / "run" / "journal.jsonl") == pinned
    if case == "raced":  # the pinned search holds candidates the race stopped, and the set-level one infeasible-free
        assert sum("partial" in e for e in pinned) == 2
    masks = json.loads((tmp_path / "run" / "masks.json").read_text())
    want = json.loads((PINNED / f"{case}-masks.json").read_text())
    assert masks["values"] == want["values"]
    assert masks["provenance"]["search_reward"] == want["search_reward"]
    assert masks["provenance"]["holdout"] == want["holdout"]


def test_a_journal_from_before_resumes_to_the_same_end(tmp_path):
    """The pinned journal, cut inside a raced group, resumes to the pinned journal: the same candidates, the same
    stops. The cut group's rest runs alone and the cache starts empty, so rewards agree to float rounding and
    the replay counts differ."""
    out = tmp_path / "run"
    out.mkdir()
    lines = (PINNED / "raced-journal.jsonl").read_text().splitlines()
    (out / "journal.jsonl").write_text("\n".join(lines[:6]) + "\n")
    search(out, "raced", "--resume")
    resumed, pinned = entries(out / "journal.jsonl"), entries(PINNED / "raced-journal.jsonl")
    assert resumed[:5] == pinned[:5]
    assert [e["values"] for e in resumed] == [e["values"] for e in pinned]
    assert ["partial" in e for e in resumed] == ["partial" in e for e in pinned]
    assert [e["reward"] for e in resumed] == pytest.approx([e["reward"] for e in pinned], abs=1e-6)
