"""Tiny LTX-2, LTX-2.3 and LTX-2.5 pipelines (video + audio): real classes, random weights, offline.

Sizes follow diffusers' own LTX-2 tests: a 2-layer ``LTX2VideoTransformer3DModel`` (video 2 heads x 8, audio
2 heads x 4), a one-block video VAE (4 latent channels, 4x4 patches: 8x spatial and 2x temporal compression, so a
64x64 9-frame video is 320 tokens), a one-level audio VAE over 8 mel bins, a small vocoder, text
connectors, and a 2-layer Gemma3 text encoder over our in-memory Gemma tokenizer. The Gemma hidden size must equal
the connectors' heads x head dim (4 x 8 = 32).

LTX-2.3 differs the way the real checkpoints differ (ai-toolkit's ``convert_ltx2_to_diffusers`` configs): gated
attention and cross-attention modulation in the transformer, per-modality text projections in the connectors (no
caption projection in the transformer), STG-capable attention, and the vocoder with bandwidth extension (16 kHz ->
48 kHz here, as in the real one).

LTX-2.3's high resolution mode adds a latent upsampler (32 channels, one block per stage, the real model's rational
2x resampler) and a distilled LoRA (diffusers names, every block Linear): ``write_ltx23_high_resolution``.

LTX-2.5 is LTX-2.3 with the video feed-forward biases dropped (the audio feed-forward keeps them) and a Gemma-4 text
model (``Gemma4TextModel``, the text stack ai-toolkit loads from the ComfyUI file) in place of Gemma-3.
"""

from __future__ import annotations

from .tokenizers import gemma_tokenizer

TEXT_HIDDEN = 32  # Gemma hidden = connector heads (4) x head dim (8)
TEXT_LAYERS = 2
VIDEO_INNER = 2 * 8
AUDIO_INNER = 2 * 4
MEL_BINS = 8
AUDIO_RATE = 16000


def gemma_encoder(tokenizer):
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    boi, eoi, image = tokenizer.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer),
                         sliding_window=16, max_position_embeddings=1024),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def gemma4_encoder(tokenizer):
    import torch
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

    torch.manual_seed(0)
    config = Gemma4TextConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=TEXT_LAYERS, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, vocab_size=len(tokenizer), sliding_window=16,
        max_position_embeddings=1024, vocab_size_per_layer_input=len(tokenizer), hidden_size_per_layer_input=8,
    )
    return Gemma4TextModel(config).eval()


def ltx2_transformer(v23: bool, video_ff_bias: bool = True):
    import torch
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=VIDEO_INNER, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=AUDIO_INNER, num_layers=2,
        qk_norm="rms_norm_across_heads", caption_channels=TEXT_HIDDEN, rope_double_precision=False, rope_type="split",
        gated_attn=v23, cross_attn_mod=v23, audio_gated_attn=v23, audio_cross_attn_mod=v23,
        use_prompt_embeddings=not v23, perturbed_attn=v23, ff_bias=video_ff_bias,
    )


def ltx2_connectors(v23: bool):
    import torch
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    # 2.0: both connectors run at the Gemma width and the transformer projects captions; 2.3: each connector runs
    # at its modality's width (video 2 x 8, audio 2 x 4), which the transformer's cross-attention takes directly.
    video_heads, video_dim, audio_heads, audio_dim = (2, 8, 2, 4) if v23 else (4, 8, 4, 8)
    torch.manual_seed(0)
    return LTX2TextConnectors(
        caption_channels=TEXT_HIDDEN, text_proj_in_factor=TEXT_LAYERS + 1,
        video_connector_num_attention_heads=video_heads, video_connector_attention_head_dim=video_dim,
        video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=audio_heads, audio_connector_attention_head_dim=audio_dim,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
        rope_theta=10000.0, rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
        video_gated_attn=v23, audio_gated_attn=v23, per_modality_projections=v23, video_hidden_dim=VIDEO_INNER,
        audio_hidden_dim=AUDIO_INNER, proj_bias=v23,
    )


def ltx2_video_vae():
    import torch
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
        downsample_type=("spatiotemporal",), upsample_type=("spatiotemporal",), upsample_residual=(False,),
        upsample_factor=(1,), timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def ltx2_audio_vae():
    import torch
    from diffusers import AutoencoderKLLTX2Audio

    torch.manual_seed(0)
    return AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=AUDIO_RATE, mel_hop_length=160, is_causal=True, mel_bins=MEL_BINS,
    )


def ltx2_vocoder(v23: bool):
    import torch
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    torch.manual_seed(0)
    stage = dict(hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
                 resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1)
    if not v23:
        return LTX2Vocoder(in_channels=2 * MEL_BINS, output_sampling_rate=AUDIO_RATE, **stage)
    # As in the real one, stage 1 makes a whole number of mel hops per input frame (4 samples, hop 4), and the
    # bandwidth extender upsamples that mel back to samples at 3x the rate (hop 4 x 3 = 4 x 3).
    bwe = {f"bwe_{k}": v for k, v in stage.items()}
    bwe.update(bwe_upsample_factors=[4, 3], bwe_upsample_kernel_sizes=[8, 7])
    return LTX2VocoderWithBWE(
        in_channels=2 * MEL_BINS, bwe_in_channels=2 * MEL_BINS, num_mel_channels=MEL_BINS, filter_length=16,
        hop_length=4, window_length=16, input_sampling_rate=AUDIO_RATE, output_sampling_rate=3 * AUDIO_RATE,
        **stage, **bwe,
    )


def _build(v23: bool, v25: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    tokenizer = gemma_tokenizer()
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=ltx2_video_vae(), audio_vae=ltx2_audio_vae(),
        text_encoder=(gemma4_encoder if v25 else gemma_encoder)(tokenizer), tokenizer=tokenizer,
        connectors=ltx2_connectors(v23), transformer=ltx2_transformer(v23, video_ff_bias=not v25),
        vocoder=ltx2_vocoder(v23),
    )


def build_ltx2():
    return _build(v23=False)


def build_ltx23():
    return _build(v23=True)


def build_ltx25():
    return _build(v23=True, v25=True)


def ltx23_latent_upsampler():
    import torch
    from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel

    torch.manual_seed(0)
    return LTX2LatentUpsamplerModel(in_channels=4, mid_channels=32, num_blocks_per_stage=1)


def write_ltx23_high_resolution(pipe, out_dir: str, seed: int = 7) -> dict[str, str]:
    """The high resolution mode's parts for tiny LTX-2.3 ``pipe``, as ``LTX2HighResolution`` takes them: ``upsampler``
    (a folder with ``latent_upsampler/``) and ``distilled_lora`` (a ``.safetensors`` file in diffusers names)."""
    import os

    from .loras import lora_targets, make_state_dict, save_lora

    upsampler = os.path.join(out_dir, "upsampler")
    ltx23_latent_upsampler().save_pretrained(os.path.join(upsampler, "latent_upsampler"))
    lora = save_lora(os.path.join(out_dir, "distilled_lora.safetensors"),
                     make_state_dict("peft", lora_targets(pipe.transformer), seed=seed, std=0.1))
    return {"upsampler": upsampler, "distilled_lora": lora}
