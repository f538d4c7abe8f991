"""Tiny and full-size U-Net configs the tests build (no download): SD1.5-, SD2.1- and SDXL-shaped."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

# SD1.5's block structure at toy width: same unit names, same code paths.
TINY_SD = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4,
)

# SD2.1's: linear projections, per-block head dims, upcast attention (and, in tiny_pipeline, v-prediction).
TINY_SD21 = {**TINY_SD, "attention_head_dim": (2, 4), "use_linear_projection": True, "upcast_attention": True}

# SDXL's: added text/time conditioning, linear projections, several transformer layers.
TINY_XL = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=24,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
)


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def tiny_unet(config: dict = TINY_SD, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    # Random init leaves some layers (e.g. conv_out) at zero; perturb everything so masks change outputs.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, size: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    kw = dict(
        sample=torch.randn(batch, cfg.in_channels, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, cfg.cross_attention_dim, generator=g),
    )
    if cfg.addition_embed_type == "text_time":
        text_embeds = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, text_embeds, generator=g), time_ids=torch.randn(batch, 6, generator=g)
        )
    return kw


def tiny_pipeline(path, xl: bool = False, seed: int = 0, sd21: bool = False):
    """Save a tiny StableDiffusion(XL)Pipeline with save_pretrained, as a user's local folder would be.

    sd21: SD2.1-shaped (see TINY_SD21), a gelu text encoder and a v-prediction scheduler.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tiny_clip import save_tokenizer

    torch.manual_seed(seed)
    unet = tiny_unet(TINY_XL if xl else TINY_SD21 if sd21 else TINY_SD, seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    tok = save_tokenizer(path / "_tok")
    text = lambda hidden, **kw: CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw
    )
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if sd21 else "epsilon")
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=sched, tokenizer=tok, tokenizer_2=tok,
            text_encoder=CLIPTextModel(text(8)), text_encoder_2=CLIPTextModelWithProjection(text(16, projection_dim=24)),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=sched, tokenizer=tok,
            text_encoder=CLIPTextModel(text(16, hidden_act="gelu") if sd21 else text(16)),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(path)
    return path
