"""`maskopt generate`: one image from a diffusers pipeline whose U-Net is the masked one.

    >>> from pathlib import Path
    >>> from maskopt import Buckets, MaskSet, find_units
    >>> from maskopt.models import load_unet
    >>> unet = load_unet("maskopt:default")
    >>> _ = MaskSet.ones(unet, find_units(unet, "paper"), Buckets.uniform(4), source="maskopt:default").save("masks.json")
    >>> done = generate(GenerateConfig(prompt="a handwritten 7", out=Path("7.png"), masks=Path("masks.json"), steps=15))
    >>> done.path.name, done.backend, done.sampler.steps
    ('7.png', 'torch', 15)

With `export_dir=Path("export")` (a folder made by `maskopt export`) the exported variants run instead.
The sampler defaults to the one the masks were searched with (the mask file's `sampler`); a setting
that departs from it gets one warning line.

Backends: `torch` runs the pipeline's own U-Net under `maskopt.apply` (weights switch per bucket);
`onnxruntime` and `tensorrt` replace `pipe.unet` with a `RoutedUNet` (`maskopt.export.runtime`) that runs
the exported variant of the current timestep's bucket (ONNX Runtime sessions, CUDA provider when present;
or TensorRT engines).
With the same seed, torch and onnxruntime give the same image (fp32: PSNR well above 40 dB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import MaskoptError
from .paths import check_writable, make_folder
from .sampler import COMPARED, Sampler, check_size, classifier_free

BACKENDS = ("torch", "onnxruntime", "tensorrt", "triton")


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str
    out: Path
    masks: Path | None = None  # a mask file (torch backend)
    export_dir: Path | None = None  # a `maskopt export` folder (any backend; torch uses its masks.json)
    backend: str | None = None  # default: torch with --masks; with --export onnxruntime, or tensorrt if it has only engines
    model: str | None = None  # default: the export's/mask file's model, else the embedded default
    seed: int = 0
    steps: int | None = None  # default: as searched (the mask file's sampler), else FALLBACK's
    guidance: float | None = None  # default: as searched, else FALLBACK's
    scheduler: str | None = None  # default: as searched, else the pipeline's own
    size: tuple[int, int] | None = None  # (height, width) in pixels; default: as searched, else the pipeline's
    device: str | None = None  # default: cuda for tensorrt (and torch when present), else cpu
    url: str | None = None  # triton backend: the server serving the export's triton/ folder (HOST:PORT, grpc://...)




@dataclass
class Generated:
    image: Any  # PIL image
    backend: str
    sampler: Sampler  # what ran
    searched: Sampler  # what the masks were searched with (fields None: not recorded)
    departures: list[str]  # the settings that differ from the searched ones, as warned
    path: Path | None = None  # where `generate` saved the image

    def describe(self) -> str:
        """'torch backend, ddim, 15 steps, guidance 1, 32x32 as searched' (or what departs, or that none is recorded)."""
        how = (f"departs from the search: {', '.join(self.departures)}" if self.departures else
               "as searched" if self.searched.steps is not None else "the mask file records no sampler")
        return f"{self.backend} backend, {self.sampler.describe()}; {how}"


def resolve_backend(config: GenerateConfig) -> str:
    if (config.masks is None) == (config.export_dir is None):
        raise MaskoptError("give either --masks FILE or --export DIR")
    backend = config.backend
    if backend is None:
        backend = "torch" if config.masks is not None else "onnxruntime" if _has_onnx(config.export_dir) else "tensorrt"
    if backend not in BACKENDS:
        raise MaskoptError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "torch" and config.export_dir is None:
        raise MaskoptError(f"the {backend} backend runs exported variants: give --export DIR (made by maskopt export)")
    if backend == "onnxruntime":
        from .export.ort import require_onnxruntime

        require_onnxruntime()
    if backend == "tensorrt":
        from .export.trt import require_tensorrt

        require_tensorrt()
    if (backend == "triton") != (config.url is not None):
        raise MaskoptError("the triton backend needs --url HOST:PORT of the server" if backend == "triton"
                           else f"--url is for the triton backend, not {backend}")
    if backend == "triton":
        from .export.triton_client import _client_module, parse_url

        _client_module(parse_url(config.url)[0])
    return backend


def _has_onnx(folder: Path) -> bool:
    """Whether an export kept its ONNX variants (a glance at the manifest; it is checked in full later)."""
    from .export.manifest import Manifest

    try:
        return Manifest.load(folder, check_hashes=False).has("onnx")
    except MaskoptError:
        return True  # let the full load report what is wrong


def generate(config: GenerateConfig) -> Generated:
    """Generate one image and save it to `config.out`."""
    out = Path(config.out)
    check_image_path(out)  # before the work, not after it
    done = generate_image(config)
    make_folder(out.parent, "--out")
    done.image.save(out)
    done.path = out
    return done


def check_image_path(out: Path) -> None:
    """An image file name PIL can write (.png, .jpg, ...) in a folder that can be written."""
    from PIL import Image

    if out.is_dir():
        raise MaskoptError(f"--out {out} is a folder; give an image file name, e.g. {out / 'image.png'}")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise MaskoptError(f"--out {out}: give an image file name ending in .png (or .jpg, .webp)")
    check_writable(out, "--out")


def generate_image(config: GenerateConfig, on_pipe: Callable[[Any], None] | None = None) -> Generated:
    """The image and how it was made; `on_pipe(pipe)` sees the pipeline before it runs (tests read `pipe.unet.history`)."""
    from .export.manifest import Manifest
    from .export.runtime import OrtVariants, RoutedUNet, TrtVariants
    from .masking import apply
    from .maskset import MaskSet, fingerprint
    from .models import check_device, check_scheduler, load_pipeline, model_for, scheduler_name

    # 1. Check inputs
    if config.steps is not None and config.steps < 1:
        raise MaskoptError(f"--steps must be at least 1, got {config.steps}")
    if config.size is not None:
        check_size(config.size)
    if config.scheduler is not None:
        check_scheduler(config.scheduler)
    backend = resolve_backend(config)
    manifest = Manifest.load(config.export_dir) if config.export_dir is not None else None
    masks = MaskSet.load(config.masks if config.masks is not None else Path(config.export_dir) / "masks.json")
    # 2. The sampler: as searched unless a flag says otherwise
    sampler = masks.sampler.filled(scheduler=config.scheduler, steps=config.steps, guidance=config.guidance,
                                   size=config.size)
    if config.scheduler is None and sampler.scheduler is not None:
        try:  # a scheduler named by the mask file, not by a flag
            check_scheduler(sampler.scheduler)
        except MaskoptError as e:
            raise MaskoptError(f"mask file {config.masks or Path(config.export_dir) / 'masks.json'}: {e}") from None
    # 3. Pipeline, checked against what the masks/variants were made for
    model = model_for(config.model, manifest.model if manifest else masks.source)
    device = config.device or ("cuda" if backend == "tensorrt" or (backend == "torch" and torch.cuda.is_available()) else "cpu")
    check_device(device)
    pipe = load_pipeline(model, device=device, scheduler=sampler.scheduler)
    made_for = manifest.masks["fingerprint"] if manifest else masks.fingerprint
    if made_for and fingerprint(pipe.unet) != made_for:
        what = f"export {config.export_dir}" if manifest else f"mask file {config.masks}"
        raise MaskoptError(f"{what} was made for another U-Net (fingerprint {made_for[:12]}), "
                           f"not {model}'s ({fingerprint(pipe.unet)[:12]})")
    buckets = masks.buckets if manifest is None else manifest.buckets
    if int(pipe.scheduler.config.num_train_timesteps) != buckets.num_train_timesteps:
        raise MaskoptError(f"the buckets cover {buckets.num_train_timesteps} training timesteps, "
                           f"the pipeline's scheduler has {pipe.scheduler.config.num_train_timesteps}")
    # what will run, named as a search names it (a scheduler given by its class name is the same sampler)
    height, width = sampler.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    sampler = Sampler(scheduler=scheduler_name(pipe.scheduler), steps=sampler.steps, guidance=sampler.guidance,
                      size=(height, width), dtype=str(pipe.unet.dtype).removeprefix("torch."),
                      prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")))
    departures = masks.sampler.warn_departures("generate samples", **{k: getattr(sampler, k) for k in COMPARED})
    done = lambda image: Generated(image, backend, sampler, masks.sampler, departures)
    # 4. Engines accept only their profile's shapes: refuse before any work
    guided = classifier_free(sampler.guidance, pipe.unet.config)
    if backend == "tensorrt":
        scale = pipe.vae_scale_factor
        try:
            manifest.profile.check(2 if guided else 1, height // scale, width // scale)
        except MaskoptError as e:
            raise MaskoptError(f"--size {height}x{width} (guidance {sampler.guidance:g}): {e}") from None
    # 5. Denoise
    kwargs = dict(prompt=config.prompt, num_inference_steps=sampler.steps, guidance_scale=sampler.guidance,
                  height=height, width=width, generator=torch.Generator(device="cpu").manual_seed(config.seed))
    if backend == "torch":
        with apply(pipe.unet, masks):
            if on_pipe:
                on_pipe(pipe)
            return done(pipe(**kwargs).images[0])
    if backend == "triton":
        from .export.triton_client import TritonVariants

        variants: Any = TritonVariants(config.url, manifest.buckets.to_list())
    elif backend == "onnxruntime":
        variants = OrtVariants(manifest, config.export_dir)
    else:
        variants = TrtVariants(manifest, config.export_dir)
    try:
        profile = manifest.profile if backend == "tensorrt" else None
        pipe.unet = RoutedUNet(pipe.unet, manifest.buckets, variants, manifest.signature.xl, profile)
        if on_pipe:
            on_pipe(pipe)
        return done(pipe(**kwargs).images[0])
    finally:
        if hasattr(variants, "close"):
            variants.close()
