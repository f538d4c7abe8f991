import json

import copy

import numpy as np
import pytest
import torch

from maskopt import Buckets, MaskoptError, MaskSet, find_units
from tiny import TINY_XL, tiny_unet


@pytest.fixture
def masks(unet):
    units = find_units(unet, ["paper", "resnets"]) + find_units(unet, "down_blocks.0.resnets.0.conv1", groups=2)
    values = np.random.default_rng(0).uniform(0, 2, (3, len(units)))
    values[0, :3] = [0, 1, 0.1 + 0.2]  # integers stay integers, other floats keep every digit
    return MaskSet.ones(unet, units, Buckets.from_edges([100, 600])).with_values(values, reward="digits", budget=5)


def test_round_trip(tmp_path, unet, masks):
    path = masks.save(tmp_path / "masks.json")
    back = MaskSet.load(path, unet=unet)
    assert back.units == masks.units and back.buckets == masks.buckets
    assert np.array_equal(back.values, masks.values)  # exact, not approximately
    assert back.fingerprint == masks.fingerprint and back.source == masks.source
    d = json.loads(path.read_text())
    assert d["format"] == "maskopt.masks/2" and d["buckets"] == [[0, 99], [100, 599], [600, 999]]
    assert d["values"][0][:2] == [0, 1]
    assert {"reward", "budget", "maskopt", "created"} <= d["provenance"].keys()
    assert d["units"][-1] == {"name": "down_blocks.0.resnets.0.conv1", "kind": "group", "group": 1, "groups": 2}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def _write(tmp_path, masks, **change):
    d = masks.to_dict()
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v(d) if callable(v) else v
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("change, message", [
    (dict(format="maskopt.masks/9"), "format is 'maskopt.masks/9', expected 'maskopt.masks/2' \\(or 'maskopt.masks/1'\\)"),
    (dict(values=None), "missing 'values'"),
    (dict(values=lambda d: d["values"][:2]), "values has 2 rows but there are 3 buckets"),
    (dict(values=lambda d: [d["values"][0], d["values"][1][:-1], d["values"][2]]), "values row 1 has .* numbers but there are"),
    (dict(values=lambda d: [[5.0] + r[1:] for r in d["values"]]), "value 5.0 for unit .* in bucket 0 is outside"),
    (dict(buckets=[[0, 99], [101, 599], [600, 999]]), "bucket 1 starts at 101, expected 100"),
    (dict(units=lambda d: d["units"][:-1] + [{"name": "up_blocks.7.nope", "kind": "weight"}]), "unit 'up_blocks.7.nope' does not exist"),
    (dict(units=lambda d: d["units"][:-1] + [{"name": "x", "kind": "mystery"}]), "kind 'mystery' is not one of"),
    (dict(fingerprint="0" * 64), "masks were made for U-Net .* not for this one"),
    (dict(sampler={"steps": 0}), ": sampler steps must be a positive integer, got 0"),
    (dict(sampler={"steps": True}), ": sampler steps must be a positive integer, got True"),
    (dict(sampler={"size": [32, 32, 32]}), ": sampler size must be \\[height, width\\], positive multiples of 8"),
    (dict(sampler={"size": [7, 7]}), ": sampler size must be"),
    (dict(sampler={"scheduler": 5}), ": sampler scheduler must be a name, got 5"),
    (dict(sampler={"guidance": "high"}), ": sampler guidance must be a number"),
    (dict(sampler={"dtype": "float8"}), ": sampler dtype 'float8' is not one of"),
    (dict(sampler={"stepz": 15}), ": sampler has an unknown key 'stepz'"),
    (dict(sampler=[15]), ": sampler must be an object of scheduler, steps, guidance"),
    (dict(sampler=[]), ": sampler must be an object of"),
])
def test_invalid_files_rejected(tmp_path, unet, masks, change, message):
    path = _write(tmp_path, masks, **change)
    with pytest.raises(MaskoptError, match=message) as e:
        MaskSet.load(path, unet=unet)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unreadable_files(tmp_path, unet):
    with pytest.raises(MaskoptError, match="does not exist"):
        MaskSet.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(MaskoptError, match="is not valid JSON"):
        MaskSet.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(MaskoptError, match="not a maskopt mask file"):
        MaskSet.load(tmp_path / "y.json")


def test_file_for_another_unet(tmp_path, masks):
    path = masks.save(tmp_path / "m.json")
    with pytest.raises(MaskoptError, match="fingerprint"):
        MaskSet.load(path, unet=tiny_unet(TINY_XL))


def test_other_weights_of_the_same_architecture_are_warned_not_refused(tmp_path, unet, masks, caplog):
    """A fine-tune keeps the fingerprint (names and shapes); the weight sample tells it apart. fp16 rounding does not."""
    path = masks.save(tmp_path / "m.json")
    assert len(json.loads(path.read_text())["weights_sample"]) == 64
    half = copy.deepcopy(unet).to(torch.bfloat16)
    for same in (unet, half):
        MaskSet.load(path, unet=same)
    assert "other weights" not in caplog.text
    tuned = copy.deepcopy(unet)
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.05)
    MaskSet.load(path, unet=tuned)  # applies (same architecture), with a warning
    assert "masks were searched on other weights of this architecture" in caplog.text
    old = json.loads(path.read_text())
    del old["weights_sample"]  # a file written before the sample existed: nothing to compare
    (tmp_path / "old.json").write_text(json.dumps(old))
    caplog.clear()
    assert MaskSet.load(tmp_path / "old.json", unet=tuned).weights == () and "other weights" not in caplog.text
