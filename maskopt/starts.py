"""Starting points of a search (`--init`): FreeU's settings, or an earlier mask file, as values of the searched units.

    >>> from maskopt import Buckets, MaskSet, find_units
    >>> from maskopt.models import load_unet
    >>> unet = load_unet("maskopt:default")
    >>> template = MaskSet.ones(unet, find_units(unet, ["freeu", "paper"]), Buckets.uniform(2))
    >>> [v[:, :2].tolist() for v in points(["1.3,1.6"], template, unet)]    # b1 on up_blocks.0, b2 on up_blocks.1
    [[[1.3, 1.6], [1.3, 1.6]]]
    >>> len(points(["freeu"], template, unet))      # FreeU's backbone-only grid settings (s1 = s2 = 1)
    3

A search evaluates its starting points right after the baseline, journals them like any candidate and
tells them to the optimizer, so it starts where the best of them is: where the peer ends, or where an
earlier search stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from .errors import MaskoptError
from .freeu import GRID, FreeU
from .maskset import MaskSet

FREEU = "freeu"  # every setting of FreeU's grid that units can express


def parse(spec: str) -> FreeU | Path | str:
    """'freeu', a FreeU setting B1,B2 (or B1,B2,1,1), or a mask file; MaskoptError naming anything else."""
    if spec == FREEU:
        return spec
    if "," in spec and not Path(spec).expanduser().exists():
        parts = spec.split(",")
        setting = FreeU.parse(",".join(parts + ["1", "1"]) if len(parts) == 2 else spec)
        if (setting.s1, setting.s2) != (1, 1):
            raise MaskoptError(f"--init {spec}: FreeU's s1 and s2 filter the skip features by a Fourier transform, "
                               "which units cannot express; give B1,B2 (s1 = s2 = 1)")
        return setting
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MaskoptError(f"--init {spec}: not 'freeu', a FreeU setting B1,B2, nor a mask file that exists")
    return path


def points(specs: Sequence[str], template: MaskSet, unet: nn.Module) -> list[np.ndarray]:
    """The (buckets, units) values of each starting point, over `template`'s units and buckets."""
    found: list[np.ndarray] = []
    for spec in specs:
        what = parse(spec)
        if isinstance(what, Path):
            found.append(_from_file(what, template, unet))
        else:
            settings = [g for g in GRID if (g.s1, g.s2) == (1, 1)] if what == FREEU else [what]
            found += [freeu_values(s, template, unet, spec) for s in settings]
    return found


def freeu_values(setting: FreeU, template: MaskSet, unet: nn.Module, spec: str | None = None) -> np.ndarray:
    """The candidate that is `enable_freeu(b1, b2, 1, 1)`: b1 and b2 on the backbone units, every other unit at 1."""
    values = np.ones(template.values.shape)
    b = {0: setting.b1, 1: setting.b2}  # by the block's resolution_idx, as diffusers applies them
    hit = False
    for j, unit in enumerate(template.units):
        if unit.kind == "backbone":
            idx = getattr(unet.get_submodule(unit.name), "resolution_idx", None)
            if idx in b:
                values[:, j], hit = b[idx], True
    if not hit:
        raise MaskoptError(f"--init {spec or setting}: the searched units hold none of FreeU's backbone units; "
                           "add the preset to the targets (--targets freeu)")
    return values


def _from_file(path: Path, template: MaskSet, unet: nn.Module) -> np.ndarray:
    masks = MaskSet.load(path, unet=unet)
    if masks.buckets != template.buckets:
        raise MaskoptError(f"--init {path}: its buckets {masks.buckets.to_list()} are not the search's "
                           f"{template.buckets.to_list()}")
    column = {u.key: j for j, u in enumerate(template.units)}
    unknown = [u.key for u in masks.units if u.key not in column]
    if unknown:
        raise MaskoptError(f"--init {path}: {len(unknown)} of its units are not searched here, e.g. {unknown[0]!r}")
    values = np.ones(template.values.shape)
    for j, unit in enumerate(masks.units):
        values[:, column[unit.key]] = masks.values[:, j]
    return values
