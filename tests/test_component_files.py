"""Text encoders and VAEs as ComfyUI users keep them (``pipelines/component_files.py``): tiny components written in
the published single-file layouts (ComfyUI's ``models/text_encoders`` and ``models/vae`` files), loaded back,
compared weight for weight, and generations compared with the diffusers folder's."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from test_single_file import FP8, assert_same_weights, fp8_rounded, sdxl_vae_ldm
from test_single_file import comfy_folders, offline_hub  # noqa: F401 (fixtures)

from aitk_inference.pipelines import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------- writers of published layouts
def clip_file(text_encoder) -> dict:
    """clip_l / clip_g: transformers' original names (``text_model.`` first, which transformers 5's CLIPTextModel
    leaves out); ComfyUI's CLIP-L also carries the projection and logit scale."""
    state_dict = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
                  for k, v in text_encoder.state_dict().items()}
    width = text_encoder.config.hidden_size
    state_dict.setdefault("text_projection.weight", torch.randn(width, width))
    state_dict["logit_scale"] = torch.tensor(4.6)
    return state_dict


def t5_file(text_encoder) -> dict:
    """t5xxl / umt5_xxl: transformers' names with the token embedding once, as ``shared``."""
    return {k: v for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


def qwen25_vl_file(text_encoder) -> dict:
    """qwen_2.5_vl_7b: the original ``model.`` (language model) and ``visual.`` names, no LM head."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        for ours, original in (("model.language_model.", "model."), ("model.visual.", "visual.")):
            if key.startswith(ours):
                out[original + key[len(ours):]] = value
    return out


def ldm_vae_file(vae) -> dict:
    """ae.safetensors / sdxl_vae.safetensors: LDM names, no prefix (FLUX's has no quant convs)."""
    return {k[len("first_stage_model."):]: v for k, v in sdxl_vae_ldm(vae).items()}


# Wan 2.1's VAE as Wan-Video's reference code names it (wan/modules/vae.py): flat encoder ``downsamples`` and decoder
# ``upsamples`` Sequentials, residual blocks as ``residual.<i>`` Sequentials, ``middle``/``head`` Sequentials.
WAN_RESIDUAL_NAMES = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                      ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _wan_residual_name(rest: str) -> str:
    for ours, original in WAN_RESIDUAL_NAMES:
        if rest.startswith(ours):
            return original + rest[len(ours):]
    return rest


def wan_vae_file(vae) -> dict:
    out = {}
    decoder_index = {}  # (level, slot) -> flat upsamples index, in module order
    for level, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            decoder_index[(level, f"resnets.{j}")] = len(decoder_index)
        if block.upsamplers is not None:
            decoder_index[(level, "upsamplers.0")] = len(decoder_index)
    for key, value in vae.state_dict().items():
        side, _, rest = key.partition(".")
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            name = ("conv1." if key.startswith("quant_conv.") else "conv2.") + rest
        elif rest.startswith(("conv_in.", "conv_out.", "norm_out.")):
            part, _, tail = rest.partition(".")
            name = f"{side}.{ {'conv_in': 'conv1', 'conv_out': 'head.2', 'norm_out': 'head.0'}[part]}.{tail}"
        elif rest.startswith("mid_block."):
            match = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", rest)
            kind, index, tail = match.groups()
            name = (f"{side}.middle.{2 * int(index)}.{_wan_residual_name(tail)}" if kind == "resnets"
                    else f"{side}.middle.1.{tail}")
        elif rest.startswith("down_blocks."):
            _, index, tail = rest.split(".", 2)
            name = f"{side}.downsamples.{index}.{_wan_residual_name(tail)}"
        else:
            match = re.match(r"up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)\.(.+)", rest)
            level, slot, tail = match.groups()
            tail = _wan_residual_name(tail) if slot.startswith("resnets") else tail
            name = f"{side}.upsamples.{decoder_index[(int(level), slot)]}.{tail}"
        out[name] = value
    return out


def scaled_fp8(state_dict: dict, scale: float = 0.5) -> dict:
    """ComfyUI's ``*_fp8_e4m3fn_scaled``: each matrix as float8 codes of ``weight / scale`` and its ``scale_weight``,
    plus the ``scaled_fp8`` marker."""
    out = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    for key, value in state_dict.items():
        if key.endswith(".weight") and value.ndim == 2:
            out[key] = (value / scale).to(FP8)
            out[key[: -len("weight")] + "scale_weight"] = torch.tensor(scale)
        else:
            out[key] = value
    return out


def scaled_fp8_rounded(module, scale: float = 0.5):
    import copy

    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2 and name.endswith(".weight"):
                p.copy_((p / scale).to(FP8).float() * scale)
    return rounded


def save(tmp_path, name: str, state_dict: dict) -> str:
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path


def same_images(a, b):
    """Equal up to the CPU matmul's rounding: the file's tensors map the file where they lie (no copy), so they are
    not 64-byte aligned as the folder's are, and the BLAS kernels round a few products differently (~1e-7)."""
    torch.testing.assert_close(torch.as_tensor(a.images), torch.as_tensor(b.images), rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def flux_folder_pipeline(tiny_dir):
    return load_pipeline("flux", base=tiny_dir("flux"), device="cpu", dtype="fp32")


def test_flux_clip_t5_and_ae_files(tmp_path, tiny_dir, flux_folder_pipeline):
    """FLUX.1 with clip_l, t5xxl_fp16 and ae.safetensors: every weight is the file's, and the image is the folder's."""
    source = flux_folder_pipeline.pipe
    files = {"text_encoder_file": save(tmp_path, "clip_l.safetensors", clip_file(source.text_encoder)),
             "text_encoder_2_file": save(tmp_path, "t5xxl_fp16.safetensors", t5_file(source.text_encoder_2)),
             "vae_file": save(tmp_path, "ae.safetensors", ldm_vae_file(source.vae))}
    pipeline = load_pipeline("flux", base=tiny_dir("flux"), device="cpu", dtype="fp32", **files)
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer"):
        assert_same_weights(getattr(pipeline.pipe, name), getattr(source, name))
    assert pipeline.pipe.text_encoder_2.encoder.embed_tokens.weight is pipeline.pipe.text_encoder_2.shared.weight
    kwargs = dict(prompt="a cat", width=64, height=64, steps=1, seed=3)
    same_images(pipeline.generate(**kwargs), flux_folder_pipeline.generate(**kwargs))


def test_flux_scaled_fp8_t5_with_a_transformer_file(tmp_path, tiny_dir, flux_folder_pipeline):
    """t5xxl_fp8_e4m3fn_scaled next to a transformer file (base_file): the T5 is ``fp8 * scale``; a plain
    float8_e4m3fn T5 is upcast; the rest comes from the components folder."""
    from test_single_file import flux_bfl_state_dict, to_fp8

    source = flux_folder_pipeline.pipe
    transformer = save(tmp_path, "flux1-dev.safetensors", flux_bfl_state_dict(source.transformer))
    t5 = save(tmp_path, "t5xxl_fp8_e4m3fn_scaled.safetensors", scaled_fp8(t5_file(source.text_encoder_2)))
    pipeline = load_pipeline("flux", base=transformer, components=tiny_dir("flux"), text_encoder_2_file=t5,
                             device="cpu", dtype="fp32")
    assert_same_weights(pipeline.pipe.text_encoder_2, scaled_fp8_rounded(source.text_encoder_2))
    assert_same_weights(pipeline.pipe.transformer, source.transformer)
    in_bf16 = load_pipeline("flux", base=tiny_dir("flux"), text_encoder_2_file=t5, device="cpu", dtype="bf16")
    for name, value in scaled_fp8_rounded(source.text_encoder_2).state_dict().items():
        torch.testing.assert_close(in_bf16.pipe.text_encoder_2.state_dict()[name], value.to(torch.bfloat16), rtol=0,
                                   atol=0, msg=name)
    plain = save(tmp_path, "t5xxl_fp8_e4m3fn.safetensors", to_fp8(t5_file(source.text_encoder_2)))
    pipeline = load_pipeline("flux", base=tiny_dir("flux"), text_encoder_2_file=plain, device="cpu", dtype="fp32")
    assert_same_weights(pipeline.pipe.text_encoder_2, fp8_rounded(source.text_encoder_2))


def test_wan_umt5_and_vae_files(tmp_path, tiny_dir):
    """Wan 2.1: umt5_xxl and wan_2.1_vae (Wan's original VAE names); the video is the folder's."""
    folder = tiny_dir("wan21_1b")
    source = load_pipeline("wan21_1b", base=folder, device="cpu", dtype="fp32")
    umt5 = {**t5_file(source.pipe.text_encoder), "spiece_model": torch.zeros(16, dtype=torch.uint8)}  # its tokenizer
    files = {"text_encoder_file": save(tmp_path, "umt5_xxl_fp16.safetensors", umt5),
             "vae_file": save(tmp_path, "wan_2.1_vae.safetensors", wan_vae_file(source.pipe.vae))}
    pipeline = load_pipeline("wan21_1b", base=folder, device="cpu", dtype="fp32", **files)
    for name in ("text_encoder", "vae"):
        assert_same_weights(getattr(pipeline.pipe, name), getattr(source.pipe, name))
    kwargs = dict(prompt="a cat", width=64, height=64, num_frames=1, steps=1, seed=3)
    same_images(pipeline.generate(**kwargs), source.generate(**kwargs))


def test_wan_vae_conversion_matches_diffusers_at_full_size():
    """At Wan 2.1's real VAE sizes (meta tensors; diffusers' converter assumes them), ours gives the same names and
    shapes as diffusers' ``convert_wan_vae_to_diffusers``."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from aitk_inference.pipelines.component_files import convert_wan_vae

    with torch.device("meta"):
        vae = AutoencoderKLWan()
    original = wan_vae_file(vae)
    ours = convert_wan_vae(dict(original), vae.config)
    theirs = convert_wan_vae_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert set(ours) == set(vae.state_dict())


def test_qwen_image_text_encoder_and_vae_files(tmp_path, tiny_dir):
    """Qwen-Image: qwen_2.5_vl_7b_fp8_scaled (ComfyUI's ``model.``/``visual.`` names, no LM head) and
    qwen_image_vae (Wan's VAE names): weights equal, and with the unquantized file the image is the folder's."""
    folder = tiny_dir("qwen_image")
    source = load_pipeline("qwen_image", base=folder, device="cpu", dtype="fp32")
    text_encoder = qwen25_vl_file(source.pipe.text_encoder)
    assert "lm_head.weight" not in text_encoder and any(k.startswith("visual.") for k in text_encoder)
    vae = save(tmp_path, "qwen_image_vae.safetensors", wan_vae_file(source.pipe.vae))
    pipeline = load_pipeline("qwen_image", base=folder, device="cpu", dtype="fp32", vae_file=vae,
                             text_encoder_file=save(tmp_path, "qwen_2.5_vl_7b.safetensors", text_encoder))
    assert_same_weights(pipeline.pipe.vae, source.pipe.vae)
    loaded = {k: v for k, v in pipeline.pipe.text_encoder.state_dict().items() if k != "lm_head.weight"}
    for key, value in source.pipe.text_encoder.state_dict().items():
        if key != "lm_head.weight":
            torch.testing.assert_close(loaded.pop(key), value, rtol=0, atol=0, msg=key)
    assert not loaded
    kwargs = dict(prompt="a cat", width=64, height=64, steps=2, seed=3)
    same_images(pipeline.generate(**kwargs), source.generate(**kwargs))
    scaled = save(tmp_path, "qwen_2.5_vl_7b_fp8_scaled.safetensors", scaled_fp8(text_encoder))
    pipeline = load_pipeline("qwen_image", base=folder, device="cpu", dtype="fp32", text_encoder_file=scaled)
    want = scaled_fp8_rounded(source.pipe.text_encoder).state_dict()
    for key, value in pipeline.pipe.text_encoder.state_dict().items():
        if key != "lm_head.weight":
            torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)


def test_sdxl_clip_l_clip_g_and_vae_files(tmp_path):
    """SDXL: clip_l, clip_g (transformers names, CLIPTextModelWithProjection) and sdxl_vae (LDM names), the
    encoders of different widths so that a swapped pair is told apart."""
    from test_single_file import sdxl_open_clip, sdxl_with_distinct_encoders

    folder = sdxl_with_distinct_encoders(str(tmp_path / "sdxl"))
    source = load_pipeline("sdxl", base=folder, device="cpu", dtype="fp32")
    files = {"text_encoder_file": save(tmp_path, "clip_l.safetensors", clip_file(source.pipe.text_encoder)),
             "text_encoder_2_file": save(tmp_path, "clip_g.safetensors", clip_file(source.pipe.text_encoder_2)),
             "vae_file": save(tmp_path, "sdxl_vae.safetensors", ldm_vae_file(source.pipe.vae))}
    pipeline = load_pipeline("sdxl", base=folder, device="cpu", dtype="fp32", **files)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert_same_weights(getattr(pipeline.pipe, name), getattr(source.pipe, name))
    kwargs = dict(prompt="a cat", width=64, height=64, steps=1, seed=3)
    same_images(pipeline.generate(**kwargs), source.generate(**kwargs))
    legacy = clip_file(source.pipe.text_encoder_2)  # ComfyUI's older CLIPSave: a transposed "text_projection"
    legacy["text_projection"] = legacy.pop("text_projection.weight").T
    assert_same_weights(load_pipeline("sdxl", base=folder, device="cpu", text_encoder_2_file=save(
        tmp_path, "clip_g_legacy.safetensors", legacy)).pipe.text_encoder_2, source.pipe.text_encoder_2)
    prefix = len("conditioner.embedders.1.model.")  # clip_g in open_clip's own names
    open_clip = {k[prefix:]: v for k, v in sdxl_open_clip(source.pipe.text_encoder_2).items()}
    assert_same_weights(load_pipeline("sdxl", base=folder, device="cpu", text_encoder_2_file=save(
        tmp_path, "clip_g_open_clip.safetensors", open_clip)).pipe.text_encoder_2, source.pipe.text_encoder_2)
    diffusers_vae = save(tmp_path, "sdxl_vae_diffusers.safetensors", source.pipe.vae.state_dict())  # also read
    assert_same_weights(load_pipeline("sdxl", base=folder, vae_file=diffusers_vae, device="cpu").pipe.vae,
                        source.pipe.vae)
    swapped = {"text_encoder_file": files["text_encoder_2_file"], "text_encoder_2_file": files["text_encoder_file"]}
    with pytest.raises(ValueError, match=r"clip_g.safetensors' holds a CLIP text encoder \(width 48\), which does "
                                         r"not fit sdxl's text_encoder .*CLIP-L"):
        load_pipeline("sdxl", base=folder, device="cpu", dtype="fp32", **swapped)


def test_sd15_all_in_one_checkpoint_with_a_vae_file(tmp_path, tiny_dir):
    """An SD 1.5 all-in-one checkpoint (loaded whole by diffusers) with another VAE from models/vae: the VAE is the
    file's, the UNet the checkpoint's."""
    import copy

    from test_single_file import ldm_checkpoint

    folder = tiny_dir("sd15")
    source = load_pipeline("sd15", base=folder, device="cpu", dtype="fp32").pipe
    other_vae = copy.deepcopy(source.vae)
    with torch.no_grad():
        for parameter in other_vae.parameters():
            parameter.add_(0.01)
    pipeline = load_pipeline("sd15", base=save(tmp_path, "sd15.safetensors", ldm_checkpoint(source)), components=folder,
                             vae_file=save(tmp_path, "vae-ft-mse.safetensors", ldm_vae_file(other_vae)),
                             device="cpu", dtype="fp32")
    assert_same_weights(pipeline.pipe.vae, other_vae)
    assert_same_weights(pipeline.pipe.unet, source.unet)


def test_wrong_files_get_one_clear_error(tmp_path, tiny_dir, flux_folder_pipeline):
    """A CLIP-L given as the T5, a SDXL VAE for FLUX, a truncated file, a transformer given as a VAE, a component
    the model has no slot for, a missing file: each one ValueError naming the file, what it holds, what is expected."""
    source = flux_folder_pipeline.pipe
    folder = tiny_dir("flux")
    clip = save(tmp_path, "clip_l.safetensors", clip_file(source.text_encoder))
    with pytest.raises(ValueError, match=r"text_encoder_2 file .*clip_l.safetensors' holds a CLIP text encoder "
                                         r"\(width 32\); expected flux's text_encoder_2: T5-XXL \(a T5 encoder, e.g. "
                                         r"t5xxl_fp16.safetensors"):
        load_pipeline("flux", base=folder, text_encoder_2_file=clip, device="cpu")
    from aitk_inference.tiny.stable_diffusion import sd_vae

    sdxl_vae = save(tmp_path, "sdxl_vae.safetensors", ldm_vae_file(sd_vae(scaling_factor=0.13025)))
    with pytest.raises(ValueError, match=r"sdxl_vae.safetensors' holds an SD/FLUX VAE \(LDM layout\) \(latent "
                                         r"channels 4\) whose weights do not match flux's vae"):
        load_pipeline("flux", base=folder, vae_file=sdxl_vae, device="cpu")
    truncated = tmp_path / "t5xxl_fp16.safetensors"
    truncated.write_bytes(open(save(tmp_path, "t5.safetensors", t5_file(source.text_encoder_2)), "rb").read()[:300])
    with pytest.raises(ValueError, match=r"t5xxl_fp16.safetensors' cannot be read as a .safetensors file"):
        load_pipeline("flux", base=folder, text_encoder_2_file=str(truncated), device="cpu")
    from test_single_file import flux_bfl_state_dict

    transformer = save(tmp_path, "flux1-dev.safetensors", {"model.diffusion_model." + k: v for k, v in
                                                           flux_bfl_state_dict(source.transformer).items()})
    with pytest.raises(ValueError, match=r"holds a diffusion model \(a base_file, not a component\); expected "
                                         r"flux's vae: the FLUX.1 VAE"):
        load_pipeline("flux", base=folder, vae_file=transformer, device="cpu")
    extra = save(tmp_path, "clip_l_plus.safetensors", {**clip_file(source.text_encoder), "x.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"holds a CLIP text encoder \(width 32\) whose weights do not match flux's "
                                         r"text_encoder .*0 missing .*1 left over \(e.g. \['x.weight'\]\)"):
        load_pipeline("flux", base=folder, text_encoder_file=extra, device="cpu")
    with pytest.raises(ValueError, match=r"sd15 does not take a text_encoder_2 file; it takes text_encoder"):
        load_pipeline("sd15", base=tiny_dir("sd15"), text_encoder_2_file=clip, device="cpu")
    with pytest.raises(ValueError, match=r"flux2 does not take a vae file"):
        load_pipeline("flux2", base=folder, vae_file=sdxl_vae, device="cpu")
    with pytest.raises(ValueError, match=r"vae_file '.*missing.safetensors' is not an existing .safetensors file"):
        load_pipeline("flux", base=folder, vae_file=str(tmp_path / "missing.safetensors"), device="cpu")


def test_cache_key_follows_the_files(tmp_path, tiny_dir, flux_folder_pipeline):
    """The same file is the same pipeline; another file, or the file rewritten, is a reload."""
    import os

    from aitk_inference.pipelines.runtime.options import LoadOptions

    path = save(tmp_path, "ae.safetensors", ldm_vae_file(flux_folder_pipeline.pipe.vae))
    key = LoadOptions(base=tiny_dir("flux"), vae_file=path, device="cpu").cache_key("flux")
    assert key == LoadOptions(base=tiny_dir("flux"), vae_file=path, device="cpu", dtype="fp32").cache_key("flux")
    assert key != LoadOptions(base=tiny_dir("flux"), device="cpu").cache_key("flux")
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key != LoadOptions(base=tiny_dir("flux"), vae_file=path, device="cpu").cache_key("flux")


# ------------------------------------------------------------------------------------------------------- the node
def test_load_node_component_files(comfy_folders, tiny_dir, flux_folder_pipeline):  # noqa: F811
    """The Load node lists models/text_encoders and models/vae, resolves its picks, validates full paths and loads
    the files; the handle's cache key names them."""
    from aitk_inference.nodes import classic, core
    from aitk_inference.nodes.comfy import component_file_choices
    from aitk_inference.pipelines.runtime import cache

    source = flux_folder_pipeline.pipe
    save_file(clip_file(source.text_encoder), str(comfy_folders["text_encoders"] / "clip_l.safetensors"))
    save_file(scaled_fp8(t5_file(source.text_encoder_2)),
              str(comfy_folders["text_encoders"] / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    save_file(ldm_vae_file(source.vae), str(comfy_folders["vae"] / "ae.safetensors"))
    (comfy_folders["vae"] / "readme.txt").write_text("not a model")
    texts = ["none", "text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors"]
    assert component_file_choices("text_encoder") == component_file_choices("text_encoder_2") == texts
    assert component_file_choices("vae") == ["none", "vae/ae.safetensors"]
    inputs = classic.AITKLoadPipeline.INPUT_TYPES()["optional"]
    assert inputs["vae_file"][0] == ["none", "vae/ae.safetensors"] and inputs["vae_file"][1]["default"] == "none"

    handle = core.load("flux", base=tiny_dir("flux"), dtype="fp32", device="cpu",
                       text_encoder_file="text_encoders/clip_l.safetensors",
                       text_encoder_2_file="text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors",
                       vae_file="vae/ae.safetensors")
    assert handle.options.vae_file == str(comfy_folders["vae"] / "ae.safetensors")
    pipe = handle.get_pipeline().pipe
    assert_same_weights(pipe.text_encoder_2, scaled_fp8_rounded(source.text_encoder_2))
    assert_same_weights(pipe.vae, source.vae)
    assert str(comfy_folders["vae"] / "ae.safetensors") in str(handle.options.cache_key("flux"))
    cache.evict()

    validate = classic.AITKLoadPipeline.VALIDATE_INPUTS
    assert validate(base_file="none", text_encoder_file="none", text_encoder_2_file="none", vae_file="none") is True
    assert validate(vae_file=str(comfy_folders["vae"] / "ae.safetensors")) is True
    problem = validate(vae_file="vae/missing.safetensors")
    assert "vae_file 'vae/missing.safetensors' not found" in problem and "models/vae" in problem
    problem = validate(text_encoder_2_file="vae/ae.safetensors")  # a file from another component's folder
    assert "text_encoder_2_file 'vae/ae.safetensors' not found" in problem and "models/text_encoders" in problem


def test_component_files_with_a_hub_base_offline_name_what_to_fetch(tmp_path, flux_folder_pipeline,
                                                                   offline_hub):  # noqa: F811
    """With base the model's repo (not cached, offline), the error lists the fetch of everything but the weights the
    files replace: their folders' config.json only."""
    from aitk_inference.pipelines.single_file import ComponentsUnavailableError

    vae = save(tmp_path, "ae.safetensors", ldm_vae_file(flux_folder_pipeline.pipe.vae))
    with pytest.raises(ComponentsUnavailableError) as error:
        load_pipeline("flux", vae_file=vae, device="cpu", dtype="fp32")
    message = str(error.value)
    assert message.startswith("flux: the single files hold the vae; the rest comes from the hub repo "
                              "black-forest-labs/FLUX.1-dev")
    assert "'transformer/*'" in message and "vae/config.json" in message and "'vae/*'" not in message
