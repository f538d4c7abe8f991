"""Loading pipelines and U-Nets the way users name them: a hub id, a local folder, or `maskopt:default`.

    >>> from maskopt.models import EMBEDDED, load_pipeline
    >>> pipe = load_pipeline(EMBEDDED)               # the digits pipeline that ships inside maskopt
    >>> type(pipe).__name__, scheduler_name(pipe.scheduler)
    ('StableDiffusionPipeline', 'ddim')

`load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype="float16", scheduler="dpm++")` loads
from the hub (or its local cache), `load_pipeline("./my-sd-folder")` from a folder saved with
`save_pretrained`. `maskopt:default` is a source like any other: this module is the one place that
knows where it lives.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import MaskoptError, first_line
from .sources import EMBEDDED, local_or_hub

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# name -> diffusers scheduler class name (+ config overrides). Kept as data: diffusers owns the samplers.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}



def embedded_dir() -> Path:
    from .default import PIPELINE_DIR

    return PIPELINE_DIR


def location(model: str) -> Path | str:
    """What `from_pretrained` is given for `model`: a local folder (the embedded default's too) or a hub id."""
    if model == EMBEDDED:
        return embedded_dir()
    return local_or_hub(model, "model")


def model_for(model: str | None, source: str | None) -> str:
    """The pipeline to load for a mask file or export: `model` if given, else the mask file's source.

    A source naming a pipeline's `unet` subfolder resolves to the pipeline; a folder of a Hugging Face
    cache that is not on this machine, to its hub id; a source that is neither a folder here nor a hub
    id (a U-Net built in Python has only its class name) falls back to the embedded default, with a warning.
    """
    if model:
        return model
    if not source or source == EMBEDDED:
        return EMBEDDED
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() and (path.parent / "model_index.json").is_file():
            return str(path.parent)
        return str(path)
    if hub_id_of(source):
        return hub_id_of(source)
    try:
        return str(local_or_hub(source, "source"))
    except MaskoptError:
        logger.warning("mask file source %r is not a folder here nor a hub id; using the embedded default", source)
        return EMBEDDED


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and a CUDA device only where torch sees one."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise MaskoptError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from None
    if kind not in ("cpu", "cuda"):
        raise MaskoptError(f"--device {device}: maskopt runs on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MaskoptError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__})")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MaskoptError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------
# samplers


def check_scheduler(name: str) -> None:
    """A maskopt sampler name, or the class name of one of diffusers' schedulers."""
    if name in SCHEDULERS or (name.endswith("Scheduler") and hasattr(_diffusers(), name)):
        return
    raise MaskoptError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)} (or a diffusers scheduler class)")


def scheduler_name(scheduler: Any) -> str:
    """The name `set_scheduler` takes for this scheduler: maskopt's (ddim, dpm++, ...) where one fits its
    class and config, else the diffusers class name."""
    return scheduler_name_of(type(scheduler).__name__, dict(scheduler.config))


def scheduler_name_of(class_name: str, config: dict[str, Any]) -> str:
    fits = [(len(overrides), name) for name, (cls, overrides) in SCHEDULERS.items()
            if cls == class_name and all(config.get(k) == v for k, v in overrides.items())]
    return max(fits)[1] if fits else class_name


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's sampler for a named one built from the same config (same training schedule)."""
    check_scheduler(name)
    cls_name, overrides = SCHEDULERS.get(name, (name, {}))
    pipe.scheduler = getattr(_diffusers(), cls_name).from_config(pipe.scheduler.config, **overrides)


def _diffusers() -> Any:
    import diffusers

    return diffusers


# ---------------------------------------------------------------------------------------------------
# what a pipeline is, from its config files alone (no weights loaded)


@dataclass(frozen=True)
class PipelineInfo:
    """What a search needs to know of a pipeline before loading it: its own sampler, image size, geometry."""

    scheduler: str  # scheduler_name of the pipeline's own sampler
    prediction_type: str  # epsilon, v_prediction, sample
    num_train_timesteps: int
    size: tuple[int, int]  # (H, W) in pixels: the U-Net's sample size times the VAE factor
    vae_scale: int
    text_length: int  # the tokenizer's max length (77 for SD)


def read_config(model: str, name: str) -> dict[str, Any]:
    """One of a pipeline's JSON config files (`"unet/config.json"`), from its folder or the hub."""
    where = location(model)
    try:
        if isinstance(where, Path):
            return json.loads((where / name).read_text())
        from huggingface_hub import hf_hub_download

        with _quiet_loading():
            return json.loads(Path(hf_hub_download(where, name)).read_text())
    except (OSError, ValueError) as e:  # a missing file, an unreachable hub, a file that is not JSON
        raise _load_error("pipeline", model, e, detail=name) from None


def pipeline_info(model: str) -> PipelineInfo:
    """Read from the pipeline's config files; MaskoptError when one is missing or unreadable."""
    sched = read_config(model, "scheduler/scheduler_config.json")
    unet = read_config(model, "unet/config.json")
    vae = read_config(model, "vae/config.json")
    try:
        tok = read_config(model, "tokenizer/tokenizer_config.json")
    except MaskoptError:  # a tokenizer without a config file: diffusers' SD pipelines use 77
        tok = {}
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    sample = unet.get("sample_size", 64)
    h, w = (sample, sample) if isinstance(sample, int) else sample
    length = int(tok.get("model_max_length", 77))
    return PipelineInfo(
        scheduler=scheduler_name_of(str(sched.get("_class_name", "")), sched),
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
        size=(h * scale, w * scale), vae_scale=scale, text_length=length if length <= 4096 else 77,
    )


# ---------------------------------------------------------------------------------------------------
# loading


@contextmanager
def _quiet_loading():
    """diffusers/transformers loading bars and their torch_dtype deprecation notice are noise in a CLI."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    levels = transformers.utils.logging.get_verbosity(), diffusers.utils.logging.get_verbosity()
    # diffusers logs "Couldn't connect to the Hub" / "Will try to load from local cache" on its way to an
    # error that _load_error words in one line
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    hub = logging.getLogger("huggingface_hub")  # its retry warnings, on the same way
    hub_level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
            yield
    finally:
        transformers.utils.logging.set_verbosity(levels[0])
        diffusers.utils.logging.set_verbosity(levels[1])
        hub.setLevel(hub_level)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exception types of 'the hub could not be reached': offline mode, a file neither cached nor
    downloadable, and the network errors of the HTTP client huggingface_hub runs on."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError,
                                        TimeoutError, socket.gaierror]
    for client in ("httpx2", "httpx", "requests"):  # whichever huggingface_hub imported
        module = sys.modules.get(client)
        error = getattr(module, "TransportError", None) or getattr(getattr(module, "exceptions", None),
                                                                 "ConnectionError", None)
        if isinstance(error, type):
            kinds.append(error)
    return tuple(kinds)


def unreachable(e: BaseException | None) -> bool:
    """Did loading fail because the hub could not be reached (offline, no network), not because of a bad id?"""
    kinds, seen = _network_errors(), 0
    while e is not None and seen < 20:
        if isinstance(e, kinds):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _load_error(what: str, model: str, e: BaseException, detail: str | None = None) -> MaskoptError:
    """One line for a failed load; `detail`: the file that was being read."""
    if not isinstance(location(model), Path) and unreachable(e):
        return MaskoptError(f"could not load {what} from {model!r}: it is not in the local Hugging Face cache and the "
                            "hub cannot be reached; download it where there is a network (huggingface-cli download "
                            f"{model}) and copy the cache, or pass its local folder")
    return MaskoptError(f"could not load {what} from {model!r}: " + (f"{detail}: " if detail else "") + first_line(e))


def load_pipeline(model: str = EMBEDDED, device: str = "cpu", dtype: str | torch.dtype = "float32",
                  scheduler: str | None = None) -> Any:
    """A diffusers pipeline (SD1.5, SD2.1, SDXL, ...) from a hub id, a local folder or `maskopt:default`."""
    from diffusers import DiffusionPipeline

    where = location(model)
    torch_dtype = resolve_dtype(dtype)
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(where), torch_dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise _load_error("pipeline", model, e) from None
    if not hasattr(pipe, "unet"):
        raise MaskoptError(f"pipeline {model!r} ({type(pipe).__name__}) has no U-Net to mask")
    if scheduler:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s from %s (%s, %s)", type(pipe).__name__, model, device, torch_dtype)
    return pipe.to(device)


def load_unet(model: str = EMBEDDED, dtype: str | torch.dtype = "float32") -> Any:
    """Only the U-Net: from a pipeline (its `unet` subfolder) or a U-Net folder itself."""
    from diffusers import UNet2DConditionModel

    where = location(model)
    is_unet_folder = isinstance(where, Path) and (where / "config.json").is_file() and \
        not (where / "model_index.json").is_file()
    if is_unet_folder:
        name = json.loads((where / "config.json").read_text()).get("_class_name")
        if name != "UNet2DConditionModel":
            raise MaskoptError(f"{model!r} holds a {name}, not a UNet2DConditionModel")
    try:
        with _quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(str(where), subfolder=None if is_unet_folder else "unet",
                                                        torch_dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as e:
        raise _load_error("U-Net", model, e) from None
    return unet.eval()


_CACHED = re.compile(r".*/models--([\w.-]+)--([\w.-]+)/snapshots/[0-9a-f]+(/unet)?/?")


def hub_id_of(path: str) -> str | None:
    """The hub id of a folder in the Hugging Face cache (`.../models--org--name/snapshots/<hash>/unet`)."""
    m = _CACHED.fullmatch(path)
    return f"{m.group(1)}/{m.group(2)}" if m else None
