"""apply/bake semantics against hand-made references on tiny SD- and SDXL-shaped U-Nets."""

import pytest
import torch
from diffusers import DDIMScheduler

import maskopt
from maskopt import Buckets, MaskoptError, MaskSet, Unit, apply, bake, find_units
from tiny import TINY_XL, tiny_unet, unet_inputs

ATTN1 = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def run(unet, t, **kw):
    with torch.no_grad():
        return unet(timestep=t, **(kw or unet_inputs(unet))).sample


def state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def masks_with(unet, units, values, k=None):
    k = k or len(values)
    return MaskSet.ones(unet, units, Buckets.uniform(k)).with_values(values)


def test_all_ones_is_bit_identical(unet):
    masks = MaskSet.ones(unet, find_units(unet, ["paper", "branches"]), buckets=3)
    ref = run(unet, 500)
    with apply(unet, masks):
        assert torch.equal(run(unet, 500), ref)
    assert torch.equal(run(bake(unet, masks, 1), 500), ref)


def test_zero_one_unit_equals_zeroing_weight_by_hand(unet):
    name = f"{ATTN1}.to_v"
    masks = masks_with(unet, [Unit(name)], [[0.0]])
    with apply(unet, masks):
        got = run(unet, 10)
    by_hand = tiny_unet()
    with torch.no_grad():
        by_hand.get_submodule(name).weight.zero_()  # bias kept
    assert torch.equal(got, run(by_hand, 10))


def test_group_semantics(unet):
    name = f"{ATTN1}.to_out.0"
    units = find_units(unet, name, groups=4)
    masks = masks_with(unet, units, [[1.0, 0.0, 0.5, 2.0]])
    with apply(unet, masks):
        got = run(unet, 10)
    by_hand = tiny_unet()
    with torch.no_grad():
        w = by_hand.get_submodule(name).weight  # (out, in): rows are output channels
        q = w.shape[0] // 4
        w[q : 2 * q] *= 0.0
        w[2 * q : 3 * q] *= 0.5
        w[3 * q :] *= 2.0
    assert torch.allclose(got, run(by_hand, 10), atol=1e-6)


def _scale_branch_output(module, value, residual_input=False):
    """Reference: scale what the branch adds, with a forward hook (no weight folding involved)."""
    def hook(mod, args, kwargs, out):
        if residual_input:  # Transformer2DModel / ResnetBlock2D return residual + branch
            x = args[0] if args else kwargs["hidden_states"]
            o = out[0] if isinstance(out, tuple) else out.sample if hasattr(out, "sample") else out
            skip = x
            if type(mod).__name__ == "ResnetBlock2D":
                skip = (mod.conv_shortcut(x) if mod.conv_shortcut is not None else x) / mod.output_scale_factor
            new = skip + value * (o - skip)
            return (new,) if isinstance(out, tuple) else type(out)(sample=new) if hasattr(out, "sample") else new
        return out * value
    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("branch, residual", [
    (ATTN1, False),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", False),
    ("up_blocks.1.attentions.0.transformer_blocks.0.ff", False),
    ("up_blocks.1.attentions.1", True),
    ("up_blocks.1.resnets.0", True),  # has a conv_shortcut
    ("mid_block.resnets.1", True),
])
@pytest.mark.parametrize("value", [0.0, 0.7])
def test_branch_semantics(unet, branch, residual, value):
    masks = masks_with(unet, [Unit(branch, "branch")], [[value]])
    with apply(unet, masks):
        got = run(unet, 10)
    ref_unet = tiny_unet()
    handle = _scale_branch_output(ref_unet.get_submodule(branch), value, residual)
    ref = run(ref_unet, 10)
    handle.remove()
    assert not torch.allclose(ref, run(ref_unet, 10), atol=1e-4)  # the branch matters
    assert torch.allclose(got, ref, atol=2e-5), (got - ref).abs().max()


def test_bucket_selection_at_edges(unet):
    units = find_units(unet, "paper")
    values = torch.rand(4, len(units), generator=torch.Generator().manual_seed(0)).numpy()
    masks = masks_with(unet, units, values)
    variants = [bake(unet, masks, k) for k in range(4)]
    inputs = unet_inputs(unet)
    with apply(unet, masks):
        for t, k in [(0, 0), (249, 0), (249.5, 0), (250, 1), (499, 1), (500, 2), (749, 2), (750, 3), (999, 3)]:
            got = run(unet, torch.tensor(t), **inputs)
            assert torch.equal(got, run(variants[k], torch.tensor(t), **inputs)), (t, k)  # bit for bit
            assert not torch.equal(got, run(variants[(k + 1) % 4], torch.tensor(t), **inputs))


def test_mixed_timesteps_rejected(unet):
    masks = MaskSet.ones(unet, find_units(unet, "paper"), buckets=2)
    with apply(unet, masks), pytest.raises(MaskoptError, match="mixes timesteps"):
        run(unet, torch.tensor([10, 900]))


def test_restore_after_exit_and_exception(unet):
    before = state(unet)
    units = find_units(unet, ["paper", "resnets"], groups=None)
    masks = masks_with(unet, units, torch.rand(3, len(units)).numpy() * 2)
    with apply(unet, masks):
        run(unet, 900)
        assert not same_state(before, state(unet))
    assert same_state(before, state(unet))
    with pytest.raises(RuntimeError, match="boom"):
        with apply(unet, masks):
            run(unet, 100)
            raise RuntimeError("boom")
    assert same_state(before, state(unet))
    assert not unet._forward_pre_hooks


def test_weights_switch_only_on_bucket_change(unet):
    masks = masks_with(unet, find_units(unet, "paper"), [[0.5] * 16, [0.0] * 16, [1.5] * 16, [1.0] * 16])
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)
    inputs = unet_inputs(unet)
    with apply(unet, masks) as state_:
        for t in sched.timesteps:  # high to low: visits buckets 3, 2, 1, 0
            run(unet, t, **inputs)
    assert state_.loads == 4  # one load per bucket: K-1 switches after the first


def test_bake_refuses_inside_apply_and_other_unet(unet):
    masks = MaskSet.ones(unet, find_units(unet, "paper"), buckets=2)
    with apply(unet, masks), pytest.raises(MaskoptError, match="while masks are applied"):
        bake(unet, masks, 0)
    other = tiny_unet(TINY_XL)
    with pytest.raises(MaskoptError, match="fingerprint"):
        bake(other, masks, 0)


@pytest.mark.parametrize("config", ["sd", "xl"])
def test_drop_equals_bake_and_removes_modules(config):
    unet = tiny_unet() if config == "sd" else tiny_unet(TINY_XL)
    units = find_units(unet, ["paper", "branches"])
    # remove every other unit, scale a few
    values = [[0.0 if i % 2 else 0.8 for i in range(len(units))]]
    masks = masks_with(unet, units, values)
    baked, dropped = bake(unet, masks, 0), bake(unet, masks, 0, drop=True)
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    assert n_params(dropped) < n_params(baked)
    names = {type(m).__name__ for m in dropped.modules()}
    assert {"LinearBias", "ZeroBranch"} <= names
    inputs = unet_inputs(unet)
    assert torch.allclose(run(dropped, 10, **inputs), run(baked, 10, **inputs), atol=1e-5)


def test_drop_whole_blocks(unet):
    units = find_units(unet, ["resnets", "up_blocks.1.attentions.*", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"])
    masks = masks_with(unet, units, [[0.0] * len(units)])
    baked, dropped = bake(unet, masks, 0), bake(unet, masks, 0, drop=True)
    names = [type(m).__name__ for m in dropped.modules()]
    assert "ResnetSkip" in names and "IdentityTransformer" in names and "ResnetBlock2D" not in names
    inputs = unet_inputs(unet)
    assert torch.allclose(run(dropped, 10, **inputs), run(baked, 10, **inputs), atol=1e-5)


def test_bias_stand_ins_stay_on_the_layers_device():
    # A bias-free layer's stand-in must make its zeros on the layer's device: zeros made on the CPU fail a
    # dropped U-Net on CUDA in attention. The meta device stands in for a second device here.
    from maskopt.drop import Conv2dBias, LinearBias

    linear = LinearBias(torch.nn.Linear(4, 3, bias=False, device="meta", dtype=torch.float16))
    conv = Conv2dBias(torch.nn.Conv2d(4, 3, 3, bias=False, device="meta"))
    assert linear.bias.device.type == conv.bias.device.type == "meta" and linear.bias.dtype == torch.float16
