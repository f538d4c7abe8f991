"""ImageReward (Xu et al. 2023) on transformers alone: BLIP's ViT and its cross-attending BERT, an MLP head.

Specs: `imagereward` (THUDM/ImageReward's ImageReward.pt and med_config.json), `imagereward@/models/ir`
(a folder with ImageReward.pt, and optionally med_config.json and a BERT tokenizer), or
`imagereward@/models/ImageReward.pt` (a file; its folder is searched the same way).

Score: (MLP(text encoder's [CLS] cross-attending to the image) - 0.16717) / 1.03334, ImageReward's own
standardisation (about N(0, 1) over its training set), what its `score()` returns.

The image-reward package (1.5, the last release) fails to import beside current torch and transformers
(tests/imagereward_reference.py lists what it misses), so its checkpoint is read directly
(`torch.load(weights_only=True)`) and mapped onto transformers' BLIP classes:
`blip.visual_encoder.*` onto a BlipVisionModel (its ViT: width, depth, patch and image size read from
the checkpoint, 64-wide heads as BLIP's ViTs have, LayerNorm eps 1e-6), `blip.text_encoder.*` onto a
BlipTextModel (med_config.json; cross-attention to the ViT's width), `mlp.layers.*` onto the head. A key
left unmapped, a target left unfilled or a shape that disagrees is an error listing them. Images are
preprocessed as ImageReward does (bicubic resize of the short side to 224, centre crop, OpenAI's mean
and std), prompts tokenized as it does (bert-base-uncased plus BLIP's [DEC] and [ENC] tokens, padded
and truncated to 35). Checked against ImageReward's own model code on random weights (docs/rewards.md).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch import nn

from ..errors import MaskoptError
from .base import batched, fit, load_checkpoint, optional_file, resolve_checkpoint, reward_name
from .clip import OPENAI_MEAN, OPENAI_STD, Preprocess

DEFAULT_CHECKPOINT = "THUDM/ImageReward/ImageReward.pt"
CONFIG_REPO = "THUDM/ImageReward"
TOKENIZER_SOURCE = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's standardisation
MAX_LENGTH = 35
HEAD_DIM = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)
# BLIP's med_config.json, as ImageReward ships it: when neither the folder nor the hub repo has one
MED_CONFIG = {"hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
              "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
              "vocab_size": 30524}

_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
# in the checkpoint, not in the score: BLIP's contrastive projections, and a buffer transformers rebuilds
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
_HEAD_LAYERS = (0, 2, 4, 6, 7)  # the nn.Linear positions of ImageReward's MLP (dropouts between)


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward.pt's keys -> (BlipVisionModel, BlipTextModel, head) state dicts; unknown keys are an error."""
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(_UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder."):]
            m = _BLOCK_KEY.match(k)
            if k in _VISION_TOP:
                vision[_VISION_TOP[k]] = value
            elif m and m.group(2) in _VISION_BLOCK:
                vision[f"encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"] = value
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder."):]] = value  # BlipText was ported from BLIP's med.py: same names
        elif re.match(r"^mlp\.layers\.(\d+)\.(weight|bias)$", key) and int(key.split(".")[2]) in _HEAD_LAYERS:
            head[f"{_HEAD_LAYERS.index(int(key.split('.')[2]))}.{key.rsplit('.', 1)[1]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise MaskoptError(f"ImageReward checkpoint: {len(unknown)} keys map to nothing: {', '.join(unknown[:6])}")
    return vision, text, head


def vision_config(vision: dict[str, torch.Tensor]) -> Any:
    """BLIP's ViT from the checkpoint's shapes (ImageReward's is ViT-L/16 at 224)."""
    from transformers import BlipVisionConfig

    try:
        width, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
        tokens = vision["embeddings.position_embedding"].shape[1]
        depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
        mlp = vision["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise MaskoptError(f"ImageReward checkpoint: its visual encoder lacks {e}") from None
    side = round((tokens - 1) ** 0.5)
    return BlipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                            num_attention_heads=width // HEAD_DIM, image_size=side * patch, patch_size=patch,
                            layer_norm_eps=1e-6, hidden_act="gelu")


def text_config(med: dict[str, Any], encoder_width: int) -> Any:
    from transformers import BlipTextConfig

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    return BlipTextConfig(**{k: med[k] for k in keys if k in med}, encoder_hidden_size=encoder_width,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None)


def head_module(head: dict[str, torch.Tensor]) -> nn.Sequential:
    sizes = [head[f"{i}.weight"].shape for i in range(len(_HEAD_LAYERS))]
    return nn.Sequential(*[nn.Linear(s[1], s[0]) for s in sizes])


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, extra, wrong = fit(state, {k: tuple(v.shape) for k, v in module.state_dict().items()})
    if missing or extra or wrong:
        parts = [f"{len(missing)} unfilled ({', '.join(missing[:4])})" if missing else "",
                 f"{len(extra)} unknown ({', '.join(extra[:4])})" if extra else "",
                 f"{len(wrong)} of another shape ({', '.join(wrong[:4])})" if wrong else ""]
        raise MaskoptError(f"ImageReward checkpoint, {what}: " + "; ".join(p for p in parts if p))
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})


def load_tokenizer(folder: str | None) -> Any:
    """bert-base-uncased (or the folder's own vocab.txt) with BLIP's two added tokens, as init_tokenizer makes it."""
    from transformers import BertTokenizer

    source = folder if folder and os.path.isfile(os.path.join(folder, "vocab.txt")) else TOKENIZER_SOURCE
    tokenizer = BertTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScore:
    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Module, tokenizer: Any, name: str,
                 batch_size: int = 8) -> None:
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.name, self.batch_size = name, batch_size
        side = vision.config.image_size
        self.preprocess = Preprocess(size=side, crop=(side, side), mean=OPENAI_MEAN, std=OPENAI_STD)
        param = next(vision.parameters())
        self.device, self.dtype = param.device, param.dtype

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return batched(self._score, images, prompts, self.batch_size)

    @torch.no_grad()
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt").to(self.device)
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, is_decoder=False)
        rewards = self.head(out.last_hidden_state[:, 0, :].float())  # (B, 1), in float32 as ImageReward.score
        return ((rewards - MEAN) / STD).squeeze(-1).cpu()


def _folder_of(source: str | None, checkpoint: str) -> str | None:
    """The local folder that may hold med_config.json and a tokenizer: the source's, or the checkpoint file's."""
    if source is not None and os.path.isdir(os.path.expanduser(source)):
        return os.path.expanduser(source)
    if source is not None and os.path.isfile(os.path.expanduser(source)):
        return os.path.dirname(os.path.abspath(os.path.expanduser(source)))
    return None


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ImageRewardScore:
    from transformers import BlipTextModel, BlipVisionModel

    path = resolve_checkpoint(source, DEFAULT_CHECKPOINT)
    state = load_checkpoint(path, "ImageReward")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MaskoptError(f"ImageReward checkpoint {path} holds no state dict of tensors")
    vision_state, text_state, head_state = split_checkpoint(state)
    folder = _folder_of(source, path)
    med_path = optional_file(folder or CONFIG_REPO, "med_config.json")
    # BERT-base's values where a med config leaves a key out (BlipTextConfig's own defaults differ: 8 heads)
    med = {**MED_CONFIG, **(json.loads(open(med_path, encoding="utf-8").read()) if med_path else {})}
    vconfig = vision_config(vision_state)
    vision = BlipVisionModel(vconfig)
    text = BlipTextModel(text_config(med, vconfig.hidden_size), add_pooling_layer=False)
    head = head_module(head_state)
    _load_into(vision, vision_state, "visual encoder")
    _load_into(text, text_state, "text encoder")
    _load_into(head, head_state, "MLP head")
    vision, text = (m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (vision, text))
    head = head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)  # ImageReward: .float() first
    return ImageRewardScore(vision, text, head, load_tokenizer(folder), name=reward_name("imagereward", source))
