"""Tiny CogView4 pipeline: real ``CogView4Transformer2DModel`` and GLM text encoder, random weights."""

from __future__ import annotations

from .flux import flux_vae
from .tokenizers import glm_tokenizer


def build_cogview4():
    import torch
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    from ..pipelines.registry import COGVIEW4_FLOWMATCH

    tokenizer = glm_tokenizer()
    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=8,
        rope_axes_dim=(32, 32),
    )
    torch.manual_seed(0)
    text_encoder = GlmModel(GlmConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=1024,
    )).eval()
    return CogView4Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(COGVIEW4_FLOWMATCH),
        vae=flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
    )
