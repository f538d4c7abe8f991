"""`maskopt eval`: conditions judged on the same images, FreeU picked on the search data, sets measured, bad input named."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from maskopt.cli import main
from maskopt.scoring import Evaluator
from maskopt.freeu import FreeU, enabled
from maskopt.maskset import MaskSet
from maskopt.models import load_pipeline
from maskopt.prompts import read_prompts
from maskopt.rewards import load_reward
from maskopt.stats import paired
from tiny import tiny_pipeline
from tiny_clip import save_tiny_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-evaluation search on a tiny SD pipeline (4 DDIM steps, guidance 3), a tiny CLIP, a reference folder."""
    root = tmp_path_factory.mktemp("eval")
    pipe = tiny_pipeline(root / "sd")
    (root / "p.txt").write_text("a red cat\na blue dog\na red dog\n")
    r = CliRunner().invoke(main, ["search", "--prompts", str(root / "p.txt"), "--model", str(pipe), "--reward",
                                  "python:reward_fns:brightness", "--buckets", "2", "--steps", "4", "--guidance", "3",
                                  "--seeds", "1", "--holdout-seeds", "1", "--budget", "4", "--space", "binary",
                                  "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    save_tiny_clip(root / "clip")
    (root / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    return root


def test_eval_through_the_cli_with_clip_features_and_a_reference(tiny, tmp_path):
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["eval", "--masks", str(tiny / "run" / "masks.json"), "--seeds", "3",
                                  "--reward", "python:reward_fns:brightness", "--reward", "python:reward_fns:redness",
                                  "--features", str(tiny / "clip"), "--reference", str(tiny / "ref"),
                                  "--freeu", "1.3,1.6,1,1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1].startswith("3 conditions x 9 images; run - FreeU on python:reward_fns:brightness")
    data = json.loads((out / "eval.json").read_text())
    base, freeu, masked = data["conditions"]
    assert [c["kind"] for c in data["conditions"]] == ["baseline", "freeu", "masks"]
    assert data["settings"]["features"] == str(tiny / "clip") and data["settings"]["sampler"]["steps"] == 4
    # the numbers are the pipeline's: an Evaluator of our own gives the same per-image scores, FreeU on or off
    pipe = load_pipeline(str(tiny / "sd"))
    masks = MaskSet.load(tiny / "run" / "masks.json")
    reward = load_reward("python:reward_fns:brightness")
    ev = Evaluator(pipe, reward, masks, read_prompts(tiny / "p.txt"), range(1000, 1003), 4, 3.0, (16, 16))
    assert ev(np.ones_like(masks.values)).rewards == base["judges"]["python:reward_fns:brightness"]["scores"]
    with enabled(pipe.unet, FreeU(1.3, 1.6, 1, 1)):
        assert ev(np.ones_like(masks.values)).rewards == freeu["judges"]["python:reward_fns:brightness"]["scores"]
    assert ev(masks.values).rewards == masked["judges"]["python:reward_fns:brightness"]["scores"]
    # paired differences as stats.paired computes them, against the baseline and against FreeU
    for judge in ("python:reward_fns:brightness", "python:reward_fns:redness"):
        scores = {c["kind"]: c["judges"][judge]["scores"] for c in data["conditions"]}
        assert masked["judges"][judge]["vs_baseline"] == paired(scores["baseline"], scores["masks"]).to_dict()
        assert masked["judges"][judge]["vs_freeu"] == paired(scores["freeu"], scores["masks"]).to_dict()
    assert base["diversity"]["ratio"] == 1.0 and len(base["diversity"]["per_prompt"]) == 3
    per_prompt = {c["kind"]: c["diversity"]["per_prompt"] for c in data["conditions"]}
    for key, other in (("vs_baseline", "baseline"), ("vs_freeu", "freeu")):  # per prompt, against both
        want = paired(per_prompt[other], per_prompt["masks"]).to_dict()
        assert {k: v for k, v in masked["diversity"][key].items() if k != "in_baseline_units"} == want
    assert masked["diversity"]["vs_baseline"]["in_baseline_units"][0] == pytest.approx(masked["diversity"]["ratio"] - 1, abs=1e-6)  # float32 means
    assert all(c["frechet"]["value"] > 0 for c in data["conditions"])
    for key in ("vs_baseline", "vs_freeu"):  # a permutation test's p-value, not a bootstrap interval
        fd = masked["frechet"][key]
        assert 0 < fd["p"] <= 1 and set(fd) == {"diff", "p"}
    assert masked["frechet"]["vs_baseline"]["diff"] == pytest.approx(masked["frechet"]["value"] - base["frechet"]["value"])
    report = (out / "report.md").read_text()
    assert "| run |" in report and "picked" not in report and "(--freeu 1.3,1.6,1,1)" in report
    assert "## Each mask file against FreeU" in report and "permutation test" in report
    assert Image.open(out / "grid.png").size[1] >= 3 * 16  # a row per condition


def test_eval_picks_freeu_on_the_search_data_not_on_the_images_it_judges(tiny, tmp_path):
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["eval", "--masks", str(tiny / "run" / "masks.json"), "--seeds", "2",
                                  "--features", str(tiny / "clip"), "--freeu", "none", "--out", str(tmp_path / "none")])
    assert r.exit_code == 0, r.output
    none = json.loads((tmp_path / "none" / "eval.json").read_text())
    assert [c["kind"] for c in none["conditions"]] == ["baseline", "masks"] and none["freeu"] is None
    assert "frechet" not in none["conditions"][0]  # no reference given for a model other than the embedded default
    r = CliRunner().invoke(main, ["eval", "--masks", str(tiny / "run" / "masks.json"), "--seeds", "2",
                                  "--features", str(tiny / "clip"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    picked = json.loads((out / "eval.json").read_text())["freeu"]
    means = picked["search_means"]
    assert len(means) == 6 and str(FreeU(**picked["setting"])) == max(means, key=means.get)
    # the search's own prompts x seeds 0..S-1 under the searched reward: evaluated again, the same mean
    pipe = load_pipeline(str(tiny / "sd"))
    masks = MaskSet.load(tiny / "run" / "masks.json")
    ev = Evaluator(pipe, load_reward("python:reward_fns:brightness"), masks, read_prompts(tiny / "p.txt"), range(1), 4,
                   3.0, (16, 16))
    with enabled(pipe.unet, FreeU(**picked["setting"])):
        assert ev(np.ones_like(masks.values)).reward == means[str(FreeU(**picked["setting"]))]
    assert picked["picked_by"] == "python:reward_fns:brightness" and "seeds 0..0" in picked["picked_on"]
    assert picked["requires"] == [] and all(picked["search_feasible"].values())


def test_eval_on_the_embedded_default(readme_run):
    """The README's `maskopt eval`: its reward and a second judge, the classifier's features, the real held-out digits."""
    data = json.loads((readme_run[0] / "runs" / "first-eval" / "eval.json").read_text())
    assert data["settings"]["judges"] == ["digits", "digits-kernel"] and data["settings"]["features"] == "digits"
    assert data["settings"]["reference"] == "maskopt:default held-out digits" and data["settings"]["n_prompts"] == 20
    assert data["freeu"]["picked_by"] == "digits" and len(data["freeu"]["search_means"]) == 6
    for c in data["conditions"]:
        assert len(c["judges"]["digits-kernel"]["scores"]) == 80 and c["frechet"]["value"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1"], "--seeds must be at least 2"),
    (["--reference", "nowhere"], "reference folder nowhere does not exist"),
    (["--reference", "empty"], "reference folder empty holds 0 image(s)"),
    (["--freeu", "1.3,1.6"], "FreeU setting '1.3,1.6': expected four positive numbers"),
    (["--masks", "missing.json"], "mask file missing.json does not exist"),
    (["--reward", "clipp"], "unknown reward 'clipp'"),
    (["--prompts", "nope.txt"], "prompt file nope.txt does not exist"),
    (["--out", "a-file"], "--out a-file is a file, not a folder"),
    (["--batch-size", "-1"], "--batch-size must be 0 (all at once) or more, got -1"),
    (["--features", "./no-such-model"], "features model './no-such-model' is not a path that exists"),
    (["--reference", "broken"], "reference image broken/0.png cannot be read"),
])
def test_eval_bad_input_is_one_line_before_any_model_loads(tiny, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "broken").mkdir()
    for name in ("0.png", "1.png"):
        (tmp_path / "broken" / name).write_bytes(b"not a png")

    def no_model(*a, **k):
        raise AssertionError("the pipeline was loaded before the inputs were checked")

    monkeypatch.setattr("maskopt.comparison.load_pipeline", no_model)
    masks = ["--masks", str(tiny / "run" / "masks.json")] if "--masks" not in extra else []
    r = CliRunner().invoke(main, ["eval", *masks, "--out", "e", *extra])
    assert r.exit_code == 1 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


def test_eval_refuses_a_mask_file_for_another_model(tiny, tmp_path):
    xl = tiny_pipeline(tmp_path / "xl", xl=True)
    r = CliRunner().invoke(main, ["eval", "--masks", str(tiny / "run" / "masks.json"), "--model", str(xl), "--seeds", "2",
                                  "--features", str(tiny / "clip"), "--freeu", "none", "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "masks were made for U-Net" in r.output and not (tmp_path / "e").exists()


def test_eval_of_a_search_with_set_terms_judges_its_reward_and_picks_freeu_under_its_bounds(tiny, tmp_path):
    """The searched reward's per-image part is the judge; FreeU is picked under the search's own objective and bounds."""
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["search", "--prompts", str(tiny / "p.txt"), "--model", str(tiny / "sd"), "--reward",
                                  "python:reward_fns:brightness=1,diversity=0.05", "--require", "diversity>=0.5",
                                  "--features", str(tiny / "clip"), "--buckets", "2", "--steps", "4", "--guidance", "3",
                                  "--seeds", "2", "--holdout-seeds", "2", "--budget", "3", "--out", str(run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", "--masks", str(run / "masks.json"), "--seeds", "2", "--features",
                                  str(tiny / "clip"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert data["settings"]["judges"] == ["python:reward_fns:brightness"]
    assert data["freeu"]["requires"] == ["diversity>=0.5"] and len(data["freeu"]["search_feasible"]) == 6


def test_dinov2_features_and_a_model_of_another_kind(tmp_path):
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    from maskopt.errors import MaskoptError
    from maskopt.features import load_features

    config = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
                  patch_size=8)
    Dinov2Model(Dinov2Config(**config)).save_pretrained(tmp_path / "dino")
    features = load_features(str(tmp_path / "dino"))
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert features(images).shape == (3, 16) and not torch.allclose(features(images)[0], features(images)[1])
    ViTModel(ViTConfig(**config)).save_pretrained(tmp_path / "vit")
    with pytest.raises(MaskoptError, match="is a 'vit' model; give a CLIP or DINOv2 model"):
        load_features(str(tmp_path / "vit"))
