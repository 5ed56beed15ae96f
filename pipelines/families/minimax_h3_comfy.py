"""MiniMax-H3 from the ComfyUI files ``Comfy-Org/MiniMax-H3`` publishes, as ai-toolkit's ``MinimaxH3Model`` loads
them by default (``COMFY_FILES`` of ``extensions_built_in/diffusion_models/minimax_h3/minimax_h3.py``).

The files (repo paths in :data:`COMFY_FILES`):

* the transformer, one file per partition (``fl2va`` for ``minimax_h3``, ``ref2va`` for ``minimax_h3_ref2va``), each
  in a full and a ``pruned`` variant (ai-toolkit's default): the original checkpoint's names (no prefix), every block
  Linear in ComfyUI's int8 ConvRot format (``ltx2_comfy``: per-row int8 of the weight rotated by the block regular
  Hadamard), the rest at its stored precision. The full files' block AdaLN projections have no bias (diffusers' module
  has one: it loads as zeros). The pruned files replace the timestep MLP by ``adaln_t_table`` (``size x 8``, read by
  linear interpolation at ``t * (size - 1)``), feed it to the AdaLN projections without the SiLU, and give the block
  projections a bias; :func:`prune_time_embedding` turns diffusers' transformer into that variant;
* the Qwen3-VL-32B text encoder: only the first 50 decoder layers (MiniMax-H3 reads ``hidden_states[50]``), no final
  norm and no LM head, ``model.*`` (text) / ``visual.*`` (vision tower, bf16) names; the text Linears in ``nvfp4``
  (AWQ: with ``pre_quant_scale``), the embedding in per-row int8. Its config, tokenizer and processor are not in the
  file: they come from the bf16 repo (``MiniMaxAI/MiniMax-H3``), as in ai-toolkit;
* the video VAE (fp16) under ai-toolkit's own module names (:func:`video_vae_key`), with its latent statistics;
* the audio VAE (fp32) under diffusers' names with the weight norm folded into plain weights, with its statistics.

Everything is dequantized at load time to the model dtype (float32 maths, :mod:`ltx2_comfy`). ai-toolkit instead keeps
the codes (its Ostris backends) and multiplies by the dequantized weight on the fly: for nvfp4 it scales the input by
the AWQ factor and multiplies by the stored weight; we fold the factor into the weight's columns (the same product,
rounded once less); for int8 ConvRot on CPU it rotates the input instead of the weight (the same product), on CUDA it
also quantizes the activations per token (W8A8), which is not reproduced.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping

from .ltx2_comfy import INT8_FORMAT, NVFP4_FORMAT, build_module, dequantize_comfy_layers, locate_files

COMFY_REPO = "Comfy-Org/MiniMax-H3"
#: ai-toolkit's ``COMFY_FILES``: component -> path in the repo (ComfyUI's ``models`` layout)
COMFY_FILES = {
    "dit_fl2va": "diffusion_models/minimax_h3_fl2va_int8_convrot.safetensors",
    "dit_fl2va_pruned": "diffusion_models/minimax_h3_fl2va_pruned_int8_convrot.safetensors",
    "dit_ref2va": "diffusion_models/minimax_h3_ref2va_int8_convrot.safetensors",
    "dit_ref2va_pruned": "diffusion_models/minimax_h3_ref2va_pruned_int8_convrot.safetensors",
    "text_encoder": "text_encoders/qwen3vl_32b_minimax_h3_nvfp4_awq.safetensors",
    "video_vae": "vae/minimax_h3_video_vae_fp16.safetensors",
    "audio_vae": "vae/minimax_h3_audio_vae_fp32.safetensors",
}
#: the transformer files of each partition (the pipeline component that holds it), ai-toolkit's default first
TRANSFORMER_FILES = {"transformer": ("dit_fl2va_pruned", "dit_fl2va"),
                     "transformer_ref": ("dit_ref2va_pruned", "dit_ref2va")}
#: the small files the ComfyUI repo lacks, from the bf16 repo (``spec.base``) or the same folder
CONFIG_FOLDERS = ("transformer", "vae", "audio_vae", "text_encoder", "tokenizer", "processor")
#: decoder layers of the text encoder file; their last output (no final norm) is MiniMax-H3's conditioning
TEXT_ENCODER_LAYERS = 50

#: how the shared ComfyUI helpers name this family in their errors
COMFY = {"family": "MiniMax-H3", "repo": COMFY_REPO}


# ---------------------------------------------------------------------------------------------------------- transformer
def _linear_modulation(module, temb):
    """The pruned AdaLN projection: no activation, float32 maths on the float32-kept weights (as ai-toolkit computes
    it from the file's fp16 ones), then the block stack's dtype."""
    import torch.nn.functional as F

    linear = module.linear
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(temb.float(), linear.weight.float(), bias).to(module.output_dtype)


def _pruned_classes():
    import torch
    from diffusers.models.transformers.transformer_minimax_h3 import (
        MiniMaxH3AdaLayerNormModulation,
        MiniMaxH3AdaLayerNormOut,
    )

    class TimestepTable(torch.nn.Module):
        """``adaln_t_table`` read by linear interpolation at ``t * (rows - 1)``, ``t`` clamped to [0, 1]; float32."""

        def __init__(self, rows: int, width: int):
            super().__init__()
            self.register_buffer("adaln_t_table", torch.zeros(rows, width))

        def forward(self, timestep):
            table = self.adaln_t_table.float()
            position = timestep.float().clamp(0.0, 1.0) * (table.shape[0] - 1)
            below = position.floor().long()
            above = (below + 1).clamp(max=table.shape[0] - 1)
            fraction = (position - below.float()).unsqueeze(1)
            return table[below] * (1.0 - fraction) + table[above] * fraction

    class Modulation(MiniMaxH3AdaLayerNormModulation):
        def forward(self, temb):
            return _linear_modulation(self, temb).view(-1, 6 * self.hidden_size).chunk(6, dim=-1)

    class NormOut(MiniMaxH3AdaLayerNormOut):
        def forward(self, hidden_states, temb, timestep_indices):
            shift, scale = _linear_modulation(self, temb).chunk(2, dim=-1)
            normed = self.norm(hidden_states)
            return normed * (1.0 + scale.index_select(0, timestep_indices)) + shift.index_select(0, timestep_indices)

    return TimestepTable, Modulation, NormOut


def prune_time_embedding(transformer, table_rows: int, dtype):
    """Turn a ``MiniMaxH3Transformer3DModel`` (built with the pruned files' ``time_embed_dim``) into the pruned
    variant: the timestep goes unprojected into a table (``time_embedder.adaln_t_table``), and every AdaLN projection
    reads it without the SiLU, handing ``dtype`` (the block stack's) on."""
    import torch

    table_class, modulation_class, norm_out_class = _pruned_classes()
    transformer.time_proj = torch.nn.Identity()
    transformer.time_embedder = table_class(table_rows, transformer.config.time_embed_dim)
    for block in transformer.transformer_blocks:
        block.adaln_proj.__class__ = modulation_class
    transformer.norm_out.__class__ = norm_out_class
    for module in [transformer.norm_out] + [block.adaln_proj for block in transformer.transformer_blocks]:
        module.output_dtype = dtype
    return transformer


#: in the files (ai-toolkit's strict load wants it), computed from the config by diffusers' rotary module: checked
ROTARY_FREQUENCIES = "rope.inv_freq"
#: the pruned files' AdaLN projections (fp16 in the file), kept float32: ai-toolkit multiplies them in float32
PRUNED_FP32 = ("adaln_proj.linear", "norm_out.linear")
_BLOCK_ADALN_BIAS = re.compile(r"^transformer_blocks\.\d+\.adaln_proj\.linear\.bias$")


def load_transformer(path: str, config: Mapping, dtype):
    """A transformer file of the ComfyUI repo (full or pruned, int8 ConvRot) -> ``MiniMaxH3Transformer3DModel``
    (the pruned ones through :func:`prune_time_embedding`), dequantized, every tensor of the file placed."""
    import torch
    from diffusers import MiniMaxH3Transformer3DModel
    from diffusers.loaders.single_file_utils import convert_minimax_h3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    original = dequantize_comfy_layers(load_file(path), embeddings=(), formats=(INT8_FORMAT,))
    table = original.pop("adaln_t_table", None)
    stored_frequencies = original.pop(ROTARY_FREQUENCIES, None)
    config = dict(config)
    if table is not None:
        config["time_embed_dim"] = table.shape[1]
    state_dict = convert_minimax_h3_transformer_checkpoint_to_diffusers(original, config)
    if table is not None:
        state_dict["time_embedder.adaln_t_table"] = table

    def build(config):
        model = MiniMaxH3Transformer3DModel.from_config(config)
        return model if table is None else prune_time_embedding(model, table.shape[0], dtype)

    if table is None:  # the full files' block AdaLN projections have no bias; diffusers' have one
        with torch.device("meta"):
            names = build(config).state_dict()
        for name, value in names.items():
            if _BLOCK_ADALN_BIAS.match(name) and name not in state_dict:
                state_dict[name] = torch.zeros(value.shape)
    keep_in_fp32 = tuple(MiniMaxH3Transformer3DModel._keep_in_fp32_modules) + (() if table is None else PRUNED_FP32)
    transformer = build_module(build, config, state_dict, dtype, "transformer", **COMFY, keep_in_fp32=keep_in_fp32)
    computed = transformer.rope.inv_freq
    if stored_frequencies is not None and not torch.allclose(stored_frequencies.float(), computed, rtol=1e-5, atol=0):
        raise ValueError(f"MiniMax-H3 transformer: the file's {ROTARY_FREQUENCIES} differs from the one the config "
                         f"(rope_freq_dim {config.get('rope_freq_dim')}, rope_theta {config.get('rope_theta')}) "
                         "gives; is the transformer config the one of MiniMaxAI/MiniMax-H3?")
    return transformer


# --------------------------------------------------------------------------------------------------------- text encoder
#: the text encoder file's prefixes -> ``Qwen3VLForConditionalGeneration``'s
TEXT_ENCODER_PREFIXES = {"model.": "model.language_model.", "visual.": "model.visual."}
#: ai-toolkit keeps the file's vision tower at its stored precision (bf16) whatever the text encoder's dtype
VISION_TOWER = "model.visual."


def text_encoder_key(key: str) -> str:
    for prefix, name in TEXT_ENCODER_PREFIXES.items():
        if key.startswith(prefix):
            return name + key[len(prefix):]
    return key


def is_truncated_text_encoder(text_encoder) -> bool:
    """The ComfyUI text stack: its last hidden state (no final norm) is the conditioning."""
    import torch

    return isinstance(text_encoder.model.language_model.norm, torch.nn.Identity)


def load_text_encoder(path: str, config, dtype):
    """The nvfp4-AWQ text encoder file -> ``Qwen3VLForConditionalGeneration`` of ``config`` truncated to its 50
    decoder layers, without the LM head, the final norm an identity (:func:`is_truncated_text_encoder`)."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3VLForConditionalGeneration

    config = copy.deepcopy(config)
    config.text_config.num_hidden_layers = TEXT_ENCODER_LAYERS
    config.tie_word_embeddings = False

    def build(config):
        model = Qwen3VLForConditionalGeneration(config)
        model.lm_head = None
        model.model.language_model.norm = torch.nn.Identity()
        return model

    state_dict = {text_encoder_key(k): v for k, v in load_file(path).items()}
    return build_module(build, config, state_dict, dtype, "text encoder", formats=(NVFP4_FORMAT, INT8_FORMAT),
                        keep_stored_dtype=(VISION_TOWER,), **COMFY)


# ---------------------------------------------------------------------------------------------------------------- VAEs
#: ai-toolkit's video VAE names -> diffusers' (whole dotted segments; ``N`` a number)
VIDEO_VAE_RENAMES = (
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."), r"encoder.down_blocks.\1.resnets.\2."),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\."), r"encoder.down_blocks.\1.downsamplers.0."),
    (re.compile(r"\.nin_shortcut\."), ".conv_shortcut."),
    (re.compile(r"^decoder\.x_embedder\."), "decoder.proj_in."),
    (re.compile(r"\.attn\.to_out\."), ".attn.to_out.0."),
    (re.compile(r"\.ff\.w1\."), ".ff.net.0.proj."),
    (re.compile(r"\.ff\.w2\."), ".ff.net.2."),
)
#: in the file, not in the model: the decoder's training-time mask token (ai-toolkit: "unused at inference")
VIDEO_VAE_UNUSED = ("decoder.mask_token",)
LATENT_STATISTICS = ("latents_mean", "latents_std")


def video_vae_key(original: str) -> str:
    for pattern, replacement in VIDEO_VAE_RENAMES:
        original = pattern.sub(replacement, original)
    return original


def _split_video_vae_tensors(state_dict: dict, heads: int) -> dict:
    """The decoder's fused ``to_qkv`` holds, per head, its q, k and v rows; its SwiGLU input projection is
    ``[gate; value]`` where diffusers' reads ``[value; gate]``."""
    import torch

    for key in [k for k in state_dict if ".attn.to_qkv." in k]:
        fused = state_dict.pop(key)
        per_head = fused.reshape(heads, 3, fused.shape[0] // (3 * heads), *fused.shape[1:])
        for index, name in enumerate(("to_q", "to_k", "to_v")):
            state_dict[key.replace("to_qkv", name)] = per_head[:, index].reshape(-1, *fused.shape[1:])
    for key in [k for k in state_dict if ".ff.net.0.proj." in k]:
        gate, value = state_dict[key].chunk(2, dim=0)
        state_dict[key] = torch.cat([value, gate])
    return state_dict


def _statistics(state_dict: dict, config: Mapping) -> dict:
    """The file's latent statistics into the config (diffusers' VAEs hold them there)."""
    config = dict(config)
    for name in LATENT_STATISTICS:
        if name in state_dict:
            config[name] = [float(x) for x in state_dict.pop(name).float()]
            # a config read from a file lists the values it left at their default; this one is not any more
            config["_use_default_values"] = [n for n in config.get("_use_default_values", []) if n != name]
    return config


def load_video_vae(path: str, config: Mapping, dtype):
    from diffusers import AutoencoderKLMiniMaxH3
    from safetensors.torch import load_file

    original = load_file(path)
    config = _statistics(original, config)
    state_dict = {video_vae_key(k): v for k, v in original.items() if k not in VIDEO_VAE_UNUSED}
    state_dict = _split_video_vae_tensors(state_dict, config["decoder_num_attention_heads"])
    return build_module(AutoencoderKLMiniMaxH3.from_config, config, state_dict, dtype, "video VAE", **COMFY)


def load_audio_vae(path: str, config: Mapping):
    """The audio VAE (float32, as ai-toolkit keeps it). The file's folded weights go back into diffusers' weight-norm
    pairs: ``weight_v`` the weight, ``weight_g`` its norm over every dimension but the first."""
    import torch
    from diffusers import AutoencoderKLMiniMaxH3Audio
    from safetensors.torch import load_file

    original = load_file(path)
    config = _statistics(original, config)
    with torch.device("meta"):
        expected = AutoencoderKLMiniMaxH3Audio.from_config(config).state_dict()
    state_dict = {}
    for key, value in original.items():
        stem = key[: -len("weight")]
        if key.endswith(".weight") and stem + "weight_v" in expected:
            state_dict[stem + "weight_v"] = value
            state_dict[stem + "weight_g"] = value.norm(dim=tuple(range(1, value.ndim)), keepdim=True)
        else:
            state_dict[key] = value
    return build_module(AutoencoderKLMiniMaxH3Audio.from_config, config, state_dict, torch.float32, "audio VAE",
                        **COMFY)


# ------------------------------------------------------------------------------------------------------------ pipeline
def is_comfy_source(source: str) -> bool:
    """The ComfyUI repo, or a local folder that is not a diffusers modular pipeline folder."""
    if os.path.isdir(source):
        return not os.path.isfile(os.path.join(source, "modular_model_index.json"))
    return source == COMFY_REPO


def transformer_file(source: str, denoiser: str) -> str:
    """The component key of the transformer file to load: in a folder, the first of :data:`TRANSFORMER_FILES` that
    is there; from the hub, ai-toolkit's default (pruned)."""
    candidates = TRANSFORMER_FILES[denoiser]
    if os.path.isdir(source):
        for candidate in candidates:
            name = os.path.basename(COMFY_FILES[candidate])
            if any(name in names for _, _, names in os.walk(source)):
                return candidate
    return candidates[0]


def config_source(source: str, base: str) -> dict:
    """Where the small config/tokenizer/processor folders come from: the folder itself when it has them, else the
    bf16 repo."""
    if os.path.isdir(source) and all(os.path.isdir(os.path.join(source, name)) for name in CONFIG_FOLDERS):
        return {"pretrained_model_name_or_path": source}
    return {"pretrained_model_name_or_path": base}


def load_comfy_components(source: str, base: str, denoiser: str, dtype) -> dict:
    """The MiniMax-H3 components the ComfyUI files hold, with the configs, tokenizer and processor of the bf16 repo
    (or of the folder): the transformer as ``denoiser``, the text encoder, tokenizer, processor and both VAEs."""
    from diffusers import AutoencoderKLMiniMaxH3, AutoencoderKLMiniMaxH3Audio, MiniMaxH3Transformer3DModel
    from transformers import AutoConfig, AutoTokenizer

    from .nucleus_image import Qwen3VLTextProcessor

    dit = transformer_file(source, denoiser)
    paths = locate_files(source, {component: COMFY_FILES[component]
                                  for component in (dit, "text_encoder", "video_vae", "audio_vae")}, **COMFY)
    configs = config_source(source, base)
    config_of = {name: cls.load_config(subfolder=name, **configs) for name, cls in
                 (("transformer", MiniMaxH3Transformer3DModel), ("vae", AutoencoderKLMiniMaxH3),
                  ("audio_vae", AutoencoderKLMiniMaxH3Audio))}
    return {
        denoiser: load_transformer(paths[dit], config_of["transformer"], dtype),
        "text_encoder": load_text_encoder(paths["text_encoder"],
                                          AutoConfig.from_pretrained(subfolder="text_encoder", **configs), dtype),
        "tokenizer": AutoTokenizer.from_pretrained(subfolder="tokenizer", **configs),
        "processor": Qwen3VLTextProcessor.from_pretrained(configs["pretrained_model_name_or_path"],
                                                          subfolder="processor"),
        "vae": load_video_vae(paths["video_vae"], config_of["vae"], dtype),
        "audio_vae": load_audio_vae(paths["audio_vae"], config_of["audio_vae"]),
    }
