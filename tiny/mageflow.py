"""Tiny Mage-Flow pipelines: our ``MageFlowTransformer2DModel`` and ``MageVAE`` (the architectures ai-toolkit runs, at
tiny sizes), the real ``Qwen3VLForConditionalGeneration`` class as the text encoder (one vision block, which the edit
id feeds its reference images through); random weights, built offline.

The transformer and VAE weights are :func:`fill_by_name` draws, so that ai-toolkit's modules built from the same
configs get the same weights (tests/goldens/mageflow)."""

from __future__ import annotations

from .krea2 import qwen3_vl_processor
from .nucleus_image import qwen3_vl_text_encoder
from .tokenizers import qwen_tokenizer

TRANSFORMER_CONFIG = dict(in_channels=16, out_channels=16, context_in_dim=16, hidden_size=32, num_heads=2, depth=2,
                          axes_dim=(4, 6, 6))
#: a 2x2 attention window so that the tiny latents (4x4 at 64x64) are tiled and padded as large ones are
VAE_CONFIG = dict(latent_channels=16, hidden_size=32, patch_size=16, encoder_blocks=1, encoder_head_size=32,
                  encoder_head_blocks=1, decoder_blocks=1, decoder_pixel_size=8, decoder_pixel_blocks=1, mlp_ratio=2.0,
                  attention_window=2)
WEIGHT_SEED, WEIGHT_STD = 1, 0.2


def fill_by_name(model, seed: int = WEIGHT_SEED, std: float = WEIGHT_STD):
    """Every parameter, in sorted name order, gets ``std * randn`` from one generator seeded with ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(parameters):
            parameters[name].copy_(torch.randn(parameters[name].shape, generator=generator) * std)
    return model.eval()


def mageflow_transformer():
    from ..pipelines.families.mageflow_transformer import MageFlowTransformer2DModel

    return fill_by_name(MageFlowTransformer2DModel(**TRANSFORMER_CONFIG))


def mageflow_vae():
    from ..pipelines.families.mageflow_vae import MageVAE

    return fill_by_name(MageVAE(**VAE_CONFIG))


def build_mageflow(edit: bool = False):
    from ..pipelines.families.mageflow import MageFlowPipeline

    tokenizer = qwen_tokenizer()
    pipe = MageFlowPipeline(transformer=mageflow_transformer(), vae=mageflow_vae(),
                            text_encoder=qwen3_vl_text_encoder(tokenizer, width=16, layers=2), tokenizer=tokenizer,
                            processor=qwen3_vl_processor(tokenizer) if edit else None)
    if edit:
        pipe.register_to_config(processor=("transformers", "Qwen3VLProcessor"))
    return pipe


def build_mageflow_edit():
    return build_mageflow(edit=True)
