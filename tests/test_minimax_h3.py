"""MiniMax-H3 against ai-toolkit's own MiniMax-H3 code (goldens in tests/goldens/minimax_h3; see its MANIFEST section).

The goldens hold a tiny transformer of ai-toolkit's own class (``src/transformer.py``, original checkpoint names), its
forward on a packed sequence, ai-toolkit's schedules and frame arithmetic (``src/packing.py``), and two whole runs of
ai-toolkit's sampler (``src/pipeline.py``: text only, and with a first-frame keyframe) with what its transformer was
fed and the latents it handed to the decoders. Here the same weights, converted by diffusers' own checkpoint converter,
run in diffusers' ``MiniMaxH3Transformer3DModel`` through our blocks.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "minimax_h3")
ATOL = 1e-5  # float32
TEXT_ROWS = 9


def golden(name="minimax_h3_goldens.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def facts():
    with open(os.path.join(ROOT, "minimax_h3_schedules.json")) as f:
        return json.load(f)


def golden_transformer():
    """The golden ai-toolkit weights in diffusers' class. ai-toolkit's (unpruned) block AdaLN projection has no bias;
    diffusers' has one, which is zero for those weights."""
    from diffusers.loaders.single_file_utils import convert_minimax_h3_transformer_checkpoint_to_diffusers

    from aitk_inference.tiny.minimax_h3 import minimax_h3_transformer

    model = minimax_h3_transformer().eval()
    state = convert_minimax_h3_transformer_checkpoint_to_diffusers(golden("transformer_aitk.safetensors"), model.config)
    for name, module in model.named_modules():
        if name.endswith("adaln_proj.linear") and f"{name}.bias" not in state:
            state[f"{name}.bias"] = torch.zeros_like(module.bias)
    model.load_state_dict(state, strict=True)
    return model


def rows_of(tags, tag):
    return (tags == tag).nonzero()[:, 0]


def test_schedules_match_aitk(facts):
    """``steps`` evaluations on linspace(1, 0, steps + 1) shifted by 12, audio remapped onto shift 3."""
    from diffusers import MiniMaxH3Scheduler

    from aitk_inference.pipelines.families.minimax_h3 import remap_sigmas
    from aitk_inference.pipelines.registry import MINIMAX_H3_AUDIO_SHIFT, MINIMAX_H3_VIDEO_SHIFT

    for steps, expected in facts["schedules"].items():
        video = MiniMaxH3Scheduler(shift=MINIMAX_H3_VIDEO_SHIFT)
        video.set_timesteps(int(steps) + 1)
        assert video.num_inference_steps == int(steps)
        torch.testing.assert_close(video.sigmas, torch.tensor(expected["video_sigmas"]), rtol=0, atol=0)
        audio = remap_sigmas(video.sigmas, MINIMAX_H3_VIDEO_SHIFT, MINIMAX_H3_AUDIO_SHIFT)
        torch.testing.assert_close(audio, torch.tensor(expected["audio_sigmas"]), rtol=0, atol=0)
        # the same position of the base grid as a plain shift-3 schedule, up to float32 rounding
        plain = MiniMaxH3Scheduler(shift=MINIMAX_H3_AUDIO_SHIFT)
        plain.set_timesteps(int(steps) + 1)
        torch.testing.assert_close(audio, plain.sigmas, rtol=0, atol=1e-6)


def test_frame_grid_matches_aitk(facts):
    """ai-toolkit floors to 17n+5; the latent counts our prepare step takes from diffusers with the tiny VAE's
    geometry (the released one) and the registry's fps."""
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import audio_latent_num_frames, video_latent_num_frames

    from aitk_inference.pipelines.base import snap_frames
    from aitk_inference.pipelines.registry import get_spec
    from aitk_inference.tiny.minimax_h3 import minimax_h3_video_vae

    video, vae = get_spec("minimax_h3").video, minimax_h3_video_vae()
    for requested, expected in facts["frames"].items():
        frames = snap_frames(int(requested), video.frame_step, video.frame_offset)
        assert frames == expected["aligned_down"]
        assert video_latent_num_frames(frames, vae.config.clip_length, vae.tokens_chunk_size) == expected["latent_frames"]
        assert audio_latent_num_frames(frames, video.fps) == expected["audio_latents"]


def test_transformer_forward_matches_aitk():
    """diffusers' transformer on ai-toolkit's weights and packed inputs (the keyframe run's first step)."""
    g = golden()
    tags, row_t = g["fl2va_token_tags"], g["fl2va_row_timesteps_0"]
    timesteps, indices = torch.unique(row_t, sorted=True, return_inverse=True)
    media = tags[TEXT_ROWS:]
    with torch.no_grad():
        video, audio = golden_transformer()(
            hidden_states=g["fl2va_initial_video_rows"][None], audio_hidden_states=g["fl2va_initial_audio_rows"][None],
            encoder_hidden_states=g["embeds"][None], timestep=timesteps, timestep_indices=indices, token_tags=tags,
            position_ids=g["fl2va_position_ids"], video_indices=rows_of(media, 0) + TEXT_ROWS,
            audio_indices=rows_of(media, 2) + TEXT_ROWS, text_indices=torch.arange(TEXT_ROWS), return_dict=False)
    torch.testing.assert_close(video[0], g["forward_video_out"], rtol=0, atol=ATOL)
    torch.testing.assert_close(audio[0], g["forward_audio_out"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["t2va", "fl2va"])
def test_sampling_loop_matches_aitk(case, monkeypatch):
    """Our blocks after the text encoder, on ai-toolkit's prompt embeddings: the seed-42 noise (keyframe, video,
    audio in that order), the packed layout, every step's row timesteps and the final latents of both streams.
    ai-toolkit's keyframe encoder is its own VAE; both runs get the same keyframe latents here (the VAE is not
    part of this comparison)."""
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from PIL import Image

    from aitk_inference.pipelines.families import minimax_h3 as family
    from aitk_inference.tiny.minimax_h3 import minimax_h3_components

    class LoopOnly(SequentialPipelineBlocks):
        model_name = "minimax-h3"
        block_classes = family.MiniMaxH3AitkBlocks.block_classes[1:-1]
        block_names = family.MiniMaxH3AitkBlocks.block_names[1:-1]

    g = golden()
    monkeypatch.setattr(family, "encode_vae_condition", lambda *args: g["keyframe_latents"].clone())
    transformer, calls = golden_transformer(), []
    transformer.register_forward_pre_hook(  # clones: the loop updates the latent rows in place
        lambda module, args, kwargs: calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}),
        with_kwargs=True)
    pipe = LoopOnly().init_pipeline()
    pipe.update_components(**{**minimax_h3_components(), "transformer": transformer})
    keyframe = Image.new("RGB", (64, 64)) if case == "fl2va" else None
    state = pipe(prompt_embeds=g["embeds"][None], text_token_tags=g[f"tags_{case}"], height=64, width=64,
                 num_frames=22, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(42),
                 keyframe=keyframe)
    first = calls[0]
    torch.testing.assert_close(first["hidden_states"][0], g[f"{case}_initial_video_rows"], rtol=0, atol=0)
    torch.testing.assert_close(first["audio_hidden_states"][0], g[f"{case}_initial_audio_rows"], rtol=0, atol=0)
    torch.testing.assert_close(first["position_ids"], g[f"{case}_position_ids"], rtol=0, atol=0)
    torch.testing.assert_close(first["token_tags"], g[f"{case}_token_tags"], rtol=0, atol=0)
    assert len(calls) == 2
    for i, call in enumerate(calls):
        row_timesteps = call["timestep"][call["timestep_indices"]]
        torch.testing.assert_close(row_timesteps, g[f"{case}_row_timesteps_{i}"], rtol=0, atol=0)
    torch.testing.assert_close(state.get("latents"), g[f"{case}_final_video_latents"], rtol=0, atol=ATOL)
    torch.testing.assert_close(state.get("audio_latents"), g[f"{case}_final_audio_latents"], rtol=0, atol=ATOL)


def test_frames_and_fps_rules(pipes):
    pipe = pipes("minimax_h3")
    fast = dict(width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="24 fps only"):
        pipe.generate("x", num_frames=22, fps=25, **fast)
    with pytest.raises(ValueError, match="at least 22 frames"):
        pipe.generate("x", num_frames=21, **fast)
    result = pipe.generate("x", num_frames=38, **fast)
    assert result.params.num_frames == 22 and result.images.shape == (1, 22, 64, 64, 3)
    assert result.audio.shape == (1, 2, 37 * 800) and result.sample_rate == 32000


def test_original_name_lora_matches_every_module():
    """A LoRA under the original checkpoint names (what ai-toolkit saves): every module lands, and the merged weights
    equal the original-name merge converted by diffusers' checkpoint converter (fused QKV split, SwiGLU halves
    swapped)."""
    from diffusers.loaders.single_file_utils import convert_minimax_h3_transformer_checkpoint_to_diffusers

    from aitk_inference.pipelines.families.minimax_h3 import minimax_h3_original_to_diffusers
    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack

    original = golden("transformer_aitk.safetensors")
    targets = sorted(k[: -len(".weight")] for k, v in original.items() if k.endswith(".weight") and v.dim() == 2
                     and "norm" not in k)
    gen = torch.Generator().manual_seed(3)
    lora, merged = {}, dict(original)
    for name in targets:
        out_features, in_features = original[f"{name}.weight"].shape
        down, up = torch.randn(4, in_features, generator=gen) * 0.1, torch.randn(out_features, 4, generator=gen) * 0.1
        lora[f"diffusion_model.{name}.lora_A.weight"], lora[f"diffusion_model.{name}.lora_B.weight"] = down, up
        merged[f"{name}.weight"] = original[f"{name}.weight"] + up @ down
    model = golden_transformer()
    expected = convert_minimax_h3_transformer_checkpoint_to_diffusers(merged, model.config)
    stack = LoraStack({"transformer": model}, "fused", "transformer", "minimax_h3",
                      name_mapper=minimax_h3_original_to_diffusers)
    qkv = sum(name.endswith("attn.qkv_proj") for name in targets)
    assert stack.set([LoraRequest(state_dict=lora, name="original")])[0]["modules"] == len(targets) + 2 * qkv
    for name, weight in expected.items():
        torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=1e-6, msg=name)


def test_lora_of_another_family_is_refused_with_its_family_named(pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    pipe = pipes("minimax_h3")
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'minimax_h3'.*FLUX.1"):
        pipe.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    minimax_keys = {"diffusion_model.blocks.0.attn.qkv_proj.lora_A.weight": torch.zeros(4, 32),
                    "diffusion_model.blocks.0.attn.qkv_proj.lora_B.weight": torch.zeros(96, 4)}
    with pytest.raises(LoraFormatError, match="MiniMax-H3"):
        pipes("flux").set_loras([LoraRequest(state_dict=minimax_keys, name="minimax")])
    assert pipe.loras.describe() == []


@pytest.fixture(scope="module")
def lora_report():
    with open(os.path.join(ROOT, "lora_report.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", ["lora_r4_a2", "lokr_default"])
def test_aitk_saved_lora_matches_aitk(variant, mode, lora_report):
    """The LoRA and LoKr files ai-toolkit's network saved for this arch (original names under ``diffusion_model.``):
    every module matched (a fused QKV becomes three), and ai-toolkit's outputs at strength 1 and 0.5, live and
    merged, with the merged weights."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families.minimax_h3 import minimax_h3_original_to_diffusers
    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack

    path = os.path.join(ROOT, variant, f"tiny_minimax_h3_{variant}.safetensors")
    outputs = golden(os.path.join(variant, "outputs.safetensors"))
    inputs = golden("lora_inputs.safetensors")
    file_modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in load_file(path)}
    assert len(file_modules) == lora_report[variant]["n_modules"] == 9
    fused_qkv = sum(name.endswith("attn.qkv_proj") for name in file_modules)
    row_t = inputs["row_timesteps"][0]
    timesteps, indices = torch.unique(row_t, sorted=True, return_inverse=True)
    model = golden_transformer()

    def forward():
        with torch.no_grad():
            video, audio = model(
                hidden_states=inputs["hidden_states"], audio_hidden_states=inputs["audio_hidden_states"],
                encoder_hidden_states=inputs["encoder_hidden_states"], timestep=timesteps, timestep_indices=indices,
                token_tags=inputs["token_tags"][0], position_ids=inputs["position_ids"][0],
                video_indices=inputs["video_indices"], audio_indices=inputs["audio_indices"],
                text_indices=inputs["text_indices"], return_dict=False)
        return torch.cat([video[0].flatten(), audio[0].flatten()])

    torch.testing.assert_close(forward(), outputs["base_output"], rtol=0, atol=ATOL)
    stack = LoraStack({"transformer": model}, mode, "transformer", "minimax_h3",
                      name_mapper=minimax_h3_original_to_diffusers)
    assert stack.set([LoraRequest(path=path, strength=1.0)])[0]["modules"] == len(file_modules) + 2 * fused_qkv
    torch.testing.assert_close(forward(), outputs["lora_live_m1.0"], rtol=0, atol=ATOL)
    torch.testing.assert_close(forward(), outputs["lora_merged_m1.0"], rtol=0, atol=ATOL)
    if mode == "fused":
        effective = golden(os.path.join(variant, "effective_weights_m1.0.safetensors"))
        block = model.transformer_blocks[0]
        qkv = torch.cat([block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight])
        torch.testing.assert_close(qkv, effective["blocks.0.attn.qkv_proj.weight"], rtol=0, atol=1e-6)
        value, gate = block.ff.net[0].proj.weight.chunk(2)
        torch.testing.assert_close(torch.cat([gate, value]), effective["blocks.0.mlp.fc1.weight"], rtol=0, atol=1e-6)
    stack.set([LoraRequest(path=path, strength=0.5)])
    torch.testing.assert_close(forward(), outputs["lora_live_m0.5"], rtol=0, atol=ATOL)
    stack.clear()
    torch.testing.assert_close(forward(), outputs["base_output"], rtol=0, atol=ATOL)


def test_keyframe_posterior_matches_aitk():
    """The first-frame condition: ai-toolkit's ``encode_keyframe_latents`` (posterior sample under its own generator
    seeded 42, float16 rounding, normalization) on its tiny VAE, against diffusers' VAE with the same encoder weights
    through the encoder our prepare step calls. ai-toolkit's encoder names differ from diffusers' in two places."""
    import re

    from diffusers import AutoencoderKLMiniMaxH3

    from aitk_inference.pipelines.families.minimax_h3 import MiniMaxH3AitkBlocks, encode_vae_condition
    from aitk_inference.tiny.minimax_h3 import minimax_h3_video_vae

    expected = golden("keyframe_posterior.safetensors")
    config = {k: v for k, v in minimax_h3_video_vae().config.items() if not k.startswith("_")}
    config.update(latents_mean=expected["latents_mean"].tolist(), latents_std=expected["latents_std"].tolist())
    vae = AutoencoderKLMiniMaxH3(**config).eval()
    renamed = {}
    for name, weight in golden("keyframe_vae_encoder_aitk.safetensors").items():
        name = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", name)
        renamed[re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", name)] = weight
    missing, unexpected = vae.load_state_dict(renamed, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(("encoder.", "quant_conv."))]
    components = MiniMaxH3AitkBlocks().init_pipeline()
    pixels = expected["pixels"].permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        latents = encode_vae_condition(vae, pixels, components.pixel_mean, components.pixel_std,
                                       components.keyframe_encode_seed)
    torch.testing.assert_close(latents, expected["latents"], rtol=0, atol=ATOL)


def test_reference_sizes_match_aitk():
    from aitk_inference.pipelines.families.minimax_h3 import reference_pixel_size

    with open(os.path.join(ROOT, "minimax_h3_ref2va_sizes.json")) as f:
        sizes = json.load(f)["reference_pixel_size"]
    for key, expected in sizes.items():
        size, _, target = key.partition("_to_")
        width, height = map(int, size.split("x"))
        target_width, target_height = map(int, target.split("x")) if target else (64, 64)
        assert list(reference_pixel_size(width, height, target_height, target_width)) == expected, key


def test_ref2va_sampling_loop_matches_aitk(monkeypatch):
    """ai-toolkit's ref2va sampler with two image references (its sizing and LANCZOS resize, one noise draw per
    reference before the video and audio noise, each reference on its own rotary grid advancing the clock by one):
    the pixels each reference is encoded from, the noise rows, layout, per-row timesteps and final latents. Both
    sides get latents drawn from a generator seeded by the reference's size in place of the VAE."""
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from PIL import Image

    from aitk_inference.pipelines.families import minimax_h3 as family
    from aitk_inference.tiny.minimax_h3 import minimax_h3_components

    class LoopOnly(SequentialPipelineBlocks):
        model_name = "minimax-h3"
        block_classes = family.MiniMaxH3AitkRef2VABlocks.block_classes[1:-1]
        block_names = family.MiniMaxH3AitkRef2VABlocks.block_names[1:-1]

    g = golden("minimax_h3_ref2va_goldens.safetensors")
    encoded = []

    def encode(vae, pixels, *args):
        encoded.append(pixels[0, :, 0])
        h, w = pixels.shape[-2] // 16, pixels.shape[-1] // 16
        return torch.randn(1, 24, 1, h, w, generator=torch.Generator().manual_seed(1000 + 100 * h + w))

    monkeypatch.setattr(family, "encode_vae_condition", encode)
    transformer, calls = golden_transformer(), []
    transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}),
        with_kwargs=True)
    pipe = LoopOnly().init_pipeline()
    components = minimax_h3_components()
    del components["transformer"]
    pipe.update_components(**components, transformer_ref=transformer)
    references = [family.fit_reference(Image.fromarray(g[f"raw_ref_{i}"].numpy()), 64, 64) for i in range(2)]
    state = pipe(prompt_embeds=g["embeds"][None], text_token_tags=g["tags"], height=64, width=64, num_frames=22,
                 num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(42), references=references)
    assert len(encoded) == 2
    for i, pixels in enumerate(encoded):
        torch.testing.assert_close(pixels, g[f"ref_pixels_{i}"], rtol=0, atol=0)
    first = calls[0]
    for name in ("video_indices", "audio_indices", "position_ids", "token_tags"):
        torch.testing.assert_close(first[name], g[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(first["hidden_states"][0], g["initial_video_rows"], rtol=0, atol=0)
    torch.testing.assert_close(first["audio_hidden_states"][0], g["initial_audio_rows"], rtol=0, atol=0)
    assert len(calls) == 2
    for i, call in enumerate(calls):
        torch.testing.assert_close(call["timestep"][call["timestep_indices"]], g[f"row_timesteps_{i}"], rtol=0, atol=0)
    torch.testing.assert_close(state.get("latents"), g["final_video_latents"], rtol=0, atol=ATOL)
    torch.testing.assert_close(state.get("audio_latents"), g["final_audio_latents"], rtol=0, atol=ATOL)


def test_prompt_conditioning_matches_aitk():
    """ai-toolkit's ``encode_minimax_h3_prompt`` (prompt stripped, caption capped at 512 tokens, ``<Picture i>: `` +
    a vision block per image, an empty prompt as one pad token, ``hidden_states[50]``) against our text-encoder block on
    the same tiny conditioner: without images, with a first frame, with two references, empty, and over the cap."""
    from diffusers.modular_pipelines import SequentialPipelineBlocks
    from PIL import Image

    from aitk_inference.pipelines.families.minimax_h3 import MiniMaxH3AitkTextEncoderStep
    from aitk_inference.tiny.minimax_h3 import minimax_h3_components

    class TextOnly(SequentialPipelineBlocks):
        model_name = "minimax-h3"
        block_classes = [MiniMaxH3AitkTextEncoderStep]
        block_names = ["text_encoder"]

    with open(os.path.join(ROOT, "minimax_h3_prompts.json")) as f:
        report = json.load(f)
    expected = golden("minimax_h3_prompts.safetensors")
    components = minimax_h3_components()
    checksum = float(sum(p.detach().double().sum() for p in components["text_encoder"].parameters()))
    assert checksum == pytest.approx(report["te_param_checksum"], rel=0, abs=1e-9)
    pipe = TextOnly().init_pipeline()
    pipe.update_components(**{k: components[k] for k in ("text_encoder", "tokenizer", "processor")})
    images = [Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8"))
              for i, (h, w) in enumerate(report["image_sizes_hw"])]
    for case in ("text", "keyframe", "references", "empty", "long"):
        state = pipe(prompt=report[case]["prompt"], conditioner_images=[images[i] for i in report[case]["images"]],
                     dtype=torch.float32)
        torch.testing.assert_close(state.get("text_token_tags"), expected[f"{case}_tags"], rtol=0, atol=0, msg=case)
        torch.testing.assert_close(state.get("prompt_embeds")[0], expected[f"{case}_embeds"], rtol=0, atol=ATOL,
                                   msg=case)


def test_vae_tiling_stays_on(pipes):
    """The released frames are the tiled ones: the option must not leave the VAE untiled after the call."""
    pipe = pipes("minimax_h3")
    assert pipe.pipe.vae.use_tiling
    pipe.generate("x", width=64, height=64, steps=1, num_frames=22, vae_tiling=True)
    assert pipe.pipe.vae.use_tiling
