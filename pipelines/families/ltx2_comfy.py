"""LTX-2.5 from the ComfyUI single files ``Lightricks/LTX-2.5`` publishes (no diffusers folders exist for it).

The four files, as ai-toolkit's ``LTX25Model`` loads them (``COMFY_LTX25_FILES``, registry ``LTX2Options.comfy_files``):

* the transformer, ``model.diffusion_model.`` + original LTX names, with the video/audio embedding connectors;
* the Gemma-4 12B text encoder (``model.`` + transformers names of ``Gemma4TextModel``; vision and audio towers are
  ignored), its config as JSON in the file's metadata (``gemma_config``), its tokenizer files as uint8 tensors, and
  the connectors' per-modality input projections (``text_embedding_projection.*``);
* the conv video VAE (original LTX-2.3 names), and the audio VAE with the bandwidth-extending vocoder (``audio_vae.``,
  ``vocoder.``).

The transformer and text encoder files are quantized layer by layer in ComfyUI's format: next to a quantized
``<layer>.weight`` (int8) lie ``<layer>.weight_scale`` (float32, one per output row) and ``<layer>.comfy_quant``
(uint8 bytes of a JSON config). ``{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": G}`` means the
int8 rows are the weight multiplied, block by block along the input dimension, by the regular Hadamard matrix of size
G (Kronecker powers of the 4x4 regular Hadamard, scaled to be orthonormal; it is symmetric, so it is its own inverse),
quantized per row. Without ``convrot`` (and for embeddings) the rows are plain per-row int8. We dequantize to the model
dtype: ``rotate(int8 * scale)``. ai-toolkit's GPU sampling instead keeps the int8 codes and also quantizes the
activations per token (W8A8, ``toolkit/util/convrot_quant.py``); that rounding is not reproduced.

The dequantizer and :func:`build_module` are shared with MiniMax-H3's ComfyUI files (``minimax_h3_comfy``), whose
text encoder also uses ComfyUI's ``nvfp4`` format (:func:`dequantize_nvfp4`); each family names the formats its
publisher ships, and any other is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

#: ComfyUI quantization formats we can dequantize (LTX-2.5 ships int8 only; MiniMax-H3 also nvfp4)
INT8_FORMAT = "int8_tensorwise"
NVFP4_FORMAT = "nvfp4"

# ----------------------------------------------------------------------------------------- full-size configs (2.5)
# The numbers of ai-toolkit's convert_ltx2_to_diffusers.py for version "2.5" (the 2.3 configs; the transformer has no
# video feed-forward biases).
TRANSFORMER_CONFIG = {
    "in_channels": 128, "out_channels": 128, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 32,
    "attention_head_dim": 128, "cross_attention_dim": 4096, "vae_scale_factors": (8, 32, 32), "pos_embed_max_pos": 20,
    "base_height": 2048, "base_width": 2048, "gated_attn": True, "cross_attn_mod": True, "audio_in_channels": 128,
    "audio_out_channels": 128, "audio_patch_size": 1, "audio_patch_size_t": 1, "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64, "audio_cross_attention_dim": 2048, "audio_scale_factor": 4,
    "audio_pos_embed_max_pos": 20, "audio_sampling_rate": 16000, "audio_hop_length": 160, "audio_gated_attn": True,
    "audio_cross_attn_mod": True, "num_layers": 48, "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 3840,
    "attention_bias": True, "attention_out_bias": True, "rope_theta": 10000.0, "rope_double_precision": True,
    "causal_offset": 1, "timestep_scale_multiplier": 1000, "cross_attn_timestep_scale_multiplier": 1000,
    "rope_type": "split", "use_prompt_embeddings": False, "perturbed_attn": True, "ff_bias": False,
}
CONNECTORS_CONFIG = {
    "caption_channels": 3840, "text_proj_in_factor": 49, "video_connector_num_attention_heads": 32,
    "video_connector_attention_head_dim": 128, "video_connector_num_layers": 8,
    "video_connector_num_learnable_registers": 128, "video_gated_attn": True, "audio_connector_num_attention_heads": 32,
    "audio_connector_attention_head_dim": 64, "audio_connector_num_layers": 8,
    "audio_connector_num_learnable_registers": 128, "audio_gated_attn": True, "connector_rope_base_seq_len": 4096,
    "rope_theta": 10000.0, "rope_double_precision": True, "causal_temporal_positioning": False, "rope_type": "split",
    "per_modality_projections": True, "video_hidden_dim": 4096, "audio_hidden_dim": 2048, "proj_bias": True,
}
VIDEO_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 128, "block_out_channels": (256, 512, 1024, 1024),
    "down_block_types": ("LTX2VideoDownBlock3D",) * 4, "decoder_block_out_channels": (256, 512, 512, 1024),
    "layers_per_block": (4, 6, 4, 2, 2), "decoder_layers_per_block": (4, 6, 4, 2, 2),
    "spatio_temporal_scaling": (True, True, True, True), "decoder_spatio_temporal_scaling": (True, True, True, True),
    "decoder_inject_noise": (False,) * 5, "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
    "upsample_residual": (False,) * 4, "upsample_factor": (2, 2, 1, 2), "timestep_conditioning": False,
    "patch_size": 4, "patch_size_t": 1, "resnet_norm_eps": 1e-6, "encoder_causal": True, "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "zeros", "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}
AUDIO_VAE_CONFIG = {
    "base_channels": 128, "output_channels": 2, "ch_mult": (1, 2, 4), "num_res_blocks": 2, "attn_resolutions": None,
    "in_channels": 2, "resolution": 256, "latent_channels": 8, "norm_type": "pixel", "causality_axis": "height",
    "dropout": 0.0, "mid_block_add_attention": False, "sample_rate": 16000, "mel_hop_length": 160, "is_causal": True,
    "mel_bins": 64, "double_z": True,
}
_VOCODER_STAGE = {"resnet_kernel_sizes": [3, 7, 11], "resnet_dilations": [[1, 3, 5]] * 3, "act_fn": "snakebeta",
                  "leaky_relu_negative_slope": 0.1, "antialias": True, "antialias_ratio": 2,
                  "antialias_kernel_size": 12, "final_act_fn": None, "final_bias": False}
VOCODER_CONFIG = {
    "in_channels": 128, "hidden_channels": 1536, "out_channels": 2, "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4],
    "upsample_factors": [5, 2, 2, 2, 2, 2], **_VOCODER_STAGE,
    "bwe_in_channels": 128, "bwe_hidden_channels": 512, "bwe_out_channels": 2,
    "bwe_upsample_kernel_sizes": [12, 11, 4, 4, 4], "bwe_upsample_factors": [6, 5, 2, 2, 2],
    **{f"bwe_{k}": v for k, v in _VOCODER_STAGE.items()},
    "filter_length": 512, "hop_length": 80, "window_length": 512, "num_mel_channels": 64, "input_sampling_rate": 16000,
    "output_sampling_rate": 48000,
}

#: the configs the files are loaded with, by component (the tests swap in their tiny ones)
CONFIGS = {"transformer": TRANSFORMER_CONFIG, "connectors": CONNECTORS_CONFIG, "video_vae": VIDEO_VAE_CONFIG,
           "audio_vae": AUDIO_VAE_CONFIG, "vocoder": VOCODER_CONFIG}

# ----------------------------------------------------------------------------------- original -> diffusers names
# Renames of whole dotted path segments. The first segment of a transformer key may be a top-level module of another
# name; inside the blocks only the QK norms and the audio-video cross-attention tables are named differently.
TRANSFORMER_TOP_RENAMES = {
    "patchify_proj": "proj_in", "audio_patchify_proj": "audio_proj_in", "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed", "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate", "prompt_adaln_single": "prompt_adaln",
    "audio_prompt_adaln_single": "audio_prompt_adaln",
}
TRANSFORMER_SEGMENT_RENAMES = {
    "q_norm": "norm_q", "k_norm": "norm_k",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
}
#: the checkpoint's learned keyframe position embedding; only keyframe conditioning reads it, not ai-toolkit's sampling
TRANSFORMER_UNUSED = ("keyframes_abs_pos_embedding",)
CONNECTOR_TOP_RENAMES = {"video_embeddings_connector": "video_connector", "audio_embeddings_connector": "audio_connector"}
CONNECTOR_SEGMENT_RENAMES = {"transformer_1d_blocks": "transformer_blocks", "q_norm": "norm_q", "k_norm": "norm_k"}
CONNECTOR_PROJECTIONS = {"text_embedding_projection.video_aggregate_embed": "video_text_proj_in",
                         "text_embedding_projection.audio_aggregate_embed": "audio_text_proj_in"}
VAE_SEGMENT_RENAMES = {"res_blocks": "resnets", "last_time_embedder": "time_embedder",
                       "last_scale_shift_table": "scale_shift_table"}
VAE_STATISTICS = {"per_channel_statistics.mean-of-means": "latents_mean",
                  "per_channel_statistics.std-of-means": "latents_std"}
VAE_UNUSED = ("per_channel_statistics.channel", "per_channel_statistics.mean-of-stds")
VOCODER_SEGMENT_RENAMES = {"ups": "upsamplers", "resblocks": "resnets", "conv_pre": "conv_in", "conv_post": "conv_out",
                           "act_post": "act_out"}


def _rename_segments(key: str, top: Mapping[str, str], segments: Mapping[str, str]) -> str:
    parts = key.split(".")
    parts[0] = top.get(parts[0], parts[0])
    return ".".join(segments.get(part, part) for part in parts)


def transformer_key(original: str) -> str:
    return _rename_segments(original, TRANSFORMER_TOP_RENAMES, TRANSFORMER_SEGMENT_RENAMES)


def connector_key(original: str) -> str:
    for projection, name in CONNECTOR_PROJECTIONS.items():
        if original.startswith(projection + "."):
            return name + original[len(projection):]
    return _rename_segments(original, CONNECTOR_TOP_RENAMES, CONNECTOR_SEGMENT_RENAMES)


def _vae_block(kind: str, index: int, mid_index: int) -> str:
    """Original VAE blocks alternate resnet stages and resamplers: encoder ``down_blocks.{0,2,4,6}`` are stages,
    the odd ones their downsamplers, the last the mid block; decoder ``up_blocks.0`` is the mid block, then each
    upsampler is followed by its stage."""
    if kind == "down_blocks":
        if index == mid_index:
            return "mid_block"
        return f"down_blocks.{index // 2}" + (".downsamplers.0" if index % 2 else "")
    if index == 0:
        return "mid_block"
    return f"up_blocks.{(index - 1) // 2}" + (".upsamplers.0" if index % 2 else "")


def video_vae_key(original: str, num_levels: int) -> str:
    for statistic, name in VAE_STATISTICS.items():
        if original == statistic:
            return name
    match = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(.*)", original)
    if match:
        side, kind, index, rest = match.groups()
        original = f"{side}.{_vae_block(kind, int(index), 2 * num_levels)}.{rest}"
    return _rename_segments(original, {}, VAE_SEGMENT_RENAMES)


def audio_vae_key(original: str) -> str:
    for statistic, name in VAE_STATISTICS.items():
        if original.startswith(statistic):
            return name + original[len(statistic):]
    return original


def vocoder_key(original: str) -> str:
    return _rename_segments(original.replace(".downsample.lowpass.", ".downsample."), {}, VOCODER_SEGMENT_RENAMES)


# ------------------------------------------------------------------------------------------- int8 ConvRot weights
def regular_hadamard(size: int):
    """The orthonormal regular Hadamard matrix of ``size`` (a power of 4): Kronecker powers of
    ``[[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]] / 2``. Symmetric and orthogonal, so its own inverse."""
    import torch

    if size < 4 or size & (size - 1) or (size.bit_length() - 1) % 2:
        raise ValueError(f"ConvRot group size {size} is not a power of 4 (>= 4).")
    block = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64) / 2
    matrix = block
    while matrix.shape[0] < size:
        matrix = torch.kron(matrix, block)
    return matrix


def dequantize_int8_rows(codes, scales, rotation: int):
    """``int8 (out, in)`` codes with one float scale per row, rotated in blocks of ``rotation`` along ``in`` (1: not
    rotated) -> float32 weight."""
    import torch

    weight = codes.to(torch.float64) * scales.to(torch.float64).reshape(-1, 1)
    if rotation > 1:
        out_features, in_features = weight.shape
        if in_features % rotation:
            raise ValueError(f"ConvRot group size {rotation} does not divide the {in_features} input features.")
        blocks = weight.reshape(out_features, in_features // rotation, rotation)
        weight = (blocks @ regular_hadamard(rotation)).reshape(out_features, in_features)
    return weight.to(torch.float32)


#: the values of the 16 fp4 (e2m1) codes: bit 3 is the sign, bits 0-2 index the magnitudes
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_BLOCK = 16


def unswizzle_block_scales(scales, rows: int, blocks: int):
    """nvfp4 block scales stored in cuBLAS' swizzled tile layout -> a row-major ``(rows, blocks)`` matrix. The
    stored matrix is padded to 128-row x 4-column tiles; within a tile, row ``32 a + b`` and column ``c`` lie at
    ``16 b + 4 a + c``, tiles in row-major order."""
    row_tiles, column_tiles = -(-rows // 128), -(-blocks // 4)
    tiles = scales.reshape(row_tiles, column_tiles, 32, 4, 4)  # [tile row, tile column, b, a, c]
    return tiles.permute(0, 3, 2, 1, 4).reshape(row_tiles * 128, column_tiles * 4)[:rows, :blocks]


def dequantize_nvfp4(packed, block_scales, tensor_scale, in_features: int, input_scale=None):
    """ComfyUI's ``nvfp4`` weight -> float32: fp4 (e2m1) codes packed two per byte, the first of each pair in the
    high nibble; one e4m3 scale per 16 inputs (swizzled, :func:`unswizzle_block_scales`) times the float32
    per-tensor ``weight_scale_2``. An AWQ ``pre_quant_scale`` (multiplying the input) is folded into the columns."""
    import torch

    rows = packed.shape[0]
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(rows, in_features).long()
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)[codes & 7]
    values = torch.where(codes >= 8, -magnitudes, magnitudes)
    if block_scales.dtype != torch.float8_e4m3fn:
        block_scales = block_scales.view(torch.float8_e4m3fn)
    scales = unswizzle_block_scales(block_scales.flatten(), rows, in_features // NVFP4_BLOCK).float()
    weight = values.reshape(rows, -1, NVFP4_BLOCK) * (scales * tensor_scale.float().reshape(())).unsqueeze(-1)
    weight = weight.reshape(rows, in_features)
    return weight if input_scale is None else weight * input_scale.float().reshape(1, -1)


def _dequantize_int8(layer: str, config: dict, state_dict: dict, embeddings: tuple[str, ...]):
    rotation = int(config.get("convrot_groupsize", 256)) if config.get("convrot") and layer not in embeddings else 1
    return dequantize_int8_rows(state_dict[f"{layer}.weight"], state_dict.pop(f"{layer}.weight_scale"), rotation)


def _dequantize_nvfp4(layer: str, config: dict, state_dict: dict, embeddings: tuple[str, ...]):
    packed = state_dict[f"{layer}.weight"]
    return dequantize_nvfp4(packed, state_dict.pop(f"{layer}.weight_scale"), state_dict.pop(f"{layer}.weight_scale_2"),
                            packed.shape[1] * 2, state_dict.pop(f"{layer}.pre_quant_scale", None))


#: ComfyUI quantization formats -> how a layer of that format is dequantized
DEQUANTIZERS = {INT8_FORMAT: _dequantize_int8, NVFP4_FORMAT: _dequantize_nvfp4}


def dequantize_comfy_layers(state_dict: dict, embeddings: tuple[str, ...], formats: tuple[str, ...] = (INT8_FORMAT,)
                            ) -> dict:
    """Replace every ComfyUI-quantized layer of ``state_dict`` by its float32 weight (bias and other keys kept).
    ``embeddings``: layer names that are embedding tables (per-row int8, never rotated); ``formats``: the formats the
    caller's publisher ships (others are refused)."""
    state_dict = dict(state_dict)
    for marker in [k for k in state_dict if k.endswith(".comfy_quant")]:
        layer = marker[: -len(".comfy_quant")]
        config = json.loads(bytes(state_dict.pop(marker).tolist()).decode("utf-8"))
        if config.get("format") not in formats:
            raise ValueError(f"{layer}: ComfyUI quantization {config.get('format')!r} is not supported (only "
                             f"{', '.join(formats)}); use the publisher's quantized files or the bf16 ones.")
        state_dict[f"{layer}.weight"] = DEQUANTIZERS[config["format"]](layer, config, state_dict, embeddings)
        state_dict.pop(f"{layer}.input_scale", None)  # activation calibration, unused without quantized activations
    return state_dict


# ------------------------------------------------------------------------------------------------------- loading
def build_module(cls, config: Mapping[str, Any], state_dict: dict, dtype, name: str,
                 formats: tuple[str, ...] = (INT8_FORMAT,), family: str = "LTX-2.5", repo: str = "Lightricks/LTX-2.5",
                 keep_in_fp32: tuple[str, ...] = (), keep_stored_dtype: tuple[str, ...] = ()):
    """``cls`` from ``config`` on the meta device, then every parameter from ``state_dict`` (ComfyUI-quantized layers
    of ``formats`` dequantized; strict: a missing or an unknown key is an error naming ``repo``). Floating tensors
    load in ``dtype``, those whose name contains one of ``keep_in_fp32`` in float32, those whose name starts with one of
    ``keep_stored_dtype`` (and were not quantized) in the file's own dtype."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = cls.from_config(dict(config)) if hasattr(cls, "from_config") else cls(config)
    embeddings = tuple(n for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding))
    stored = {k for k, v in state_dict.items() if k.startswith(keep_stored_dtype) and v.is_floating_point()}
    state_dict = dequantize_comfy_layers(state_dict, embeddings, formats)
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{family} {name}: the file does not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); is it the {name} file of {repo}?")
    state_dict = {k: v if k in stored or not v.is_floating_point() else
                  v.to(torch.float32 if any(name in k for name in keep_in_fp32) else dtype)
                  for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _strip(state_dict: Mapping[str, Any], prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_transformer_and_connectors(transformer_file: str, text_encoder_file: str, dtype, transformer_config,
                                    connectors_config):
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from safetensors.torch import load_file

    original = _strip(load_file(transformer_file), "model.diffusion_model.")
    original.update({k: v for k, v in load_file(text_encoder_file).items() if k.startswith("text_embedding_projection.")})
    connector_heads = (*CONNECTOR_TOP_RENAMES, "text_embedding_projection")
    transformer_sd, connectors_sd = {}, {}
    for key, value in original.items():
        if key.startswith(connector_heads):
            connectors_sd[connector_key(key)] = value
        elif not key.startswith(TRANSFORMER_UNUSED):
            transformer_sd[transformer_key(key)] = value
    transformer = build_module(LTX2VideoTransformer3DModel, transformer_config, transformer_sd, dtype, "transformer")
    connectors = build_module(LTX2TextConnectors, connectors_config, connectors_sd, dtype, "connectors")
    return transformer, connectors


def load_gemma4_text_encoder(text_encoder_file: str, dtype):
    """``Gemma4TextModel`` from the file's ``gemma_config`` metadata and its ``model.`` weights (the text stack; the
    vision/audio towers and the connector projections in the file are not part of it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

    with safe_open(text_encoder_file, framework="pt") as f:
        metadata = f.metadata() or {}
    if "gemma_config" not in metadata:
        raise ValueError(f"{text_encoder_file}: no 'gemma_config' in the file's metadata; give the Gemma-4 text "
                         "encoder file of Lightricks/LTX-2.5 (text_encoders/gemma4-12b-with-proj-...).")
    text_config = {k: v for k, v in json.loads(metadata["gemma_config"])["text_config"].items() if k != "dtype"}
    return build_module(lambda config: Gemma4TextModel(Gemma4TextConfig(**config)), text_config,
                  _strip(load_file(text_encoder_file), "model."), dtype, "text encoder")


#: the tokenizer files ComfyUI embeds in the text encoder file, as uint8 tensors
TOKENIZER_ASSETS = {"tokenizer.json": "tokenizer_json", "tokenizer_config.json": "hf_asset__tokenizer_config.json",
                    "chat_template.jinja": "hf_asset__chat_template.jinja"}


def load_gemma4_tokenizer(text_encoder_file: str, folder: str):
    """The tokenizer embedded in the text encoder file, written to ``folder`` once. The embedded ``tokenizer.json``
    has no BOS post-processor (ComfyUI adds BOS itself), so ``add_bos_token=True`` restores Gemma's, as ai-toolkit
    does."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    os.makedirs(folder, exist_ok=True)
    with safe_open(text_encoder_file, framework="pt") as f:
        for filename, key in TOKENIZER_ASSETS.items():
            path = os.path.join(folder, filename)
            if key in f.keys() and not os.path.exists(path):
                with open(path, "wb") as out:
                    out.write(bytes(f.get_tensor(key).tolist()))
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        raise ValueError(f"{text_encoder_file}: no embedded tokenizer ('tokenizer_json'); give the Gemma-4 text "
                         "encoder file of Lightricks/LTX-2.5.")
    return AutoTokenizer.from_pretrained(folder, add_bos_token=True)


def load_video_vae(path: str, dtype, config):
    from diffusers import AutoencoderKLLTX2Video
    from safetensors.torch import load_file

    original = load_file(path)
    original = _strip(original, "vae.") or original
    levels = len(config["block_out_channels"])
    state_dict = {video_vae_key(k, levels): v for k, v in original.items() if not k.startswith(VAE_UNUSED)}
    return build_module(AutoencoderKLLTX2Video, config, state_dict, dtype, "video VAE")


def load_audio_vae_and_vocoder(path: str, dtype, audio_vae_config, vocoder_config):
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE
    from safetensors.torch import load_file

    original = load_file(path)
    audio_vae = build_module(AutoencoderKLLTX2Audio, audio_vae_config,
                       {audio_vae_key(k): v for k, v in _strip(original, "audio_vae.").items()}, dtype, "audio VAE")
    vocoder = build_module(LTX2VocoderWithBWE, vocoder_config,
                     {vocoder_key(k): v for k, v in _strip(original, "vocoder.").items()}, dtype, "vocoder")
    return audio_vae, vocoder


# ------------------------------------------------------------------------------------------------- the pipeline
def is_comfy_source(source: str, base: str) -> bool:
    """A local folder that is not a diffusers pipeline folder, or the registry's base repo (which has no diffusers
    folders)."""
    if os.path.isdir(source):
        return not os.path.isfile(os.path.join(source, "model_index.json"))
    return not os.path.exists(source) and source == base


def locate_files(source: str, files: Mapping[str, str], family: str = "LTX-2.5", repo: str = "Lightricks/LTX-2.5"
                 ) -> dict:
    """Each file of ``files`` (component -> path in the repo): from the hub repo ``source``, or in the folder
    ``source`` at that path, at its bare name, or anywhere below (a ComfyUI ``models`` folder works)."""
    if not os.path.isdir(source):
        from huggingface_hub import hf_hub_download

        return {component: hf_hub_download(source, path) for component, path in files.items()}
    found, missing = {}, []
    for component, path in files.items():
        name = os.path.basename(path)
        candidates = [os.path.join(source, path), os.path.join(source, name)]
        candidates += [os.path.join(root, name) for root, _, names in sorted(os.walk(source)) if name in names]
        found[component] = next((c for c in candidates if os.path.isfile(c)), None)
        if found[component] is None:
            missing.append(path)
    if missing:
        raise FileNotFoundError(f"{source!r} lacks the {family} ComfyUI file(s) {missing}; download them from "
                                f"{repo} into it, or give a diffusers folder.")
    return found


def load_comfy_pipeline(source: str, files: Mapping[str, str], dtype):
    """An ``LTX2Pipeline`` over the components the ComfyUI files hold (the scheduler is the caller's)."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    paths = locate_files(source, files)
    transformer, connectors = load_transformer_and_connectors(
        paths["transformer"], paths["text_encoder"], dtype, CONFIGS["transformer"], CONFIGS["connectors"])
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = load_gemma4_tokenizer(paths["text_encoder"], folder)
    audio_vae, vocoder = load_audio_vae_and_vocoder(paths["audio_vae"], dtype, CONFIGS["audio_vae"], CONFIGS["vocoder"])
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=load_video_vae(paths["video_vae"], dtype, CONFIGS["video_vae"]),
        audio_vae=audio_vae, text_encoder=load_gemma4_text_encoder(paths["text_encoder"], dtype), tokenizer=tokenizer,
        connectors=connectors, transformer=transformer, vocoder=vocoder,
    )
