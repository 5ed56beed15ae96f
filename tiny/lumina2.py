"""Tiny Lumina-Image 2.0 pipeline: real ``Lumina2Transformer2DModel`` and Gemma2 text encoder, random weights."""

from __future__ import annotations

from .flux import flux_vae
from .tokenizers import gemma_tokenizer


def build_lumina2():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from ..pipelines.registry import LUMINA2_FLOWMATCH

    tokenizer = gemma_tokenizer()
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(8, 4, 4), axes_lens=(300, 64, 64), cap_feat_dim=16,
    )
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=1,
        max_position_embeddings=512,
    )).eval()
    return Lumina2Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(LUMINA2_FLOWMATCH),
        vae=flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
    )
