"""Tiny ACE-Step 1.5 pipeline: real ``AceStepTransformer1DModel``, ``AceStepConditionEncoder`` (with ai-toolkit's
full-attention encoders), ``Qwen3Model`` and ``AutoencoderOobleck`` (48 kHz, 4x downsampling), random weights. The
parity goldens (tests/goldens/ace_step) use the same sizes in the all-in-one layout."""

from __future__ import annotations

from .tokenizers import qwen_tokenizer

TRANSFORMER_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, in_channels=192, audio_acoustic_hidden_dim=64,
                          patch_size=2, encoder_hidden_size=16)
CONDITION_ENCODER_CONFIG = dict(hidden_size=16, intermediate_size=32, text_hidden_dim=16, timbre_hidden_dim=64,
                                num_lyric_encoder_hidden_layers=1, num_timbre_encoder_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8)
TEXT_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
VAE_CONFIG = dict(encoder_hidden_size=4, channel_multiples=[1, 2], downsampling_ratios=[2, 2], decoder_channels=4,
                  decoder_input_channels=64, audio_channels=2, sampling_rate=48000)


def build_ace_step():
    import torch
    from diffusers import (AceStepConditionEncoder, AceStepPipeline, AceStepTransformer1DModel, AutoencoderOobleck,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen3Config, Qwen3Model

    from ..pipelines.families.ace_step import FULL_ATTENTION_WINDOW

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    transformer = AceStepTransformer1DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(0)
    condition_encoder = AceStepConditionEncoder(
        **CONDITION_ENCODER_CONFIG, sliding_window=FULL_ATTENTION_WINDOW,
        layer_types=["full_attention"] * CONDITION_ENCODER_CONFIG["num_lyric_encoder_hidden_layers"])
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=4096,
                                          **TEXT_CONFIG)).eval()
    torch.manual_seed(0)
    vae = AutoencoderOobleck(**VAE_CONFIG)
    return AceStepPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                           condition_encoder=condition_encoder,
                           scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0))


def original_targets(transformer) -> list[tuple[str, object]]:
    """What ai-toolkit's ACE-Step LoRA targets, under its names: the attention and MLP Linears of the DiT's layers."""
    import torch

    from ..pipelines.families.ace_step import ace_step_original_to_diffusers

    ours = {n: m for n, m in transformer.named_modules() if n.startswith("layers.") and isinstance(m, torch.nn.Linear)}
    originals = {}
    for layer in range(len(transformer.layers)):
        for inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            original = f"decoder.layers.{layer}.{inner}"
            originals[original] = ours[ace_step_original_to_diffusers(original)]
    return list(originals.items())


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layouts ai-toolkit saves for ACE-Step: ``diffusion_model.decoder.`` + ComfyUI names, as LoRA and LoKr."""
    from .loras import write_original_name_loras

    return write_original_name_loras(original_targets(pipe.transformer), out_dir, "tiny_aitk_ace_step", "ComfyUI names",
                                     seed)
