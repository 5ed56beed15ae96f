"""Tiny SD 1.5 / SD 2 / SDXL / SSD-1B / Segmind-Vega pipelines: real classes, 8x VAE geometry, char-level CLIP
tokenizers, random weights.

The UNets are small but keep every module kind an ai-toolkit kohya LoRA targets: attention and feed-forward
Linears, 1x1 convs (``proj_in``/``proj_out`` in SD 1.5, ``conv_shortcut`` where channels change) and 3x3 convs.
SD 2 differs from SD 1.5 by its linear ``proj_in``/``proj_out`` and per-block head counts (and is v-prediction);
SSD-1B and Segmind-Vega are SDXL UNets with blocks distilled away: SSD-1B keeps fewer transformer layers in some
attention blocks (``reverse_transformer_layers_per_block``), Vega one resnet/attention layer per block.
"""

from __future__ import annotations

from .flux import clip_text_encoder
from .tokenizers import clip_tokenizer

TEXT_HIDDEN = 32  # width of each tiny CLIP text encoder (SDXL concatenates two: cross-attention width 64)


def ddpm_scheduler(model_id: str = "sdxl"):
    """ai-toolkit's DDPM sampling scheduler for ``model_id`` (the registry's config)."""
    from diffusers import DDPMScheduler

    from ..pipelines.registry import get_spec

    return DDPMScheduler.from_config(dict(get_spec(model_id).scheduler.config))


def sd_vae(scaling_factor: float):
    """AutoencoderKL with SD's 8x downsampling, 4 latent channels and quant convs, 16 feature channels wide."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(16,) * 4, layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
    )


def _sd_pipeline(model_id: str, **unet_config):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, norm_num_groups=8, **unet_config,
    )
    tokenizer = clip_tokenizer()
    return StableDiffusionPipeline(
        vae=sd_vae(scaling_factor=0.18215), text_encoder=clip_text_encoder(tokenizer, hidden=TEXT_HIDDEN),
        tokenizer=tokenizer, unet=unet, scheduler=ddpm_scheduler(model_id), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def build_sd15():
    return _sd_pipeline("sd15", attention_head_dim=8, use_linear_projection=False)


def build_sd2():
    return _sd_pipeline("sd2", attention_head_dim=(2, 4), use_linear_projection=True)


def _sdxl_pipeline(model_id: str, **unet_config):
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    time_embed_dim, projection = 8, 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # SDXL's added condition: 6 micro-conditioning values (sizes, crop) embedded, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection,
        cross_attention_dim=2 * TEXT_HIDDEN, norm_num_groups=8, **unet_config,
    )
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=sd_vae(scaling_factor=0.13025),
        text_encoder=clip_text_encoder(tokenizer, hidden=TEXT_HIDDEN),
        text_encoder_2=clip_text_encoder(tokenizer_2, with_projection=True, hidden=TEXT_HIDDEN, projection=projection),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=ddpm_scheduler(model_id),
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )


def build_sdxl():
    return _sdxl_pipeline("sdxl", layers_per_block=2, transformer_layers_per_block=(1, 2))


def build_ssd():
    # the up path's attention block keeps 1 of its 2 transformer layers in its first two resnets (as SSD-1B drops some)
    return _sdxl_pipeline("ssd", layers_per_block=2, transformer_layers_per_block=(1, 2),
                          reverse_transformer_layers_per_block=((1, 1, 2), (1, 1, 1)))


def build_vega():
    return _sdxl_pipeline("vega", layers_per_block=1, transformer_layers_per_block=(1, 1))
