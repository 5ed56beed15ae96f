"""Tiny OmniGen2 pipeline: our ``OmniGen2Transformer2DModel`` (grouped key-value heads, every refiner), the real
``Qwen2_5_VLForConditionalGeneration`` class as the MLLM, a FLUX-geometry VAE; random weights, built offline."""

from __future__ import annotations

from .flux import flux_vae
from .qwen_image import qwen_vl_text_encoder
from .tokenizers import qwen_tokenizer

LATENT_CHANNELS = 16


def omnigen2_transformer(text_feat_dim: int = 16):
    import torch

    from ..pipelines.families.omnigen2_transformer import OmniGen2Transformer2DModel

    torch.manual_seed(0)
    model = OmniGen2Transformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 4, 4), axes_lens=(512, 512, 512),
        text_feat_dim=text_feat_dim, timestep_scale=1000.0,
    )
    # the real checkpoint's zero-initialised output layers are trained; random values keep the tiny model non-trivial
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim and not param.any():
                param.normal_(0.0, 0.2)
    return model.eval()


def build_omnigen2():
    from ..pipelines.families.omnigen2 import OmniFlowMatchEulerScheduler, OmniGen2Pipeline

    tokenizer = qwen_tokenizer()
    return OmniGen2Pipeline(
        transformer=omnigen2_transformer(), vae=flux_vae(), scheduler=OmniFlowMatchEulerScheduler(),
        mllm=qwen_vl_text_encoder(tokenizer), processor=tokenizer,
    )
