"""Tiny Wan pipelines (2.1 T2V/I2V, 2.2 A14B two-expert T2V/I2V, 2.2 TI2V-5B): real classes, random weights, offline.

Sizes follow diffusers' own Wan tests (2 heads x 12, 2 layers, text dim 32), with the encoder built from our in-memory
T5 tokenizer. Each part has the real geometry of its model: Wan 2.1 VAE 8x spatial / 4x temporal with 16 latent
channels; I2V transformers take 36 input channels (16 noise + 4 mask + 16 condition); Wan 2.1 I2V adds image
cross-attention fed by a tiny CLIP vision tower (Wan 2.2 I2V has none); the 2.2 5B VAE is the residual,
patchified 16x one with first-frame conditioning (``expand_timesteps``). The two experts of the A14B builds are
two differently seeded transformers.
"""

from __future__ import annotations

from .tokenizers import t5_tokenizer

TEXT_DIM = 32
IMAGE_DIM = 16  # tiny CLIP vision hidden size = the I2V transformer's image_dim
TI2V_Z_DIM = 8
INNER_DIM = 2 * 12  # heads x head dim


def umt5_encoder(tokenizer):
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def wan_transformer(seed: int = 0, in_channels: int = 16, out_channels: int = 16, image_dim: int | None = None):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=out_channels, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else INNER_DIM,
    )


def wan21_vae():
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def wan22_ti2v_vae():
    """The Wan 2.2 VAE layout: residual blocks, 2x2 patchified input, 16x spatial and 4x temporal compression."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=TI2V_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=[0.0] * TI2V_Z_DIM, latents_std=[1.0] * TI2V_Z_DIM)


def clip_vision():
    """A tiny CLIP vision tower and its image processor, both constructed in code."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)).eval()
    processor = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    return encoder, processor


def _text_and_scheduler(shift: float) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = t5_tokenizer()
    return {"tokenizer": tokenizer, "text_encoder": umt5_encoder(tokenizer),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift)}


def build_wan21_t2v():
    from diffusers import WanPipeline

    return WanPipeline(transformer=wan_transformer(), vae=wan21_vae(), **_text_and_scheduler(3.0))


def build_wan21_i2v():
    from diffusers import WanImageToVideoPipeline

    encoder, processor = clip_vision()
    return WanImageToVideoPipeline(transformer=wan_transformer(in_channels=36, image_dim=IMAGE_DIM), vae=wan21_vae(),
                                   image_encoder=encoder, image_processor=processor, **_text_and_scheduler(3.0))


def build_wan22_14b_t2v():
    from diffusers import WanPipeline

    return WanPipeline(transformer=wan_transformer(seed=0), transformer_2=wan_transformer(seed=1), vae=wan21_vae(),
                       boundary_ratio=0.875, **_text_and_scheduler(12.0))


def build_wan22_14b_i2v():
    from diffusers import WanImageToVideoPipeline

    # The hub checkpoint's config says boundary_ratio 0.9; the family sets ai-toolkit's 0.875 at load time.
    return WanImageToVideoPipeline(transformer=wan_transformer(seed=0, in_channels=36),
                                   transformer_2=wan_transformer(seed=1, in_channels=36), vae=wan21_vae(),
                                   boundary_ratio=0.9, **_text_and_scheduler(12.0))


def build_wan22_5b():
    from diffusers import WanPipeline

    return WanPipeline(transformer=wan_transformer(in_channels=TI2V_Z_DIM, out_channels=TI2V_Z_DIM),
                       vae=wan22_ti2v_vae(), expand_timesteps=True, **_text_and_scheduler(5.0))


# --------------------------------------------------------------------------------------- LoRAs in original Wan names
# diffusers -> original Wan module names inside a block, as ai-toolkit's wan_lora_convert writes them (ai-toolkit.md §1.3).
ORIGINAL_BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


def original_wan_state_dict(transformer, seed: int = 0, infix: str = "", rank: int = 4, std: float = 0.3) -> dict:
    """Random PEFT LoRA tensors for every Linear in ``transformer``'s blocks, keyed
    ``diffusion_model.<infix>blocks.N.<original name>.lora_A/B.weight`` (``infix`` e.g. ``"transformer_1."``)."""
    import torch

    from .loras import lora_targets

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in lora_targets(transformer):
        block, _, inner = name.partition(".")[2].partition(".")
        key = f"diffusion_model.{infix}blocks.{block}.{ORIGINAL_BLOCK_NAMES[inner]}"
        out_f, in_f = module.weight.shape
        sd[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
        sd[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    return sd


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layout ai-toolkit saves for Wan: original Wan names; a ``_high_noise``/``_low_noise`` pair for the
    two-expert 14B models (one file per expert, as ``split_multistage_loras`` writes them)."""
    import os

    from .loras import save_lora

    if getattr(pipe, "transformer_2", None) is None:
        path = os.path.join(out_dir, "tiny_aitk_wan.safetensors")
        return {"ai-toolkit (Wan names)": save_lora(path, original_wan_state_dict(pipe.transformer, seed))}
    return {f"ai-toolkit ({side} noise)": save_lora(
                os.path.join(out_dir, f"tiny_aitk_wan_{side}_noise.safetensors"),
                original_wan_state_dict(transformer, seed + offset))
            for offset, (side, transformer) in enumerate((("high", pipe.transformer), ("low", pipe.transformer_2)))}
