"""FreeU, the training-free booster maskopt is judged against: its settings, a grid of them, and switching it on.

    >>> from maskopt.models import load_pipeline
    >>> pipe = load_pipeline("maskopt:default")
    >>> setting = FreeU.parse("1.3,1.6,1,1")                  # b1, b2, s1, s2
    >>> with enabled(pipe.unet, setting):
    ...     _ = pipe("a handwritten 7", num_inference_steps=4)
    >>> str(setting), str(recommended(pipe.unet))
    ('b1=1.3 b2=1.6 s1=1 s2=1', 'b1=1.5 b2=1.6 s1=0.9 s2=0.2')

diffusers' `enable_freeu(s1, s2, b1, b2)` scales half of the backbone channels entering the decoder's
first two resolutions by b1 and b2, and the low frequencies of the skip features by s1 and s2 (a
Fourier filter). A fair comparison picks FreeU's best setting the way masks are picked: on the search
prompts and seeds, never on the images it is judged on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import MaskoptError


@dataclass(frozen=True)
class FreeU:
    b1: float  # backbone scale, first decoder resolution
    b2: float  # backbone scale, second
    s1: float  # skip low-frequency scale, first (1: no Fourier filter)
    s2: float  # the same, second

    def __str__(self) -> str:
        return f"b1={self.b1:g} b2={self.b2:g} s1={self.s1:g} s2={self.s2:g}"

    @classmethod
    def parse(cls, text: str) -> "FreeU":
        """'B1,B2,S1,S2', e.g. '1.3,1.6,1,1'."""
        try:
            values = [float(x) for x in str(text).split(",")]
        except ValueError:
            values = []
        if len(values) != 4 or not all(v > 0 for v in values):
            raise MaskoptError(f"FreeU setting {text!r}: expected four positive numbers B1,B2,S1,S2, e.g. 1.3,1.6,1,1")
        return cls(*values)

    def to_dict(self) -> dict[str, float]:
        return {"b1": self.b1, "b2": self.b2, "s1": self.s1, "s2": self.s2}


# diffusers' documented settings (docs "Image quality: FreeU"): SD1.5's; SD2.1's; SDXL's (from a W&B sweep)
SD15, SD21, SDXL = FreeU(1.5, 1.6, 0.9, 0.2), FreeU(1.4, 1.6, 0.9, 0.2), FreeU(1.1, 1.2, 0.6, 0.4)
# A small grid: the documented settings, milder ones, and backbone-only scalings (s = 1: no Fourier filter).
GRID = (SD15, FreeU(1.2, 1.4, 0.9, 0.2), FreeU(1.1, 1.2, 1.0, 1.0), SDXL, FreeU(1.2, 1.4, 1.0, 1.0),
        FreeU(1.3, 1.6, 1.0, 1.0))


def recommended(unet: Any) -> FreeU:
    """diffusers' documented setting for the U-Net's family: SDXL (added text-time conditioning), SD2.x
    (1024-wide text embeddings), else SD1.x's."""
    if unet.config.addition_embed_type == "text_time":
        return SDXL
    return SD21 if unet.config.cross_attention_dim == 1024 else SD15


@contextmanager
def enabled(unet: Any, setting: FreeU | None) -> Iterator[None]:
    """FreeU on `unet` for the block (None: nothing); always switched off after."""
    if setting is None:
        yield
        return
    unet.enable_freeu(s1=setting.s1, s2=setting.s2, b1=setting.b1, b2=setting.b2)
    try:
        yield
    finally:
        unet.disable_freeu()
