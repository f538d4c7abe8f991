"""PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences.

Specs: `pickscore` (yuvalkirstain/PickScore_v1), `pickscore@/models/pickscore` (a saved CLIPModel
directory).

Score: logit_scale.exp() * cos(image embedding, text embedding), as in PickScore's README
(logit_scale.exp() is about 100 for PickScore_v1, so scores land near 20).

The model comes from source. Tokenizer and preprocessing come from source too when it is a
local directory holding a tokenizer_config.json, else from laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
the processor PickScore was trained with (its README loads the two separately).
"""

from __future__ import annotations

import logging
import os

import torch

from .base import reward_name
from .clip import ClipEmbedder, ClipScore, load_model, load_preprocess, load_tokenizer

DEFAULT_SOURCE = "yuvalkirstain/PickScore_v1"
PROCESSOR_SOURCE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

logger = logging.getLogger(__name__)


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ClipScore:
    src = source or DEFAULT_SOURCE
    model = load_model(src, device, dtype)
    has_own = os.path.isfile(os.path.join(os.path.expanduser(src), "tokenizer_config.json"))
    processor = src if has_own else PROCESSOR_SOURCE
    logger.info("pickscore: tokenizer and preprocessing from %s", processor)
    preprocess = load_preprocess(processor, model.config.vision_config.image_size)
    scale = model.logit_scale.detach().float().exp().item()
    embedder = ClipEmbedder(model, preprocess, load_tokenizer(processor))
    return ClipScore(embedder, scale=scale, name=reward_name("pickscore", source), batch_size=8)
