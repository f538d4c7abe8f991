"""`maskopt generate`: torch and onnxruntime agree; variants switch by timestep; bad input is refused."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from export_helpers import cli, copy_of, exported, masks, pipeline, workspace
from maskopt import MaskoptError
from maskopt.export.manifest import Manifest
from maskopt.export.runtime import OrtVariants, RoutedUNet
from maskopt.export.shapes import Range, ShapeProfile
from maskopt.generate import GenerateConfig, generate_image
from maskopt.models import load_unet

STEPS = 8


def psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("kind", ["sd", "xl", "sd21"])
def test_torch_and_onnxruntime_agree(kind):
    out = exported(kind)
    seen = {}
    images = {}
    for backend in ("torch", "onnxruntime"):
        images[backend] = generate_image(
            GenerateConfig(prompt="a red cat", out=workspace() / "unused.png", export_dir=out, backend=backend, steps=STEPS),
            on_pipe=lambda pipe: seen.setdefault(backend, pipe.unet),
        ).image
    assert psnr(images["torch"], images["onnxruntime"]) >= 40
    assert np.asarray(images["torch"]).std() > 1  # a real image, not a constant
    # the exported variants were used from the noisiest bucket to the cleanest, switching by timestep
    history = seen["onnxruntime"].history
    assert history == sorted(history, reverse=True) and set(history) == {0, 1, 2} and len(history) == STEPS


def test_cli_generate_masks_and_export(tmp_path):
    r = cli("generate", "--prompt", "a dog", "--masks", masks(), "--model", pipeline(), "--steps", STEPS,
            "--seed", 3, "--out", tmp_path / "torch.png")
    assert r.exit_code == 0, r.output
    assert "torch backend" in r.output
    r = cli("generate", "--prompt", "a dog", "--export", exported(), "--steps", STEPS, "--seed", 3,
            "--size", "16x16", "--out", tmp_path / "ort.png")
    assert r.exit_code == 0, r.output
    assert "onnxruntime backend" in r.output
    a, b = Image.open(tmp_path / "torch.png"), Image.open(tmp_path / "ort.png")
    assert a.size == b.size == (16, 16) and psnr(a, b) >= 40


def test_generate_bad_inputs(monkeypatch, tmp_path):
    def run(*args):
        return cli("generate", "--prompt", "x", "--steps", 2, "--out", tmp_path / "x.png", *args)

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
        r = run("--export", exported(), "--backend", "tensorrt")
        assert r.exit_code == 1 and "TensorRT is not installed" in r.output
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
        r = run("--export", exported(), "--backend", "onnxruntime")
        assert r.exit_code == 1 and "needs ONNX Runtime, which is not installed" in r.output
    r = run("--masks", masks(), "--backend", "onnxruntime")
    assert r.exit_code == 1 and "give --export DIR" in r.output
    r = run("--masks", masks(), "--export", exported())
    assert r.exit_code == 1 and "either --masks FILE or --export DIR" in r.output
    r = run("--masks", masks(xl=True), "--model", pipeline(xl=False))
    assert r.exit_code == 1 and "made for another U-Net" in r.output
    r = run("--export", exported(xl=True), "--model", pipeline(xl=False))
    assert r.exit_code == 1 and "made for another U-Net" in r.output
    tampered = copy_of(exported(), "gen_tampered")
    (tampered / "unet_b0.onnx").write_bytes(b"not onnx")
    r = run("--export", tampered)
    assert r.exit_code == 1 and "unet_b0.onnx does not match its sha256" in r.output
    r = run("--export", workspace() / "nothing-here")
    assert r.exit_code == 1 and "is not a maskopt export" in r.output
    assert len(r.output.strip().splitlines()) == 1  # one line, no traceback


def test_generate_refuses_bad_options_before_loading(monkeypatch, tmp_path):
    def no_model(*a, **k):
        raise AssertionError("the pipeline was loaded before the options were checked")

    monkeypatch.setattr("maskopt.models.load_pipeline", no_model)
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--steps", 0], "--steps must be at least 1, got 0"),
        (["--size", "33x32"], "size 33x32: height and width must be positive multiples of 8"),
        (["--device", "tpu0"], "unknown device 'tpu0'"),
        (["--out", tmp_path], "is a folder; give an image file name"),
        (["--out", tmp_path / "image"], "give an image file name ending in .png"),
        (["--out", tmp_path / "a-file" / "x.png"], "a-file is a file, not a folder"),
    ]
    for flags, message in cases:
        r = cli("generate", "--prompt", "x", "--masks", masks(), "--model", pipeline(), "--steps", 2,
                "--out", tmp_path / "x.png", *flags)
        assert r.exit_code == 1 and message in r.output, (flags, r.output)
        assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_shape_outside_the_engine_profile_names_the_allowed_range():
    manifest = Manifest.load(exported())
    profile = ShapeProfile(batch=Range(2, 2, 2), height=Range(4, 8, 8), width=Range(4, 8, 8), seq=16, vae_scale=2)
    unet = RoutedUNet(load_unet(str(pipeline())), manifest.buckets, OrtVariants(manifest, exported()), xl=False,
                      profile=profile)
    ok = unet(torch.zeros(2, 4, 8, 8), torch.tensor(10), torch.zeros(2, 16, 16), return_dict=False)[0]
    assert ok.shape == (2, 4, 8, 8) and unet.history == [0]
    with pytest.raises(MaskoptError, match=r"height 32 px \(latent 16\) is outside 8..16 px \(latent 4..8\)"):
        unet(torch.zeros(2, 4, 16, 8), torch.tensor(10), torch.zeros(2, 16, 16))
    with pytest.raises(MaskoptError, match=r"batch 4 \(U-Net batch, CFG doubled\) is outside 2"):
        unet(torch.zeros(4, 4, 8, 8), torch.tensor(10), torch.zeros(4, 16, 16))
    with pytest.raises(MaskoptError, match="mixes timesteps"):
        unet(torch.zeros(2, 4, 8, 8), torch.tensor([10, 900]), torch.zeros(2, 16, 16))
