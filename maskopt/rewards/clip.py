"""CLIP score, and the CLIP loading and preprocessing that pickscore, hpsv2 and aesthetic share.

Specs: `clip` (openai/clip-vit-large-patch14 from the hub), `clip@/models/my-clip` (any directory a
CLIPModel was save_pretrained to); `load_reward(spec)(images, prompts)` scores as every reward does.

Score: 100 * cosine similarity, the usual "CLIP score" of text-to-image papers (torchmetrics'
CLIPScore also clamps it at 0; we do not, so poor images still rank among themselves). The factor
is fixed rather than the checkpoint's logit_scale.exp() so that scores compare across CLIP models;
for openai/clip-vit-large-patch14 the two coincide (logit_scale.exp() == 100).

Preprocessing runs as torch ops on the (B, 3, H, W) [0, 1] tensors, on the model's device, instead
of CLIPProcessor's PIL round trip: bicubic resize with antialiasing, centre crop (or, for HPSv2,
resize the longest side and zero-pad), normalise. Sizes and mean/std come from the source's
preprocessor_config.json when it has one, else the vision config's image_size and OpenAI's
mean/std. Versus PIL on uint8 the pixels differ by about one grey level (no 8-bit rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..sources import local_or_hub
from .base import batched, optional_file, reward_name

if TYPE_CHECKING:
    from transformers import CLIPModel

DEFAULT_SOURCE = "openai/clip-vit-large-patch14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """Pixels (B, 3, H, W) in [0, 1] -> a CLIP vision tower's normalised input (B, 3, *crop).

    fit="crop": shortest side -> size, centre crop to crop (CLIPImageProcessor, OpenAI's clip).
    fit="pad": longest side -> size, zero-pad (black) to size x size (open_clip's ResizeMaxSize,
    which HPSv2 scores with).
    """

    size: int
    crop: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    fit: str = "crop"

    def __post_init__(self) -> None:
        if self.fit not in ("crop", "pad"):
            raise ValueError(f"Preprocess fit must be 'crop' or 'pad', got {self.fit!r}")
        if self.fit == "crop" and min(self.crop) > self.size:
            raise ValueError(f"Preprocess crop {self.crop} is larger than the resized shortest side {self.size}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        h, w = x.shape[-2:]
        if self.fit == "crop":
            # As torchvision's Resize(int) and CLIPImageProcessor: the long side keeps the aspect, floored.
            nh, nw = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
            x = _resize(x, nh, nw)
            ch, cw = self.crop
            top, left = int(round((nh - ch) / 2)), int(round((nw - cw) / 2))
            x = x[..., top : top + ch, left : left + cw]
        else:
            scale = self.size / max(h, w)
            nh, nw = round(h * scale), round(w * scale)
            # HPSv2 scores PIL images (hpsv2 1.2.0's open_clip 2.16 resizes in PIL: uint8, the overshoot clipped)
            x = _resize(x, nh, nw)
            ph, pw = self.size - nh, self.size - nw
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (h, w):
        return x
    # Clamp: bicubic overshoots at edges, where PIL's uint8 output (CLIPImageProcessor's, HPSv2's) clips.
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def load_preprocess(source: str, image_size: int, fit: str = "crop") -> Preprocess:
    """Preprocess from source's preprocessor_config.json (local dir or hub id), else CLIP defaults at image_size."""
    path = optional_file(source, "preprocessor_config.json")
    config: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            config = json.load(f)
    size = config.get("size", image_size)
    if isinstance(size, dict):  # {"shortest_edge": 224} or {"height": 224, "width": 224}
        size = size.get("shortest_edge") or min(size["height"], size["width"])
    crop = config.get("crop_size", size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    if fit == "pad":
        crop = (size, size)
    mean = tuple(config.get("image_mean", OPENAI_MEAN))
    std = tuple(config.get("image_std", OPENAI_STD))
    return Preprocess(size=int(size), crop=(int(crop[0]), int(crop[1])), mean=mean, std=std, fit=fit)


def load_model(source: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "CLIPModel":
    """transformers' CLIPModel.from_pretrained(source): a hub id or a save_pretrained directory."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(local_or_hub(source, "CLIP model")))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _pooled(out: Any) -> torch.Tensor:
    # transformers 4.x returns the projected features; 5.x a ModelOutput holding them as pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


class ClipEmbedder:
    """A CLIPModel with its preprocessing and tokenizer: L2-normalised float32 embeddings.

    Text embeddings are cached per prompt: a search scores the same few prompts thousands of
    times, and the model is frozen.
    """

    def __init__(self, model: "CLIPModel", preprocess: Preprocess, tokenizer: Any = None):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_length = model.config.text_config.max_position_embeddings
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, projection_dim)."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return _unit(_pooled(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, projection_dim); prompts longer than the context are truncated."""
        if self.tokenizer is None:
            raise RuntimeError("this ClipEmbedder was built without a tokenizer")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tokens = self.tokenizer(
                missing, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            self._text_cache.update(zip(missing, _unit(_pooled(out))))
        return torch.stack([self._text_cache[p] for p in prompts])


class ClipScore:
    """scale * cos(image embedding, text embedding) per (image, prompt) pair.

    clip: scale 100; pickscore: the checkpoint's logit_scale.exp(); hpsv2: 1.
    """

    def __init__(self, embedder: ClipEmbedder, scale: float, name: str, batch_size: int = 16):
        self.embedder = embedder
        self.scale = float(scale)
        self.name = name
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return batched(self._score, images, prompts, self.batch_size)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_emb = self.embedder.images(images)
        text_emb = self.embedder.texts(prompts).to(image_emb.device)
        return self.scale * (image_emb * text_emb).sum(dim=-1)


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ClipScore:
    """CLIP score with the CLIPModel, tokenizer and preprocessing at source (default ViT-L/14)."""
    src = source or DEFAULT_SOURCE
    model = load_model(src, device, dtype)
    preprocess = load_preprocess(src, model.config.vision_config.image_size)
    embedder = ClipEmbedder(model, preprocess, load_tokenizer(src))
    return ClipScore(embedder, scale=100.0, name=reward_name("clip", source))
