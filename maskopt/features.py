"""Image features for the set-level measures (Frechet distance, diversity), and reference images to compare with.

    >>> from maskopt.default.data import load_split
    >>> features = load_features("digits")              # the embedded default's classifier, 64 features
    >>> features(load_split("holdout")[0][:5]).shape
    torch.Size([5, 64])

A source is `digits` (the classifier behind the embedded default's reward; the default there), or a hub id
or folder of a CLIP model (image embeddings, L2-normalised; `openai/clip-vit-large-patch14` by default
elsewhere) or of a DINOv2 model (its pooled CLS embedding), loaded through transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .errors import MaskoptError, first_line

CLIP_DEFAULT = "openai/clip-vit-large-patch14"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Features:
    """A feature model: images (B, 3, H, W) in [0, 1] -> (B, D) float32 on the CPU, in batches."""

    def __init__(self, name: str, embed: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64) -> None:
        self.name, self.embed, self.batch_size = name, embed, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.embed(images[i:i + self.batch_size]).float().cpu() for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 0)


def load_features(source: str | None = None, device: str = "cpu") -> Features:
    """`digits`, or a CLIP or DINOv2 model by hub id or folder (default CLIP ViT-L/14)."""
    source = source or CLIP_DEFAULT
    if source == "digits":
        from .default.reward import DigitReward

        return Features("digits", DigitReward(device=device).features, batch_size=512)
    from transformers import AutoConfig

    from .sources import local_or_hub

    where = str(local_or_hub(source, "features model"))
    try:
        kind = AutoConfig.from_pretrained(where).model_type
    except (OSError, ValueError) as e:
        raise MaskoptError(f"could not load the features model {source!r}: {first_line(e)}") from None
    if kind == "clip":
        from .rewards.clip import ClipEmbedder, load_model, load_preprocess

        model = load_model(where, device)
        return Features(source, ClipEmbedder(model, load_preprocess(where, model.config.vision_config.image_size)).images)
    if kind == "dinov2":
        return Features(source, _dino(where, device))
    raise MaskoptError(f"features model {source!r} is a {kind!r} model; give a CLIP or DINOv2 model (or digits)")


def _dino(where: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers import AutoModel

    from .rewards.clip import load_preprocess

    model = AutoModel.from_pretrained(where).to(device).eval().requires_grad_(False)
    preprocess = load_preprocess(where, model.config.image_size)  # its preprocessor_config: size, crop, mean, std
    return lambda images: model(pixel_values=preprocess(images.to(device))).pooler_output


def image_files(folder: str | Path) -> list[Path]:
    """The images of a reference folder (png, jpg, webp, bmp), at least 2, each readable; MaskoptError naming
    what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MaskoptError(f"reference folder {folder} does not exist" if not folder.exists()
                           else f"reference {folder} is a file; give a folder of images")
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise MaskoptError(f"reference folder {folder} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                           "a Frechet distance needs at least 2")
    for path in files:  # a header check: a truncated or mislabelled file fails here, before any model loads
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many kinds for a bad file
            raise MaskoptError(f"reference image {path} cannot be read ({type(e).__name__}: {e})") from None
    return files


def load_images(folder: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """Every image of `image_files(folder)`, RGB, resized to `size` (H, W): (N, 3, H, W) in [0, 1]."""
    import numpy as np
    from PIL import Image

    images = []
    for path in image_files(folder):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        except OSError as e:
            raise MaskoptError(f"reference image {path} cannot be read ({e})") from None
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(images)


__all__ = ["CLIP_DEFAULT", "Features", "image_files", "load_features", "load_images"]
