"""LTX-2 / LTX-2.3 (video + audio) on tiny random-weight pipelines of the real classes."""

import functools
import inspect
import math

import numpy as np
import pytest
import torch

FAST = dict(width=64, height=64, num_frames=9, steps=2, seed=5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_id", ["ltx2", "ltx2.3"])
def test_frames_and_audio(model_id, pipes):
    """Frames [B,T,H,W,C], audio [B,C,S] at the vocoder's rate, progress per step plus decode."""
    pipe = pipes(model_id)
    steps = []
    first = pipe.generate("a fox in the snow", progress=lambda step, total: steps.append((step, total)), **FAST)
    assert first.images.shape == (1, 9, 64, 64, 3) and first.images.dtype == np.float32
    assert first.audio.dtype == np.float32 and first.audio.ndim == 3 and first.audio.shape[:2] == (1, 2)
    assert first.audio.shape[2] > 0 and np.isfinite(first.audio).all()
    assert first.sample_rate == pipe.pipe.vocoder.config.output_sampling_rate
    assert first.sample_rate == (48000 if model_id == "ltx2.3" else 16000)  # the tiny vocoders' rates
    assert steps == [(1, 2), (2, 2), (2, 2)], "one report per step, and one more when decoding starts"
    assert first.timings["decode"] >= 0 and pipe.stage == "done"
    assert first.params.fps == 24 and first.metadata()["num_frames"] == 9


def test_guidance_arguments_match_diffusers_and_ai_toolkit(pipes):
    """Every guidance kwarg is a real LTX2 pipeline argument; 2.3 gets ai-toolkit's extras, STG mapped by depth."""
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

    from aitk_inference.pipelines.registry import get_spec

    for model_id in ("ltx2", "ltx2.3"):
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
    legacy = pipes("ltx2").guidance_kwargs()
    assert legacy["stg_scale"] == 0.0 and legacy["modality_scale"] == 1.0 and legacy["use_cross_timestep"] is False


def test_scheduler_sigmas(pipes, monkeypatch):
    """ai-toolkit's LTX-2 schedule: linspace(1, 1/N, N), exponential shift with mu from the video token count,
    stretched to end at 0.1 (computed here from the formulas, not from the scheduler)."""
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
    tokens = 5 * 8 * 8  # 9 frames -> 5 latent frames, 64x64 -> 8x8 (tiny VAE: 2x temporal, 8x spatial)
    m = (2.05 - 0.95) / (4096 - 1024)
    mu = tokens * m + 0.95 - m * 1024
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
