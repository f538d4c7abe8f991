"""An export's variants run inside a diffusers pipeline (`maskopt generate --export`), from its manifest.

- `Runner`: the type of a variant runner, (variant k, named inputs) -> out_sample.
- `RoutedUNet`: stands in for `pipe.unet`; each call runs the variant of its timestep's bucket.
- `OrtVariants`: a Runner over ONNX Runtime sessions, one per variant.
- `TrtVariants`: a Runner over TensorRT engines, one per variant or one refitted per bucket.

The third Runner, `triton_client.TritonVariants`, sends every call to a Triton server's router instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..buckets import Buckets, scalar_timestep
from ..errors import MaskoptError

logger = logging.getLogger(__name__)

Runner = Callable[[int, dict[str, torch.Tensor]], torch.Tensor]  # (variant k, named inputs) -> out_sample


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
        k = self.buckets.index(t)  # the rule of every backend, the Triton router's included (manifest's timestep.rule)
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
        from . import ort

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
        from .trt import load_weights, run_engine

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
        from .trt import refit

        if self.weights is not None and self.loaded != k:
            refit(self.infers[k].runner.engine, self.weights[k])
            self.loaded = k
        out = self.infers[k]({n: t.contiguous() for n, t in feeds.items()})["out_sample"]
        return out.clone() if isinstance(out, torch.Tensor) else torch.from_numpy(out.copy())  # runners reuse buffers

    def close(self) -> None:
        for infer in {id(i): i for i in self.infers}.values():
            infer.runner.deactivate()
