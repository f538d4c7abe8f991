"""--init and the backbone columns of the search space: a search that starts where FreeU ends."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from maskopt import MaskSet
from maskopt.cli import main
from maskopt.errors import MaskoptError
from maskopt.freeu import GRID
from maskopt.space import BACKBONE_GRID, BACKBONE_RANGE, check_point, decode, encode, space

BACKBONE_ONLY = [[g.b1, g.b2] for g in GRID if (g.s1, g.s2) == (1, 1)]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red cat\na blue dog\n")
    return p


def search(pipe_dir, prompts, out, *extra):
    return CliRunner().invoke(main, [
        "search", "--prompts", str(prompts), "--model", str(pipe_dir), "--reward", "python:reward_fns:brightness",
        "--buckets", "2", "--steps", "4", "--seeds", "1", "--holdout-seeds", "2", "--out", str(out), *extra])


def entries_of(out):
    return [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()[1:]]


@pytest.mark.parametrize("kind", ["binary", "groups", "gates"])
def test_backbone_columns_take_freeus_values(kind):
    param = space(kind, 2, 3, gate_range=(0, 1.5), backbone=[1])
    values = np.array([[0.0, 1.3, 1.0], [1.0, 1.6, 0.0]])
    child = param.spawn_child(new_value=encode(values, kind, backbone=[1]))
    assert decode(child.value, 2, 3, backbone=[1]).tolist() == values.tolist()
    if kind != "gates":
        assert {1.3, 1.6} <= set(BACKBONE_GRID)  # FreeU's settings are points of the space
        with pytest.raises(MaskoptError, match="backbone value 1.35 is not one of"):
            encode([[0, 1.35, 1], [1, 1, 1]], kind, backbone=[1])
        with pytest.raises(MaskoptError, match="value 0.5 is not 0 or 1"):
            encode([[0.5, 1.3, 1], [1, 1, 1]], kind, backbone=[1])
    else:
        lo, hi = BACKBONE_RANGE
        check_point(values, kind, (0, 1.5), [1], "here")
        with pytest.raises(MaskoptError, match=f"here: value 1.9 .* outside the gates space's {lo:g}..{hi:g}"):
            check_point([[1, 1.9, 1], [1, 1, 1]], kind, (0, 1.5), [1], "here")


def test_init_freeu_evaluates_freeus_settings_first_and_the_search_goes_on_from_the_best(pipe_dir, prompts, tmp_path):
    out = tmp_path / "run"
    r = search(pipe_dir, prompts, out, "--targets", "freeu", "--targets", "up_blocks.*.attn2.to_out.0",
               "--init", "freeu", "--budget", "8", "--space", "gates")
    assert r.exit_code == 0, r.output
    entries = entries_of(out)
    assert len(entries) == 8
    header = json.loads((out / "journal.jsonl").read_text().splitlines()[0])
    assert header["config"]["init"] == ["freeu"] and [u["kind"] for u in header["units"][:2]] == ["backbone"] * 2
    # after the baseline, FreeU's backbone-only settings (b1 on up_blocks.0, b2 on up_blocks.1), every other unit at 1
    for e, (b1, b2) in zip(entries[1:4], BACKBONE_ONLY):
        assert all(row[:2] == [b1, b2] and set(row[2:]) == {1.0} for row in e["values"])
    masks = MaskSet.load(out / "masks.json")
    best = max(entries, key=lambda e: e["objective"])
    assert masks.values.tolist() == best["values"]
    assert best["reward"] >= max(e["reward"] for e in entries[1:4])  # never worse than FreeU's best on search data


def test_init_from_an_earlier_mask_file(pipe_dir, prompts, tmp_path):
    first = tmp_path / "first"
    assert search(pipe_dir, prompts, first, "--targets", "up_blocks.*.attn2.to_out.0", "--budget", "5",
                  "--space", "gates").exit_code == 0
    earlier = MaskSet.load(first / "masks.json")
    out = tmp_path / "second"  # more units than the earlier file: those start at 1
    r = search(pipe_dir, prompts, out, "--targets", "freeu", "--targets", "up_blocks.*.attn2.to_out.0", "--budget", "4",
               "--space", "gates", "--init", str(first / "masks.json"), "--init", "1.2,1.4")
    assert r.exit_code == 0, r.output
    entries = entries_of(out)
    assert np.array_equal(np.asarray(entries[1]["values"])[:, 2:], earlier.values)
    assert np.asarray(entries[1]["values"])[:, :2].tolist() == [[1.0, 1.0]] * 2
    assert np.asarray(entries[2]["values"])[:, :2].tolist() == [[1.2, 1.4]] * 2


@pytest.mark.parametrize("extra,message", [
    (["--init", "freeu"], "--init freeu: the searched units hold none of FreeU's backbone units"),
    (["--targets", "freeu", "--init", "1.5,1.6,0.9,0.2"], "s1 and s2 filter the skip features"),
    (["--targets", "freeu", "--init", "nowhere.json"], "--init nowhere.json: not 'freeu', a FreeU setting B1,B2, nor a mask"),
    (["--targets", "freeu", "--init", "1.3,x"], "FreeU setting '1.3,x,1,1': expected four positive numbers"),
    (["--targets", "freeu", "--init", "1.35,1.6", "--space", "groups"], "--init 1.35,1.6: backbone value 1.35 is not one of"),
])
def test_bad_init_is_one_line_and_writes_nothing(pipe_dir, prompts, tmp_path, extra, message):
    out = tmp_path / "run"
    r = search(pipe_dir, prompts, out, "--budget", "4", "--targets", "up_blocks.*.attn2.to_out.0", *extra)
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


@pytest.mark.parametrize("strategy,kept", [("joint", 3), ("joint", 6), ("sweep", 6)])
def test_a_resumed_search_with_starting_points_is_the_uninterrupted_one(pipe_dir, prompts, tmp_path, strategy, kept):
    """Cut inside the starting points (3 entries: baseline + 2 of FreeU's 3) or after them, the resumed search asks
    and journals what the uninterrupted one did: backbone values on the grid, masks 0/1."""
    opts = ("--targets", "freeu", "--targets", "up_blocks.*.attn2.to_out.0", "--init", "freeu", "--space", "groups",
            "--strategy", strategy, "--budget", "9")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert search(pipe_dir, prompts, whole, *opts).exit_code == 0
    lines = (whole / "journal.jsonl").read_text().splitlines()
    cut.mkdir()
    (cut / "journal.jsonl").write_text("\n".join(lines[:1 + kept]) + "\n")
    r = search(pipe_dir, prompts, cut, *opts, "--resume")
    assert r.exit_code == 0, r.output
    strip = lambda e: {k: v for k, v in e.items() if k not in ("seconds", "cache_hits", "unet_calls")}
    assert [strip(e) for e in entries_of(cut)] == [strip(e) for e in entries_of(whole)]
    values = np.asarray([e["values"] for e in entries_of(whole)])
    assert set(np.unique(values[:, :, :2])) <= set(BACKBONE_GRID) and set(np.unique(values[:, :, 2:])) <= {0.0, 1.0}
    assert len({str(v) for v in values.tolist()}) == 9 and (values[4:, :, :2] != 1).any()  # the b factors are searched


def test_a_space_of_freeus_factors_alone():
    param = space("groups", 2, 2, backbone=[0, 1])
    values = [[1.3, 1.6], [1.1, 1.2]]
    assert decode(param.spawn_child(new_value=encode(values, "groups", [0, 1])).value, 2, 2, [0, 1]).tolist() == values
    assert decode(param.value, 2, 2, [0, 1]).tolist() == [[1.0, 1.0], [1.0, 1.0]]  # starts at the baseline


@pytest.mark.parametrize("strategy", ["joint", "sweep"])
def test_the_optimizer_goes_on_from_the_best_starting_point(strategy):
    """Told after the baseline, the better starting point is what the first proposals mutate (the sweep restarts
    its first stage from it and plans its stages on the budget the starting points leave)."""
    from maskopt.asktell import AskTell
    from maskopt.config import SearchConfig
    from maskopt.search import make_optimizer

    shape, backbone = (2, 3), [0]
    start = np.array([[1.3, 1.0, 0.0], [1.6, 0.0, 1.0]])
    cfg = SearchConfig(space="groups", strategy=strategy, budget=12, optimizer="DiscreteOnePlusOne")
    driver = AskTell(lambda: make_optimizer(cfg, shape, [0.5, 1.0], backbone, 1), "groups", shape, 12, 1, backbone, [start])
    seen = []

    def evaluate(group):
        seen.extend(group)
        return [float(np.abs(v - start).sum()) for v in group]  # the nearer the start, the better

    driver.run(evaluate)
    driver.close()
    assert np.array_equal(seen[1], start) and len(seen) == 12
    # the first proposals are mutations of the starting point (one step from it), not of the baseline (the sweep's
    # first stage row from the baseline would be 1.6 away)
    assert max(np.abs(v - start).sum() for v in seen[2:5]) <= 1.0 + 1e-9
