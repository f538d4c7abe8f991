"""A deployed Triton repository as a generate backend: every U-Net call goes to the router model `unet`.

This is how a user checks a deployment: `maskopt generate --export DIR --backend triton --url HOST:PORT`
runs the pipeline here and the U-Net on the server, through the one model a serving stack calls. The
router picks the variant; the images should equal the onnxruntime backend's on the same export.
`grpc://HOST:PORT` talks gRPC, anything else (`HOST:PORT`, `http://HOST:PORT`) HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..errors import MaskoptError
from ..lazy import require

logger = logging.getLogger(__name__)

INSTALL = "pip install 'tritonclient[http,grpc]' (or the maskopt[triton] extra)"
ROUTER = "unet"


def _client_module(protocol: str) -> Any:
    """tritonclient.grpc or tritonclient.http, or a one-line MaskoptError saying how to install it."""
    return require(f"tritonclient.{'grpc' if protocol == 'grpc' else 'http'}", INSTALL,
                   reason="the triton backend needs tritonclient, which is not installed")


def parse_url(url: str) -> tuple[str, str]:
    """'grpc://h:p' -> ('grpc', 'h:p'); 'http://h:p' or 'h:p' -> ('http', 'h:p')."""
    for scheme in ("grpc", "http"):
        if url.startswith(f"{scheme}://"):
            return scheme, url[len(scheme) + 3:].rstrip("/")
    if "://" in url:
        raise MaskoptError(f"--url {url}: give HOST:PORT, http://HOST:PORT or grpc://HOST:PORT")
    return "http", url.rstrip("/")


class TritonVariants:
    """Calls the router `unet` on a running Triton server; `k` (the bucket maskopt computed) is the server's to pick."""

    def __init__(self, url: str, buckets: list[list[int]] | None = None, timeout_s: float = 600.0) -> None:
        """`buckets`: the export's timestep ranges, checked against the router's (the server serves this export)."""
        self.protocol, self.address = parse_url(url)
        self.module = _client_module(self.protocol)
        kw = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if self.protocol == "http" else {}
        self.timeout_s = timeout_s
        self.client = None
        try:
            try:
                self.client = self.module.InferenceServerClient(self.address, **kw)
                ready = self.client.is_model_ready(ROUTER)
            except Exception as e:  # connection refused, DNS, a non-Triton port: the client's own exception types
                hint = "" if self.protocol == "grpc" else " (for its gRPC port, give grpc://HOST:PORT)"
                raise MaskoptError(f"no Triton server answers at {url} ({self.protocol}){hint}: "
                                   f"{str(e).strip()[:200]}") from None
            if not ready:
                raise MaskoptError(f"the Triton server at {url} has no ready model {ROUTER!r}: serve the export's "
                                   "triton/ folder as its model repository")
            if buckets is not None:
                try:
                    served = self._served_buckets()
                except Exception as e:
                    raise MaskoptError(f"the Triton server at {url}: cannot read {ROUTER!r}'s config: "
                                       f"{str(e).strip()[:200]}") from None
                if served != [list(b) for b in buckets]:
                    raise MaskoptError(f"the Triton server at {url} serves another export: its {ROUTER!r} routes "
                                       f"buckets {served}, this export has {[list(b) for b in buckets]}")
        except BaseException:
            self.close()
            raise
        logger.info("triton: %s at %s", self.protocol, self.address)

    def _served_buckets(self) -> list[list[int]]:
        import json

        config = (self.client.get_model_config(ROUTER, as_json=True)["config"] if self.protocol == "grpc"
                  else self.client.get_model_config(ROUTER))
        return json.loads(config.get("parameters", {}).get("buckets", {}).get("string_value", "null") or "null")

    def __call__(self, k: int, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, tensor in feeds.items():
            array = tensor.detach().cpu().contiguous().numpy().astype(np.float32, copy=False)
            item = self.module.InferInput(name, list(array.shape), "FP32")
            item.set_data_from_numpy(array)
            inputs.append(item)
        try:
            kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(ROUTER, inputs, **kw)
        except InferenceServerException as e:
            raise MaskoptError(f"Triton at {self.address}: {e.message() if callable(getattr(e, 'message', None)) else e}") from None
        except Exception as e:  # the HTTP client raises its transport's own errors (connection lost, timeout)
            raise MaskoptError(f"Triton at {self.address}: {type(e).__name__}: {str(e).strip()[:200]}") from None
        out = result.as_numpy("out_sample")
        if out is None:
            raise MaskoptError(f"Triton at {self.address}: {ROUTER!r} answered without out_sample")
        return torch.from_numpy(np.array(out))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
