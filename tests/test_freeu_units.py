"""Backbone units (the `freeu` preset) against diffusers' own FreeU: same numbers, baked, dropped, per sample, exported."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from maskopt import Buckets, MaskoptError, MaskSet, Unit, apply, bake, find_units
from maskopt.export.onnx import export_onnx
from maskopt.export.shapes import Signature
from maskopt.freeu import FreeU, enabled
from maskopt.masking import per_sample
from maskopt.models import load_pipeline
from maskopt.units import masked_params
from tiny import TINY_SD, TINY_XL, tiny_pipeline, tiny_unet, unet_inputs

B1, B2 = 1.3, 1.6


def run(unet, t, kw):
    with torch.no_grad():
        return unet(timestep=t, **kw).sample


def freeu_masks(unet, rows, extra=()):
    """Masks over the freeu units (+ `extra` units at 1): row k = (b1, b2) of bucket k."""
    units = find_units(unet, ["freeu", *extra])
    masks = MaskSet.ones(unet, units, Buckets.uniform(len(rows)))
    values = np.ones(masks.values.shape)
    col = {u.name: j for j, u in enumerate(units)}
    for k, (b1, b2) in enumerate(rows):
        values[k, col["up_blocks.0"]], values[k, col["up_blocks.1"]] = b1, b2
    return masks.with_values(values)


@pytest.mark.parametrize("config", [TINY_SD, TINY_XL], ids=["sd", "xl"])
def test_the_freeu_preset_is_freeus_two_blocks(config):
    unet = tiny_unet(config)
    units = find_units(unet, "freeu")
    assert [(u.name, u.kind) for u in units] == [("up_blocks.0", "backbone"), ("up_blocks.1", "backbone")]
    assert masked_params(unet, units) == 0  # no weight is scaled: the inputs are
    # the first half of the backbone: what enters the block (mid block's output) for resnet 0, then resnet 0's
    mid = unet.mid_block.resnets[-1].out_channels
    assert units[0].inputs(unet)[0] == ("up_blocks.0.resnets.0", slice(0, mid // 2))
    assert units[0].inputs(unet)[1] == ("up_blocks.0.resnets.1", slice(0, unet.up_blocks[0].resnets[0].out_channels // 2))


@pytest.mark.parametrize("config", [TINY_SD, TINY_XL], ids=["sd", "xl"])
def test_freeu_units_reproduce_enable_freeu(config):
    unet = tiny_unet(config)
    kw = unet_inputs(unet)
    masks = freeu_masks(unet, [(B1, B2), (1.1, 1.2)])  # bucket 0 (t < 500): 1.3/1.6, bucket 1: 1.1/1.2
    for t, (b1, b2) in ((100, (B1, B2)), (900, (1.1, 1.2))):
        with enabled(unet, FreeU(b1, b2, 1, 1)):
            ref = run(unet, t, kw)
        base = run(unet, t, kw)
        with apply(unet, masks):
            out = run(unet, t, kw)
        assert not torch.allclose(ref, base, atol=1e-3)  # FreeU changes this U-Net's output...
        # ...and the units change it the same way, up to the rounding of FreeU's FFT round trip at s = 1
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(bake(unet, masks, masks.buckets.index(t)), t, kw), out, rtol=0, atol=0)
    assert not any(r._forward_pre_hooks for b in unet.up_blocks for r in b.resnets)  # apply left no hook behind


def test_freeu_units_reproduce_freeus_images(tmp_path):
    """The candidate equal to enable_freeu(b1, b2, 1, 1) in every bucket gives FreeU's images."""
    pipe = load_pipeline(str(tiny_pipeline(tmp_path / "sd")))  # through maskopt's own loading code
    masks = freeu_masks(pipe.unet, [(B1, B2)] * 4)

    def images():
        return pipe(["a red cat", "a blue dog"], num_inference_steps=6, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = images()
    with enabled(pipe.unet, FreeU(B1, B2, 1, 1)):
        ref = images()
    with apply(pipe.unet, masks):
        out = images()
    assert (ref - base).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_backbone_units_compose_with_weights_drop_and_per_sample():
    unet = tiny_unet()
    kw = unet_inputs(unet)
    masks = freeu_masks(unet, [(B1, B2), (1.0, 1.0)], extra=["up_blocks.*.resnets.*"])
    values = masks.values.copy()
    values[0, [j for j, u in enumerate(masks.units) if u.name == "up_blocks.0.resnets.1"]] = 0.0  # a removed branch
    masks = masks.with_values(values)
    with apply(unet, masks):
        ref = run(unet, 100, kw)
        other = run(unet, 900, kw)
    # bake with drop: the removed resnet is a ResnetSkip, and its scaled input still reaches the shortcut
    torch.testing.assert_close(run(bake(unet, masks, 0, drop=True), 100, kw), ref, rtol=1e-5, atol=1e-6)
    ones = MaskSet.ones(unet, masks.units, masks.buckets)
    # per sample: sample 0 under the masks, sample 1 under the ones, in one batch
    with per_sample(unet, [masks, ones]) as gate:
        gate.select(0, torch.tensor([0, 1]))
        both = run(unet, 100, kw)
    torch.testing.assert_close(both[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], run(unet, 100, kw)[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref, other)


def test_a_baked_backbone_exports_with_parity(tmp_path):
    unet = tiny_unet()
    masks = freeu_masks(unet, [(B1, B2)])
    variant = bake(unet, masks, 0)
    sig = Signature.from_unet(unet)
    example = sig.random_inputs(sig.shapes(2, 8, 8, 5), timestep=100.0)
    (path,) = export_onnx(variant, tmp_path / "unet.onnx", sig, example, opset=17, fp16=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, example)[0]
    args = [torch.from_numpy(example[n]) for n in ("sample", "timestep", "encoder_hidden_states")]
    with torch.no_grad():
        want = variant(*args).sample.numpy()
    with enabled(unet, FreeU(B1, B2, 1, 1)), torch.no_grad():
        freeu = unet(*args).sample.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, freeu, rtol=1e-4, atol=1e-5)  # FreeU itself, which cannot be exported


def test_variants_with_and_without_freeu_share_one_graph_for_refit(tmp_path):
    """A bucket at b = 1 keeps its (unit) scale, so every bucket's ONNX has the same nodes: --refit swaps the scales.

    Bucket 0 has b1 = b2: up_blocks.0.resnets.1 and up_blocks.1.resnets.0 (48 channels each, 16 scaled) then get
    equal scale vectors, which the exporter must not merge into one constant in that bucket only."""
    from maskopt.export.trt import refit_weight_sets

    unet = tiny_unet()
    assert unet.up_blocks[0].resnets[1].in_channels == unet.up_blocks[1].resnets[0].in_channels
    masks = freeu_masks(unet, [(B1, B1), (1.0, B2)])
    sig = Signature.from_unet(unet)
    example = sig.random_inputs(sig.shapes(1, 8, 8, 5), timestep=100.0)
    paths = [export_onnx(bake(unet, masks, k), tmp_path / f"unet_b{k}.onnx", sig, example, opset=17, fp16=False)[0]
             for k in (0, 1)]
    sets = refit_weight_sets(paths)  # refuses variants whose graphs differ
    assert sets[0] and all(not np.array_equal(sets[0][n], sets[1][n]) for n in sets[0])
    assert len(sets[0]) == 4  # one scale per resnet of the two blocks, none shared
    assert any(np.isclose(v, B1).any() for v in sets[0].values()) and any(np.isclose(v, B2).any() for v in sets[1].values())


def test_a_backbone_unit_must_be_a_decoder_block():
    unet = tiny_unet()
    for name in ("down_blocks.0", "up_blocks.0.resnets.0"):
        with pytest.raises(MaskoptError, match="a decoder block where diffusers applies FreeU"):
            MaskSet.ones(unet, [Unit(name, "backbone")])


def test_a_bfloat16_unet_is_scaled_as_freeu_scales_it():
    """FreeU multiplies by the Python float and rounds once; the units do the same (a bfloat16 scale would
    be 1.296875 for 1.3): equal to the last bit here."""
    unet = tiny_unet().to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) for k, v in unet_inputs(unet).items()}
    masks = freeu_masks(unet, [(B1, B2)])
    with enabled(unet, FreeU(B1, B2, 1, 1)):
        ref = run(unet, 100, kw)
    with apply(unet, masks):
        out = run(unet, 100, kw)
    assert not torch.equal(ref, run(unet, 100, kw)) and torch.equal(out, ref)
