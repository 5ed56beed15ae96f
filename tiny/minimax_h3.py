"""Tiny MiniMax-H3 modular pipeline: real ``MiniMaxH3Transformer3DModel``, ``AutoencoderKLMiniMaxH3``,
``AutoencoderKLMiniMaxH3Audio``, two ``MiniMaxH3Scheduler`` (video shift 12, audio shift 3) and a
``Qwen3VLForConditionalGeneration`` conditioner; random weights, built offline.

The latent widths are the released ones (24 video, 32 audio channels) and so are the VAEs' compression factors (16x
spatial, 17 -> 5 frames, 800 audio samples per latent), so the packed-sequence geometry is the real one at a small
size. The conditioner has 51 text layers: MiniMax-H3 reads ``hidden_states[50]``, which needs more than 50.

The end-to-end jobs (goldens/e2e/minimax_h3, minimax_h3_ref2va; their ``base.json``) sample a variant built with
``block_adaln_bias=False``: ai-toolkit's own transformer class, like the released unpruned checkpoints, has no bias on
the blocks' AdaLN projection."""

from __future__ import annotations

from .nucleus_image import qwen3_vl_text_encoder
from .tokenizers import qwen_tokenizer

VIDEO_LATENT_CHANNELS = 24
AUDIO_LATENT_CHANNELS = 32
TEXT_WIDTH = 16
TEXT_LAYERS = 51


def minimax_h3_transformer(block_adaln_bias: bool = True):
    """``block_adaln_bias`` False zeroes the blocks' AdaLN projection bias, which the released (unpruned) checkpoints
    and ai-toolkit's own transformer class do not have (goldens/e2e/minimax_h3)."""
    import torch
    from diffusers import MiniMaxH3Transformer3DModel

    torch.manual_seed(0)
    transformer = MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=1, num_refiner_layers=1, ffn_dim=64,
        in_channels=VIDEO_LATENT_CHANNELS, audio_in_channels=AUDIO_LATENT_CHANNELS, text_dim=TEXT_WIDTH, freq_dim=32,
        time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2,
    )
    if not block_adaln_bias:
        with torch.no_grad():
            for block in transformer.transformer_blocks:
                block.adaln_proj.linear.bias.zero_()
    return transformer


def minimax_h3_video_vae():
    import torch
    from diffusers import AutoencoderKLMiniMaxH3

    torch.manual_seed(0)
    return AutoencoderKLMiniMaxH3(
        latent_channels=VIDEO_LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, decoder_num_layers=1, decoder_num_attention_heads=2, decoder_attention_head_dim=8,
        decoder_num_register_tokens=1, decoder_ffn_mult=2,
    )


def minimax_h3_audio_vae():
    import torch
    from diffusers import AutoencoderKLMiniMaxH3Audio

    torch.manual_seed(0)
    return AutoencoderKLMiniMaxH3Audio(
        encoder_dim=4, latent_dim=64, latent_channels=AUDIO_LATENT_CHANNELS, num_attention_heads=2, decoder_dim=128,
        resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),), latents_mean=[0.0] * AUDIO_LATENT_CHANNELS,
        latents_std=[1.0] * AUDIO_LATENT_CHANNELS,
    )


def minimax_h3_components(block_adaln_bias: bool = True) -> dict:
    from diffusers import MiniMaxH3Scheduler
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..pipelines.families.nucleus_image import Qwen3VLTextProcessor
    from ..pipelines.registry import MINIMAX_H3_AUDIO_SHIFT, MINIMAX_H3_VIDEO_SHIFT

    tokenizer = qwen_tokenizer()
    processor = Qwen3VLTextProcessor(image_processor=Qwen2VLImageProcessorPil(patch_size=16), tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template)
    return {
        "transformer": minimax_h3_transformer(block_adaln_bias), "vae": minimax_h3_video_vae(),
        "audio_vae": minimax_h3_audio_vae(),
        "text_encoder": qwen3_vl_text_encoder(tokenizer, TEXT_WIDTH, TEXT_LAYERS), "tokenizer": tokenizer,
        "processor": processor,
        "scheduler": MiniMaxH3Scheduler(shift=MINIMAX_H3_VIDEO_SHIFT),
        "audio_scheduler": MiniMaxH3Scheduler(shift=MINIMAX_H3_AUDIO_SHIFT),
    }


def build_minimax_h3(block_adaln_bias: bool = True):
    from ..pipelines.families.minimax_h3 import MiniMaxH3AitkBlocks

    pipe = MiniMaxH3AitkBlocks().init_pipeline()
    pipe.update_components(**minimax_h3_components(block_adaln_bias))
    return pipe


def original_named_state_dict(pipe, seed: int = 0, rank: int = 4, std: float = 0.3) -> dict:
    """Random PEFT LoRA tensors under the names ai-toolkit saves for MiniMax-H3: ``diffusion_model.`` + the original
    checkpoint's module names of every block Linear (main stack and text token refiner), the QKV fused."""
    import torch

    from ..pipelines.families.minimax_h3 import MINIMAX_H3_BLOCK_NAMES

    transformer = getattr(pipe, "transformer", None) or pipe.transformer_ref
    targets = []
    for original_parent, stack in (("blocks", transformer.transformer_blocks),
                                   ("token_refiner.blocks", transformer.token_refiner.refiner_blocks)):
        for index, block in enumerate(stack):
            for original, diffusers_names in MINIMAX_H3_BLOCK_NAMES.items():
                names = diffusers_names if isinstance(diffusers_names, tuple) else (diffusers_names,)
                modules = [block.get_submodule(name) for name in names if hasattr(block, name.split(".")[0])]
                if modules:
                    rows = sum(m.out_features for m in modules)
                    targets.append((f"{original_parent}.{index}.{original}", modules[0].in_features, rows))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, in_features, out_features in targets:
        sd[f"diffusion_model.{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * std
        sd[f"diffusion_model.{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * std
    return sd


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layout ai-toolkit saves for MiniMax-H3: original checkpoint names, fused QKV."""
    import os

    from .loras import save_lora

    path = os.path.join(out_dir, "tiny_aitk_minimax_h3.safetensors")
    return {"ai-toolkit (original MiniMax-H3 names)": save_lora(path, original_named_state_dict(pipe, seed))}


def build_minimax_h3_ref2va(block_adaln_bias: bool = True):
    """The same tiny components, the transformer as the ref2va partition (``transformer_ref``)."""
    from ..pipelines.families.minimax_h3 import MiniMaxH3AitkRef2VABlocks

    components = minimax_h3_components(block_adaln_bias)
    components["transformer_ref"] = components.pop("transformer")
    pipe = MiniMaxH3AitkRef2VABlocks().init_pipeline()
    pipe.update_components(**components)
    return pipe
