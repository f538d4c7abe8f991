"""ImageReward's own model code, run in this environment, as the reference maskopt's ImageReward is checked against.

The `image-reward` package (1.5, the last release) cannot be imported beside current torch/transformers
(it fails, in turn, on: no `clip` module, `pkg_resources`, torchvision's compiled ops, `apply_chunking_to_forward`
gone from transformers.modeling_utils, `datasets`). Its model is four source files: models/BLIP/vit.py
(the ViT), med.py (BLIP's BERT with cross-attention), blip_pretrain.py and ImageReward.py (the MLP head
and the standardisation). This module downloads the wheel (`pip download image-reward==1.5 --no-deps`,
cached in ~/.cache/maskopt/image-reward or MASKOPT_IMAGEREWARD_WHEEL) and executes those files unchanged,
with stand-ins only for what they import and no longer exists here, none of which touches a number that
is compared:

    timm's PatchEmbed        its ViT patch projection: Conv2d(patch, stride patch), flatten, transpose (timm 0.6.13's)
    timm's DropPath          identity at eval (drop_path_rate 0 here anyway)
    timm's trunc_normal_, _cfg, register_model, named_apply, adapt_input_conv, download_cached_file: init/loading only
    fairscale's checkpoint_wrapper: gradient checkpointing only (off)
    transformers.modeling_utils.apply_chunking_to_forward etc.: moved to transformers.pytorch_utils
    BertPreTrainedModel.init_weights: transformers 4.x's (apply _init_weights); 5.x's needs post_init
    invert_attention_mask, get_head_mask: transformers 4.x's, removed from PreTrainedModel in 5.x
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import torch
from torch import nn

WHEEL = "image-reward==1.5"


def wheel_dir() -> Path:
    return Path(os.environ.get("MASKOPT_IMAGEREWARD_WHEEL", Path.home() / ".cache" / "maskopt" / "image-reward"))


def source() -> tuple[Path | None, str]:
    """The unpacked wheel's ImageReward/ folder (downloaded once), or (None, why not)."""
    root = wheel_dir()
    package = root / "src" / "ImageReward"
    if (package / "ImageReward.py").is_file():
        return package, ""
    root.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", WHEEL, "--no-deps", "-d", str(root)],
                       capture_output=True, text=True, timeout=300)
    wheels = sorted(root.glob("image_reward-*.whl"))
    if r.returncode != 0 or not wheels:
        return None, f"pip download {WHEEL} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(root / "src")
    return package, ""


class _PatchEmbed(nn.Module):
    """timm 0.6.13's PatchEmbed as BLIP's ViT builds it (flatten=True, no norm)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


_SHIMMED = ("timm", "timm.models", "timm.models.vision_transformer", "timm.models.registry", "timm.models.layers",
            "timm.models.helpers", "timm.models.hub", "fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
            "fairscale.nn.checkpoint.checkpoint_activations")


def _shims() -> None:
    def module(name, **attrs):
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m
        return m

    module("timm")
    module("timm.models")
    module("timm.models.vision_transformer", _cfg=lambda **kw: kw, PatchEmbed=_PatchEmbed)
    module("timm.models.registry", register_model=lambda f: f)
    module("timm.models.layers", trunc_normal_=lambda t, std=1.0, **kw: nn.init.trunc_normal_(t, std=std),
           DropPath=lambda p=0.0: nn.Identity())
    module("timm.models.helpers", named_apply=None, adapt_input_conv=None)
    module("timm.models.hub", download_cached_file=None)
    module("fairscale")
    module("fairscale.nn")
    module("fairscale.nn.checkpoint")
    module("fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=lambda m: m)
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    def find_pruneable_heads_and_indices(*a, **kw):
        raise NotImplementedError("pruning is not used")

    mu.apply_chunking_to_forward = pu.apply_chunking_to_forward
    mu.prune_linear_layer = pu.prune_linear_layer
    mu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices


def _invert_attention_mask(self, encoder_attention_mask):
    """transformers 4.x's ModuleUtilsMixin.invert_attention_mask (gone in 5.x)."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    """transformers 4.x's ModuleUtilsMixin.get_head_mask, for head_mask None (the only case used)."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not used")
    return [None] * num_hidden_layers


_REMOVED_FROM_TRANSFORMERS = {"invert_attention_mask": _invert_attention_mask, "get_head_mask": _get_head_mask}


def load_reference(package: Path) -> types.SimpleNamespace:
    """ImageReward's vit, med and ImageReward modules, executed from the wheel's files."""
    saved = {name: sys.modules.get(name) for name in _SHIMMED}
    _shims()
    loaded = {}
    for name, rel in (("vit", "models/BLIP/vit.py"), ("med", "models/BLIP/med.py"), ("ImageReward", "ImageReward.py")):
        path = package / rel
        text = path.read_text()
        if name == "ImageReward":  # only its MLP and score_gard are used; its BLIP import would pull the tokenizer
            text = text.replace("from .models.BLIP.blip_pretrain import BLIP_Pretrain", "BLIP_Pretrain = None")
            text = text.replace("from torchvision.transforms import Compose, Resize, CenterCrop, ToTensor, Normalize",
                                "Compose = Resize = CenterCrop = ToTensor = Normalize = None")
        spec = importlib.util.spec_from_loader(f"imagereward_reference_{name}", loader=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__file__ = str(path)
        try:
            exec(compile(text, str(path), "exec"), mod.__dict__)
        finally:
            if name == "ImageReward":  # the last: the stand-ins leave sys.modules, the modules keep their names
                for shimmed, original in saved.items():
                    sys.modules.pop(shimmed) if original is None else sys.modules.__setitem__(shimmed, original)
        loaded[name] = mod
    # transformers 5's init_weights needs post_init's bookkeeping, which med.py (written for 4.x) never calls;
    # 4.x's init_weights was this (BERT ties no weights)
    bert = loaded["med"].BertPreTrainedModel
    bert.init_weights = lambda self: self.apply(self._init_weights)
    for name, method in _REMOVED_FROM_TRANSFORMERS.items():
        if not hasattr(bert, name):
            setattr(bert, name, method)
    return types.SimpleNamespace(**loaded)


def tiny_reference(ref: types.SimpleNamespace, vocab_size: int, seed: int = 0) -> types.SimpleNamespace:
    """A tiny ImageReward from the reference classes: ViT (width 128, 2 blocks, 2 heads of 64, 32 px, patch 16),
    med's BertModel (width 64, 2 layers, cross-attention to the ViT), the MLP head; every weight random."""
    torch.manual_seed(seed)
    visual = ref.vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=128, depth=2, num_heads=2)
    config = ref.med.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=96, max_position_embeddings=40, add_cross_attention=True,
                                encoder_width=128, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    text = ref.med.BertModel(config=config, add_pooling_layer=False)
    mlp = ref.ImageReward.MLP(64)
    blip = nn.Module()
    blip.visual_encoder, blip.text_encoder = visual, text
    blip.vision_proj, blip.text_proj = nn.Linear(128, 16), nn.Linear(64, 16)  # in the checkpoint, unused by the score
    model = nn.Module()
    model.blip, model.mlp = blip, mlp
    with torch.no_grad():  # perturb everything, LayerNorms and biases included, so a swapped key shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.device, model.mean, model.std = "cpu", 0.16717362830052426, 1.0333394966054072
    return types.SimpleNamespace(model=model, score=lambda ids, mask, pixels: ref.ImageReward.ImageReward.score_gard(
        model, ids, mask, pixels))
