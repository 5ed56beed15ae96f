"""Tiny Nucleus-Image pipeline: real ``NucleusMoEImageTransformer2DModel`` (one dense and one MoE block),
``Qwen3VLForConditionalGeneration`` text encoder, ``AutoencoderKLQwenImage``; random weights, built offline."""

from __future__ import annotations

from .tokenizers import qwen_tokenizer

LATENT_CHANNELS = 16
TEXT_WIDTH = 16


def nucleus_transformer():
    """Two blocks: block 0 dense, block 1 a MoE layer of 4 routed experts (capacity = a quarter of the tokens) plus
    the shared expert. ``mlp_ratio`` 6 gives the dense MLP 128 hidden units (the class rounds down to a multiple of
    128, which is 0 at the default ratio for this width). The packed expert weights are created uninitialised
    (``torch.empty``), so they are drawn here."""
    import torch
    from diffusers import NucleusMoEImageTransformer2DModel

    torch.manual_seed(0)
    transformer = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6),
        mlp_ratio=6.0, dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=8,
        capacity_factors=1.0,
    )
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".experts." in name:
                parameter.normal_(0.0, 0.2)
    return transformer


def qwen3_vl_text_encoder(tokenizer, width: int = TEXT_WIDTH, layers: int = 8):
    """A Qwen3-VL conditioner with one vision block; eight text layers by default, so that Nucleus' hidden state 8
    layers from the top exists."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=width, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer),
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width,
                           deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=16),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).eval()


def build_nucleus_image():
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..pipelines.families.nucleus_image import Qwen3VLTextProcessor
    from ..pipelines.registry import NUCLEUS_FLOWMATCH

    tokenizer = qwen_tokenizer()
    processor = Qwen3VLTextProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template)
    transformer = nucleus_transformer()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )
    pipe = NucleusMoEImagePipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(NUCLEUS_FLOWMATCH), vae=vae,
        text_encoder=qwen3_vl_text_encoder(tokenizer), processor=processor,
    )
    # model_index.json names the processor as the real checkpoint does
    pipe.register_to_config(processor=("transformers", "Qwen3VLProcessor"))
    return pipe
