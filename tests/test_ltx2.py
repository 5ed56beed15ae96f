"""LTX-2 / LTX-2.3 / LTX-2.5 (video + audio) on tiny random-weight pipelines of the real classes; LTX-2.5 also
against ai-toolkit's own code (tests/goldens/ltx25, MANIFEST "ltx25"), LTX-2.3's high resolution mode against the
reference implementation's own (tests/goldens/ltx23_high, MANIFEST "ltx23_high")."""

import functools
import inspect
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR

FAST = dict(width=64, height=64, num_frames=9, steps=2, seed=5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_id", ["ltx2", "ltx2.3", "ltx2.5"])
def test_frames_and_audio(model_id, pipes):
    """Frames [B,T,H,W,C], audio [B,C,S] at the vocoder's rate, progress per step plus decode."""
    pipe = pipes(model_id)
    steps = []
    first = pipe.generate("a fox in the snow", progress=lambda step, total: steps.append((step, total)), **FAST)
    assert first.images.shape == (1, 9, 64, 64, 3) and first.images.dtype == np.float32
    assert first.audio.dtype == np.float32 and first.audio.ndim == 3 and first.audio.shape[:2] == (1, 2)
    assert first.audio.shape[2] > 0 and np.isfinite(first.audio).all()
    assert first.sample_rate == pipe.pipe.vocoder.config.output_sampling_rate
    assert first.sample_rate == (16000 if model_id == "ltx2" else 48000)  # the tiny vocoders' rates (2.3+: BWE)
    assert steps == [(1, 2), (2, 2), (2, 2)], "one report per step, and one more when decoding starts"
    assert first.timings["decode"] >= 0 and pipe.stage == "done"
    assert first.params.fps == 24 and first.metadata()["num_frames"] == 9


def test_guidance_arguments_match_diffusers_and_ai_toolkit(pipes):
    """Every guidance kwarg is a real LTX2 pipeline argument; 2.3 gets ai-toolkit's extras, STG mapped by depth."""
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

    from aitk_inference.pipelines.registry import get_spec

    for model_id in ("ltx2", "ltx2.3", "ltx2.5"):
        for cls in (LTX2Pipeline, LTX2ImageToVideoPipeline):
            missing = set(get_spec(model_id).options.guidance) - set(inspect.signature(cls.__call__).parameters)
            assert not missing, f"{cls.__name__} lacks {missing}"
    extras = pipes("ltx2.3").guidance_kwargs()
    assert extras == {
        "stg_scale": 1.0, "modality_scale": 3.0, "guidance_rescale": 0.7, "audio_guidance_scale": 7.0,
        "audio_stg_scale": 1.0, "audio_modality_scale": 3.0, "audio_guidance_rescale": 0.7,
        "spatio_temporal_guidance_blocks": [1],  # block 28 of 48 -> block 1 of the tiny model's 2
        "use_cross_timestep": True,
    }
    assert pipes("ltx2.5").guidance_kwargs() == extras, "ai-toolkit samples 2.5 exactly as 2.3"
    legacy = pipes("ltx2").guidance_kwargs()
    assert legacy["stg_scale"] == 0.0 and legacy["modality_scale"] == 1.0 and legacy["use_cross_timestep"] is False


def test_scheduler_sigmas(pipes, monkeypatch):
    """ai-toolkit's LTX-2 schedule for 2.0 (2.5's is compared with its goldens below): linspace(1, 1/N, N),
    exponential shift with mu = 2.05 whatever the size (its pinned diffusers computes mu at 4096 tokens), stretched to
    end at 0.1 (computed here from the formulas, not from the scheduler)."""
    pipe = pipes("ltx2")
    scheduler = pipe.pipe.scheduler
    calls = []
    original = type(scheduler).set_timesteps

    # on the class: the pipeline deep-copies the scheduler for the audio latents, and both copies must really run
    @functools.wraps(original)  # the pipeline inspects the signature for `sigmas`
    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(scheduler), "set_timesteps", spy)
    pipe.generate("a fox", **{**FAST, "steps": 4})
    assert calls, "the pipeline must set the scheduler's timesteps"
    mu = 2.05
    for call in calls:
        assert call["mu"] == pytest.approx(mu)
        assert np.allclose(call["sigmas"], np.linspace(1.0, 0.25, 4))
    sigmas = np.linspace(1.0, 0.25, 4)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    one_minus = 1 - shifted
    expected = 1 - one_minus / (one_minus[-1] / (1 - 0.1))
    got = scheduler.sigmas.numpy()
    assert np.allclose(got[:-1], expected, atol=1e-6) and got[-1] == 0.0
    assert got[-2] == pytest.approx(0.1), "shift_terminal: the last sigma before 0 is 0.1"


def _lora_targets(transformer, top_level: tuple[str, ...]):
    """Linear modules of the first block plus the named top-level modules."""
    return [(n, m) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and (n.startswith("transformer_blocks.0.") or n in top_level)]


def _state_dict(targets, names, prefix: str, seed: int = 0, rank: int = 4):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in targets:
        out_f, in_f = module.weight.shape
        key = f"{prefix}.{names.get(name, name)}"
        sd[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        sd[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
    return sd


def test_lora_changes_the_audio_too(pipes, tmp_path):
    """The transformer is joint: a LoRA on its first block and video patchify projection changes the audio too."""
    from safetensors.torch import save_file

    pipe = pipes("ltx2")
    base = pipe.generate("a fox", **FAST)
    path = str(tmp_path / "ltx.safetensors")
    save_file(_state_dict(_lora_targets(pipe.pipe.transformer, ("proj_in",)), {}, "diffusion_model"), path)
    try:
        assert pipe.set_loras([(path, 0.8)])[0]["modules"] > 0
        with_lora = pipe.generate("a fox", **FAST)
    finally:
        pipe.set_loras([])
    assert np.abs(with_lora.images - base.images).max() > 1e-3, "the LoRA must change the frames"
    assert np.abs(with_lora.audio - base.audio).max() > 0, "the LoRA must change the audio (joint transformer)"


# diffusers name -> the name ai-toolkit writes (its convert_lora_diffusers_to_original, str.replace chain included)
ORIGINAL_NAMES = {
    "proj_in": "patchify_proj",
    "audio_proj_in": "audio_patchify_proj",
    "time_embed.linear": "adaln_single.linear",
    "audio_time_embed.emb.timestep_embedder.linear_1": "audio_adaln_single.emb.timestep_embedder.linear_1",
    "av_cross_attn_video_scale_shift.linear": "av_ca_video_scale_shift_adaln_single.linear",
    "av_cross_attn_audio_v2a_gate.linear": "av_ca_v2a_gate_adaln_single.linear",
    "prompt_adaln.linear": "prompt_adaln_single.linear",
    "audio_prompt_adaln.linear": "audio_prompt_adaln_single_single.linear",
}


def test_original_ltx_names_equal_diffusers_names(pipes, tmp_path):
    """An ai-toolkit file in original LTX names (diffusion_model.) loads exactly like the diffusers-named one."""
    from safetensors.torch import save_file

    pipe = pipes("ltx2.3")
    targets = _lora_targets(pipe.pipe.transformer, tuple(ORIGINAL_NAMES))
    assert {n for n, _ in targets} >= set(ORIGINAL_NAMES), "the tiny 2.3 transformer has every renamed module"
    original, diffusers_named = str(tmp_path / "original.safetensors"), str(tmp_path / "diffusers.safetensors")
    save_file(_state_dict(targets, ORIGINAL_NAMES, "diffusion_model"), original)
    save_file(_state_dict(targets, {}, "transformer"), diffusers_named)

    a, b = pipe.check_lora(original).loaded, pipe.check_lora(diffusers_named).loaded
    assert a.converted.layout.endswith("+ltx_names") and not b.converted.layout.endswith("+ltx_names")
    assert set(a.patches) == set(b.patches) and len(a.patches) == len(targets)
    for key, patch in a.patches.items():
        assert all(torch.equal(patch.tensors[k], b.patches[key].tensors[k]) for k in ("down", "up"))
    try:
        pipe.set_loras([(original, 1.0)])
        from_original = pipe.generate("a fox", **FAST)
        pipe.set_loras([(diffusers_named, 1.0)])
        from_diffusers = pipe.generate("a fox", **FAST)
    finally:
        pipe.set_loras([])
    assert np.array_equal(from_original.images, from_diffusers.images)
    assert np.array_equal(from_original.audio, from_diffusers.audio)


def test_frame_and_size_snapping(pipes):
    result = pipes("ltx2").generate("a fox", **{**FAST, "num_frames": 10, "width": 100, "height": 70})
    assert (result.params.num_frames, result.params.width, result.params.height) == (9, 96, 64)
    assert result.images.shape == (1, 9, 64, 96, 3)


def test_frame_rate_option(pipes):
    """``frame_rate`` (the rate the model is conditioned on) defaults to the requested fps; set, the fps no longer
    changes the frames or the audio (ai-toolkit's previews: 24 whatever the fps, which reproduce passes)."""
    pipe = pipes("ltx2")
    at_24 = pipe.generate("a fox", **{**FAST, "fps": 24})
    at_12 = pipe.generate("a fox", **{**FAST, "fps": 12})
    as_previews = pipe.generate("a fox", **{**FAST, "fps": 12, "frame_rate": 24})
    assert at_12.audio.shape[2] > at_24.audio.shape[2], "by default the audio lasts num_frames / fps"
    assert as_previews.params.fps == 12 and as_previews.metadata()["options"] == {"frame_rate": 24}
    assert np.array_equal(as_previews.images, at_24.images) and np.array_equal(as_previews.audio, at_24.audio)
    for model_id in ("ltx2", "ltx2.3", "ltx2.5"):
        assert pipes(model_id).job_options({"arch": model_id}) == {"frame_rate": 24.0}
    for bad in (0, 121, True, "24"):
        with pytest.raises(ValueError, match="`frame_rate` must be a number in 1..120"):
            pipe.generate("a fox", **{**FAST, "frame_rate": bad})
    with pytest.raises(ValueError, match=r"Unknown generation option\(s\) for ltx2: \['motion'\]; it takes frame_rate"):
        pipe.generate("a fox", **{**FAST, "motion": 1})


def test_image_to_video(pipes):
    """A control image switches to LTX2ImageToVideoPipeline over the same modules; the result differs from T2V."""
    from PIL import Image

    pipe = pipes("ltx2")
    image = Image.fromarray((np.random.RandomState(0).rand(48, 80, 3) * 255).astype(np.uint8))
    t2v = pipe.generate("a fox", **FAST)
    i2v = pipe.generate("a fox", control_images=[image], **FAST)
    assert type(pipe._image_pipe).__name__ == "LTX2ImageToVideoPipeline"
    assert pipe._image_pipe.transformer is pipe.pipe.transformer, "no second copy of the model"
    assert i2v.images.shape == t2v.images.shape and np.isfinite(i2v.images).all()
    assert np.abs(i2v.images - t2v.images).max() > 1e-3


def test_mp4_with_audio_track(pipes, tmp_path):
    """The MP4 carries every frame at the requested fps and the audio track (probed with PyAV)."""
    import av

    from aitk_inference.pipelines.media import write_mp4

    result = pipes("ltx2").generate("a fox", **{**FAST, "fps": 12})
    assert result.params.fps == 12
    path = write_mp4(result.images[0], str(tmp_path / "ltx.mp4"), result.params.fps, audio=result.audio[0],
                     sample_rate=result.sample_rate)
    with av.open(path) as container:
        video = container.streams.video[0]
        audio = container.streams.audio
        assert video.average_rate == 12
        assert sum(1 for _ in container.decode(video=0)) == 9
        assert len(audio) == 1 and audio[0].sample_rate == result.sample_rate and audio[0].channels == 2


def test_image_to_video_ltx23_batch(pipes):
    """LTX-2.3 image-to-video with its guidance extras, a batch of 2: one video and one audio track per item."""
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))
    result = pipes("ltx2.3").generate("a fox", control_images=[image], batch_size=2, **FAST)
    assert result.images.shape == (2, 9, 64, 64, 3) and result.audio.shape[:2] == (2, 2)
    assert np.isfinite(result.images).all() and np.isfinite(result.audio).all()


# ------------------------------------------------------------------------------------ LTX-2.5 against ai-toolkit
LTX25_GOLDENS = os.path.join(GOLDENS_DIR, "ltx25")
LTX25_PROMPT = dict(prompt="a fox in the snow", negative="blurry", seed=42, guidance=4.0)
# ai-toolkit encodes each prompt at its own length and zero-pads the Gemma states to 1024 on the left; diffusers pads
# the tokens to 1024 first. Gemma's attention sees the real tokens at the same relative positions either way, so the
# connector outputs differ by float32 rounding only (largest seen 1.3e-5 on values up to 2.6).
PROMPT_EMBEDS_ATOL = 5e-5


@pytest.fixture(scope="module")
def ltx25_golden():
    from safetensors.torch import load_file

    with open(os.path.join(LTX25_GOLDENS, "sample_first_call.json")) as f:
        meta = json.load(f)
    return load_file(os.path.join(LTX25_GOLDENS, "sample_first_call.safetensors")), meta


class _FirstCall(Exception):
    pass


def _record_sampling(pipe, monkeypatch, stop_at_first_call: bool) -> dict:
    """Spy on what the scheduler (both copies: video and audio) and the transformer receive."""
    record = {"set_timesteps": []}
    scheduler_cls = type(pipe.pipe.scheduler)
    original = scheduler_cls.set_timesteps

    @functools.wraps(original)  # the pipeline inspects the signature for `sigmas`
    def spy_set(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        record["set_timesteps"].append((kwargs, self.sigmas.clone(), self.timesteps.clone()))
        return out

    transformer = pipe.pipe.transformer
    forward = transformer.forward

    def spy_forward(*args, **kwargs):
        record.setdefault("first_call", kwargs)
        if stop_at_first_call:
            raise _FirstCall
        return forward(*args, **kwargs)

    monkeypatch.setattr(scheduler_cls, "set_timesteps", spy_set)
    monkeypatch.setattr(transformer, "forward", spy_forward)
    # ai-toolkit passes STG block 28, which the 2-block tiny transformer lacks, so its STG pass perturbs nothing; ours
    # maps 28 onto the tiny depth (block 1). Give ours ai-toolkit's list to compare the sampling itself; on the real
    # 48-block model the mapping is the identity.
    monkeypatch.setattr(pipe, "guidance_kwargs", lambda: dict(pipe.spec.options.guidance))
    return record


def test_ltx25_sampling_matches_ai_toolkit(pipes, monkeypatch, ltx25_golden):
    """ai-toolkit's LTX-2.5 sample path (generate_single_image on its pinned diffusers) vs ours, for three sizes and
    step counts: the schedule both schedulers get (sigmas in, mu = 2.05 whatever the size, resulting sigmas and
    timesteps), the initial video and audio noise for seed 42 and the first timestep; for the 64x64 2-step run also
    the Gemma-4 prompt embeddings after the connectors and the decoded frames and audio."""
    golden, meta = ltx25_golden
    pipe = pipes("ltx2.5")
    assert meta["seed"] == LTX25_PROMPT["seed"] and meta["prompt"] == LTX25_PROMPT["prompt"]
    for key, run in meta["runs"].items():
        if key.startswith("i2v_"):
            continue  # test_ltx25_image_to_video_matches_ai_toolkit
        steps, width, height, frames = map(int, re.fullmatch(r"steps(\d+)_w(\d+)_h(\d+)_f(\d+)", key).groups())
        full = key == "steps2_w64_h64_f9"
        with monkeypatch.context() as patch:
            record = _record_sampling(pipe, patch, stop_at_first_call=not full)
            call = functools.partial(pipe.generate, width=width, height=height, num_frames=frames, steps=steps,
                                     **LTX25_PROMPT)
            if full:
                result = call()
            else:
                with pytest.raises(_FirstCall):
                    call()
        assert len(record["set_timesteps"]) == len(run["set_timesteps"]) == 2, "video and audio schedulers"
        for (kwargs, sigmas, timesteps), expected in zip(record["set_timesteps"], run["set_timesteps"]):
            assert kwargs["mu"] == pytest.approx(expected["mu"], abs=1e-12) and expected["mu"] == pytest.approx(2.05)
            assert np.allclose(kwargs["sigmas"], expected["sigmas_in"], atol=1e-7, rtol=0)
            assert np.allclose(sigmas.numpy(), expected["sigmas"], atol=1e-6, rtol=0)
            assert np.allclose(timesteps.numpy(), expected["timesteps"], atol=1e-4, rtol=0)
        first = record["first_call"]
        for name in ("hidden_states", "audio_hidden_states", "timestep", "sigma"):
            assert torch.equal(first[name].float(), golden[f"{key}.first_call.{name}"]), f"{key}: {name}"
        if not full:
            continue
        for name in ("encoder_attention_mask", "audio_encoder_attention_mask", "video_coords", "audio_coords"):
            assert torch.equal(first[name].float(), golden[f"{key}.first_call.{name}"]), name
        for name in ("encoder_hidden_states", "audio_encoder_hidden_states"):  # every prompt token is in the last 64
            difference = (first[name][:, -64:].float() - golden[f"{key}.first_call.{name}_last64"]).abs().max().item()
            assert difference < PROMPT_EMBEDS_ATOL, f"{name}: {difference}"
        assert np.allclose(result.images[:, [0, 8]], golden[f"{key}.video_frames_0_8"].numpy(), atol=1e-5, rtol=0)
        assert np.allclose(result.images.astype(np.float64).sum(axis=(2, 3, 4)),
                           golden[f"{key}.video_sum_per_frame"].numpy(), rtol=1e-5)
        assert np.allclose(result.audio, golden[f"{key}.audio"].numpy(), atol=1e-5, rtol=0)


def test_ltx25_image_to_video_matches_ai_toolkit(pipes, monkeypatch, ltx25_golden):
    """ai-toolkit's image-to-video sample (its control image LANCZOS-resized, LTX2ImageToVideoPipeline of its pinned
    diffusers, which never re-compresses the image) vs ours with ``image_crf=0``: same noise, frames and audio."""
    from PIL import Image

    golden, meta = ltx25_golden
    key = "i2v_steps2_w64_h64_f9"
    assert meta["runs"][key]["pipeline"] == "LTX2ImageToVideoPipeline"
    assert "image_crf" not in meta["runs"][key]["call_kwargs"]
    pipe = pipes("ltx2.5")
    assert pipe.spec.options.image_crf == 0
    control = Image.open(os.path.join(LTX25_GOLDENS, "control_48x80.png"))
    with monkeypatch.context() as patch:
        record = _record_sampling(pipe, patch, stop_at_first_call=False)
        result = pipe.generate(width=64, height=64, num_frames=9, steps=2, control_images=[control], **LTX25_PROMPT)
    for name in ("hidden_states", "audio_hidden_states"):
        assert torch.allclose(record["first_call"][name].float(), golden[f"{key}.first_call.{name}"], atol=1e-6)
    assert np.allclose(result.images[:, [0, 8]], golden[f"{key}.video_frames_0_8"].numpy(), atol=1e-5, rtol=0)
    assert np.allclose(result.images.astype(np.float64).sum(axis=(2, 3, 4)),
                       golden[f"{key}.video_sum_per_frame"].numpy(), rtol=1e-5)
    assert np.allclose(result.audio, golden[f"{key}.audio"].numpy(), atol=1e-5, rtol=0)


def test_ltx25_transformer_drops_the_video_feed_forward_biases(pipes, ltx25_golden):
    """ai-toolkit's "2.5" surgery (convert_ltx2_transformer) leaves exactly the video feed-forward Linears bias-free;
    ours is the 2.3 transformer built with ff_bias=False, the only config difference (audio_ff keeps its biases)."""
    _, meta = ltx25_golden
    v25, v23 = pipes("ltx2.5").pipe.transformer, pipes("ltx2.3").pipe.transformer
    bias_free = sorted(n for n, m in v25.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is None)
    assert bias_free == meta["bias_free_linears"]
    assert set(v23.state_dict()) - set(v25.state_dict()) == {f"{n}.bias" for n in bias_free}
    assert set(v25.state_dict()) < set(v23.state_dict())
    differing = {k for k, v in v25.config.items() if v23.config.get(k) != v and not k.startswith("_")}
    assert differing == {"ff_bias"} and v25.config.audio_ff_bias
    assert meta["transformer_keys_pinned_class_lacks"]["ff_bias"] is False


def _first_call_inputs(ltx25_golden):
    golden, meta = ltx25_golden
    run = "steps2_w64_h64_f9"
    inputs = {k.split(".first_call.")[1]: v for k, v in golden.items() if k.startswith(f"{run}.first_call.")}
    for mask in ("encoder_attention_mask", "audio_encoder_attention_mask"):
        inputs[mask] = inputs[mask].long()
    for name in ("encoder_hidden_states", "audio_encoder_hidden_states"):  # as the golden: 960 zero rows + last 64
        last = inputs.pop(f"{name}_last64")
        inputs[name] = torch.cat([last.new_zeros(last.shape[0], 1024 - last.shape[1], last.shape[2]), last], dim=1)
    other = {k: v for k, v in meta["runs"][run]["first_call_other"].items() if k != "return_dict"}
    return {**inputs, **other}


LTX25_LORA_FILES = {"blocks": "ltx25_lora_blocks_r4_fp32.safetensors", "all": "ltx25_lora_all_r4_fp32.safetensors",
                    "lokr": "ltx25_lokr_default_fp32.safetensors"}


@pytest.mark.parametrize("scope", list(LTX25_LORA_FILES))
def test_ltx25_lora_saved_by_ai_toolkit(pipes, ltx25_golden, scope):
    """LoRAs saved by ai-toolkit's LoRASpecialNetwork for arch ltx2.5 (diffusion_model. + original LTX names,
    converter version "2.5"; transformer_blocks only, every Linear, and a LoKr with its defaults) load with every
    module matched, and the transformer's outputs equal ai-toolkit's with the network off, at 1.0 and at 0.5."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    expected = load_file(os.path.join(LTX25_GOLDENS, "lora_outputs.safetensors"))
    path = os.path.join(LTX25_GOLDENS, LTX25_LORA_FILES[scope])
    with safe_open(path, "pt") as f:
        file_modules = {re.split(r"\.(lora_|lokr_|alpha$)", k)[0] for k in f.keys()}
    assert all(m.startswith("diffusion_model.") for m in file_modules)
    pipe = pipes("ltx2.5")
    transformer = pipe.pipe.transformer
    inputs = _first_call_inputs(ltx25_golden)
    assert set(inputs) <= set(inspect.signature(transformer.forward).parameters)

    def forward():
        with torch.no_grad():
            return transformer(**inputs, return_dict=False)

    video, audio = forward()  # ai-toolkit's output with the network inactive is its base output (checked there)
    assert torch.allclose(video, expected["base.video"], atol=1e-5, rtol=0)
    assert torch.allclose(audio, expected["base.audio"], atol=1e-5, rtol=0)
    try:
        for multiplier in (1.0, 0.5):
            assert pipe.set_loras([(path, multiplier)])[0]["modules"] == len(file_modules)
            video, audio = forward()
            assert torch.allclose(video, expected[f"{scope}.m{multiplier}.video"], atol=1e-5, rtol=0)
            assert torch.allclose(audio, expected[f"{scope}.m{multiplier}.audio"], atol=1e-5, rtol=0)
    finally:
        pipe.set_loras([])
    assert (expected[f"{scope}.m1.0.video"] - expected["base.video"]).abs().max() > 1e-2, "the LoRA has an effect"


@pytest.mark.parametrize("scope", ["all", "lokr"])
def test_ltx25_fused_lora_weight_equals_ai_toolkit(pipes, scope):
    """Fused mode merges the ai-toolkit file into the weight ai-toolkit's network computes (LoRA: W + scale * up @
    down; LoKr: its own merge_in)."""
    from safetensors.torch import load_file

    expected = load_file(os.path.join(LTX25_GOLDENS, "lora_outputs.safetensors"))
    pipe = pipes("ltx2.5", lora_mode="fused")
    module = "transformer_blocks.0.attn1.to_q"
    try:
        pipe.set_loras([(os.path.join(LTX25_GOLDENS, LTX25_LORA_FILES[scope]), 1.0)])
        weight = pipe.pipe.transformer.get_submodule(module).weight.detach()
        assert torch.allclose(weight, expected[f"{scope}.merged.{module}"], atol=1e-6, rtol=0)
    finally:
        pipe.set_loras([])


@pytest.mark.parametrize("key,family", [
    ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "Wan"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "FLUX.1"),
])
def test_ltx25_refuses_a_lora_of_another_family(pipes, tmp_path, key, family):
    from safetensors.torch import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({key: torch.zeros(4, 16), key.replace("lora_A", "lora_B"): torch.zeros(16, 4)}, path)
    with pytest.raises(ValueError, match=family):
        pipes("ltx2.5").set_loras([(path, 1.0)])


# ------------------------------------------------------------- LTX-2.5 from the ComfyUI int8 ConvRot files
def test_ltx25_comfy_int8_convrot_files_load_as_ai_toolkit_loads_them(pipes, ltx25_golden, tmp_path):
    """Tiny files in the ComfyUI int8 ConvRot layout, quantized by ai-toolkit's own ConvRotInt8Quantizer (MANIFEST
    "ltx25"), loaded natively (dequantized): the Gemma-4 tokenizer (BOS restored), the text encoder's stacked hidden
    states, the connectors and the transformer equal what ai-toolkit's loading code (OstrisLinear, Int8Embedding)
    computes from the same files."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families import ltx2_comfy

    expected = load_file(os.path.join(LTX25_GOLDENS, "comfy_outputs.safetensors"))
    dit, te = (os.path.join(LTX25_GOLDENS, f"comfy_{name}.safetensors") for name in ("dit", "te"))
    tiny = pipes("ltx2.5").pipe
    transformer, connectors = ltx2_comfy.load_transformer_and_connectors(
        dit, te, torch.float32, transformer_config=tiny.transformer.config, connectors_config=tiny.connectors.config)
    text_encoder = ltx2_comfy.load_gemma4_text_encoder(te, torch.float32)
    tokenizer = ltx2_comfy.load_gemma4_tokenizer(te, str(tmp_path / "tokenizer"))
    assert type(text_encoder).__name__ == "Gemma4TextModel"

    ids = tokenizer(["a fox in the snow"], return_tensors="pt").input_ids
    assert ids.float().equal(expected["prompt_input_ids"]) and ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        states = text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        embeds = torch.stack(states.hidden_states, dim=-1).flatten(2, 3)
        assert torch.allclose(embeds, expected["prompt_embeds"], atol=1e-5, rtol=0)
        padded = torch.cat([embeds.new_zeros(1, 1024 - embeds.shape[1], embeds.shape[2]), embeds], dim=1)
        mask = torch.cat([torch.zeros(1, 1024 - ids.shape[1], dtype=torch.long), torch.ones_like(ids)], dim=1)
        video_text, audio_text, _ = connectors(padded, mask)
        assert torch.allclose(video_text[:, -64:], expected["connectors.video_last64"], atol=1e-5, rtol=0)
        assert torch.allclose(audio_text[:, -64:], expected["connectors.audio_last64"], atol=1e-5, rtol=0)
        video, audio = transformer(**_first_call_inputs(ltx25_golden), return_dict=False)
    assert torch.allclose(video, expected["transformer.video"], atol=1e-5, rtol=0)
    assert torch.allclose(audio, expected["transformer.audio"], atol=1e-5, rtol=0)

    # an int8 embedding table (per-row scales, never rotated) looks up the rows ai-toolkit's Int8Embedding returns
    marker = torch.tensor(list(b'{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 16}'),
                          dtype=torch.uint8)
    table = ltx2_comfy.dequantize_comfy_layers(
        {"embed_tokens.weight": expected["embedding.codes"], "embed_tokens.weight_scale": expected["embedding.scales"],
         "embed_tokens.comfy_quant": marker}, embeddings=("embed_tokens",))["embed_tokens.weight"]
    assert torch.allclose(torch.nn.functional.embedding(ids, table), expected["embedding.rows"], atol=1e-7, rtol=0)


def test_ltx25_int8_convrot_dequantization():
    """The regular Hadamard is orthonormal and symmetric; per-row int8 codes rotated in blocks dequantize to the
    weight they were made from (within the int8 step), and unsupported ComfyUI formats are refused by name."""
    import json as json_module

    from aitk_inference.pipelines.families import ltx2_comfy

    for size in (4, 16, 64, 256):
        h = ltx2_comfy.regular_hadamard(size)
        assert torch.allclose(h @ h, torch.eye(size, dtype=h.dtype)) and torch.equal(h, h.T)
    with pytest.raises(ValueError, match="power of 4"):
        ltx2_comfy.regular_hadamard(8)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    rotated = (weight.double().reshape(8, 2, 16) @ ltx2_comfy.regular_hadamard(16)).reshape(8, 32)
    scales = rotated.abs().amax(dim=1) / 127
    codes = torch.round(rotated / scales[:, None]).to(torch.int8)
    restored = ltx2_comfy.dequantize_int8_rows(codes, scales.float(), 16)
    assert (restored - weight).abs().max() <= scales.max() * 2
    marker = torch.tensor(list(json_module.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nvfp4"):
        ltx2_comfy.dequantize_comfy_layers({"x.weight": codes, "x.weight_scale": scales, "x.comfy_quant": marker}, ())


@pytest.fixture(scope="module")
def ltx25_names():
    import gzip

    with gzip.open(os.path.join(LTX25_GOLDENS, "names.json.gz"), "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("component", ["transformer", "connectors", "video_vae", "audio_vae", "vocoder"])
def test_ltx25_full_size_names_and_shapes_match_ai_toolkit(ltx25_names, component):
    """For every key of the real 2.5 checkpoints (made from the modules ai-toolkit's converter builds), our renaming
    gives ai-toolkit's diffusers name (or drops it, where ai-toolkit drops it), and our full-size configs build modules
    with exactly the parameter names and shapes of ai-toolkit's (meta device, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE

    from aitk_inference.pipelines.families import ltx2_comfy as comfy

    golden = ltx25_names[component]
    levels = len(comfy.VIDEO_VAE_CONFIG["block_out_channels"])
    rename, drop, cls, config = {
        "transformer": (comfy.transformer_key, comfy.TRANSFORMER_UNUSED, LTX2VideoTransformer3DModel,
                        comfy.TRANSFORMER_CONFIG),
        "connectors": (comfy.connector_key, (), LTX2TextConnectors, comfy.CONNECTORS_CONFIG),
        "video_vae": (lambda k: comfy.video_vae_key(k, levels), comfy.VAE_UNUSED, AutoencoderKLLTX2Video,
                      comfy.VIDEO_VAE_CONFIG),
        "audio_vae": (comfy.audio_vae_key, (), AutoencoderKLLTX2Audio, comfy.AUDIO_VAE_CONFIG),
        "vocoder": (comfy.vocoder_key, (), LTX2VocoderWithBWE, comfy.VOCODER_CONFIG),
    }[component]
    ours = {k: None if k.startswith(drop) else rename(k) for k in golden["original"]}
    wrong = {k: (v, golden["renames"][k]) for k, v in ours.items() if v != golden["renames"][k]}
    assert not wrong, f"{len(wrong)} keys renamed differently, e.g. {list(wrong.items())[:3]}"
    with init_empty_weights(include_buffers=True):
        module = cls.from_config(dict(config))
    assert {k: list(v.shape) for k, v in module.state_dict().items()} == golden["shapes"]


def _original_vae_key(key: str) -> str:
    """Diffusers -> original LTX name of a one-level video VAE (the inverse of ``ltx2_comfy.video_vae_key``)."""
    key = {"latents_mean": "per_channel_statistics.mean-of-means",
           "latents_std": "per_channel_statistics.std-of-means"}.get(key, key)
    for pattern, replacement in ((r"^encoder\.down_blocks\.0\.downsamplers\.0\.", "encoder.down_blocks.1."),
                                 (r"^encoder\.mid_block\.", "encoder.down_blocks.2."),
                                 (r"^decoder\.mid_block\.", "decoder.up_blocks.0."),
                                 (r"^decoder\.up_blocks\.0\.upsamplers\.0\.", "decoder.up_blocks.1."),
                                 (r"^decoder\.up_blocks\.0\.(?!upsamplers)", "decoder.up_blocks.2.")):
        if re.match(pattern, key):
            key = re.sub(pattern, replacement, key)
            break
    return key.replace("resnets", "res_blocks")


def _original_vocoder_key(key: str) -> str:
    names = {"upsamplers": "ups", "resnets": "resblocks", "conv_in": "conv_pre", "conv_out": "conv_post",
             "act_out": "act_post"}
    return ".".join(names.get(part, part) for part in key.split(".")).replace(".downsample.", ".downsample.lowpass.")


def test_ltx25_loads_a_comfyui_folder(pipes, tmp_path, monkeypatch):
    """A folder laid out like Lightricks/LTX-2.5 (ComfyUI single files: the int8 ConvRot transformer and text encoder
    goldens, the conv VAE and the audio VAE + vocoder written in original names) loads as the ltx2.5 pipeline: every
    component from its file, the tokenizer from the text encoder file, and it generates."""
    import shutil

    from safetensors.torch import save_file

    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.pipelines.families import ltx2_comfy
    from aitk_inference.pipelines.registry import LTX25_COMFY_FILES

    tiny = pipes("ltx2.5").pipe
    for component, module in (("transformer", tiny.transformer), ("connectors", tiny.connectors),
                              ("video_vae", tiny.vae), ("audio_vae", tiny.audio_vae), ("vocoder", tiny.vocoder)):
        monkeypatch.setitem(ltx2_comfy.CONFIGS, component, dict(module.config))
    folder = tmp_path / "models"
    for component, golden in (("transformer", "comfy_dit"), ("text_encoder", "comfy_te")):
        target = folder / LTX25_COMFY_FILES[component]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(LTX25_GOLDENS, f"{golden}.safetensors"), target)
    video_vae = {_original_vae_key(k): v for k, v in tiny.vae.state_dict().items()}
    assert all(ltx2_comfy.video_vae_key(o, 1) == k for o, k in zip(video_vae, tiny.vae.state_dict()))
    (folder / "vae").mkdir()
    save_file({k: v.contiguous() for k, v in video_vae.items()}, str(folder / LTX25_COMFY_FILES["video_vae"]))
    audio = {f"audio_vae.{k.replace('latents_mean', 'per_channel_statistics.mean-of-means').replace('latents_std', 'per_channel_statistics.std-of-means')}": v
             for k, v in tiny.audio_vae.state_dict().items()}
    audio.update({f"vocoder.{_original_vocoder_key(k)}": v for k, v in tiny.vocoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in audio.items()}, str(folder / LTX25_COMFY_FILES["audio_vae"]))

    pipe = load_pipeline("ltx2.5", base=str(folder), device="cpu", dtype="fp32")
    for name in ("vae", "audio_vae", "vocoder", "connectors"):
        ours, theirs = getattr(pipe.pipe, name).state_dict(), getattr(tiny, name).state_dict()
        assert set(ours) == set(theirs), name
        if name != "connectors":  # the connectors' Linears are int8 in the file
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    to_q = "transformer_blocks.0.attn1.to_q.weight"  # int8 ConvRot in the file: within the int8 step of the original
    original = tiny.transformer.state_dict()[to_q]
    assert (pipe.pipe.transformer.state_dict()[to_q] - original).abs().max() < original.abs().max() / 64
    assert pipe.pipe.tokenizer("a fox").input_ids[0] == pipe.pipe.tokenizer.bos_token_id
    assert type(pipe.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.pipe.scheduler.config.base_shift == pipe.pipe.scheduler.config.max_shift == 2.05
    result = pipe.generate("a fox", **FAST)
    assert result.images.shape == (1, 9, 64, 64, 3) and np.isfinite(result.images).all()
    assert np.isfinite(result.audio).all() and result.audio.shape[:2] == (1, 2)


def test_ltx25_comfyui_folder_missing_a_file_is_named(tmp_path):
    from aitk_inference.pipelines.families import ltx2_comfy
    from aitk_inference.pipelines.registry import LTX25_COMFY_FILES

    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / LTX25_COMFY_FILES["transformer"]).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="gemma4-12b-with-proj"):
        ltx2_comfy.locate_files(str(tmp_path), LTX25_COMFY_FILES)


# ------------------------------------------------------------------ LTX-2.3 high resolution against the reference
LTX23_HIGH_GOLDENS = os.path.join(GOLDENS_DIR, "ltx23_high")


def _tensor_digest(tensors: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def high_pipe(load_tiny, tmp_path_factory):
    """A tiny ltx2.3 of its own (the high mode keeps its distilled LoRA in the stack) whose high mode reads the tiny
    upsampler and distilled LoRA, plus the golden's user LoRA, checked against the digests the golden was made with."""
    import dataclasses

    from safetensors.torch import load_file

    from aitk_inference.tiny.loras import lora_targets, make_state_dict, save_lora
    from aitk_inference.tiny.ltx2 import write_ltx23_high_resolution

    with open(os.path.join(LTX23_HIGH_GOLDENS, "meta.json")) as f:
        meta = json.load(f)
    folder = tmp_path_factory.mktemp("ltx23_high")
    pipe = load_tiny("ltx2.3")
    parts = write_ltx23_high_resolution(pipe.pipe, str(folder))
    user_lora = save_lora(str(folder / "user_lora.safetensors"),
                          make_state_dict("peft_diffusion_model", lora_targets(pipe.pipe.transformer), seed=1, std=0.1))
    from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel

    upsampler = LTX2LatentUpsamplerModel.from_pretrained(parts["upsampler"], subfolder="latent_upsampler")
    assert _tensor_digest(upsampler.state_dict()) == meta["upsampler_digest"], "the tiny upsampler changed"
    assert _tensor_digest(load_file(parts["distilled_lora"])) == meta["distilled_lora_digest"]
    assert _tensor_digest(load_file(user_lora)) == meta["user_lora_digest"]
    options = pipe.spec.options
    pipe.spec = dataclasses.replace(pipe.spec, options=dataclasses.replace(
        options, high=dataclasses.replace(options.high, **parts)))
    return pipe, user_lora, meta


def test_ltx23_high_resolution_matches_the_reference(high_pipe):
    """resolution='high' equals the reference implementation's own LTX23Pipeline High path (its code, under the
    diffusers it pins) on the tiny model: stage 1 at half the size (text-to-video with a user LoRA, image-to-video
    without), the 2x latent upsampler, the distilled-LoRA refine. Frames within 1 level of 255, audio to float32
    rounding; the default mode is untouched by a high render."""
    from PIL import Image

    pipe, user_lora, meta = high_pipe
    golden = np.load(os.path.join(LTX23_HIGH_GOLDENS, "high.npz"))
    for name, case in meta["cases"].items():
        pipe.set_loras([(user_lora, case["user_lora_strength"])] if case["user_lora_strength"] else [])
        control = case["control_image"] and [Image.open(os.path.join(LTX23_HIGH_GOLDENS, case["control_image"]))]
        render = functools.partial(pipe.generate, case["prompt"], negative=case["negative"], seed=case["seed"],
                                   width=case["output_size"], height=case["output_size"], steps=case["steps"],
                                   guidance=case["guidance"], num_frames=case["num_frames"], fps=case["fps"],
                                   control_images=control or None)
        default_before = render().images if name == "t2v_lora" else None
        result = render(resolution="high")
        frames = (result.images[0] * 255).round().astype(np.int16)
        assert frames.shape == golden[f"{name}.frames"].shape
        assert np.abs(frames - golden[f"{name}.frames"]).max() <= 1, name  # largest seen: 1 (t2v_lora), 0 (i2v)
        np.testing.assert_allclose(result.audio, golden[f"{name}.audio"], rtol=0, atol=1e-5)
        assert result.sample_rate == case["audio_sample_rate"]
        if default_before is not None:
            assert np.array_equal(render().images, default_before), "the distilled LoRA acts outside the refine"
    assert [lora["side"] for lora in pipe.loras.describe()] == ["refine"]
    pipe.set_loras([])


def test_ltx23_high_resolution_inputs(high_pipe, pipes):
    pipe, user_lora, _ = high_pipe
    with pytest.raises(ValueError, match="ltx2 has no high resolution mode.*use model ltx2.3"):
        pipes("ltx2").generate("a fox", resolution="high", **FAST)
    with pytest.raises(ValueError, match="multiples of 64 \\(got 96x64\\)"):
        pipe.generate("a fox", resolution="high", **{**FAST, "width": 96})
    with pytest.raises(ValueError, match="`resolution` must be one of default, high, got 'High'"):
        pipe.generate("a fox", resolution="High", **FAST)
    assert pipe.check_lora((user_lora, 1.0, "refine")).request.side == "refine"
    with pytest.raises(ValueError, match="side is empty .* or 'refine'"):
        pipe.check_lora((user_lora, 1.0, "high"))
