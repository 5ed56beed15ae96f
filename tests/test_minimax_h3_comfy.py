"""MiniMax-H3 from the ComfyUI files (Comfy-Org/MiniMax-H3) against ai-toolkit's own loading code (goldens in
tests/goldens/minimax_h3_comfy; see its MANIFEST section).

The golden folder holds tiny files in each of the repo's layouts, written with ai-toolkit's own quantizers (int8 ConvRot
and plain int8, nvfp4 with AWQ, an int8 embedding; the full and the pruned transformer; the 50-layer text stack; the
fp16 video VAE under ai-toolkit's names), and what ai-toolkit's loaders (``MinimaxH3Model._load_transformer`` /
``_load_text_encoder``, ``import_comfy_quantized_layers``, the Ostris backends) compute from them. Here our loaders
(``pipelines/families/minimax_h3_comfy.py``) read the same files.
"""

import gzip
import json
import os
import shutil

import pytest
import torch

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "minimax_h3_comfy")
INPUTS = os.path.join(GOLDENS_DIR, "minimax_h3", "minimax_h3_goldens.safetensors")
ATOL = 1e-5  # float32
TEXT_ROWS = 9


@pytest.fixture(scope="module")
def expected():
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, "comfy_outputs.safetensors"))


@pytest.fixture(scope="module")
def text_encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("minimax_comfy") / "text_encoder.safetensors"
    with gzip.open(os.path.join(ROOT, "text_encoder.safetensors.gz"), "rb") as packed, open(path, "wb") as out:
        shutil.copyfileobj(packed, out)
    return str(path)


def test_each_format_dequantizes_as_aitk(expected):
    """int8 ConvRot, plain int8, nvfp4 with AWQ, nvfp4 over two 128-row scale tiles, an int8 embedding: our float32
    weights equal ai-toolkit's (its AWQ-folded weight for nvfp4), and a Linear with them gives its layers' outputs;
    the unused activation calibration is dropped, nothing else."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families.ltx2_comfy import INT8_FORMAT, NVFP4_FORMAT, dequantize_comfy_layers

    state = dequantize_comfy_layers(load_file(os.path.join(ROOT, "formats.safetensors")), embeddings=("embed",),
                                    formats=(INT8_FORMAT, NVFP4_FORMAT))
    assert sorted(state) == ["awq.bias", "awq.weight", "embed.weight", "plain.weight", "rot.bias", "rot.weight",
                             "tiles.weight"]
    for name in ("rot", "plain", "awq", "tiles"):
        torch.testing.assert_close(state[f"{name}.weight"], expected[f"formats.{name}.weight"], rtol=0, atol=ATOL)
        output = torch.nn.functional.linear(expected[f"formats.{name}.input"], state[f"{name}.weight"],
                                            state.get(f"{name}.bias"))
        torch.testing.assert_close(output, expected[f"formats.{name}.output"], rtol=0, atol=ATOL)
    torch.testing.assert_close(state["embed.weight"], expected["formats.embed.weight"], rtol=0, atol=0)
    rows = torch.nn.functional.embedding(expected["formats.embed.ids"].long(), state["embed.weight"])
    torch.testing.assert_close(rows, expected["formats.embed.rows"], rtol=0, atol=0)
    # LTX-2.5's publisher ships no nvfp4: its loader keeps refusing it by name
    with pytest.raises(ValueError, match="'nvfp4' is not supported"):
        dequantize_comfy_layers(load_file(os.path.join(ROOT, "formats.safetensors")), embeddings=("embed",))


def first_call_inputs():
    from safetensors.torch import load_file

    g = load_file(INPUTS)
    tags, row_t = g["fl2va_token_tags"], g["fl2va_row_timesteps_0"]
    timesteps, indices = torch.unique(row_t, sorted=True, return_inverse=True)
    media = tags[TEXT_ROWS:]
    return dict(hidden_states=g["fl2va_initial_video_rows"][None], audio_hidden_states=g["fl2va_initial_audio_rows"][None],
                encoder_hidden_states=g["embeds"][None], timestep=timesteps, timestep_indices=indices, token_tags=tags,
                position_ids=g["fl2va_position_ids"], video_indices=(media == 0).nonzero()[:, 0] + TEXT_ROWS,
                audio_indices=(media == 2).nonzero()[:, 0] + TEXT_ROWS, text_indices=torch.arange(TEXT_ROWS),
                return_dict=False)


@pytest.mark.parametrize("variant", ["full", "pruned"])
def test_transformer_files_match_aitk(variant, expected):
    """The int8 ConvRot transformer, full and pruned (timestep table, no SiLU before the AdaLN projections, block
    AdaLN biases): diffusers' transformer loaded by us equals ai-toolkit's loaded transformer on the same packed
    inputs."""
    from aitk_inference.pipelines.families.minimax_h3_comfy import load_transformer
    from aitk_inference.tiny.minimax_h3 import minimax_h3_transformer

    config = minimax_h3_transformer().config
    model = load_transformer(os.path.join(ROOT, f"dit_{variant}.safetensors"), config, torch.float32)
    assert (model.config.time_embed_dim, hasattr(model.time_embedder, "adaln_t_table")) == (
        (8, True) if variant == "pruned" else (16, False))
    with torch.no_grad():
        video, audio = model(**first_call_inputs())
    torch.testing.assert_close(video, expected[f"transformer_{variant}.video"], rtol=0, atol=ATOL)
    torch.testing.assert_close(audio, expected[f"transformer_{variant}.audio"], rtol=0, atol=ATOL)


def tiny_text_encoder_config():
    from aitk_inference.tiny.minimax_h3 import TEXT_LAYERS, TEXT_WIDTH, qwen3_vl_text_encoder
    from aitk_inference.tiny.tokenizers import qwen_tokenizer

    return qwen3_vl_text_encoder(qwen_tokenizer(), TEXT_WIDTH, TEXT_LAYERS).config


def test_text_encoder_file_matches_aitk(expected, text_encoder_file):
    """The nvfp4-AWQ 50-layer text stack (int8 embedding, bf16 vision tower) gives ai-toolkit's prompt conditioning,
    text only and with a first frame, through our prompt block."""
    import numpy as np
    from PIL import Image

    from aitk_inference.pipelines.families.minimax_h3 import MiniMaxH3AitkBlocks
    from aitk_inference.pipelines.families.minimax_h3_comfy import is_truncated_text_encoder, load_text_encoder
    from aitk_inference.tiny.minimax_h3 import minimax_h3_components

    text_encoder = load_text_encoder(text_encoder_file, tiny_text_encoder_config(), torch.float32)
    assert len(text_encoder.model.language_model.layers) == 50 and is_truncated_text_encoder(text_encoder)
    components = minimax_h3_components()
    pipe = MiniMaxH3AitkBlocks().init_pipeline()
    pipe.update_components(text_encoder=text_encoder, tokenizer=components["tokenizer"],
                           processor=components["processor"])
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    for case, prompt, images in (("text", "a red fox in the snow", None), ("keyframe", "a red fox", [image])):
        state = pipe.blocks.sub_blocks["text_encoder"](pipe, _state(prompt, images))[1]
        torch.testing.assert_close(state.get("prompt_embeds")[0], expected[f"text_encoder.{case}.embeds"], rtol=0,
                                   atol=ATOL)
        assert state.get("text_token_tags").equal(expected[f"text_encoder.{case}.tags"].long())


def _state(prompt, images):
    from diffusers.modular_pipelines import PipelineState

    state = PipelineState()
    for name, value in (("prompt", prompt), ("conditioner_images", images), ("dtype", torch.float32)):
        state.set(name, value)
    return state


def test_video_vae_file_matches_aitk(expected):
    """The fp16 video VAE under ai-toolkit's names (encoder ``down.N.block.M``, decoder ``x_embedder``, per-head fused
    ``to_qkv``, ``ff.w1`` as ``[gate; value]``; ``mask_token`` unused): loaded by us, it decodes 7 latent frames (22
    pixel frames, two chunks cross-faded) as ai-toolkit's loaded VAE does, and keeps the file's latent statistics."""
    from aitk_inference.pipelines.families.minimax_h3 import MiniMaxH3AitkBlocks
    from aitk_inference.pipelines.families.minimax_h3_comfy import load_video_vae
    from aitk_inference.tiny.minimax_h3 import minimax_h3_video_vae

    vae = load_video_vae(os.path.join(ROOT, "video_vae.safetensors"), minimax_h3_video_vae().config, torch.float32)
    for name in ("latents_mean", "latents_std"):
        torch.testing.assert_close(torch.tensor(vae.config[name]), expected[f"video_vae.{name}"], rtol=0, atol=0)
    # ai-toolkit's decode takes normalized latents and denormalizes them itself; diffusers' takes them denormalized
    shape = (1, -1, 1, 1, 1)
    latents = expected["video_vae.latents"] * expected["video_vae.latents_std"].view(shape) + expected[
        "video_vae.latents_mean"].view(shape)
    with torch.no_grad():
        decoded = vae.decode(latents, return_dict=False)[0]
    # ai-toolkit's decode also returns the ImageNet-normalized RGB as [-1, 1] pixels (our decode block: [0, 1])
    pipe = MiniMaxH3AitkBlocks().init_pipeline()
    mean, std = (torch.tensor(values).view(shape) for values in (pipe.pixel_mean, pipe.pixel_std))
    pixels = (decoded * std + mean).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(pixels, expected["video_vae.decoded"], rtol=0, atol=ATOL)


def folded_audio_vae():
    """The audio VAE file's layout, from the tiny audio VAE: weight-norm pairs folded into plain weights (torch's own
    ``remove_weight_norm``), the latent statistics as tensors."""
    from aitk_inference.tiny.minimax_h3 import minimax_h3_audio_vae

    module = minimax_h3_audio_vae()
    for sub in module.modules():
        if hasattr(sub, "weight_g"):
            torch.nn.utils.remove_weight_norm(sub)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    state.update({name: torch.tensor(module.config[name]) for name in ("latents_mean", "latents_std")})
    return state


def write_comfy_folder(folder, expected_dir=ROOT, text_encoder=None):
    """A ComfyUI ``models`` folder of the tiny files (the audio VAE folded from the tiny one) plus the small config,
    tokenizer and processor folders the bf16 repo provides."""
    from safetensors.torch import save_file

    from aitk_inference.pipelines.families.minimax_h3_comfy import COMFY_FILES
    from aitk_inference.tiny.minimax_h3 import minimax_h3_components

    components = minimax_h3_components()
    files = {"dit_fl2va_pruned": os.path.join(expected_dir, "dit_pruned.safetensors"),
             "dit_ref2va": os.path.join(expected_dir, "dit_full.safetensors"), "text_encoder": text_encoder,
             "video_vae": os.path.join(expected_dir, "video_vae.safetensors")}
    for component, source in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, COMFY_FILES[component])), exist_ok=True)
        shutil.copyfile(source, os.path.join(folder, COMFY_FILES[component]))
    save_file(folded_audio_vae(), os.path.join(folder, COMFY_FILES["audio_vae"]))
    for name in ("transformer", "vae", "audio_vae", "text_encoder"):
        components[name].config.save_pretrained(os.path.join(folder, name)) if name == "text_encoder" else \
            components[name].save_config(os.path.join(folder, name))
    components["tokenizer"].save_pretrained(os.path.join(folder, "tokenizer"))
    components["processor"].save_pretrained(os.path.join(folder, "processor"))



@pytest.mark.parametrize("model_id", ["minimax_h3", "minimax_h3_ref2va"])
def test_generation_from_comfy_files(model_id, tmp_path_factory, text_encoder_file):
    """``minimax_h3`` (the pruned fl2va file) and ``minimax_h3_ref2va`` (the full ref2va file) load from a ComfyUI
    folder and generate video and audio; the audio VAE's folded weights come back as the tiny VAE's."""
    from aitk_inference.pipelines.registry import get_spec
    from aitk_inference.pipelines.runtime.options import LoadOptions

    folder = str(tmp_path_factory.mktemp(model_id))
    write_comfy_folder(folder, text_encoder=text_encoder_file)
    spec = get_spec(model_id)
    pipeline = spec.family_class().from_spec(spec, LoadOptions(base=folder, device="cpu", dtype="fp32"))
    denoiser = getattr(pipeline.pipe, pipeline.denoiser)
    assert hasattr(denoiser.time_embedder, "adaln_t_table") == (model_id == "minimax_h3")
    folded = folded_audio_vae()
    loaded = pipeline.pipe.audio_vae
    weight_normed = [(name, m) for name, m in loaded.named_modules() if hasattr(m, "weight_g")]
    assert weight_normed
    for name, module in weight_normed:
        v = module.weight_v
        effective = module.weight_g * v / v.norm(dim=tuple(range(1, v.ndim)), keepdim=True)
        torch.testing.assert_close(effective, folded[f"{name}.weight"], rtol=0, atol=1e-6)
    result = pipeline.generate("a red fox in the snow", width=64, height=64, num_frames=22, steps=1, seed=42)
    assert result.images.shape[1:] == (22, 64, 64, 3) and result.audio.shape[1] == 2
    assert torch.isfinite(torch.from_numpy(result.images)).all()


def test_missing_files_and_unknown_keys_are_refused(tmp_path, text_encoder_file):
    """A folder without the files names them and the repo; a file with a tensor the model lacks, or rotary
    frequencies its config does not give, is refused."""
    from safetensors.torch import load_file, save_file

    from aitk_inference.pipelines.families.minimax_h3_comfy import load_comfy_components, load_transformer
    from aitk_inference.tiny.minimax_h3 import minimax_h3_transformer

    with pytest.raises(FileNotFoundError, match="Comfy-Org/MiniMax-H3"):
        load_comfy_components(str(tmp_path), "MiniMaxAI/MiniMax-H3", "transformer", torch.float32)
    state = load_file(os.path.join(ROOT, "dit_full.safetensors"))
    state["blocks.0.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="unexpected"):
        load_transformer(str(tmp_path / "dit.safetensors"), minimax_h3_transformer().config, torch.float32)
    del state["blocks.0.extra.weight"]
    state["rope.inv_freq"] = state["rope.inv_freq"] * 2
    save_file(state, tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="rope.inv_freq"):
        load_transformer(str(tmp_path / "dit.safetensors"), minimax_h3_transformer().config, torch.float32)


def test_report_counts():
    """ai-toolkit attached every quantized layer the files hold (the goldens are not from unquantized files), and its
    audio VAE weight-norm folding equals torch's."""
    with open(os.path.join(ROOT, "comfy_report.json")) as f:
        report = json.load(f)
    assert report["transformer_full"]["quantized_layers"] == report["transformer_pruned"]["quantized_layers"] == 8
    assert report["text_encoder"] == {"quantized_layers": 351, "layers": 50}
    # the audio VAE file the generation test writes (torch's weight-norm folding) is ai-toolkit's fold
    assert report["audio_vae_fold"]["max_abs_difference_vs_torch_remove_weight_norm"] < 1e-6
