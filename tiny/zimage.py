"""Tiny Z-Image pipelines (Z-Image, Turbo, De-Turbo): real classes, random weights, built offline.

``build_zimage_deturbo`` mirrors how the De-Turbo model is assembled: a Turbo-style pipeline folder (text encoder,
VAE, tokenizer) plus a separately stored De-Turbo transformer. The latter is saved in the folder's
``de_turbo_transformer/`` subfolder (written next to the pipeline by the builder's ``save_pretrained``), which is
where the family loader looks for it in a local folder.
"""

from __future__ import annotations

from .flux import flux_vae
from .tokenizers import qwen_tokenizer

DETURBO_SUBFOLDER = "de_turbo_transformer"


def zimage_transformer(seed: int = 0):
    import torch
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # the pad tokens are torch.empty-initialised: make them finite and deterministic
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    return transformer


def zimage_text_encoder(tokenizer):
    """Z-Image's tiny Qwen3 text model (2 layers, width 16), ``torch.manual_seed(0)`` init; Zeta-Chroma uses it too."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    return Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
    )).eval()


def zimage_components(transformer=None) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines.registry import ZIMAGE_FLOWMATCH

    tokenizer = qwen_tokenizer()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(ZIMAGE_FLOWMATCH),
        "vae": flux_vae(),
        "text_encoder": zimage_text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "transformer": transformer if transformer is not None else zimage_transformer(),
    }


def build_zimage():
    from diffusers import ZImagePipeline

    return ZImagePipeline(**zimage_components())


def build_zimage_deturbo():
    import os

    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(**zimage_components())
    deturbo = zimage_transformer(seed=1)
    save_pipeline = pipe.save_pretrained

    def save_with_deturbo(save_directory, **kwargs):
        save_pipeline(save_directory, **kwargs)
        deturbo.save_pretrained(os.path.join(save_directory, DETURBO_SUBFOLDER))

    pipe.save_pretrained = save_with_deturbo
    return pipe
