"""Tiny PRXPixel pipeline: real ``PRXTransformer2DModel`` (pixel space, patch 16) and Qwen3-VL text model, random
weights, no VAE."""

from __future__ import annotations

from .tokenizers import qwen_tokenizer

#: the released checkpoint's layout (3 channels, 16x16 patches, bottleneck patch projection, resolution embedding)
#: at toy widths; the parity goldens (tests/goldens/prx_pixel) use the same sizes
TRANSFORMER_CONFIG = dict(in_channels=3, patch_size=16, context_in_dim=16, hidden_size=16, mlp_ratio=2.0, num_heads=2,
                          depth=2, axes_dim=[4, 4], bottleneck_size=8, resolution_embeds=True)
TEXT_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})


def prx_pixel_text_encoder(tokenizer):
    import torch
    from transformers import Qwen3VLTextConfig, Qwen3VLTextModel

    torch.manual_seed(0)
    config = Qwen3VLTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)
    return Qwen3VLTextModel(config).eval()


def build_prx_pixel():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline, PRXTransformer2DModel

    from ..pipelines.registry import PRX_FLOWMATCH

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    transformer = PRXTransformer2DModel(**TRANSFORMER_CONFIG)
    with torch.no_grad():  # the stock init zeroes every block's modulation (gates 0: the blocks would do nothing)
        for parameter in transformer.parameters():
            parameter.normal_(0.0, 0.05)
    return PRXPixelPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(PRX_FLOWMATCH),
        text_encoder=prx_pixel_text_encoder(tokenizer), tokenizer=tokenizer,
    )
