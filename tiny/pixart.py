"""Tiny PixArt-alpha / PixArt-Sigma pipelines: real ``PixArtTransformer2DModel`` and T5, SD's VAE geometry, random
weights.

``sample_size=32`` is the smallest transformer size the pipelines' resolution binning knows (the 256-pixel aspect
ratio bins): a request is sampled at its nearest bin and resized back, as with the real 1024-pixel checkpoints. The
alpha transformer takes the resolution / aspect-ratio micro-conditions (the real PixArt-XL-2-1024-MS does); the
alpha pipeline feeds them only to a ``sample_size`` 128 transformer, so the tiny one leaves them out.
"""

from __future__ import annotations

from .flux import t5_text_encoder
from .stable_diffusion import sd_vae
from .tokenizers import t5_tokenizer

T5_HIDDEN = 32


def _pixart_pipeline(model_id: str, pipeline_class: str, scaling_factor: float):
    import diffusers
    import torch
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    from ..pipelines.registry import get_spec

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=T5_HIDDEN, in_channels=4, out_channels=8, cross_attention_dim=16, norm_num_groups=8,
        use_additional_conditions=False,
    )
    tokenizer = t5_tokenizer()
    return getattr(diffusers, pipeline_class)(
        transformer=transformer, vae=sd_vae(scaling_factor=scaling_factor),
        text_encoder=t5_text_encoder(tokenizer, d_model=T5_HIDDEN), tokenizer=tokenizer,
        scheduler=DDPMScheduler.from_config(dict(get_spec(model_id).scheduler.config)),
    )


def build_pixart():
    return _pixart_pipeline("pixart", "PixArtAlphaPipeline", scaling_factor=0.18215)  # PixArt-alpha: SD's VAE


def build_pixart_sigma():
    return _pixart_pipeline("pixart_sigma", "PixArtSigmaPipeline", scaling_factor=0.13025)  # PixArt-Sigma: SDXL's
