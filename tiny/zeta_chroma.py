"""Tiny Zeta-Chroma pipeline: our ``ZetaChromaTransformer2DModel`` at toy widths (32x32 RGB patches as tokens, as the
real model) with Z-Image's tiny Qwen3 text model and tokenizer; no VAE.

The transformer's parameters are redrawn by :func:`fill_parameters` (every parameter, in sorted name order, from one
seeded generator): the parity goldens (tests/goldens/zeta_chroma) ran ai-toolkit's ``ZImageDCT`` on the weights this
rule gives for the same config, which are too large to commit (the timestep MLP alone is 256 x 1024).
"""

from __future__ import annotations

from .tokenizers import qwen_tokenizer
from .zimage import zimage_text_encoder

#: the released layout (3072 values per token, patch 1, x0 prediction, 3 rope axes) at toy widths; text width = the
#: tiny Qwen3's hidden size
TRANSFORMER_CONFIG = dict(in_channels=3072, patch_size=1, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                          n_kv_heads=2, cap_feat_dim=16, axes_dims=(8, 4, 4), decoder_hidden_size=16,
                          decoder_num_res_blocks=2, use_x0=True)
WEIGHTS_SEED = 1234


def fill_parameters(model, seed: int = WEIGHTS_SEED, scale: float = 0.1) -> None:
    """Every parameter, in sorted name order, drawn ``randn * scale`` from one generator seeded ``seed``; the norm
    weights get 1 added (so that normalisations keep their input's scale)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(parameters):
            value = torch.randn(parameters[name].shape, generator=generator) * scale
            parameters[name].copy_(value + 1.0 if "norm" in name else value)


def zeta_chroma_transformer():
    from ..pipelines.families.zeta_chroma_transformer import ZetaChromaTransformer2DModel

    transformer = ZetaChromaTransformer2DModel(**TRANSFORMER_CONFIG)
    fill_parameters(transformer)
    return transformer.eval()


def build_zeta_chroma():
    from ..pipelines.families.zeta_chroma import ZetaChromaPipeline

    tokenizer = qwen_tokenizer()
    return ZetaChromaPipeline(transformer=zeta_chroma_transformer(), text_encoder=zimage_text_encoder(tokenizer),
                              tokenizer=tokenizer)
