"""Tiny FLUX.1 / Kontext pipelines: real classes, real 8x VAE geometry and 2x2 latent packing, random weights."""

from __future__ import annotations

from .tokenizers import clip_tokenizer, t5_tokenizer


def clip_text_encoder(tokenizer, with_projection: bool = False, hidden: int = 32, projection: int = 32):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, hidden_act="gelu", projection_dim=projection, max_position_embeddings=77,
    )
    torch.manual_seed(0)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def t5_text_encoder(tokenizer, d_model: int = 32):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def flux_vae(latent_channels: int = 16, blocks: int = 4, mid_attention: bool = True):
    """An AutoencoderKL with FLUX's 8x downsampling (``blocks`` 4; each block fewer halves it) and 16 latent channels,
    16 feature channels wide; ``mid_attention`` False leaves out the middle blocks' self-attention over every latent
    pixel (costly on large latents)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=(16,) * blocks, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=64, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611, mid_block_add_attention=mid_attention,
    )


def flux_transformer(in_channels: int = 64, out_channels: int | None = None):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=[4, 6, 6],
    )


def flux_components(transformer=None) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines.registry import FLUX_FLOWMATCH

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOWMATCH),
        "text_encoder": clip_text_encoder(clip_tok),
        "tokenizer": clip_tok,
        "text_encoder_2": t5_text_encoder(t5_tok),
        "tokenizer_2": t5_tok,
        "transformer": transformer if transformer is not None else flux_transformer(),
        "vae": flux_vae(),
    }


def build_flux():
    from diffusers import FluxPipeline

    return FluxPipeline(**flux_components())


def build_flux_kontext():
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**flux_components())
