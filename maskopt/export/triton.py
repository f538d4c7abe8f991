"""A Triton model repository for an export: one model per variant, and a `unet` model that routes.

    triton/
      unet/config.pbtxt           Python backend: reads the timestep, forwards to unet_b{k} through BLS
      unet/1/model.py             (a copy of maskopt/export/triton_unet.py)
      unet_b0/config.pbtxt        tensorrt_plan, or onnxruntime_onnx when only ONNX was exported
      unet_b0/1/model.plan        (a hard link to the export's unet_b0.plan: no second copy on disk)
      ...

Every config.pbtxt is built as Triton's own `ModelConfig` protobuf message (shipped by tritonclient),
printed in protobuf text format, and checked as Triton would on load before the export counts as done.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import MaskoptError
from .shapes import Signature

logger = logging.getLogger(__name__)

ROUTER = "unet"


@dataclass(frozen=True)
class Backend:
    platform: str
    filename: str
    kind: str  # instance_group kind


BACKENDS = {
    "plan": Backend("tensorrt_plan", "model.plan", "KIND_GPU"),
    "onnx": Backend("onnxruntime_onnx", "model.onnx", "KIND_AUTO"),  # GPU when Triton has one, else CPU
}


# ---------------------------------------------------------------------------------------------------
# config.pbtxt, built as Triton's own ModelConfig message and printed in protobuf text format


def _io(config: Any, sig: Signature, inputs: Sequence[str] | None = None) -> None:
    """The signature's inputs (or the subset `inputs`) and output, float32, named dims dynamic (-1)."""
    pb = model_config_module()
    dims = sig.dims()
    dynamic = lambda shape: [d if isinstance(d, int) else -1 for d in shape]
    for name in (n for n in sig.input_names if inputs is None or n in inputs):
        config.input.add(name=name, data_type=pb.TYPE_FP32, dims=dynamic(dims[name]))
    for name in (n for n in dims if n not in sig.input_names):
        config.output.add(name=name, data_type=pb.TYPE_FP32, dims=dynamic(dims[name]))


def variant_config(name: str, sig: Signature, backend: Backend, inputs: Sequence[str] | None = None) -> Any:
    """`inputs`: the subset of the signature the model file takes (a TensorRT engine drops inputs that
    nothing reads); default all."""
    pb = model_config_module()
    # max_batch_size 0: the batch is the explicit first dim of each tensor (CFG doubles it; Triton must
    # not add its own batch dim, which the engines' profiles do not have).
    config = pb.ModelConfig(name=name, platform=backend.platform, max_batch_size=0,
                            default_model_filename=backend.filename)
    _io(config, sig, inputs)
    config.instance_group.add(kind=getattr(pb.ModelInstanceGroup, backend.kind), count=1)
    return config


def router_config(sig: Signature, ranges: Sequence[Sequence[int]], variants: Sequence[str], num_train_timesteps: int,
                  variant_inputs: Sequence[Sequence[str]] | None = None, instances: int = 4) -> Any:
    pb = model_config_module()
    config = pb.ModelConfig(name=ROUTER, backend="python", max_batch_size=0)
    _io(config, sig)
    # An instance blocks on its BLS call until the variant answers, so `instances` requests are served at once
    # (benchmarks/triton_load.py); each is a Python stub process on the CPU, idle while it waits.
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instances)
    params = {"buckets": json.dumps([list(r) for r in ranges]), "variants": json.dumps(list(variants)),
              "num_train_timesteps": str(num_train_timesteps)}
    if variant_inputs is not None:  # which inputs each variant takes, when some take fewer than all
        params["variant_inputs"] = json.dumps([list(i) for i in variant_inputs])
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def _write(config: Any, path: Path) -> Path:
    from google.protobuf import text_format

    path.write_text(text_format.MessageToString(config))
    return path


# ---------------------------------------------------------------------------------------------------
# the repository


def _link(src: Path, dst: Path) -> None:
    """Hard link when possible (same bytes, no extra disk), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_repository(
    root: Path,
    sig: Signature,
    ranges: Sequence[Sequence[int]],
    files: Sequence[dict[str, Path]],
    role: str,
    num_train_timesteps: int = 1000,
    inputs: Sequence[Sequence[str] | None] | None = None,
    instances: int = 4,
) -> list[Path]:
    """Write the repository under `root`; `files[k]` maps roles ("onnx", "onnx_data", "plan") to variant
    k's files and `role` picks the one Triton serves; `inputs[k]`, if not None, the inputs variant k's
    file takes. Returns every file written."""
    backend = BACKENDS[role]
    written: list[Path] = []
    names = [f"unet_b{k}" for k in range(len(files))]
    inputs = [list(i) if i is not None else list(sig.input_names) for i in (inputs or [None] * len(files))]
    for name, variant, takes in zip(names, files, inputs):
        version = root / name / "1"
        version.mkdir(parents=True)
        _link(variant[role], version / backend.filename)
        written.append(version / backend.filename)
        if role == "onnx" and "onnx_data" in variant:
            # the ONNX file names its weight file; keep that name beside the renamed model.onnx
            _link(variant["onnx_data"], version / variant["onnx_data"].name)
            written.append(version / variant["onnx_data"].name)
        written.append(_write(variant_config(name, sig, backend, takes), root / name / "config.pbtxt"))
    (root / ROUTER / "1").mkdir(parents=True)
    shutil.copyfile(Path(__file__).with_name("triton_unet.py"), root / ROUTER / "1" / "model.py")
    every = all(i == list(sig.input_names) for i in inputs)
    router = router_config(sig, ranges, names, num_train_timesteps, None if every else inputs, instances)
    written += [root / ROUTER / "1" / "model.py", _write(router, root / ROUTER / "config.pbtxt")]
    validate_repository(root)
    return written


# ---------------------------------------------------------------------------------------------------
# validation with Triton's own protobuf


@functools.cache
def model_config_module() -> Any:
    """Triton's model-config protobuf module (ModelConfig and its enums), from tritonclient's model_config_pb2.

    Loaded by file path: `import tritonclient.grpc` needs the grpc extras, this file does not.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MaskoptError("--triton validates configs with Triton's model-config protobuf: pip install tritonclient")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise MaskoptError(f"this tritonclient has no {path.name} to validate configs with (pip install -U tritonclient)")
    module_spec = importlib.util.spec_from_file_location("maskopt_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_config(path: Path) -> Any:
    from google.protobuf import text_format

    try:
        return text_format.Parse(Path(path).read_text(), model_config_module().ModelConfig())
    except text_format.ParseError as e:
        raise MaskoptError(f"{path}: not a valid Triton model config ({e})") from None


def validate_repository(root: Path) -> dict[str, Any]:
    """Parse every config.pbtxt under `root` and check what Triton would check on load."""
    configs: dict[str, Any] = {}
    for config_path in sorted(Path(root).glob("*/config.pbtxt")):
        folder = config_path.parent
        c = parse_config(config_path)
        where = f"{config_path}"
        if c.name != folder.name:
            raise MaskoptError(f"{where}: name {c.name!r} differs from its folder {folder.name!r}")
        if bool(c.platform) == bool(c.backend):
            raise MaskoptError(f"{where}: exactly one of platform and backend must be set")
        if not c.input or not c.output:
            raise MaskoptError(f"{where}: no inputs or no outputs")
        model_file = "model.py" if c.backend == "python" else c.default_model_filename
        if not (folder / "1" / model_file).is_file():
            raise MaskoptError(f"{where}: version 1 has no {model_file}")
        configs[c.name] = c
    router = configs.get(ROUTER)
    if router is not None:
        params = {k: v.string_value for k, v in router.parameters.items()}
        variants, ranges = json.loads(params["variants"]), json.loads(params["buckets"])
        if len(variants) != len(ranges):
            raise MaskoptError(f"{root}/{ROUTER}: {len(variants)} variants for {len(ranges)} buckets")
        signature = {i.name: list(i.dims) for i in router.input}
        takes = json.loads(params.get("variant_inputs", "null")) or [list(signature)] * len(variants)
        for name, wanted in zip(variants, takes):
            if name not in configs:
                raise MaskoptError(f"{root}/{ROUTER}: routes to {name!r}, which is not in the repository")
            declared = {i.name: list(i.dims) for i in configs[name].input}
            if list(declared) != list(wanted) or any(signature.get(n) != d for n, d in declared.items()):
                raise MaskoptError(f"{root}/{name}: inputs {list(declared)} differ from what {ROUTER} forwards")
    return configs
