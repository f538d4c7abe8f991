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

# Names resolve on first use (PEP 562), so `import maskopt` (and the `maskopt` command's --help) does not import
# torch; `from maskopt import MaskSet` imports what it names.
_EXPORTS = {
    "Buckets": "buckets", "MaskoptError": "errors", "apply": "masking", "bake": "masking", "MaskSet": "maskset",
    "fingerprint": "maskset", "PRESETS": "units", "Unit": "units", "find_units": "units", "masked_params": "units",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maskopt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # once
    return value
