"""maskopt: training-free, timestep-specialised masks for diffusion U-Nets.

    >>> import maskopt
    >>> from maskopt.models import load_pipeline
    >>> pipe = load_pipeline("maskopt:default")          # or any diffusers pipeline with a U-Net
    >>> units = maskopt.find_units(pipe.unet, "paper")
    >>> masks = maskopt.MaskSet.ones(pipe.unet, units, buckets=maskopt.Buckets.uniform(4))
    >>> with maskopt.apply(pipe.unet, masks):
    ...     image = pipe("a handwritten 7", num_inference_steps=4).images[0]
    >>> variant = maskopt.bake(pipe.unet, masks, bucket=0, drop=True)
"""

__version__ = "0.1.0"

from .buckets import Buckets  # noqa: E402
from .errors import MaskoptError  # noqa: E402
from .masking import apply, bake  # noqa: E402
from .maskset import MaskSet, fingerprint  # noqa: E402
from .units import PRESETS, Unit, find_units, masked_params  # noqa: E402

__all__ = [
    "Buckets", "MaskSet", "MaskoptError", "PRESETS", "Unit",
    "apply", "bake", "find_units", "fingerprint", "masked_params", "__version__",
]
