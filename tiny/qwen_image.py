"""Tiny Qwen-Image pipeline: real classes (``Qwen2_5_VLForConditionalGeneration`` text encoder with a two-block
vision tower, ``AutoencoderKLQwenImage``, ``QwenImageTransformer2DModel``), random weights, built offline."""

from __future__ import annotations

from .tokenizers import qwen_tokenizer

LATENT_CHANNELS = 16


def qwen_vl_text_encoder(tokenizer):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, rope_theta=1e6, vocab_size=len(tokenizer),
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[1], window_size=112),
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None,
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_components(vae_dim: int = 16, vae_res_blocks: int = 1) -> dict:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from ..pipelines.registry import QWEN_FLOWMATCH

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=vae_dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=vae_res_blocks,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )
    tokenizer = qwen_tokenizer()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(QWEN_FLOWMATCH),
        "vae": vae,
        "text_encoder": qwen_vl_text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_qwen_image():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**qwen_image_components())


def qwen_vl_processor(tokenizer):
    """The image half of a Qwen2-VL processor with the real patch settings and a small pixel budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..pipelines.families.qwen_image import QwenVLImageProcessor

    # max 64 merged tokens per image keeps the tiny vision tower and text encoder fast
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 64 * 28 * 28})
    return QwenVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _edit_pipeline(pipeline_cls):
    # The edit pipelines VAE-encode every control image at about 1 MP (diffusers' fixed size); the smallest VAE
    # keeps that to a few CPU seconds.
    components = qwen_image_components(vae_dim=4, vae_res_blocks=0)
    pipe = pipeline_cls(processor=qwen_vl_processor(components["tokenizer"]), **components)
    # model_index.json names the processor as the real checkpoints do
    pipe.register_to_config(processor=("transformers", "Qwen2VLProcessor"))
    return pipe


def build_qwen_image_edit():
    from diffusers import QwenImageEditPipeline

    return _edit_pipeline(QwenImageEditPipeline)


def build_qwen_image_edit_plus():
    from diffusers import QwenImageEditPlusPipeline

    return _edit_pipeline(QwenImageEditPlusPipeline)
