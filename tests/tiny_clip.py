"""Tiny CLIP models the reward tests build and save like hub repos (no download).

save_tiny_clip(dir) writes what a CLIP hub repo holds: config.json + model.safetensors
(save_pretrained), a CLIPTokenizer made from a hand-written byte-level vocab.json/merges.txt, and a
preprocessor_config.json in the hub's CLIPImageProcessor format. to_open_clip() turns a CLIPModel
state dict into open_clip's key layout (written here, independently of maskopt.rewards.hpsv2, so
the test checks one mapping against its inverse).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

IMAGE_SIZE = 32
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _byte_chars() -> list[str]:
    # GPT-2/CLIP byte-level BPE's printable stand-ins for the 256 bytes.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def save_tokenizer(path: Path, max_length: int = 16) -> CLIPTokenizer:
    """Every byte alone and word-final, a few merges so some words are one token, CLIP's two specials."""
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=max_length)
    tokenizer.save_pretrained(path)
    return tokenizer


def save_preprocessor(path: Path, size: int = IMAGE_SIZE, crop: int = IMAGE_SIZE, mean=MEAN, std=STD) -> None:
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def tiny_config(tokenizer: CLIPTokenizer, projection_dim: int = 16) -> CLIPConfig:
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(path: Path, seed: int = 0, tokenizer: bool = True, preprocessor: bool = True,
                   weights: bool = True) -> CLIPModel:
    """A random tiny CLIPModel saved to path as a hub repo would hold it; returns the model (eval)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(path / "_tokenizer") if not tokenizer else save_tokenizer(path)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_config(tok)).eval()
    # A random init leaves logit_scale at the default; make it distinct so scale bugs show.
    model.logit_scale.data.fill_(3.0)
    if weights:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
    if preprocessor:
        save_preprocessor(path)
    return model


_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel keys -> open_clip's (ViT towers, non-HF text tower)."""
    top = {
        "logit_scale": "logit_scale",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    }
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value.clone()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().clone()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().clone()
        else:
            tower, _, _, index, rest = key.split(".", 4)  # e.g. vision_model.encoder.layers.0.mlp.fc1.weight
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{index}."
            module, _, param = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                packed.setdefault(f"{prefix}attn.in_proj_{param}", {})[module[-6]] = value
            else:
                out[f"{prefix}{_BLOCK[module]}.{param}"] = value.clone()
    for key, parts in packed.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
