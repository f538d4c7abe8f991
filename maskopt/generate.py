"""`maskopt generate`: one image from a diffusers pipeline whose U-Net is the masked one.

    generate(GenerateConfig(prompt="a cat", out=Path("cat.png"), masks=Path("masks.json")))              # torch
    generate(GenerateConfig(prompt="a cat", out=Path("cat.png"), export_dir=Path("out"), backend="onnxruntime"))

Backends: `torch` runs the pipeline's own U-Net under `maskopt.apply` (weights switch per bucket);
`onnxruntime` and `tensorrt` replace `pipe.unet` with a `RoutedUNet` that runs the exported variant of
the current timestep's bucket (ONNX Runtime sessions, CUDA provider when present; or TensorRT engines).
With the same seed, torch and onnxruntime give the same image (fp32: PSNR well above 40 dB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from .buckets import Buckets, scalar_timestep
from .config import check_size
from .errors import MaskoptError
from .paths import check_writable, make_folder

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")

Runner = Callable[[int, dict[str, torch.Tensor]], torch.Tensor]  # (variant k, named inputs) -> out_sample


@dataclass(frozen=True)
class GenerateConfig:
    prompt: str
    out: Path
    masks: Path | None = None  # a mask file (torch backend)
    export_dir: Path | None = None  # a `maskopt export` folder (any backend; torch uses its masks.json)
    backend: str | None = None  # default: torch with --masks; with --export onnxruntime, or tensorrt if it has only engines
    model: str | None = None  # default: the export's/mask file's model, else the embedded default
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    size: tuple[int, int] | None = None  # (height, width) in pixels; default: the pipeline's
    device: str | None = None  # default: cuda for tensorrt (and torch when present), else cpu


class RoutedUNet:
    """Stands in for `pipe.unet`: each call runs the variant of its timestep's bucket.

    It has what diffusers' SD and SDXL pipelines read from a UNet2DConditionModel (`config`, `dtype`,
    `device`, SDXL's `add_embedding.linear_1.in_features`) and is called the same way. `history` lists
    the variant of every call, in order.
    """

    def __init__(self, unet: Any, buckets: Buckets, run: Runner, xl: bool, profile: Any = None) -> None:
        self.config = unet.config
        self.dtype, self.device = unet.dtype, unet.device
        if xl:  # the SDXL pipeline checks its time-id embedding width against this layer
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=unet.add_embedding.linear_1.in_features))
        self.buckets, self.run, self.xl, self.profile = buckets, run, xl, profile
        self.history: list[int] = []

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                 timestep_cond: Any = None, cross_attention_kwargs: Any = None,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None, return_dict: bool = True, **unused: Any):
        extra = {k: v for k, v in unused.items() if v is not None}
        if timestep_cond is not None or cross_attention_kwargs or extra:
            raise MaskoptError("exported variants take sample, timestep, text embeddings (and SDXL's conditioning) "
                               f"only; this pipeline also passes {', '.join(extra) or 'timestep_cond/cross_attention_kwargs'}")
        t = scalar_timestep(timestep)
        k = self.buckets.index(t)
        if self.profile is not None:
            self.profile.check(sample.shape[0], sample.shape[2], sample.shape[3], encoder_hidden_states.shape[1])
        feeds = {
            "sample": sample.float(),
            "timestep": torch.tensor([t], dtype=torch.float32, device=sample.device),
            "encoder_hidden_states": encoder_hidden_states.float(),
        }
        if self.xl:
            feeds.update(text_embeds=added_cond_kwargs["text_embeds"].float(), time_ids=added_cond_kwargs["time_ids"].float())
        out = self.run(k, feeds).to(device=sample.device, dtype=sample.dtype)
        self.history.append(k)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


class OrtVariants:
    """One ONNX Runtime session per variant (CUDA provider when present, else CPU)."""

    def __init__(self, manifest: Any, folder: Path) -> None:
        from .export import ort

        if not manifest.has("onnx"):
            raise MaskoptError(f"{folder} has no ONNX variants (it was exported with --trt only): use --backend tensorrt")
        self.sessions = [ort.session(Path(folder) / v.files["onnx"].path) for v in manifest.variants]
        logger.info("onnxruntime on %s", self.sessions[0].get_providers()[0])

    def __call__(self, k: int, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        arrays = {n: t.detach().cpu().contiguous().numpy() for n, t in feeds.items()}
        return torch.from_numpy(self.sessions[k].run(["out_sample"], arrays)[0])


class TrtVariants:
    """TensorRT engines, one per variant; or one refittable engine, refitted when the bucket changes."""

    def __init__(self, manifest: Any, folder: Path) -> None:
        from .export.trt import load_weights, run_engine

        if not manifest.has("plan"):
            raise MaskoptError(f"{folder} has no TensorRT engines: export with --trt, or use --backend onnxruntime")
        folder = Path(folder)
        if manifest.refit:
            infer = run_engine((folder / manifest.variants[0].files["plan"].path).read_bytes())
            self.infers = [infer] * len(manifest.variants)
            self.weights = [load_weights(folder / v.files["weights"].path) for v in manifest.variants]
        else:
            self.infers = [run_engine((folder / v.files["plan"].path).read_bytes()) for v in manifest.variants]
            self.weights = None
        self.loaded: int | None = None

    def __call__(self, k: int, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        from .export.trt import refit

        if self.weights is not None and self.loaded != k:
            refit(self.infers[k].runner.engine, self.weights[k])
            self.loaded = k
        out = self.infers[k]({n: t.contiguous() for n, t in feeds.items()})["out_sample"]
        return out.clone() if isinstance(out, torch.Tensor) else torch.from_numpy(out.copy())  # runners reuse buffers

    def close(self) -> None:
        for infer in {id(i): i for i in self.infers}.values():
            infer.runner.deactivate()


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
    return backend


def _has_onnx(folder: Path) -> bool:
    """Whether an export kept its ONNX variants (a glance at the manifest; it is checked in full later)."""
    from .export.manifest import Manifest

    try:
        return Manifest.load(folder, check_hashes=False).has("onnx")
    except MaskoptError:
        return True  # let the full load report what is wrong


def generate(config: GenerateConfig) -> Path:
    """Generate one image and save it to `config.out`."""
    out = Path(config.out)
    check_image_path(out)  # before the work, not after it
    image = generate_image(config)
    make_folder(out.parent, "--out")
    image.save(out)
    return out


def check_image_path(out: Path) -> None:
    """An image file name PIL can write (.png, .jpg, ...) in a folder that can be written."""
    from PIL import Image

    if out.is_dir():
        raise MaskoptError(f"--out {out} is a folder; give an image file name, e.g. {out / 'image.png'}")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise MaskoptError(f"--out {out}: give an image file name ending in .png (or .jpg, .webp)")
    check_writable(out, "--out")


def generate_image(config: GenerateConfig, on_pipe: Callable[[Any], None] | None = None) -> Any:
    """The PIL image; `on_pipe(pipe)` sees the pipeline before it runs (tests read `pipe.unet.history`)."""
    from .export import resolve_model
    from .export.manifest import Manifest
    from .masking import apply
    from .maskset import MaskSet, fingerprint
    from .models import check_device, load_pipeline

    # 1. Check inputs
    if config.steps < 1:
        raise MaskoptError(f"--steps must be at least 1, got {config.steps}")
    if config.size is not None:
        check_size(config.size)
    backend = resolve_backend(config)
    manifest = Manifest.load(config.export_dir) if config.export_dir is not None else None
    masks = None
    if backend == "torch":
        masks = MaskSet.load(config.masks if config.masks is not None else Path(config.export_dir) / "masks.json")
    # 2. Pipeline, checked against what the masks/variants were made for
    model = resolve_model(config.model, manifest.model if manifest else masks.source)
    device = config.device or ("cuda" if backend == "tensorrt" or (backend == "torch" and torch.cuda.is_available()) else "cpu")
    check_device(device)
    pipe = load_pipeline(model, device=device)
    made_for = manifest.masks["fingerprint"] if manifest else masks.fingerprint
    if made_for and fingerprint(pipe.unet) != made_for:
        what = f"export {config.export_dir}" if manifest else f"mask file {config.masks}"
        raise MaskoptError(f"{what} was made for another U-Net (fingerprint {made_for[:12]}), "
                           f"not {model or 'the embedded default'}'s ({fingerprint(pipe.unet)[:12]})")
    buckets = masks.buckets if masks is not None else manifest.buckets
    if int(pipe.scheduler.config.num_train_timesteps) != buckets.num_train_timesteps:
        raise MaskoptError(f"the buckets cover {buckets.num_train_timesteps} training timesteps, "
                           f"the pipeline's scheduler has {pipe.scheduler.config.num_train_timesteps}")
    height, width = config.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    # 3. Engines accept only their profile's shapes: refuse before any work
    cfg = config.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    if backend == "tensorrt":
        scale = pipe.vae_scale_factor
        try:
            manifest.profile.check(2 if cfg else 1, height // scale, width // scale)
        except MaskoptError as e:
            raise MaskoptError(f"--size {height}x{width} (guidance {config.guidance:g}): {e}") from None
    # 4. Denoise
    kwargs = dict(prompt=config.prompt, num_inference_steps=config.steps, guidance_scale=config.guidance,
                  height=height, width=width, generator=torch.Generator(device="cpu").manual_seed(config.seed))
    if backend == "torch":
        with apply(pipe.unet, masks):
            if on_pipe:
                on_pipe(pipe)
            return pipe(**kwargs).images[0]
    variants = OrtVariants(manifest, config.export_dir) if backend == "onnxruntime" else TrtVariants(manifest, config.export_dir)
    try:
        profile = manifest.profile if backend == "tensorrt" else None
        pipe.unet = RoutedUNet(pipe.unet, manifest.buckets, variants, manifest.signature.xl, profile)
        if on_pipe:
            on_pipe(pipe)
        return pipe(**kwargs).images[0]
    finally:
        if hasattr(variants, "close"):
            variants.close()
