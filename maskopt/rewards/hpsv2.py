"""HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences, run in transformers.

Specs: `hpsv2` (xswu/HPSv2, HPS_v2.1_compressed.pt), `hpsv2@/models/HPS_v2.1_compressed.pt` (a local
checkpoint), `hpsv2@xswu/HPSv2/HPS_v2_compressed.pt` (another file of a hub repo: v2.0),
`hpsv2@/models/hps` (a directory: its one .pt, plus its config.json/tokenizer when present).

Score: cos(image embedding, text embedding), exactly what hpsv2.score() returns (about 0.2-0.35;
HPSv2's benchmark tables print 100x this). Images are fitted as HPSv2 does at inference
(open_clip's ResizeMaxSize: longest side to 224, zero-pad to square; in PIL, so the bicubic overshoot
clipped), not centre-cropped. Both towers run ViT-H-14's gelu, whatever the base config omits.

open_clip is not imported: it needs torchvision, and the torchvision paired with this torch fails to import
beside the CPU torch wheel (`operator torchvision::nms does not exist`). The checkpoint's state dict
(``{"state_dict": ...}`` as HPSv2 saves it) is renamed onto transformers' CLIPModel keys, and loaded
into a CLIPModel built from laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json; that repo also
gives the tokenizer and preprocessing sizes (no weights are fetched from it). Any key left unmapped,
any target key left unfilled and any shape that disagrees is an error that lists them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from ..errors import MaskoptError
from .base import base_model_source, fit, load_checkpoint, reward_name, resolve_checkpoint
from .clip import ClipEmbedder, ClipScore, load_preprocess, load_tokenizer

if TYPE_CHECKING:
    from transformers import CLIPConfig

DEFAULT_CHECKPOINT = "xswu/HPSv2/HPS_v2.1_compressed.pt"
BASE_SOURCE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# open_clip CLIP (non-HF text tower) -> transformers CLIPModel. open_clip names from
# src/open_clip/model.py and transformer.py (CLIP, VisionTransformer, ResidualAttentionBlock).
_RENAMED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# open_clip applies these as x @ proj with proj (width, embed_dim); nn.Linear keeps proj.T.
_TRANSPOSED = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
# Inside a residual block. attn.in_proj_{weight,bias} (nn.MultiheadAttention's packed q, k, v) is split below.
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
# The text tower's causal mask: a buffer that some open_clip versions saved; transformers builds its own.
_IGNORED = {"attn_mask"}


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT CLIP state dict onto transformers' CLIPModel keys.

    Raises MaskoptError listing the keys it does not know (e.g. LayerScale's ls_1, a timm or HF
    text tower), rather than dropping them.
    """
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _RENAMED:
            out[_RENAMED[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _BLOCK_KEY.match(key):
            visual, index, rest = match.groups()
            prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}."
            module, _, param = rest.rpartition(".")
            if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
                kind = param.removeprefix("in_proj_")
                for name, part in zip("qkv", value.chunk(3, dim=0)):  # packed in q, k, v order
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
            elif module in _BLOCK:
                out[f"{prefix}{_BLOCK[module]}.{param}"] = value
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    if unmapped:
        raise MaskoptError(
            f"{len(unmapped)} open_clip keys have no transformers CLIPModel counterpart: {_few(unmapped)}"
        )
    return out


def check_complete(state: dict[str, torch.Tensor], config: "CLIPConfig") -> None:
    """Raise MaskoptError unless state fills every CLIPModel(config) key with the right shape, and no more."""
    from transformers import CLIPModel

    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
    missing, extra, wrong = fit(state, expected)
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in wrong]
    problems = [
        f"{len(missing)} CLIPModel keys not filled: {_few(missing)}" if missing else "",
        f"{len(extra)} keys CLIPModel does not have: {_few(extra)}" if extra else "",
        f"{len(wrong)} shapes differ from the config: {_few(wrong)}" if wrong else "",
    ]
    if any(problems):
        found = "; ".join(p for p in problems if p)
        raise MaskoptError(f"HPS checkpoint does not fit the ViT-H-14 CLIPModel config: {found}")


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an HPSv2 checkpoint: {"state_dict": ...} or a bare state dict, any "module." prefix dropped."""
    checkpoint = load_checkpoint(path, "HPSv2")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise MaskoptError(f"{path} holds no state dict (got {type(checkpoint).__name__})")
    # DistributedDataParallel saves prefix every key with "module."; HPSv2's own loader expects none.
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


ACTIVATION = "gelu"  # open_clip's ViT-H-14 towers use nn.GELU; transformers' CLIPConfig defaults to quick_gelu


def with_activation(config: "CLIPConfig", base: str) -> "CLIPConfig":
    """`config` with both towers on ViT-H-14's activation; a base config.json that names another is an error.

    A config without `hidden_act` would otherwise run transformers' default, quick_gelu (about 3e-3 off)."""
    import json

    from .base import optional_file

    path = optional_file(base, "config.json")
    raw = json.loads(open(path, encoding="utf-8").read()) if path is not None else {}
    for tower in ("text_config", "vision_config"):
        named = (raw.get(tower) or {}).get("hidden_act")
        if named is not None and named != ACTIVATION:
            raise MaskoptError(f"{base}: config.json's {tower} has hidden_act {named!r}, but HPSv2's ViT-H-14 "
                               f"uses {ACTIVATION!r}")
        getattr(config, tower).hidden_act = ACTIVATION
    return config


def load(source: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ClipScore:
    from transformers import CLIPConfig, CLIPModel

    path = resolve_checkpoint(source, DEFAULT_CHECKPOINT)
    base = base_model_source(source, BASE_SOURCE)
    config = with_activation(CLIPConfig.from_pretrained(base), base)
    state = open_clip_to_transformers(read_state_dict(path))
    check_complete(state, config)
    # Cast first: the compressed checkpoints may hold float16 tensors.
    state = {k: v.to(torch.float32) for k, v in state.items()}
    model = CLIPModel.from_pretrained(None, config=config, state_dict=state)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    preprocess = load_preprocess(base, config.vision_config.image_size, fit="pad")
    embedder = ClipEmbedder(model, preprocess, load_tokenizer(base))
    return ClipScore(embedder, scale=1.0, name=reward_name("hpsv2", source), batch_size=8)
