"""LAION aesthetic predictor v2 (improved-aesthetic-predictor): an MLP on CLIP ViT-L/14 image embeddings.

Specs: `aesthetic` (sac+logos+ava1-l14-linearMSE.pth on ViT-L/14), `aesthetic@/models/mlp.pth` (another
head, still on openai/clip-vit-large-patch14), `aesthetic@/models/aes` (a directory: its one .pth/.pt,
plus its own CLIPModel when it holds a config.json).

Score: MLP(e / |e|) with e the CLIP image embedding (visual projection output, what OpenAI clip's
encode_image returns); roughly 1-10, higher is prettier. The prompt is ignored.
The head is the repository's MLP: Linear 768->1024->128->64->16->1 with dropout between the first
four and no activations (the ReLUs are commented out there; it was trained that way), so its keys
are layers.{0,2,4,6,7}.{weight,bias}. Loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MaskoptError
from .base import base_model_source, batched, resolve_checkpoint, reward_name
from .clip import ClipEmbedder, load_model, load_preprocess

DEFAULT_MLP = "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class AestheticMLP(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic:
    def __init__(self, embedder: ClipEmbedder, mlp: AestheticMLP, name: str, batch_size: int = 16):
        self.embedder = embedder
        self.mlp = mlp
        self.name = name
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return batched(self._score, images, prompts, self.batch_size)

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embedding = self.embedder.images(images)  # (B, 768), unit length, float32
        return self.mlp(embedding.to(self.mlp.layers[0].weight.device)).squeeze(-1)


def load_mlp(path: str) -> AestheticMLP:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise MaskoptError(f"{path} is not an improved-aesthetic-predictor state dict (no layers.0.weight; has {keys})")
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    try:
        mlp.load_state_dict(state)
    except RuntimeError as err:  # torch lists the missing/unexpected keys and bad shapes
        raise MaskoptError(f"{path} does not fit the aesthetic MLP: {' '.join(str(err).split())}") from err
    return mlp.float().eval().requires_grad_(False)


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Aesthetic:
    mlp = load_mlp(resolve_checkpoint(source, DEFAULT_MLP)).to(device)
    clip_source = base_model_source(source, DEFAULT_CLIP)
    model = load_model(clip_source, device, dtype)
    if model.config.projection_dim != mlp.layers[0].in_features:
        raise MaskoptError(
            f"aesthetic head takes {mlp.layers[0].in_features}-d embeddings but {clip_source} "
            f"projects to {model.config.projection_dim}"
        )
    preprocess = load_preprocess(clip_source, model.config.vision_config.image_size)
    return Aesthetic(ClipEmbedder(model, preprocess), mlp, name=reward_name("aesthetic", source))
