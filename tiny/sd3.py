"""Tiny Stable Diffusion 3.5 pipeline: real ``SD3Transformer2DModel``, two CLIP text encoders with projection and T5,
FLUX.1's 16-channel VAE geometry, random weights."""

from __future__ import annotations

from .flux import clip_text_encoder, flux_vae, t5_text_encoder
from .tokenizers import clip_tokenizer, t5_tokenizer

CLIP_HIDDEN = 32  # each CLIP encoder; the pipeline concatenates both (64) and zero-pads them to T5's width
T5_HIDDEN = 64


def build_sd3():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from ..pipelines.registry import get_spec

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=T5_HIDDEN, caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_HIDDEN, pos_embed_max_size=96,
    )
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(dict(get_spec("sd3").scheduler.config)),
        vae=flux_vae(),
        text_encoder=clip_text_encoder(tokenizer, with_projection=True, hidden=CLIP_HIDDEN, projection=CLIP_HIDDEN),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(tokenizer_2, with_projection=True, hidden=CLIP_HIDDEN,
                                         projection=CLIP_HIDDEN),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_text_encoder(tokenizer_3, d_model=T5_HIDDEN),
        tokenizer_3=tokenizer_3,
    )
