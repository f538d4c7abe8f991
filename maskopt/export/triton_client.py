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

logger = logging.getLogger(__name__)

INSTALL = "pip install 'tritonclient[http,grpc]' (or the maskopt[triton] extra)"
ROUTER = "unet"


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise MaskoptError(f"the triton backend needs tritonclient, which is not installed: {INSTALL}") from None
    return module


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

    def __init__(self, url: str) -> None:
        self.protocol, self.address = parse_url(url)
        self.module = _client_module(self.protocol)
        try:
            self.client = self.module.InferenceServerClient(self.address)
            ready = self.client.is_model_ready(ROUTER)
        except Exception as e:  # connection refused, DNS, a non-Triton port: the client's own exception types
            raise MaskoptError(f"no Triton server answers at {url} ({self.protocol}): {str(e).strip()[:200]}") from None
        if not ready:
            raise MaskoptError(f"the Triton server at {url} has no ready model {ROUTER!r}: serve the export's "
                               "triton/ folder as its model repository")
        logger.info("triton: %s at %s", self.protocol, self.address)

    def __call__(self, k: int, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, tensor in feeds.items():
            array = tensor.detach().cpu().contiguous().numpy().astype(np.float32, copy=False)
            item = self.module.InferInput(name, list(array.shape), "FP32")
            item.set_data_from_numpy(array)
            inputs.append(item)
        try:
            result = self.client.infer(ROUTER, inputs)
        except InferenceServerException as e:
            raise MaskoptError(f"Triton at {self.address}: {e.message() if callable(getattr(e, 'message', None)) else e}") from None
        return torch.from_numpy(np.array(result.as_numpy("out_sample")))

    def close(self) -> None:
        self.client.close()
