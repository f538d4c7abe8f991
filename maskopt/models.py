"""Loading pipelines and U-Nets the way users name them: a hub id, a local folder, or nothing (the embedded default).

    pipe = load_pipeline("runwayml/stable-diffusion-v1-5", device="cuda", dtype=torch.float16)
    pipe = load_pipeline("./my-sd-folder", scheduler="dpm++")
    unet = load_unet(None)                       # the digits pipeline that ships with maskopt
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import MaskoptError

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


DEFAULT_SOURCE = "maskopt:default"  # a mask file's source when it was searched on the embedded default


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


def default_model() -> str:
    """Path of the embedded default pipeline (digits), shipped inside the package."""
    from .default import PIPELINE_DIR

    return str(PIPELINE_DIR)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MaskoptError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_source(model: str) -> None:
    """A name that looks like a path must exist: otherwise diffusers would try the hub and fail obscurely."""
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") > 1
    if looks_local and not Path(model).expanduser().exists():
        raise MaskoptError(f"model {model!r} is not a folder that exists (nor a hub id)")


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


def _unreachable(e: BaseException | None) -> bool:
    """Did loading fail because the hub could not be reached (offline, no network) rather than a bad id?"""
    seen = 0
    while e is not None and seen < 20:
        text = f"{type(e).__name__} {e}".lower()
        if any(k in text for k in ("connection", "offline", "localentrynotfound", "not fully cached",
                                   "outgoing traffic has been disabled", "name or service not known")):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _load_error(what: str, model: str, e: Exception) -> MaskoptError:
    text = str(e).strip()
    if not Path(model).expanduser().exists() and _unreachable(e):
        return MaskoptError(f"could not load {what} from {model!r}: it is not in the local Hugging Face cache and the "
                            "hub cannot be reached; download it where there is a network (huggingface-cli download "
                            f"{model}) and copy the cache, or pass its local folder")
    first = text.splitlines()[0] if text else type(e).__name__
    return MaskoptError(f"could not load {what} from {model!r}: {first}")


def load_pipeline(
    model: str | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    scheduler: str | None = None,
) -> Any:
    """A diffusers pipeline (SD1.5, SD2.1, SDXL, ...) from a hub id or local folder, on `device`."""
    from diffusers import DiffusionPipeline

    model = model or default_model()
    _check_source(model)
    torch_dtype = resolve_dtype(dtype)
    local = Path(model).expanduser()
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(local) if local.exists() else model, torch_dtype=torch_dtype)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_error("pipeline", model, e) from None
    if not hasattr(pipe, "unet"):
        raise MaskoptError(f"pipeline {model!r} ({type(pipe).__name__}) has no U-Net to mask")
    if scheduler:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s from %s (%s, %s)", type(pipe).__name__, model, device, torch_dtype)
    return pipe.to(device)


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's sampler for a named one built from the same config (same training schedule)."""
    import diffusers

    if name not in SCHEDULERS:
        raise MaskoptError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def load_unet(model: str | None = None, dtype: str | torch.dtype = "float32") -> Any:
    """Only the U-Net: from a pipeline folder/hub id (its `unet` subfolder) or a U-Net folder itself."""
    from diffusers import UNet2DConditionModel

    model = model or default_model()
    _check_source(model)
    path = Path(model).expanduser()
    is_unet_folder = path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file()
    if is_unet_folder:
        name = json.loads((path / "config.json").read_text()).get("_class_name")
        if name != "UNet2DConditionModel":
            raise MaskoptError(f"{model!r} holds a {name}, not a UNet2DConditionModel")
    try:
        with _quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(
                str(path) if path.exists() else model,
                subfolder=None if is_unet_folder else "unet",
                torch_dtype=resolve_dtype(dtype),
            )
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_error("U-Net", model, e) from None
    return unet.eval()
