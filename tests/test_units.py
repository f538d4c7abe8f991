import pytest
import torch

import maskopt
from maskopt import MaskoptError, Unit, find_units, masked_params
from tiny import SD15, SDXL, TINY_SD, meta_unet


def test_paper_preset_on_sd15_config():
    unet = meta_unet(SD15)
    units = find_units(unet, "paper")
    assert len(units) == 72
    assert masked_params(unet, units) == 49_029_120  # the paper's 49.03M
    assert {u.name.rsplit(".", 1)[-1] for u in units} == {"to_q", "to_k", "to_v", "0"}
    assert all(u.name.startswith("up_blocks.") and u.kind == "weight" for u in units)


def test_paper_preset_on_sdxl_config():
    unet = meta_unet(SDXL)
    units = find_units(unet, "paper")
    assert len(units) == 288
    assert round(masked_params(unet, units) / 1e6, 2) == 482.67


def test_presets_and_kinds(unet):
    assert all(u.kind == "branch" for u in find_units(unet, "resnets"))
    assert len(find_units(unet, "resnets")) == sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    branches = {u.name.rsplit(".", 1)[-1] for u in find_units(unet, "branches")}
    assert {"attn1", "attn2", "ff"} <= branches
    attention = find_units(unet, "attention")
    assert len(attention) == 4 * sum(type(m).__name__ == "Attention" for m in unet.modules())


def test_globs_groups_and_order(unet):
    units = find_units(unet, ["up_blocks.*.attn2.to_k", "up_blocks.*.resnets.0"])
    order = [n for n, _ in unet.named_modules()]
    assert [u.name for u in units] == sorted((u.name for u in units), key=order.index)  # module order
    assert [u.kind for u in units] == ["branch", "weight", "weight", "branch"]
    groups = find_units(unet, "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", groups=4)
    assert [(u.kind, u.group, u.groups) for u in groups] == [("group", g, 4) for g in range(4)]
    assert groups[1].key.endswith("#1/4")
    # duplicates across targets are kept once
    assert len(find_units(unet, ["paper", "paper"])) == len(find_units(unet, "paper"))


def test_bad_targets(unet):
    with pytest.raises(MaskoptError, match="matches no unit"):
        find_units(unet, "no_such_block.*")
    with pytest.raises(MaskoptError, match="do not split into 3 groups"):
        find_units(unet, "paper", groups=3)
    with pytest.raises(MaskoptError, match="does not exist"):
        Unit("up_blocks.9.nothing").scales(unet)
    with pytest.raises(MaskoptError, match="not an nn.Linear"):
        Unit("up_blocks.1.resnets.0").scales(unet)
    with pytest.raises(MaskoptError, match="kind"):
        Unit("x", "slice")
