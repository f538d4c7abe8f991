"""The TensorRT path as far as it goes without TensorRT: profiles, builder flags, the loader chain, refit
weight sets. What needs the library itself is skipped, with the reason, where it is not installed."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export_helpers import exported
from maskopt import MaskoptError
from maskopt.export.manifest import Manifest
from maskopt.export.shapes import Range, Signature, profile_for
from maskopt.export.trt import (
    INSTALL, EngineSettings, create_config, engine_loader, load_weights, refit_weight_sets, require_tensorrt, save_weights,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (" + INSTALL + "); needs an NVIDIA GPU")

SD = Signature(4, 4, 768)
XL = Signature(4, 4, 2048, text_embeds_dim=1280, time_ids_dim=6)


def test_profile_doubles_batch_for_classifier_free_guidance_and_uses_latent_units():
    p = profile_for(Range(1, 2, 4), Range(256, 512, 1024), classifier_free=True, vae_scale=8, seq=77, multiple=8)
    shapes = p.shapes(XL)
    assert shapes["sample"] == ((2, 4, 32, 32), (4, 4, 64, 64), (8, 4, 128, 128))
    assert shapes["timestep"] == ((1,), (1,), (1,))
    assert shapes["encoder_hidden_states"] == ((2, 77, 2048), (4, 77, 2048), (8, 77, 2048))
    assert shapes["text_embeds"] == ((2, 1280), (4, 1280), (8, 1280))
    assert shapes["time_ids"] == ((2, 6), (4, 6), (8, 6))
    unguided = profile_for(Range(1, 2, 4), Range(512, 512, 512), classifier_free=False, vae_scale=8, seq=77, multiple=8)
    assert unguided.shapes(SD)["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 64, 64))
    assert "text_embeds" not in unguided.shapes(SD)
    with pytest.raises(MaskoptError, match="multiples of 64"):
        profile_for(Range(1, 1, 1), Range(500, 512, 512), classifier_free=True, vae_scale=8, seq=77, multiple=8)
    # the two parity shapes lie inside the profile
    for b, h, w in p.verify_shapes():
        p.check(b, h, w, 77)
    with pytest.raises(MaskoptError, match=r"width 1088 px \(latent 136\) is outside 256..1024 px"):
        p.check(2, 64, 136)


def test_builder_config_from_settings(tmp_path):
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    profile = profile_for(Range(1, 1, 2), Range(512, 512, 768), classifier_free=True, vae_scale=8, seq=77, multiple=8)
    cache = tmp_path / "timing.cache"
    settings = EngineSettings(profile, SD, fp16=True, optimization_level=4, timing_cache=cache, refittable=True)
    config = create_config(settings)
    assert isinstance(config, CreateConfig)
    assert config.fp16 and config.refittable and config.builder_optimization_level == 4
    assert config.timing_cache_path is None  # nothing to load before the first build
    (prof,) = config.profiles
    assert tuple(prof["sample"].min) == (2, 4, 64, 64) and tuple(prof["sample"].max) == (4, 4, 96, 96)
    assert tuple(prof["encoder_hidden_states"].opt) == (2, 77, 768)
    cache.write_bytes(b"cache")
    assert create_config(settings).timing_cache_path == str(cache)  # later builds start from it
    loader = engine_loader(Path("unet_b0.onnx"), settings)
    assert isinstance(loader, EngineBytesFromNetwork) and loader.timing_cache_path == str(cache)
    assert isinstance(loader._network, NetworkFromOnnxPath) and loader._network.path == "unet_b0.onnx"
    assert settings.to_dict() == {"fp16": True, "builder_optimization_level": 4, "workspace_gb": None, "refittable": True}
    with pytest.raises(MaskoptError, match="must be 0..5"):
        EngineSettings(profile, SD, optimization_level=7)
    with pytest.raises(MaskoptError, match="positive number of GB"):
        EngineSettings(profile, SD, workspace_gb=0)


def test_require_tensorrt_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MaskoptError, match="pypi.nvidia.com tensorrt"):
        require_tensorrt()
    profile = profile_for(Range(1, 1, 1), Range(512, 512, 512), classifier_free=True, vae_scale=8, seq=77, multiple=8)
    with pytest.raises(MaskoptError, match="TensorRT is not installed"):  # the workspace pool is a TensorRT enum
        create_config(EngineSettings(profile, SD, workspace_gb=4))


def test_refit_weight_sets_restore_each_variant_exactly(tmp_path):
    out = exported(drop=False)
    paths = [out / v.files["onnx"].path for v in Manifest.load(out).variants]
    sets = refit_weight_sets(paths)
    assert len(sets) == 3 and sets[0] and all(s.keys() == sets[0].keys() for s in sets)
    inits = [{t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer} for p in paths]
    assert len(sets[0]) < len(inits[0])  # only what the masks change: far less than a whole engine
    for k in range(3):
        saved = load_weights(save_weights(tmp_path / f"b{k}.safetensors", sets[k]))
        refitted = {**inits[0], **saved}  # what refitting variant 0's engine with set k holds
        assert all(np.array_equal(refitted[n], inits[k][n]) for n in inits[k]), k


def test_refit_refuses_dropped_variants():
    out = exported(drop=True)
    paths = [out / v.files["onnx"].path for v in Manifest.load(out).variants]
    with pytest.raises(MaskoptError, match="--refit needs every variant to share one graph"):
        refit_weight_sets(paths)


@needs_trt
def test_build_and_run_a_tiny_engine(tmp_path):
    from maskopt.export import ExportConfig, export
    from export_helpers import masks, pipeline

    m = export(ExportConfig(masks=masks(), model=str(pipeline()), out=tmp_path / "trt", trt=True, onnx=True, triton=True))
    assert all(v.verify["tensorrt"].passed and (tmp_path / "trt" / v.files["plan"].path).is_file() for v in m.variants)


@needs_trt
def test_refit_engine_matches_each_bucket(tmp_path):
    from maskopt.export import ExportConfig, export
    from export_helpers import masks, pipeline

    m = export(ExportConfig(masks=masks(), model=str(pipeline()), out=tmp_path / "refit", trt=True, refit=True))
    assert m.refit and len({v.files["plan"].path for v in m.variants}) == 1
    assert all(v.verify["tensorrt"].passed for v in m.variants)
