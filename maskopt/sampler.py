"""The sampling regime a mask set was searched in, which `generate`, `export` and `eval` default to.

Masks are tuned for one sampler: a mask searched at 15 DDIM steps without guidance is not the same
mask at 30 steps with guidance 7.5. The mask file carries the regime (its `sampler` section), the
commands take their defaults from it, and a flag that departs from it gets one warning line.

    >>> searched = Sampler(scheduler="ddim", steps=15, guidance=1.0, size=(32, 32), dtype="float32",
    ...                    prediction_type="epsilon")
    >>> searched.departures(steps=30, guidance=1.0, scheduler="ddim")
    ['steps 30 (searched: 15)']
    >>> classifier_free(searched.guidance)      # guidance 1: no unconditional half in the U-Net batch
    False
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import MaskoptError

logger = logging.getLogger(__name__)

# what a departure warning compares: each changes what the masks see at each step
COMPARED = ("scheduler", "steps", "guidance", "size", "prediction_type")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Sampler:
    """None in a field: not recorded (a mask file made before files carried a sampler, or made in Python)."""

    scheduler: str | None = None  # maskopt's name (ddim, dpm++, ...) or a diffusers scheduler class name
    steps: int | None = None
    guidance: float | None = None
    size: tuple[int, int] | None = None  # (height, width) in pixels
    dtype: str | None = None  # float32, float16, bfloat16
    prediction_type: str | None = None  # the scheduler's: epsilon, v_prediction, sample

    def __post_init__(self) -> None:
        # every field checked, so a hand-edited mask file fails in one line when it loads, not mid-sampling
        for name in ("scheduler", "dtype", "prediction_type"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise MaskoptError(f"sampler {name} must be a name, got {value!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MaskoptError(f"sampler dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise MaskoptError(f"sampler steps must be a positive integer, got {self.steps!r}")
        if self.guidance is not None:
            if not _is_number(self.guidance) or not math.isfinite(self.guidance) or self.guidance < 0:
                raise MaskoptError(f"sampler guidance must be a number of 0 or more, got {self.guidance!r}")
            object.__setattr__(self, "guidance", float(self.guidance))
        if self.size is not None:
            size = self.size
            if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(x) and x >= 8 and x % 8 == 0
                                                                              for x in size):
                raise MaskoptError(f"sampler size must be [height, width], positive multiples of 8, got {size!r}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))

    def departures(self, **used: Any) -> list[str]:
        """'steps 30 (searched: 15)' for each setting of COMPARED that differs from the searched one."""
        out = []
        for name in COMPARED:
            searched, now = getattr(self, name), used.get(name)
            if name == "size" and now is not None:
                now = tuple(now)
            if searched is not None and now is not None and now != searched:
                out.append(f"{name} {_show(now)} (searched: {_show(searched)})")
        return out

    def filled(self, **given: Any) -> "Sampler":
        """What to sample with: each setting `given` that is not None, else this (the searched) sampler's, else
        FALLBACK's (steps and guidance; its other fields are None: the pipeline's own). The one place generate
        and eval pick their defaults.

        >>> Sampler(scheduler="ddim", steps=15, guidance=1.0).filled(steps=None, guidance=3.0)
        Sampler(scheduler='ddim', steps=15, guidance=3.0, size=None, dtype=None, prediction_type=None)
        >>> Sampler().filled(size=(64, 48))         # a mask file that records no sampler
        Sampler(scheduler=None, steps=30, guidance=7.5, size=(64, 48), dtype=None, prediction_type=None)
        """
        picked = replace(self, **{name: value for name, value in given.items() if value is not None})
        unset = {f.name: getattr(FALLBACK, f.name) for f in fields(self) if getattr(picked, f.name) is None}
        return replace(picked, **unset)

    def warn_departures(self, what: str, **used: Any) -> list[str]:
        """Log one warning line naming every departure; returns them."""
        found = self.departures(**used)
        if found:
            logger.warning("%s outside the regime the masks were searched in: %s", what, ", ".join(found))
        return found

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Sampler":
        """A mask file's `sampler` object; MaskoptError naming what is wrong with it."""
        if not isinstance(d, dict):
            raise MaskoptError(f"sampler must be an object of {', '.join(f.name for f in fields(cls))}, or null")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise MaskoptError(f"sampler has an unknown key {unknown[0]!r}")
        return cls(**d)

    @classmethod
    def from_search_config(cls, config: Any) -> "Sampler":
        """From the resolved search settings a mask file's provenance holds (`config`); missing keys stay None."""
        if not isinstance(config, dict):
            return cls()
        size = config.get("size")
        return cls(scheduler=config.get("scheduler"), steps=config.get("steps"), guidance=config.get("guidance"),
                   size=tuple(size) if size else None, dtype=config.get("dtype"),
                   prediction_type=config.get("prediction_type"))

    def describe(self) -> str:
        """'ddim, 15 steps, guidance 1, 32x32' (unrecorded fields left out)."""
        parts = [self.scheduler or "",
                 f"{self.steps} steps" if self.steps is not None else "",
                 f"guidance {_show(self.guidance)}" if self.guidance is not None else "",
                 "x".join(map(str, self.size)) if self.size else ""]
        return ", ".join(p for p in parts if p) or "not recorded"


def parse_size(text: str | list | tuple | None) -> tuple[int, int] | None:
    """An image size as (height, width) in pixels, from every place one is given: '512x768' or '512' (square) from
    a flag, [512, 768] from a recipe; checked (`check_size`).

        >>> parse_size("512x768"), parse_size("512"), parse_size([64, 32])
        ((512, 768), (512, 512), (64, 32))
    """
    if text is None:
        return None
    try:
        parts = [int(x) for x in (str(text).lower().split("x") if isinstance(text, str) else text)]
        if len(parts) not in (1, 2):
            raise ValueError
    except (ValueError, TypeError):
        raise MaskoptError(f"size {text!r} is not HxW, e.g. 512x512") from None
    return check_size((parts[0], parts[-1]))


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    # diffusers' Stable Diffusion pipelines (SD1.5, SD2.1, SDXL) refuse sizes that are not multiples of 8
    h, w = size
    if h < 8 or w < 8 or h % 8 or w % 8:
        raise MaskoptError(f"size {h}x{w}: height and width must be positive multiples of 8, e.g. 512x512")
    return size


def classifier_free(guidance: float, unet_config: Any = None) -> bool:
    """diffusers' rule for its SD pipelines: guidance above 1 runs the conditional and the unconditional half
    in one U-Net call (the batch doubled), unless the U-Net takes the guidance as an embedding (LCM-style,
    `time_cond_proj_dim`). The one place generate and export decide it."""
    return guidance > 1.0 and getattr(unet_config, "time_cond_proj_dim", None) is None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


# what generate and eval sample with where a mask file records no sampler: SD's usual steps and guidance
FALLBACK = Sampler(steps=30, guidance=7.5)
