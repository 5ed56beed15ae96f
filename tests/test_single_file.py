"""Single-file bases as ComfyUI users keep them (``pipelines/single_file.py``): tiny models written in the original
single-file key layouts (from the published module names), loaded back, compared weight for weight and run."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from aitk_inference.pipelines import load_pipeline
from aitk_inference.pipelines.single_file import (ComponentsUnavailableError, convert_flux1_transformer,
                                                  is_single_file_source)

pytestmark = pytest.mark.usefixtures("one_thread")

FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------- writers of original layouts
# FLUX.1 as BFL's reference code names it (flux/model.py, flux/modules/layers.py of black-forest-labs/flux).
def flux_bfl_state_dict(transformer) -> dict:
    sd = transformer.state_dict()
    out = {}
    top = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer", "proj_out": "final_layer.linear"}
    for name, bfl in top.items():
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = sd[f"{name}.{p}"]
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    for i in range(transformer.config.num_layers):
        d = f"transformer_blocks.{i}."
        b = f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
            for ours, bfl in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                              ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                              ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                              ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
                out[f"{b}{bfl}.{p}"] = sd[f"{d}{ours}.{p}"]
        for ours, bfl in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                          ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{b}{bfl}.scale"] = sd[f"{d}attn.{ours}.weight"]
    for i in range(transformer.config.num_single_layers):
        d = f"single_transformer_blocks.{i}."
        b = f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}linear1.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{d}proj_mlp.{p}"]])
            out[f"{b}linear2.{p}"] = sd[f"{d}proj_out.{p}"]
            out[f"{b}modulation.lin.{p}"] = sd[f"{d}norm.linear.{p}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return out


# Wan 2.x as Wan-Video's reference code names it (wan/modules/model.py).
WAN_RENAMES = [("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
               ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
               ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
               ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
               ("condition_embedder.time_proj", "time_projection.1"), ("proj_out", "head.head"),
               (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
               (".to_k.", ".k."), (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2")]


def wan_original_state_dict(transformer) -> dict:
    out = {}
    for key, value in transformer.state_dict().items():
        if key == "scale_shift_table":
            out["model.diffusion_model.head.modulation"] = value
            continue
        key = re.sub(r"^(blocks\.\d+\.)scale_shift_table$", r"\1modulation", key)
        key = re.sub(r"^(blocks\.\d+\.)norm2\.", r"\1norm3.", key)  # Wan's norm3 is the cross-attention norm
        for ours, original in WAN_RENAMES:
            key = key.replace(ours, original)
        out["model.diffusion_model." + key] = value
    return out


# SDXL as Stability's generative-models code names an all-in-one checkpoint (sgm UNetModel, ldm AutoencoderKL,
# conditioner.embedders.0 = CLIP-L in transformers names, .1 = OpenCLIP bigG); diffusers' own tables where it
# exposes them (DIFFUSERS_TO_LDM_MAPPING).
LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
LDM_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _put(out, prefix, sd, source, renames=None):
    """Copy ``source.*`` of ``sd`` to ``prefix.*`` in ``out``, renaming the first segment(s) by ``renames``."""
    for key, value in sd.items():
        if key.startswith(source + "."):
            rest = key[len(source) + 1:]
            for ours, theirs in (renames or {}).items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours):]
            out[f"{prefix}.{rest}"] = value


def sdxl_unet_ldm(unet) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    sd, out = unet.state_dict(), {}
    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    extra = tables["addition_embed_type"] if unet.config.addition_embed_type else {}
    for ours, theirs in {**tables["layers"], **extra}.items():
        out[theirs] = sd[ours]
    per_block = unet.config.layers_per_block
    for i, block in enumerate(unet.down_blocks):
        for j in range(per_block):
            n = 1 + i * (per_block + 1) + j
            _put(out, f"input_blocks.{n}.0", sd, f"down_blocks.{i}.resnets.{j}", LDM_RESNET)
            if getattr(block, "attentions", None):
                _put(out, f"input_blocks.{n}.1", sd, f"down_blocks.{i}.attentions.{j}")
        if block.downsamplers:
            _put(out, f"input_blocks.{1 + i * (per_block + 1) + per_block}.0.op", sd, f"down_blocks.{i}.downsamplers.0.conv")
    _put(out, "middle_block.0", sd, "mid_block.resnets.0", LDM_RESNET)
    _put(out, "middle_block.1", sd, "mid_block.attentions.0")
    _put(out, "middle_block.2", sd, "mid_block.resnets.1", LDM_RESNET)
    for i, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(per_block + 1):
            n = i * (per_block + 1) + j
            _put(out, f"output_blocks.{n}.0", sd, f"up_blocks.{i}.resnets.{j}", LDM_RESNET)
            if has_attention:
                _put(out, f"output_blocks.{n}.1", sd, f"up_blocks.{i}.attentions.{j}")
        if block.upsamplers:
            _put(out, f"output_blocks.{i * (per_block + 1) + per_block}.{2 if has_attention else 1}.conv", sd,
                 f"up_blocks.{i}.upsamplers.0.conv")
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def sdxl_vae_ldm(vae) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    sd, out = vae.state_dict(), {}
    for ours, theirs in DIFFUSERS_TO_LDM_MAPPING["vae"].items():
        if ours in sd:  # FLUX's VAE has no quant convs
            out[theirs] = sd[ours]
    count = len(vae.encoder.down_blocks)
    for side, blocks, kind in (("encoder", vae.encoder.down_blocks, "down"), ("decoder", vae.decoder.up_blocks, "up")):
        for i, block in enumerate(blocks):
            index = i if kind == "down" else count - 1 - i
            for j in range(len(block.resnets)):
                _put(out, f"{side}.{kind}.{index}.block.{j}", sd, f"{side}.{kind}_blocks.{i}.resnets.{j}",
                     LDM_VAE_RESNET)
            resampler = "downsamplers" if kind == "down" else "upsamplers"
            if getattr(block, resampler, None):
                _put(out, f"{side}.{kind}.{index}.{kind}sample.conv", sd, f"{side}.{kind}_blocks.{i}.{resampler}.0.conv")
        _put(out, f"{side}.mid.block_1", sd, f"{side}.mid_block.resnets.0", LDM_VAE_RESNET)
        _put(out, f"{side}.mid.block_2", sd, f"{side}.mid_block.resnets.1", LDM_VAE_RESNET)
        for ours, theirs in LDM_VAE_ATTENTION.items():
            for p in ("weight", "bias"):
                value = sd[f"{side}.mid_block.attentions.0.{ours}.{p}"]
                out[f"{side}.mid.attn_1.{theirs}.{p}"] = value[..., None, None] if value.ndim == 2 else value
    return {"first_stage_model." + k: v for k, v in out.items()}


def sdxl_open_clip(text_encoder) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    sd, out = text_encoder.state_dict(), {}
    tables = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    for ours, theirs in tables["layers"].items():
        out[theirs] = sd[ours].T.contiguous() if theirs == "text_projection" else sd[ours]
    for i in range(text_encoder.config.num_hidden_layers):
        layer = f"text_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [sd[f"{layer}self_attn.{x}_proj.{p}"] for x in "qkv"])
        for key, value in sd.items():
            if key.startswith(layer) and ".self_attn.q_proj" not in key and ".self_attn.k_proj" not in key \
                    and ".self_attn.v_proj" not in key:
                for ours, theirs in tables["transformer"].items():
                    key = key.replace(ours, theirs)
                out["transformer." + key] = value
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


def clip_l_ldm(text_encoder, prefix: str) -> dict:
    """CLIP-L under ``prefix`` in the transformers names the checkpoints were saved with (``text_model.`` first)."""
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


def ldm_checkpoint(pipe) -> dict:
    """SDXL (sgm: ``conditioner.embedders``) or SD 1.5 (ldm: ``cond_stage_model.transformer``) all-in-one layout."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return {**sdxl_unet_ldm(pipe.unet), **sdxl_vae_ldm(pipe.vae),
                **clip_l_ldm(pipe.text_encoder, "cond_stage_model.transformer.")}
    return {**sdxl_unet_ldm(pipe.unet), **sdxl_vae_ldm(pipe.vae), **sdxl_open_clip(pipe.text_encoder_2),
            **clip_l_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer.")}


def to_fp8(state_dict: dict) -> dict:
    """Every floating weight as float8_e4m3fn (what flux1-dev-fp8 / *_fp8_e4m3fn files hold)."""
    return {k: v.to(FP8) if v.is_floating_point() and v.ndim >= 2 else v for k, v in state_dict.items()}


def assert_same_weights(loaded, source):
    got, want = loaded.state_dict(), source.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def fp8_rounded(module) -> torch.nn.Module:
    import copy

    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(FP8).to(p.dtype))
    return rounded


@pytest.fixture(scope="module")
def flux_source(tiny_dir):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_dir("flux"), subfolder="transformer")


def fake_hub_cache(root, repo: str, folder: str) -> str:
    """A hub cache holding ``folder`` as the snapshot of ``repo`` (what a download of it leaves)."""
    commit = "0" * 40
    repo_dir = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(folder, os.path.join(repo_dir, "snapshots", commit), ignore=shutil.ignore_patterns("loras"))
    return root


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty hub cache and no network: ``huggingface_hub`` answers from the cache only."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return str(cache)


# ------------------------------------------------------------------------------------------------------------ tests
def test_flux_fp8_transformer_file_from_hub_cache(tmp_path, tiny_dir, flux_source, offline_hub):
    """flux1-dev-fp8 style transformer-only file (BFL names, float8_e4m3fn, no prefix): the other components come from
    the hub cache of the registry's base repo; the weights are the FP8 values upcast, and a generation runs."""
    path = str(tmp_path / "flux1-dev-fp8.safetensors")
    save_file(to_fp8(flux_bfl_state_dict(flux_source)), path)
    fake_hub_cache(offline_hub, "black-forest-labs/FLUX.1-dev", tiny_dir("flux"))
    pipeline = load_pipeline("flux", base=path, device="cpu", dtype="fp32")
    assert_same_weights(pipeline.pipe.transformer, fp8_rounded(flux_source))
    result = pipeline.generate("a cat", width=64, height=64, steps=1, seed=1)
    assert result.images.shape == (1, 64, 64, 3)


def test_flux_comfy_scaled_fp8_and_all_in_one(tmp_path, tiny_dir, flux_source):
    """A ComfyUI all-in-one FLUX checkpoint (``model.diffusion_model.`` + ``vae.`` + ``text_encoders.``) with scaled
    FP8 layers (``scale_weight``, ``scaled_fp8``): its denoiser is ``fp8 * scale``; components from a folder."""
    original = flux_bfl_state_dict(flux_source)
    scale = torch.tensor(0.5)
    checkpoint = {"model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=FP8)}
    for key, value in original.items():
        if key.endswith(".weight") and value.ndim == 2:
            checkpoint["model.diffusion_model." + key] = (value / scale).to(FP8)
            checkpoint["model.diffusion_model." + key[:-len("weight")] + "scale_weight"] = scale.clone()
        else:
            checkpoint["model.diffusion_model." + key] = value
    checkpoint["vae.decoder.conv_in.weight"] = torch.zeros(1)
    checkpoint["text_encoders.clip_l.logit_scale"] = torch.zeros(1)
    path = str(tmp_path / "flux1-dev-fp8-aio.safetensors")
    save_file(checkpoint, path)
    pipeline = load_pipeline("flux", base=path, components=tiny_dir("flux"), device="cpu", dtype="fp32")
    got = pipeline.pipe.transformer.state_dict()
    block = "transformer_blocks.0.ff.net.2.weight"
    torch.testing.assert_close(got[block], (flux_source.state_dict()[block] / scale).to(FP8).float() * scale,
                               rtol=0, atol=0)
    torch.testing.assert_close(got["norm_out.linear.bias"], flux_source.state_dict()["norm_out.linear.bias"],
                               rtol=0, atol=0)


def _comfy_quant(settings: dict):
    return torch.tensor(list(json.dumps(settings).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("where", ["per_layer", "header"])
def test_flux_comfy_quant_fp8_file(tmp_path, tiny_dir, flux_source, where):
    """ComfyUI's newer quantized files: per layer a ``comfy_quant`` setting (a uint8 JSON tensor, or the header's
    ``_quantization_metadata``), a ``weight_scale`` and an ``input_scale``; a float8 layer is ``fp8 * weight_scale``."""
    original = flux_bfl_state_dict(flux_source)
    scale = torch.tensor(0.25)
    quantized, layers = {}, {}
    for key, value in original.items():
        if key.endswith(".weight") and value.ndim == 2:
            layer = key[: -len(".weight")]
            quantized[key] = (value / scale).to(FP8)
            quantized[layer + ".weight_scale"] = scale.clone()
            quantized[layer + ".input_scale"] = torch.tensor(1.0)
            layers[layer] = {"format": "float8_e4m3fn"}
            if where == "per_layer":
                quantized[layer + ".comfy_quant"] = _comfy_quant(layers[layer])
        else:
            quantized[key] = value
    path = str(tmp_path / f"flux1-dev-comfy-quant-{where}.safetensors")
    header = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(quantized, path, metadata=header if where == "header" else None)
    pipeline = load_pipeline("flux", base=path, components=tiny_dir("flux"), device="cpu", dtype="fp32")
    block = "transformer_blocks.0.ff.net.2.weight"
    torch.testing.assert_close(pipeline.pipe.transformer.state_dict()[block],
                               (flux_source.state_dict()[block] / scale).to(FP8).float() * scale, rtol=0, atol=0)


def test_a_comfy_quant_format_not_read_here_is_named(tmp_path, tiny_dir, flux_source):
    original = flux_bfl_state_dict(flux_source)
    layer = next(k for k, v in original.items() if k.endswith(".weight") and v.ndim == 2)[: -len(".weight")]
    original[layer + ".comfy_quant"] = _comfy_quant({"format": "int8_tensorwise"})
    path = str(tmp_path / "flux1-dev-int8.safetensors")
    save_file(original, path)
    with pytest.raises(ValueError, match=f"Layer '{layer}' is quantized in ComfyUI's 'int8_tensorwise' format"):
        load_pipeline("flux", base=path, components=tiny_dir("flux"), device="cpu", dtype="fp32")


def test_flux_conversion_matches_diffusers_at_full_size():
    """At FLUX.1-dev's real sizes (meta tensors; diffusers' converter only works there), ours gives the same names
    and shapes as diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 1, "num_single_layers": 1,
              "in_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
              "axes_dims_rope": (16, 56, 56)}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    bfl = {k: torch.empty(v.shape, device="meta") for k, v in flux_bfl_state_dict(model).items()}
    ours = convert_flux1_transformer(dict(bfl), config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_wan22_expert_pair(tmp_path, tiny_dir):
    """Wan 2.2 A14B as ComfyUI's two files (original Wan names, ``model.diffusion_model.`` prefix, FP8): naming the
    high-noise file finds the low-noise one beside it; each expert gets its own weights; a generation runs."""
    from diffusers import WanTransformer3DModel

    folder = tiny_dir("wan22_14b_t2v")
    sources = {c: WanTransformer3DModel.from_pretrained(folder, subfolder=c) for c in ("transformer", "transformer_2")}
    for component, side in (("transformer", "high"), ("transformer_2", "low")):
        save_file(to_fp8(wan_original_state_dict(sources[component])),
                  str(tmp_path / f"wan2.2_t2v_{side}_noise_14B_fp8_e4m3fn.safetensors"))
    high = str(tmp_path / "wan2.2_t2v_high_noise_14B_fp8_e4m3fn.safetensors")
    pipeline = load_pipeline("wan22_14b_t2v", base=high, components=folder, device="cpu", dtype="fp32")
    for component, source in sources.items():
        assert_same_weights(getattr(pipeline.pipe, component), fp8_rounded(source))
    result = pipeline.generate("a cat", width=64, height=64, num_frames=1, steps=2, seed=1)  # both experts run
    assert result.images.shape == (1, 1, 64, 64, 3)


def test_qwen_image_fp8_file(tmp_path, tiny_dir):
    """qwen_image_fp8_e4m3fn style file: diffusers' own names under ComfyUI's prefix, FP8; a generation runs."""
    from diffusers import QwenImageTransformer2DModel

    folder = tiny_dir("qwen_image")
    source = QwenImageTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    path = str(tmp_path / "qwen_image_fp8_e4m3fn.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in to_fp8(source.state_dict()).items()}, path)
    pipeline = load_pipeline("qwen_image", base=path, components=folder, device="cpu", dtype="fp32")
    assert_same_weights(pipeline.pipe.transformer, fp8_rounded(source))
    assert pipeline.generate("a cat", width=64, height=64, steps=2, seed=1).images.shape == (1, 64, 64, 3)


def test_wan22_needs_both_experts(tmp_path, tiny_dir):
    lone = tmp_path / "wan2.2_t2v_high_noise_14B.safetensors"
    save_file({"x": torch.zeros(1)}, str(lone))
    with pytest.raises(FileNotFoundError, match="low_noise_14B.safetensors.*other expert"):
        load_pipeline("wan22_14b_t2v", base=str(lone), components=tiny_dir("wan22_14b_t2v"), device="cpu")
    with pytest.raises(ValueError, match="two experts"):
        load_pipeline("wan22_14b_t2v", base=str(tmp_path / "wan_t2v.safetensors"), device="cpu")


def test_missing_components_offline_names_what_to_fetch(tmp_path, flux_source, offline_hub):
    path = str(tmp_path / "flux1-dev.safetensors")
    save_file(flux_bfl_state_dict(flux_source), path)
    with pytest.raises(ComponentsUnavailableError) as error:
        load_pipeline("flux", base=path, device="cpu", dtype="fp32")
    message = str(error.value)
    assert "black-forest-labs/FLUX.1-dev" in message
    assert "huggingface-cli download black-forest-labs/FLUX.1-dev --include model_index.json" in message
    assert "'text_encoder/*'" in message and "'vae/*'" in message and "transformer/config.json" in message
    assert "'transformer/*'" not in message  # the file replaces the transformer weights: never fetched


def test_cli_offline_error_has_no_traceback(tmp_path, flux_source, offline_hub, capsys):
    from aitk_inference.cli import main

    path = str(tmp_path / "flux1-dev.safetensors")
    save_file(flux_bfl_state_dict(flux_source), path)
    assert main(["generate", "--model", "flux", "--base", path, "--device", "cpu", "--prompt", "x",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: flux: the single file holds the denoiser only") and "Traceback" not in err
    assert "huggingface-cli download black-forest-labs/FLUX.1-dev" in err


def test_components_folder_errors(tmp_path, flux_source, tiny_dir):
    path = str(tmp_path / "flux1-dev.safetensors")
    save_file(flux_bfl_state_dict(flux_source), path)
    with pytest.raises(ComponentsUnavailableError, match="not a diffusers folder"):
        load_pipeline("flux", base=path, components=str(tmp_path), device="cpu")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir("flux"), partial, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ComponentsUnavailableError, match=r"lacks \['vae'\]"):
        load_pipeline("flux", base=path, components=str(partial), device="cpu")
    wrong = str(tmp_path / "not_flux.safetensors")
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="Not a FLUX.1 transformer file"):
        load_pipeline("flux", base=wrong, components=tiny_dir("flux"), device="cpu")
    wan_part = str(tmp_path / "wan2.1_t2v_1.3B.safetensors")
    save_file({"model.diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(24, 24)}, wan_part)
    with pytest.raises(ValueError, match="does not hold every weight of WanTransformer3DModel"):
        load_pipeline("wan21_1b", base=wan_part, components=tiny_dir("wan21_1b"), device="cpu")
    save_file({"model.diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, wan_part)
    with pytest.raises(ValueError, match="does not fit WanTransformer3DModel"):
        load_pipeline("wan21_1b", base=wan_part, components=tiny_dir("wan21_1b"), device="cpu")
    with pytest.raises(ValueError, match="components applies only to a single-file base"):
        load_pipeline("flux", base=tiny_dir("flux"), components=tiny_dir("flux"), device="cpu")
    # families that read their own checkpoint files (or refuse them) keep their own path
    with pytest.raises(ValueError, match="zeta_chroma does not take `components`"):
        load_pipeline("zeta_chroma", base=wan_part, components=tiny_dir("flux"), device="cpu")


def test_expert_files_explicit_pair_and_by_name(tmp_path):
    from aitk_inference.pipelines.registry import get_spec
    from aitk_inference.pipelines.single_file import expert_files

    spec = get_spec("wan22_14b_t2v")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    high, low = tmp_path / "wan_high_noise.safetensors", tmp_path / "wan_low_noise.safetensors"
    for path in (first, second, high, low):
        path.write_bytes(b"")
    assert expert_files(spec, f"{first}|{second}") == {"transformer": str(first), "transformer_2": str(second)}
    assert expert_files(spec, str(low)) == {"transformer_2": str(low), "transformer": str(high)}
    with pytest.raises(ValueError, match="one denoiser: give one file, not 2"):
        expert_files(get_spec("flux"), f"{first}|{second}")


def test_single_file_source_spelling():
    assert is_single_file_source("/m/flux1-dev.safetensors")
    assert is_single_file_source("/m/a_high_noise.safetensors|/m/a_low_noise.safetensors")
    assert not is_single_file_source("black-forest-labs/FLUX.1-dev")
    assert not is_single_file_source("/models/diffusers/flux")


def sdxl_with_distinct_encoders(folder: str) -> str:
    """The tiny SDXL with its two text encoders of different widths (32 and 48), saved to ``folder``: diffusers tells
    an all-in-one file's CLIP-L from its OpenCLIP bigG by their widths (768 and 1280 in SDXL), so equal tiny widths
    would be ambiguous."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from aitk_inference.tiny.flux import clip_text_encoder
    from aitk_inference.tiny.stable_diffusion import ddpm_scheduler, sd_vae
    from aitk_inference.tiny.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D",
        "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 48,
        norm_num_groups=8)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    torch.manual_seed(1)
    text_encoder_2 = clip_text_encoder(tokenizer_2, with_projection=True, hidden=48, projection=32)
    StableDiffusionXLPipeline(vae=sd_vae(scaling_factor=0.13025), text_encoder=clip_text_encoder(tokenizer, hidden=32),
                              text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                              scheduler=ddpm_scheduler()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_id", ["sdxl", "sd15"])
def test_ldm_all_in_one_checkpoint(tmp_path, tiny_dir, model_id):
    """SDXL / SD 1.5 all-in-one checkpoints (models/checkpoints): diffusers' from_single_file reads the UNet, VAE and
    text encoders from the file; only tokenizers, scheduler and configs come from beside; every weight equals the
    source, and a generation runs."""
    from diffusers import DiffusionPipeline

    folder = sdxl_with_distinct_encoders(str(tmp_path / "sdxl")) if model_id == "sdxl" else tiny_dir(model_id)
    source = DiffusionPipeline.from_pretrained(folder)
    path = str(tmp_path / f"{model_id}.safetensors")
    save_file(ldm_checkpoint(source), path)
    pipeline = load_pipeline(model_id, base=path, components=folder, device="cpu", dtype="fp32")
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if model_id == "sdxl" else ("unet", "vae", "text_encoder")
    for name in names:
        assert_same_weights(getattr(pipeline.pipe, name), getattr(source, name))
    result = pipeline.generate("a cat", width=64, height=64, steps=1, seed=1)
    assert result.images.shape == (1, 64, 64, 3)


# ------------------------------------------------------------------------------------------------------- the node
@pytest.fixture
def comfy_folders(monkeypatch, tmp_path):
    """A stand-in for ComfyUI's ``folder_paths`` with models/diffusion_models, checkpoints, text_encoders and vae
    (``unet`` and ``clip`` are mapped onto diffusion_models and text_encoders, as ComfyUI does, so they are no keys of
    their own)."""
    import sys
    import types

    roots = {name: tmp_path / "models" / name for name in ("diffusion_models", "checkpoints", "loras", "diffusers",
                                                           "text_encoders", "vae")}
    for root in roots.values():
        root.mkdir(parents=True)
    module = types.ModuleType("folder_paths")
    module.folder_names_and_paths = {name: ([str(root)], {".safetensors"}) for name, root in roots.items()}
    module.get_folder_paths = lambda name: [str(roots[name])]
    module.get_filename_list = lambda name: sorted(os.listdir(roots[name]))
    module.get_full_path = lambda name, file: (str(roots[name] / file) if name in roots
                                               and (roots[name] / file).is_file() else None)
    monkeypatch.setitem(sys.modules, "folder_paths", module)
    return roots


def test_load_node_base_file(comfy_folders, tiny_dir, flux_source, monkeypatch):
    from aitk_inference.nodes import core
    from aitk_inference.nodes.comfy import base_file_choices
    from aitk_inference.pipelines.runtime import cache

    save_file(to_fp8(flux_bfl_state_dict(flux_source)), str(comfy_folders["diffusion_models"] / "flux1-dev-fp8.safetensors"))
    save_file({"x": torch.zeros(1)}, str(comfy_folders["checkpoints"] / "sd_xl_base_1.0.safetensors"))
    (comfy_folders["checkpoints"] / "notes.txt").write_text("not a model")
    assert base_file_choices() == ["none", "diffusion_models/flux1-dev-fp8.safetensors",
                                   "checkpoints/sd_xl_base_1.0.safetensors"]

    handle = core.load("flux", base=tiny_dir("flux"), dtype="fp32", device="cpu",
                       base_file="diffusion_models/flux1-dev-fp8.safetensors")
    assert handle.options.base == str(comfy_folders["diffusion_models"] / "flux1-dev-fp8.safetensors")
    assert handle.options.components == tiny_dir("flux")
    assert_same_weights(handle.get_pipeline().pipe.transformer, fp8_rounded(flux_source))
    cache.evict()

    info = core.base_source("flux", tiny_dir("flux"), "diffusion_models/flux1-dev-fp8.safetensors")
    assert info["kind"] == "local" and info["source"].endswith("flux1-dev-fp8.safetensors") and info["bytes"] > 0
    assert info["components"]["source"] == tiny_dir("flux")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the status line asks the hub for sizes only when online
    hub = core.base_source("flux", "", "diffusion_models/flux1-dev-fp8.safetensors")["components"]
    assert hub["source"] == "black-forest-labs/FLUX.1-dev" and (hub["cached"] or hub["partial"])
    assert core.base_file_input_problem("none") is True
    assert core.base_file_input_problem(str(comfy_folders["checkpoints"] / "sd_xl_base_1.0.safetensors")) is True
    problem = core.base_file_input_problem("diffusion_models/missing.safetensors")
    assert "not found" in problem and "models/diffusion_models" in problem
