"""The sampler a search ran with travels in the mask file: generate and export default to it, flags that depart warn.

Also: a mask file and a journal written by the previous format (maskopt.masks/1, before the sampler section;
tests/data, made by that code) still load, export, generate and resume.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from maskopt import Buckets, MaskSet, find_units
from maskopt.cli import main
from maskopt.config import SearchConfig, complete, resolve
from maskopt.errors import MaskoptError
from maskopt.export.config import ExportConfig, build_profile
from maskopt.generate import GenerateConfig, generate_image
from maskopt.models import EMBEDDED, load_unet
from maskopt.sampler import Sampler
from tiny import tiny_pipeline

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 4-evaluation search on a tiny pipeline, at 4 DDIM steps without guidance, through the CLI."""
    root = tmp_path_factory.mktemp("sampler")
    pipe = tiny_pipeline(root / "sd")
    (root / "p.txt").write_text("a red cat\na blue dog\n")
    out = root / "run"
    r = CliRunner().invoke(main, ["search", "--prompts", str(root / "p.txt"), "--model", str(pipe), "--reward",
                                  "python:reward_fns:brightness", "--buckets", "2", "--steps", "4", "--guidance", "1",
                                  "--seeds", "1", "--holdout-seeds", "1", "--budget", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return pipe, out / "masks.json"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_the_mask_file_records_the_sampler_and_a_provenance_without_none(searched):
    _, masks_path = searched
    d = json.loads(masks_path.read_text())
    assert d["format"] == "maskopt.masks/2"
    assert d["sampler"] == {"scheduler": "ddim", "steps": 4, "guidance": 1.0, "size": [16, 16], "dtype": "float32",
                            "prediction_type": "epsilon"}
    config = d["provenance"]["config"]
    assert [k for k, v in config.items() if v is None] == []  # every default that was used is named
    assert (config["reward"], config["optimizer"], config["groups"], config["scheduler"]) == \
        ("python:reward_fns:brightness", "NGOpt", 1, "ddim")
    assert config["holdout_prompts"] == config["prompts"]  # no held-out file given: the search prompts, unseen seeds
    header = json.loads((masks_path.parent / "journal.jsonl").read_text().splitlines()[0])
    assert header["config"] == {k: v for k, v in config.items() if k not in SearchConfig.RUNTIME}


def test_resolve_fills_every_default_once():
    cfg = resolve(budget=7)
    assert None not in cfg.to_dict().values()
    assert (cfg.model, cfg.reward, cfg.optimizer, cfg.groups, cfg.scheduler, cfg.size) == \
        (EMBEDDED, "digits", "DiscreteOnePlusOne", 4, "ddim", (32, 32))
    assert Path(cfg.holdout_prompts).name == "holdout_prompts.txt"  # the shipped held-out phrasings
    assert complete(cfg) == cfg  # complete is idempotent: a resolved config is its own completion
    assert resolve(space="binary", budget=7).groups == 1  # whole layers outside the groups space
    with pytest.raises(MaskoptError, match="--prompts is required with --model"):
        resolve(model="org/name")


def test_generate_samples_as_searched_and_warns_once_when_a_flag_departs(searched, tmp_path, caplog):
    pipe, masks_path = searched
    calls = []
    count = lambda p: p.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    run = lambda **kw: generate_image(GenerateConfig(prompt="a red cat", out=tmp_path / "x.png", masks=masks_path,
                                                     model=str(pipe), **kw), on_pipe=count)
    as_searched = run()
    assert len(calls) == 4 and as_searched.sampler.describe() == "ddim, 4 steps, guidance 1, 16x16"
    assert as_searched.departures == [] and _warnings(caplog) == []
    spelled_out = run(steps=4, guidance=1.0, scheduler="ddim", size=(16, 16))  # the same regime, given as flags
    assert np.array_equal(np.asarray(spelled_out.image), np.asarray(as_searched.image)) and _warnings(caplog) == []
    calls.clear()
    other = run(steps=6, guidance=3.0)
    assert len(calls) == 6  # 6 steps, and guidance 3 runs both halves in one U-Net call per step
    assert _warnings(caplog) == ["generate samples outside the regime the masks were searched in: steps 6 (searched: 4), "
                                 "guidance 3 (searched: 1)"]
    assert other.departures == ["steps 6 (searched: 4)", "guidance 3 (searched: 1)"]
    caplog.clear()
    assert run(scheduler="DDIMScheduler").departures == [] and _warnings(caplog) == []  # the same sampler, spelled as a class
    assert run(size=(24, 24)).departures == ["size 24x24 (searched: 16x16)"]
    assert as_searched.sampler.dtype == "float32" and as_searched.sampler.prediction_type == "epsilon"


def test_cli_generate_says_how_it_sampled(searched, tmp_path):
    pipe, masks_path = searched
    base = ["generate", "--masks", str(masks_path), "--model", str(pipe), "--prompt", "a dog", "--out"]
    r = CliRunner().invoke(main, base + [str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == (f"wrote {tmp_path / 'a.png'} (seed 0; torch backend, ddim, 4 steps, "
                                                 "guidance 1, 16x16; as searched)")
    assert Image.open(tmp_path / "a.png").size == (16, 16)
    r = CliRunner().invoke(main, base + [str(tmp_path / "b.png"), "--steps", "30"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1].endswith("; departs from the search: steps 30 (searched: 4))")
    r = CliRunner().invoke(main, base + [str(tmp_path / "c.png"), "--scheduler", "warp"])
    assert r.exit_code == 1 and r.output.startswith("Error: unknown scheduler 'warp'; valid: ddim, dpm++")


def test_export_profiles_follow_the_searched_guidance(searched, tmp_path, caplog):
    pipe, masks_path = searched
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["export", "--masks", str(masks_path), "--model", str(pipe), "--out", str(out), "--onnx"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"]["batch"] == [1, 1, 4]  # guidance 1 was searched: one U-Net row per image
    assert manifest["masks"]["sampler"]["guidance"] == 1.0 and "U-Net batch 1..4" in r.stdout
    # the profile builder alone: guided, unknown, and a flag that departs from the search
    unet = load_unet(str(pipe))
    profile = lambda sampler, **kw: build_profile(ExportConfig(masks=masks_path, out=out, **kw), unet, (2, 16), sampler)
    assert profile(Sampler(guidance=7.5)).batch.to_list() == [2, 2, 8]
    assert profile(Sampler()).batch.to_list() == [2, 2, 8]  # not recorded: classifier-free guidance assumed
    assert profile(Sampler(guidance=1.0, size=(32, 32))).height.to_list() == [8, 16, 32]  # around the searched size
    assert _warnings(caplog) == []
    assert profile(Sampler(guidance=1.0), classifier_free=True).batch.to_list() == [2, 2, 8]
    assert _warnings(caplog) == ["--classifier-free: the masks were searched at guidance 1, so a pipeline that samples "
                                 "as searched runs without classifier-free guidance"]
    caplog.clear()
    # a non-square search: each side around its own searched size (latent units; VAE factor 2 here)
    wide = profile(Sampler(guidance=1.0, size=(16, 40)))
    assert (wide.height.to_list(), wide.width.to_list()) == ([4, 8, 16], [10, 20, 40]) and _warnings(caplog) == []
    # a side the U-Net cannot take (with a VAE factor of 8 its sides step by 16 px) is rounded up, said once
    odd = build_profile(ExportConfig(masks=masks_path, out=out), unet, (8, 16), Sampler(guidance=1.0, size=(16, 40)))
    assert (odd.height.to_list(), odd.width.to_list()) == ([2, 2, 4], [2, 6, 12])
    assert _warnings(caplog) == ["the masks were searched at 16x40 px, which this U-Net runs only at multiples of 16 px: "
                                 "the profile is built around 16x48 (--size sets it)"]


def test_a_format_1_mask_file_loads_exports_and_generates(tmp_path):
    """tests/data/masks-format1.json was written by maskopt before mask files carried a sampler (a search on the
    embedded default): its sampler comes from the provenance, and export and generate take it from there."""
    masks = MaskSet.load(DATA / "masks-format1.json", unet=load_unet(EMBEDDED))
    assert masks.sampler == Sampler(steps=15, guidance=1.0, dtype="float32")  # what the old provenance recorded
    r = CliRunner().invoke(main, ["export", "--masks", str(DATA / "masks-format1.json"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["profile"]["batch"] == [1, 1, 4]
    done = generate_image(GenerateConfig(prompt="a handwritten 7", out=tmp_path / "7.png", export_dir=tmp_path / "e"))
    assert (done.backend, done.sampler.steps, done.sampler.guidance, done.sampler.scheduler) == \
        ("onnxruntime", 15, 1.0, "ddim")  # the scheduler: the pipeline's own, as the old search used
    # saved again, it is a format-2 file with the same values and the sampler in its own section
    again = MaskSet.load(masks.save(tmp_path / "resaved.json"))
    assert json.loads((tmp_path / "resaved.json").read_text())["format"] == "maskopt.masks/2"
    assert np.array_equal(again.values, masks.values) and again.sampler == masks.sampler


def test_a_mask_file_without_a_sampler_falls_back_and_says_so(tmp_path):
    unet = load_unet(EMBEDDED)
    path = MaskSet.ones(unet, find_units(unet, "paper"), Buckets.uniform(2), source=EMBEDDED).save(tmp_path / "m.json")
    done = generate_image(GenerateConfig(prompt="a 3", out=tmp_path / "3.png", masks=path, steps=2))
    assert done.sampler.describe() == "ddim, 2 steps, guidance 7.5, 32x32" and done.departures == []
    assert done.describe().endswith("; the mask file records no sampler")


def test_a_search_journaled_by_the_previous_format_resumes(tmp_path):
    """tests/data/journal-format1.jsonl: a 4-evaluation search on the embedded default by the previous maskopt,
    whose header left defaults as null; completed, its settings are today's, so --resume continues it."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copyfile(DATA / "journal-format1.jsonl", out / "journal.jsonl")
    r = CliRunner().invoke(main, ["search", "--budget", "6", "--seeds", "1", "--holdout-seeds", "1", "--out", str(out),
                                  "--resume"])
    assert r.exit_code == 0, r.output
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert lines[:5] == (DATA / "journal-format1.jsonl").read_text().splitlines() and len(lines) == 1 + 6
    r = CliRunner().invoke(main, ["search", "--budget", "7", "--seeds", "2", "--holdout-seeds", "1", "--out", str(out),
                                  "--resume"])
    assert r.exit_code == 1 and "different configuration (seeds: 1 there, 2 now)" in r.output
