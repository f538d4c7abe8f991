"""The sampling regime a mask set was searched in, which `generate`, `export` and `eval` default to.

Masks are tuned for one sampler: a mask searched at 15 DDIM steps without guidance is not the same
mask at 30 steps with guidance 7.5. The mask file carries the regime (its `sampler` section), the
commands take their defaults from it, and a flag that departs from it gets one warning line.

    >>> searched = Sampler(scheduler="ddim", steps=15, guidance=1.0, size=(32, 32), dtype="float32",
    ...                    prediction_type="epsilon")
    >>> searched.departures(steps=30, guidance=1.0, scheduler="ddim")
    ['steps 30 (searched: 15)']
    >>> searched.classifier_free
    False
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import MaskoptError

logger = logging.getLogger(__name__)

# what a departure warning compares: steps, guidance and the sampler change what the masks see at each step
COMPARED = ("scheduler", "steps", "guidance")


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
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(x) for x in self.size))
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise MaskoptError(f"sampler steps must be a positive integer, got {self.steps!r}")
        if self.guidance is not None:
            object.__setattr__(self, "guidance", float(self.guidance))

    @property
    def classifier_free(self) -> bool | None:
        """Whether the pipeline runs classifier-free guidance (a U-Net batch of two halves); None: unknown."""
        return None if self.guidance is None else self.guidance > 1.0

    def departures(self, **used: Any) -> list[str]:
        """'steps 30 (searched: 15)' for each of scheduler, steps and guidance that differs from the searched one."""
        out = []
        for name in COMPARED:
            searched, now = getattr(self, name), used.get(name)
            if searched is not None and now is not None and now != searched:
                out.append(f"{name} {_show(now)} (searched: {_show(searched)})")
        return out

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
    def from_dict(cls, d: Any, where: str = "sampler") -> "Sampler":
        if not isinstance(d, dict):
            raise MaskoptError(f"{where}: expected an object of {', '.join(f.name for f in fields(cls))}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise MaskoptError(f"{where}: unknown key {unknown[0]!r}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise MaskoptError(f"{where}: {e}") from None

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


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
