"""`maskopt export` on tiny SD1.5-, SD2.1- and SDXL-shaped pipelines: parity per variant, manifest, bad input."""

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

import maskopt.export as export_pkg
from export_helpers import K, cli, copy_of, exported, masks, pipeline, workspace
from maskopt import MaskoptError, MaskSet, bake
from maskopt.export import ExportConfig, export
from maskopt.export.manifest import FORMAT, Manifest
from maskopt.export.onnx import ExportWrapper
from maskopt.export.shapes import Range
from maskopt.export.verify import ParityError, compare
from maskopt.export import ort
from maskopt.models import load_unet


@pytest.mark.parametrize("kind", ["sd", "xl", "sd21"])
def test_export_variants_match_baked_unets(kind):
    xl = kind == "xl"
    out = exported(kind)
    m = Manifest.load(out)
    assert [v.timesteps for v in m.variants] == [(0, 332), (333, 666), (667, 999)]
    inputs = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if xl else [])
    unet = load_unet(str(pipeline(kind)))
    mask_set = MaskSet.load(masks(kind))
    rng = np.random.default_rng(5)
    outputs = []
    for k, v in enumerate(m.variants):
        # the export's own parity record: two shapes, all within tolerance
        rec = v.verify["onnx"]
        assert rec.passed and len(rec.checks) == 2 and rec.max_abs < 1e-4
        assert {tuple(c.shapes["sample"]) for c in rec.checks} == {(2, 4, 8, 8), (8, 4, 4, 8)}
        # and an independent check: a fresh bake of bucket k, at a new shape and timestep of the bucket
        model = onnx.load(str(out / v.files["onnx"].path))
        assert [i.name for i in model.graph.input] == inputs and model.graph.output[0].name == "out_sample"
        assert model.opset_import[0].version >= 17
        feeds = {"sample": rng.standard_normal((4, 4, 12, 8)).astype(np.float32),
                 "timestep": np.array([v.timesteps[1]], np.float32),
                 "encoder_hidden_states": rng.standard_normal((4, 16, unet.config.cross_attention_dim)).astype(np.float32)}
        if xl:
            feeds.update(text_embeds=rng.standard_normal((4, 24)).astype(np.float32),
                         time_ids=rng.standard_normal((4, 6)).astype(np.float32))
        got = ort.session(out / v.files["onnx"].path).run(None, feeds)[0]
        with torch.no_grad():
            want = ExportWrapper(bake(unet, mask_set, k), xl)(*(torch.from_numpy(feeds[n]) for n in inputs)).numpy()
        assert compare(want, got, 1e-4, 1e-3).passed, np.abs(want - got).max()
        outputs.append(got)
    assert not np.allclose(outputs[0], outputs[1], atol=1e-3)  # the buckets really differ


def test_manifest_round_trip_and_routing():
    out = exported()
    d = json.loads((out / "manifest.json").read_text())
    assert d["format"] == FORMAT and d["timestep"]["shape"] == [1] and d["precision"] == "fp32" and d["drop"]
    m = Manifest.load(out)
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))).to_dict() | {"provenance": None} == \
        m.to_dict() | {"provenance": None}
    assert m.masks["fingerprint"] == MaskSet.load(masks()).fingerprint
    assert (out / "masks.json").read_bytes() == masks().read_bytes()
    # the profile, in latent units: 1:1:4 images with CFG -> U-Net batch 2:2:8; 8..32 px -> 4..16 latents
    assert d["profile"]["batch"] == [2, 2, 8] and d["profile"]["height"] == [4, 8, 16]
    assert d["profile"]["shapes"]["sample"] == {"min": [2, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}
    assert [m.variant_for(t).bucket for t in (999, 999.5, 667, 666.9, 333, 332.5, 0, -3, 1e4)] == [2, 2, 2, 1, 1, 0, 0, 0, 2]
    for t in (float("nan"), float("inf")):  # the manifest's timestep.rule: finite, floored, clamped
        with pytest.raises(MaskoptError, match="is not a finite number"):
            m.variant_for(t)
    for v in m.variants:
        for f in v.files.values():
            assert (out / f.path).stat().st_size == f.bytes and len(f.sha256) == 64


def test_hash_mismatch_is_refused():
    out = copy_of(exported(), "tampered")
    onnx_file = out / "unet_b1.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 1
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(MaskoptError, match="unet_b1.onnx does not match its sha256"):
        Manifest.load(out)
    (out / "unet_b1.onnx").unlink()
    with pytest.raises(MaskoptError, match="unet_b1.onnx is listed in manifest.json but missing"):
        Manifest.load(out)


def test_drop_variants_are_smaller_than_full_ones():
    drop, full = Manifest.load(exported(drop=True)), Manifest.load(exported(drop=False))
    for d, f in zip(drop.variants, full.variants):
        assert d.files["onnx"].bytes < f.files["onnx"].bytes
        nodes = lambda m, v: len(onnx.load(str(m / v.files["onnx"].path)).graph.node)  # noqa: E731
        assert nodes(exported(drop=True), d) < nodes(exported(drop=False), f)


def test_fp16_with_external_data_replaces_existing_folder_with_force():
    out = workspace() / "fp16"
    out.mkdir(exist_ok=True)
    (out / "old.txt").write_text("previous export")
    r = cli("export", "--masks", masks(), "--model", pipeline(), "--out", out, "--fp16")
    assert r.exit_code != 0 and "exists and is not empty (add --force" in r.output
    assert (out / "old.txt").exists()
    m = export(ExportConfig(masks=masks(), model=str(pipeline()), out=out, fp16=True, force=True,
                            external_data_threshold=1))  # force the >2 GB layout on a tiny model
    assert not (out / "old.txt").exists() and m.precision == "fp16"
    for v in m.variants:
        assert v.files["onnx_data"].path == f"{v.name}.onnx.data"
        assert v.verify["onnx"].passed and 0 < v.verify["onnx"].max_abs < 5e-2  # fp16 rounding, no NaN
        model = onnx.load(str(out / v.files["onnx"].path), load_external_data=False)
        assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
        assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
    Manifest.load(out)  # data files are hashed too
    assert not list(out.parent.glob(".fp16.*"))  # no staging folder left behind


def test_parity_failure_writes_nothing_and_keeps_existing_folder():
    out = workspace() / "parity"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("x")
    with pytest.raises(ParityError, match=r"unet_b0 \(timesteps 0..332\): onnxruntime .* differs from torch float32"):
        export(ExportConfig(masks=masks(), model=str(pipeline()), out=out, force=True, atol=0.0, rtol=0.0))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(out.parent.glob(".parity.*"))


def test_folders_made_and_taken_back_are_the_normalised_ones(tmp_path):
    from maskopt.paths import make_folder, remove_made

    (tmp_path / "user").mkdir()
    for path in (tmp_path / "nothere" / ".." / "user", tmp_path / "nothere" / ".." / "user" / "new" / "deeper"):
        remove_made(make_folder(path, "--out"), path)
    assert [p.name for p in tmp_path.iterdir()] == ["user"] and not any((tmp_path / "user").iterdir())


def test_failed_export_takes_back_the_folders_it_made():
    top = workspace() / "made"
    shutil.rmtree(top, ignore_errors=True)
    with pytest.raises(ParityError):
        export(ExportConfig(masks=masks(), model=str(pipeline()), out=top / "a" / "b" / "out", atol=0.0, rtol=0.0))
    assert not top.exists()


def test_bad_inputs_fail_before_any_work(monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the U-Net was loaded before the options were checked")

    monkeypatch.setattr("maskopt.models.load_unet", no_model)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    out = workspace() / "never"
    cases = [
        (["--trt"], "TensorRT is not installed"),
        (["--refit"], "--refit builds one refittable TensorRT engine: add --trt"),
        (["--opset", "13"], "supported opsets are 17"),
        (["--batch", "4:2:1"], "need 0 < MIN <= OPT <= MAX"),
    ]
    for flags, message in cases:
        r = cli("export", "--masks", masks(), "--model", pipeline(), "--out", out, *flags)
        assert r.exit_code == 1 and message in r.output, (flags, r.output)
        assert len(r.output.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists()
    r = cli("export", "--masks", workspace() / "missing.json", "--out", out)
    assert r.exit_code == 1 and "does not exist" in r.output
    r = cli("export", "--masks", workspace(), "--out", out)
    assert r.exit_code == 1 and "is a folder; give its masks.json" in r.output
    afile = workspace() / "a-file"
    afile.write_text("x")
    r = cli("export", "--masks", masks(), "--model", pipeline(), "--out", afile / "sub" / "export")
    assert r.exit_code == 1 and f"--out {afile / 'sub' / 'export'}: {afile} is a file, not a folder" in r.output


def test_mask_file_for_another_unet_is_refused():
    r = cli("export", "--masks", masks(xl=True), "--model", pipeline(xl=False), "--out", workspace() / "other")
    assert r.exit_code == 1 and "fingerprint" in r.output
    assert not (workspace() / "other").exists()


def test_size_must_fit_the_unet_and_default_model_is_the_mask_source(monkeypatch):
    r = cli("export", "--masks", masks(), "--model", pipeline(), "--out", workspace() / "odd", "--size", "6:16:32")
    assert r.exit_code == 1 and "size 6 px: image sides must be multiples of 4" in r.output
    from maskopt.models import EMBEDDED, model_for

    assert model_for(None, str(pipeline() / "unet")) == str(pipeline())  # pipeline's unet subfolder
    assert model_for(None, "stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert model_for(None, "UNet2DConditionModel") == EMBEDDED  # a U-Net built in Python names only its class
    assert model_for(None, "maskopt:default") == EMBEDDED  # what a search on the embedded default writes
    assert model_for("x/y", "anything") == "x/y"
    cached = "/elsewhere/.cache/huggingface/hub/models--org--sd-1.5_x/snapshots/0123abcd/unet"  # another machine's cache
    assert model_for(None, cached) == "org/sd-1.5_x"
    assert Range.parse("512") == Range(512, 512, 512)


def test_unused_input_stays_in_the_signature(tmp_path):
    """With --drop, a bucket that removes every cross-attention no longer reads encoder_hidden_states;
    the variant must still take it (every variant has the same named inputs)."""
    from maskopt import Buckets, find_units
    from maskopt.export.onnx import export_onnx
    from maskopt.export.shapes import Signature

    unet = load_unet(str(pipeline()))
    units = find_units(unet, "*.attn2")
    mask_set = MaskSet.ones(unet, units, Buckets.uniform(2)).with_values([[0.0] * len(units), [1.0] * len(units)])
    sig = Signature.from_unet(unet)
    feeds = sig.random_inputs(sig.shapes(2, 8, 8, 16), timestep=100.0)
    variant = bake(unet, mask_set, 0, drop=True)
    path = export_onnx(variant, tmp_path / "unet_b0.onnx", sig, feeds)[0]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == list(sig.input_names)
    assert not any("encoder_hidden_states" in n.input for n in model.graph.node)  # really unused
    onnx.checker.check_model(model)
    got = ort.session(path).run(None, feeds)[0]
    with torch.no_grad():
        want = ExportWrapper(variant, False)(*(torch.from_numpy(feeds[n]) for n in sig.input_names)).numpy()
    assert compare(want, got, 1e-4, 1e-3).passed
