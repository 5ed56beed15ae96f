"""Tiny AuraFlow pipeline: real ``AuraFlowTransformer2DModel`` and UMT5 encoder, SDXL's VAE geometry, random weights."""

from __future__ import annotations

from .stable_diffusion import sd_vae
from .tokenizers import t5_tokenizer

UMT5_HIDDEN = 32


def build_auraflow():
    import torch
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from ..pipelines.registry import get_spec

    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=UMT5_HIDDEN,
        out_channels=4, pos_embed_max_size=2304,  # a 48x48 patch grid: 768-pixel sides
    )
    # At default init the timestep embedding, and with it every block's AdaLN gate, is near zero, so the text barely
    # reaches the image (the negative moves a 2-step image by 3e-4); scaled so that prompts move it clearly
    with torch.no_grad():
        transformer.time_step_proj.linear_2.weight.mul_(8.0)
    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=UMT5_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )).eval()
    return AuraFlowPipeline(
        transformer=transformer, vae=sd_vae(scaling_factor=0.13025), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(dict(get_spec("auraflow").scheduler.config)),
    )
