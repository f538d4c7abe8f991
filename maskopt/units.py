"""Maskable units of a diffusers U-Net, and the presets that select them.

A unit is named by its module name in `unet.named_modules()` and has one of four kinds:

    weight    an nn.Linear / nn.Conv2d whose weight is multiplied by the value (bias kept): the paper's operation
    group     output channels [g*out/G, (g+1)*out/G) of such a layer's weight, multiplied by the value
    branch    the residual branch of a block, multiplied by the value (0 leaves only the skip path);
              baked as a scaling of the branch's last layer's weight *and* bias
    backbone  a decoder block (up_blocks.N): the first half of the backbone channels entering each of its
              resnets, multiplied by the value. That is FreeU's b factor (`enable_freeu(b1, b2, s1=1, s2=1)`),
              one value per block and bucket; the preset `freeu` holds FreeU's two blocks

The first three reduce to "scale these output rows of these parameters" (`Unit.scales()`). A backbone
unit scales no parameter: the resnets' GroupNorm sees its input's channels in groups that the scaled
half can cut through, so nothing folds into weights. It reduces to "scale these input channels of these
modules" (`Unit.inputs()`), an elementwise multiply in front of each resnet (a Mul in an exported graph).
masking.py deals with these two forms only.

    >>> from maskopt.models import load_unet
    >>> unet = load_unet("maskopt:default")
    >>> len(find_units(unet, "paper"))                     # 72 on SD1.5's U-Net, 288 on SDXL's
    32
    >>> find_units(unet, ["up_blocks.*.resnets.*"])[0].kind    # a whole residual branch
    'branch'
    >>> units = find_units(unet, ["up_blocks.*.resnets.*.conv1"], groups=4)   # 4 output-channel groups each
    >>> units[0].kind, units[0].key
    ('group', 'up_blocks.0.resnets.0.conv1#0/4')
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from .errors import MaskoptError

logger = logging.getLogger(__name__)

KINDS = ("weight", "group", "branch", "backbone")

# The decoder blocks whose forward calls diffusers' apply_freeu (unet_2d_blocks.py): where a backbone unit is FreeU.
FREEU_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
# The official MaskUNet code masks every nn.Linear under up_blocks except names containing these.
PAPER_EXCLUDE = ("time_emb_proj", "ff", "conv_shortcut", "proj_in", "proj_out")
ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str = "weight"
    group: int | None = None  # group index, for kind == "group"
    groups: int | None = None  # number of groups the layer's output channels are cut into

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MaskoptError(f"unit {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "group":
            if self.groups is None or self.group is None or not 0 <= self.group < self.groups:
                raise MaskoptError(f"unit {self.name!r}: group {self.group} of {self.groups} is not a valid group")
        elif self.group is not None or self.groups is not None:
            raise MaskoptError(f"unit {self.name!r}: only 'group' units take group/groups, this one is {self.kind!r}")

    @property
    def key(self) -> str:
        """Unique, human-readable id: `name`, or `name#g/G` for a group."""
        return f"{self.name}#{self.group}/{self.groups}" if self.kind == "group" else self.name

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind}
        if self.kind == "group":
            d.update(group=self.group, groups=self.groups)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Unit":
        return cls(name=d["name"], kind=d.get("kind", "weight"), group=d.get("group"), groups=d.get("groups"))

    def scales(self, unet: nn.Module) -> list[tuple[str, slice]]:
        """The (parameter name, output-row slice) pairs this unit's value multiplies (none for a backbone unit)."""
        module = _get(unet, self.name)
        if self.kind == "backbone":
            self.inputs(unet)  # checks that the block is one
            return []
        if self.kind == "weight":
            _require_layer(self.name, module)
            return [(f"{self.name}.weight", slice(None))]
        if self.kind == "group":
            _require_layer(self.name, module)
            out = module.weight.shape[0]
            if out % self.groups:
                raise MaskoptError(f"unit {self.key!r}: {out} output channels do not split into {self.groups} groups")
            size = out // self.groups
            return [(f"{self.name}.weight", slice(self.group * size, (self.group + 1) * size))]
        last = branch_last_layer(self.name, module)
        if last is None:
            raise MaskoptError(f"unit {self.name!r}: a {type(module).__name__} is not a branch maskopt can mask")
        prefix = f"{self.name}.{last}"
        names = [f"{prefix}.weight"]
        if _get(unet, prefix).bias is not None:
            names.append(f"{prefix}.bias")
        return [(n, slice(None)) for n in names]


    def inputs(self, unet: nn.Module) -> list[tuple[str, slice]]:
        """The (module name, input-channel slice) pairs this unit's value multiplies (only a backbone unit has any)."""
        return backbone_inputs(unet, self.name) if self.kind == "backbone" else []


def backbone_inputs(unet: nn.Module, name: str) -> list[tuple[str, slice]]:
    """Each resnet of decoder block `name` with the first half of its backbone channels, as FreeU scales them.

    A decoder resnet's input is cat([backbone, skip]); FreeU multiplies backbone[:, :C // 2] by b before the
    cat. The backbone is what enters the block (the mid block's or the previous decoder block's output) for
    the first resnet, the previous resnet's output for the others.
    """
    block = _get(unet, name)
    parts = name.split(".")
    if len(parts) != 2 or parts[0] != "up_blocks" or type(block).__name__ not in FREEU_BLOCKS:
        raise MaskoptError(f"unit {name!r}: a backbone unit is a decoder block where diffusers applies FreeU "
                           f"(up_blocks.N, a {' or '.join(FREEU_BLOCKS)}), not a {type(block).__name__}")
    j, resnets = int(parts[1]), block.resnets
    # what enters decoder block 0 is the bottleneck's output (block_out_channels[-1]), with or without a mid block
    channels = unet.config.block_out_channels[-1] if j == 0 else unet.up_blocks[j - 1].resnets[-1].out_channels
    found = []
    for i, resnet in enumerate(resnets):
        backbone = channels if i == 0 else resnets[i - 1].out_channels
        if not 0 < backbone < resnet.in_channels:
            raise MaskoptError(f"unit {name!r}: resnet {i} takes {resnet.in_channels} channels, not a backbone of "
                               f"{backbone} and skip features")
        found.append((f"{name}.resnets.{i}", slice(0, backbone // 2)))
    return found


def _get(unet: nn.Module, name: str) -> nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise MaskoptError(f"unit {name!r} does not exist in this U-Net") from None


def _require_layer(name: str, module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise MaskoptError(f"unit {name!r} is a {type(module).__name__}, not an nn.Linear or nn.Conv2d")


def branch_last_layer(name: str, module: nn.Module) -> str | None:
    """Relative name of the layer whose output *is* the branch's output, or None if `module` is not a branch.

    Scaling that layer's weight and bias scales the whole branch, because nothing between it and the
    residual add is non-linear (ResnetBlock2D: conv2 -> add; attention: to_out.0 -> dropout -> add;
    FeedForward: net.2 -> add; Transformer2DModel: proj_out -> add).
    """
    kind = type(module).__name__
    if kind == "ResnetBlock2D":
        return "conv2"
    if kind == "Transformer2DModel" and getattr(module, "is_input_continuous", False):  # has a residual
        return "proj_out"
    leaf = name.rsplit(".", 1)[-1]
    if kind == "Attention" and leaf in ("attn1", "attn2") and ".transformer_blocks." in f".{name}":
        return "to_out.0"
    if kind == "FeedForward" and leaf == "ff":
        return f"net.{max(i for i, layer in enumerate(module.net) if isinstance(layer, nn.Linear))}"
    return None


# ---------------------------------------------------------------------------------------------------
# presets


def _paper(unet: nn.Module) -> list[Unit]:
    return [
        Unit(n)
        for n, m in unet.named_modules()
        if n.startswith("up_blocks.") and isinstance(m, nn.Linear) and not any(x in n for x in PAPER_EXCLUDE)
    ]


def _attention(unet: nn.Module) -> list[Unit]:
    return [
        Unit(n)
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and ".attn" in n and n.endswith(ATTENTION_LINEARS)
    ]


def _resnets(unet: nn.Module) -> list[Unit]:
    return [Unit(n, "branch") for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]


def _branches(unet: nn.Module) -> list[Unit]:
    return [Unit(n, "branch") for n, m in unet.named_modules() if n and branch_last_layer(n, m) is not None]


def _freeu(unet: nn.Module) -> list[Unit]:
    # diffusers applies FreeU in the up blocks whose resolution_idx is 0 (b1) or 1 (b2)
    return [Unit(f"up_blocks.{j}", "backbone") for j, b in enumerate(getattr(unet, "up_blocks", []))
            if getattr(b, "resolution_idx", None) in (0, 1) and type(b).__name__ in FREEU_BLOCKS]


PRESETS = {"paper": _paper, "attention": _attention, "resnets": _resnets, "branches": _branches, "freeu": _freeu}


def _glob(unet: nn.Module, pattern: str) -> list[Unit]:
    units = []
    for n, m in unet.named_modules():
        if not n or not fnmatch.fnmatchcase(n, pattern):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            units.append(Unit(n))
        elif branch_last_layer(n, m) is not None:
            units.append(Unit(n, "branch"))
    if not units:
        raise MaskoptError(
            f"target {pattern!r} matches no unit (not a preset: {', '.join(PRESETS)}; as a glob it matched "
            "no nn.Linear, nn.Conv2d or residual branch)"
        )
    return units


def find_units(unet: nn.Module, targets: str | Sequence[str] = "paper", groups: int | None = None) -> list[Unit]:
    """Units selected by presets and/or name globs, in module order, each once.

    `groups=G` (G > 1) turns every weight unit into G group units (branches stay branches); 1 or None
    keeps whole layers.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise MaskoptError("no targets given: name a preset (" + ", ".join(PRESETS) + ") or a module-name glob")
    found: dict[Unit, None] = {}
    for t in targets:
        units = PRESETS[t](unet) if t in PRESETS else _glob(unet, t)
        if not units:
            raise MaskoptError(f"preset {t!r} selects no unit in this U-Net")
        for u in units:
            found[u] = None
    order = {n: i for i, (n, _) in enumerate(unet.named_modules())}
    units = sorted(found, key=lambda u: order[u.name])
    if groups and groups > 1:
        units = [g for u in units for g in _split(unet, u, groups)]
    return units


def _split(unet: nn.Module, unit: Unit, groups: int) -> Iterable[Unit]:
    if unit.kind != "weight":
        return [unit]
    out = _get(unet, unit.name).weight.shape[0]
    if out % groups:
        raise MaskoptError(f"unit {unit.name!r}: {out} output channels do not split into {groups} groups")
    return [Unit(unit.name, "group", g, groups) for g in range(groups)]


def masked_params(unet: nn.Module, units: Sequence[Unit]) -> int:
    """Number of weights the units scale (each parameter element counted once)."""
    params = dict(unet.named_parameters())
    rows: dict[str, set[int]] = {}
    for u in units:
        for pname, sl in u.scales(unet):
            rows.setdefault(pname, set()).update(range(*sl.indices(params[pname].shape[0])))
    return sum(params[p][0].numel() * len(r) if params[p].dim() > 1 else len(r) for p, r in rows.items())
