"""ImageReward (Xu et al. 2023), through the image-reward package (an optional extra).

Install it with `pip install image-reward` (or `pip install 'maskopt[imagereward]'`). Specs:
`imagereward` (ImageReward-v1.0), `imagereward@/models/ImageReward.pt`.

Source: a name the package knows ("ImageReward-v1.0") or a local checkpoint, passed to
ImageReward.load as is. Score: the package's reward, (MLP(BLIP text-image [CLS]) - mean) / std,
about N(0, 1) over its training set.

The package's own score() takes PIL images one by one; this runs the same steps (BLIP tokenizer
at max_length 35, visual encoder, cross-attending text encoder, MLP, standardisation) on tensor
batches, with its preprocessing (bicubic resize to 224, centre crop, OpenAI mean/std) as torch ops.
Untested against the real package here: it pins timm==0.6.13 and fairscale, which conflict with
this environment (FINDINGS).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MaskoptError
from .base import batched, reward_name
from .clip import Preprocess

DEFAULT_SOURCE = "ImageReward-v1.0"
INSTALL_HINT = (
    "reward 'imagereward' needs the image-reward package: "
    "pip install image-reward (or pip install 'maskopt[imagereward]')"
)


class ImageRewardScore:
    def __init__(self, model: Any, name: str, batch_size: int = 8):
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self.preprocess = Preprocess(size=224, crop=(224, 224))
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return batched(self._score, images, prompts, self.batch_size)

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        blip = self.model.blip
        text = blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        text = text.to(self.device)
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        image_embeds = blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = blip.text_encoder(
            text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        rewards = self.model.mlp(out.last_hidden_state[:, 0, :])  # (B, 1)
        return ((rewards.float() - self.model.mean) / self.model.std).squeeze(-1)


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ImageRewardScore:
    try:
        import ImageReward as RM  # the image-reward package's module name
    except ImportError as err:
        raise MaskoptError(INSTALL_HINT) from err
    model = RM.load(source or DEFAULT_SOURCE, device=device)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ImageRewardScore(model, name=reward_name("imagereward", source))
