"""Wan 2.1 / 2.2 on tiny random-weight pipelines: ai-toolkit's sampling wiring (Euler static shift, expert switch at
t >= 875, LANCZOS control image, first-frame conditioning), LoRAs in original Wan names on the right expert, MP4/WEBP
output and the CLI."""

import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from aitk_inference.pipelines.lora.stack import LoraRequest
from aitk_inference.pipelines.lora.convert import LoraFormatError, convert_ai_toolkit_lora
from aitk_inference.pipelines.registry import get_spec
from aitk_inference.pipelines.media import write_video
from aitk_inference.tiny.loras import save_lora
from aitk_inference.tiny.wan import original_wan_state_dict

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, FRAMES, STEPS = 64, 5, 2
WAN_IDS = ("wan21_1b", "wan21_14b", "wan21_i2v_14b", "wan21_i2v_14b480p", "wan22_14b_t2v", "wan22_14b_i2v", "wan22_5b")
# ai-toolkit facts restated independently of the registry: (shift, divisor, frames, fps, control images)
AITK = {
    "wan21_1b": (3.0, 16, 41, 16, (0, 0)), "wan21_14b": (3.0, 16, 41, 16, (0, 0)),
    "wan21_i2v_14b": (3.0, 16, 41, 16, (1, 1)), "wan21_i2v_14b480p": (3.0, 16, 41, 16, (1, 1)),
    "wan22_14b_t2v": (5.0, 16, 41, 16, (0, 0)), "wan22_14b_i2v": (5.0, 16, 41, 16, (1, 1)),
    "wan22_5b": (5.0, 32, 121, 24, (0, 1)),
}


def control_image():
    ramp = np.linspace(0, 255, 40, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(ramp, (40, 1)), np.tile(ramp[:, None], (1, 40)), np.full((40, 40), 90, np.uint8)], -1))


def run(pipeline, **kwargs):
    kwargs = {"prompt": "a cat surfing", "negative": "blurry", "width": SIZE, "height": SIZE, "num_frames": FRAMES,
              "steps": STEPS, "seed": 7, **kwargs}
    return pipeline.generate(**kwargs)


def stock_call(pipe, shift, **kwargs):
    """diffusers' own pipeline called the way ai-toolkit samples: fresh Euler with a static shift, embeddings of the
    prompt and negative at 512 tokens, CPU generator, the control image LANCZOS-resized to the target size."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kept = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    try:
        with torch.inference_mode():
            return pipe(prompt=["a cat surfing"], negative_prompt=["blurry"], width=SIZE, height=SIZE, num_frames=FRAMES,
                        num_inference_steps=kwargs.pop("steps", STEPS), guidance_scale=4.0, max_sequence_length=512,
                        generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kwargs).frames
    finally:
        pipe.scheduler = kept


def aitk_timesteps(shift, steps):
    """FlowMatch Euler static shift (ai-toolkit.md §6.14: s*sigma / (1 + (s-1)*sigma)) over diffusers' linspace."""
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    return [1000 * shifted(s) for s in np.linspace(1.0, shifted(0.001), steps)]


def spy_experts(pipe):
    """Record (expert, timestep) of every transformer forward."""
    calls, handles = [], []
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            hook = lambda m, a, kw, name=name: calls.append((name, float(kw["timestep"].flatten()[0])))  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


@pytest.fixture(scope="module")
def t2v(load_tiny):
    return load_tiny("wan21_1b")


@pytest.fixture(scope="module")
def moe(load_tiny):
    return load_tiny("wan22_14b_t2v")


@pytest.fixture
def clean(request):
    pipelines = [request.getfixturevalue(name) for name in ("t2v", "moe") if name in request.fixturenames]
    for p in pipelines:
        p.set_loras([])
    yield
    for p in pipelines:
        p.set_loras([])


def test_registry_matches_ai_toolkit():
    for model_id in WAN_IDS:
        spec = get_spec(model_id)
        shift, divisor, frames, fps, control = AITK[model_id]
        assert spec.scheduler.class_name == "FlowMatchEulerDiscreteScheduler", model_id
        assert (spec.scheduler.config["shift"], spec.scheduler.config["use_dynamic_shifting"]) == (shift, False)
        assert (spec.divisor, spec.video.num_frames, spec.video.fps, spec.video.frame_step) == (divisor, frames, fps, 4)
        assert spec.control_images == control and spec.guidance_kind == "cfg" and spec.uses_negative
        moe = model_id.startswith("wan22_14b")
        assert spec.lora_components == (("transformer", "transformer_2") if moe else ("transformer",))
        assert (spec.experts.boundary_ratio if spec.experts else None) == (0.875 if moe else None)


def test_t2v_snapped_and_equal_to_stock_euler(t2v, clean):
    """Sizes/frames snap (70 -> 64, 6 -> 5 frames), the result is [B, T, H, W, C] and equals
    diffusers' WanPipeline with Euler shift 3.0; the timesteps equal ai-toolkit's wan21 scheduler (schedulers.json)."""
    with open(os.path.join(GOLDENS_DIR, "schedulers.json")) as f:
        expected = json.load(f)["wan21"]["runs"]["steps4_w64_h64"]["timesteps"]
    calls, handles = spy_experts(t2v.pipe)
    try:
        first = run(t2v, width=70, num_frames=6, steps=4)
    finally:
        for h in handles:
            h.remove()
    assert (first.params.width, first.params.num_frames, first.params.fps) == (64, 5, 16)
    assert first.images.shape == (1, 5, 64, 64, 3) and first.is_video and first.images.dtype == np.float32
    assert sorted({t for _, t in calls}, reverse=True) == pytest.approx(expected, abs=1e-3)
    assert {name for name, _ in calls} == {"transformer"} and len(calls) == 8  # true CFG: two forwards per step
    np.testing.assert_array_equal(first.images, stock_call(t2v.pipe, 3.0, steps=4))
    assert set(first.timings) >= {"total", "denoise", "decode"}


@pytest.mark.parametrize("model_id", ["wan22_14b_t2v", "wan22_14b_i2v"])
def test_expert_switch_at_875_like_ai_toolkit(model_id, load_tiny, moe):
    """High-noise expert while t >= 875, for T2V and I2V (the tiny I2V checkpoint says 0.9, as the real one), with
    guidance_scale_2 = guidance; 6 steps put one timestep (883) between 875 and 900. Progress names the expert."""
    pipeline = moe if model_id == "wan22_14b_t2v" else load_tiny(model_id)
    assert pipeline.pipe.config.boundary_ratio == 0.875
    image = {"control_images": [control_image()]} if "i2v" in model_id else {}
    calls, handles = spy_experts(pipeline.pipe)
    stages = []
    try:
        ours = run(pipeline, steps=6, progress=lambda s, n: stages.append((s, pipeline.stage)), **image).images
    finally:
        for h in handles:
            h.remove()
    timesteps = aitk_timesteps(5.0, 6)
    assert any(875 <= t < 900 for t in timesteps)
    expected = [("transformer" if t >= 875 else "transformer_2", t) for t in timesteps for _ in range(2)]
    assert [n for n, _ in calls] == [n for n, _ in expected]
    assert [t for _, t in calls] == pytest.approx([t for _, t in expected], abs=1e-3)
    assert stages == [(i + 1, "high_noise" if t >= 875 else "low_noise") for i, t in enumerate(timesteps)] + [(6, "decode")]
    assert pipeline.stage == "done"
    if image:  # the I2V run is also checked against diffusers' own pipeline (T2V wiring is checked on wan21_1b)
        stock = stock_call(pipeline.pipe, 5.0, steps=6, guidance_scale_2=4.0,
                           image=control_image().resize((SIZE, SIZE), Image.LANCZOS))
        np.testing.assert_array_equal(ours, stock)


@pytest.mark.parametrize("model_id", ["wan21_i2v_14b", "wan22_5b"])
def test_image_conditioned_equals_stock(model_id, load_tiny):
    """Wan 2.1 I2V (CLIP image cross-attention) and TI2V-5B first-frame conditioning: the control image is
    LANCZOS-resized to the target size and goes through diffusers' WanImageToVideoPipeline."""
    from diffusers import WanImageToVideoPipeline

    pipeline = load_tiny(model_id)
    ours = run(pipeline, control_images=[control_image()])
    assert ours.images.shape == (1, FRAMES, SIZE, SIZE, 3)
    pipe = pipeline.pipe
    if model_id == "wan22_5b":
        assert pipe.config.expand_timesteps
        pipe = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                       scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True)
        pipe.set_progress_bar_config(disable=True)
        text_only = run(pipeline).images
        assert np.abs(text_only - ours.images).max() > 1e-3  # the image changes the video
    stock = stock_call(pipe, AITK[model_id][0], image=control_image().resize((SIZE, SIZE), Image.LANCZOS))
    np.testing.assert_array_equal(ours.images, stock)


def test_size_and_frame_snapping(load_tiny, t2v):
    five_b = load_tiny("wan22_5b")
    params = five_b.resolve_params("x", width=100, height=70)
    assert (params.width, params.height, params.num_frames, params.fps) == (96, 64, 121, 24)
    assert t2v.resolve_params("x", num_frames=44, fps=8).num_frames == 41


def test_original_wan_names_map_to_diffusers(t2v):
    """ai-toolkit.md §6.5: self_attn.q -> attn1.to_q, cross_attn.o -> attn2.to_out.0, ffn.0 -> ffn.net.0.proj,
    ffn.2 -> ffn.net.2, cross_attn.k_img -> attn2.add_k_proj; the patch tensors are untouched."""
    from aitk_inference.pipelines.lora.convert import wan_original_to_diffusers

    a, b = torch.randn(4, 24), torch.randn(24, 4)
    keys = {"self_attn.q": "attn1.to_q", "cross_attn.o": "attn2.to_out.0", "ffn.2": "ffn.net.2",
            "cross_attn.k_img": "attn2.add_k_proj", "ffn.0": "ffn.net.0.proj"}
    sd = {}
    for original in keys:
        sd[f"diffusion_model.blocks.3.{original}.lora_A.weight"] = a
        sd[f"diffusion_model.blocks.3.{original}.lora_B.weight"] = b
    converted = convert_ai_toolkit_lora(sd, "transformer", {}, wan_original_to_diffusers)
    assert set(converted.patches) == {("transformer", f"blocks.3.{d}") for d in keys.values()}
    patch = converted.patches[("transformer", "blocks.3.attn2.to_out.0")]
    torch.testing.assert_close(patch.delta(), b @ a)
    with pytest.raises(LoraFormatError, match=r"k_img/v_img.*wan21_i2v_14b"):
        convert_ai_toolkit_lora(sd, "transformer", {}, t2v.lora_name_mapper())


def test_lora_errors(t2v, moe, load_tiny, tmp_path, clean):
    i2v = load_tiny("wan21_i2v_14b")
    i2v_lora = save_lora(str(tmp_path / "i2v.safetensors"), original_wan_state_dict(i2v.pipe.transformer))
    assert i2v.set_loras([i2v_lora])[0]["modules"] == 24  # k_img/v_img included
    i2v.set_loras([])
    with pytest.raises(LoraFormatError, match=r"cross_attn.k_img/v_img.*text-to-video"):
        t2v.set_loras([i2v_lora])
    plain = save_lora(str(tmp_path / "style_high_noise.safetensors"),
                                    original_wan_state_dict(t2v.pipe.transformer))
    with pytest.raises(ValueError, match="single transformer"):
        t2v.set_loras([LoraRequest(path=plain, side="high")])
    unnamed = save_lora(str(tmp_path / "style.safetensors"), original_wan_state_dict(t2v.pipe.transformer))
    with pytest.raises(ValueError, match="side 'high' or 'low'"):
        moe.set_loras([unnamed])
    assert t2v.loras.active == {} and moe.loras.active == {}


def _expert_outputs(pipe):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8)
    text = torch.randn(1, 8, 32)
    with torch.inference_mode():
        return [getattr(pipe, n)(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                                 return_dict=False)[0] for n in ("transformer", "transformer_2")]


def test_lora_pair_goes_to_its_expert(moe, tmp_path, clean):
    """A *_high_noise file patches only `transformer`, a *_low_noise file only `transformer_2` (perturb one side: only
    that expert's output changes); a combined transformer_1/transformer_2 file equals the pair; strength 0 is base."""
    high_sd = original_wan_state_dict(moe.pipe.transformer, seed=1)
    low_sd = original_wan_state_dict(moe.pipe.transformer_2, seed=2)
    high = save_lora(str(tmp_path / "style_000000250_high_noise.safetensors"), high_sd)
    low = save_lora(str(tmp_path / "style_000000250_low_noise.safetensors"), low_sd)
    combined = {k.replace("diffusion_model.", "diffusion_model.transformer_1."): v for k, v in high_sd.items()}
    combined.update({k.replace("diffusion_model.", "diffusion_model.transformer_2."): v for k, v in low_sd.items()})
    combined = save_lora(str(tmp_path / "style_combined.safetensors"), combined)

    base_high, base_low = _expert_outputs(moe.pipe)
    moe.set_loras([high])
    out_high, out_low = _expert_outputs(moe.pipe)
    assert (out_high - base_high).abs().max() > 1e-3
    torch.testing.assert_close(out_low, base_low, rtol=0, atol=0)
    moe.set_loras([(low, 0.5)])
    out_high, out_low = _expert_outputs(moe.pipe)
    torch.testing.assert_close(out_high, base_high, rtol=0, atol=0)
    assert (out_low - base_low).abs().max() > 1e-3
    summary = moe.set_loras([high, low])
    assert [(s["components"], s["modules"]) for s in summary] == [(["transformer"], 20), (["transformer_2"], 20)]
    pair = _expert_outputs(moe.pipe)
    moe.set_loras([combined])
    for a, b in zip(_expert_outputs(moe.pipe), pair):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    moe.set_loras([(combined, 1.0, "low")])  # one half of a combined file
    out_high, out_low = _expert_outputs(moe.pipe)
    torch.testing.assert_close(out_high, base_high, rtol=0, atol=0)
    torch.testing.assert_close(out_low, pair[1], rtol=0, atol=1e-6)
    moe.set_loras([(high, 0.0), (low, 0.0)])
    for a, b in zip(_expert_outputs(moe.pipe), (base_high, base_low)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_original_wan_names_through_generate(t2v, tmp_path, clean):
    """A LoRA in ai-toolkit's original Wan names is renamed onto every block module and changes the frames."""
    lora = save_lora(str(tmp_path / "t2v.safetensors"), original_wan_state_dict(t2v.pipe.transformer))
    base = run(t2v).images
    t2v.set_loras([(lora, 1.0)])
    result = run(t2v)
    assert np.abs(result.images - base).max() > 1e-3
    assert result.loras[0]["layout"] == "peft+wan_names" and result.loras[0]["modules"] == 20


def test_video_writers(tmp_path):
    frames = np.random.default_rng(0).random((9, 32, 48, 3), dtype=np.float32)
    audio = (0.3 * np.sin(np.linspace(0, 2000, 16000, dtype=np.float32)))[None].repeat(2, 0)
    for name, fps, sound in (("a.mp4", 16, None), ("b.mp4", 24, audio)):
        path = write_video(frames, str(tmp_path / name), fps, audio=sound, sample_rate=16000 if sound is not None else None)
        with av.open(path) as container:
            video = container.streams.video[0]
            assert (video.codec_context.name, video.average_rate, video.width, video.height) == ("h264", fps, 48, 32)
            assert len(container.streams.audio) == (0 if sound is None else 1)
            if sound is not None:
                assert container.streams.audio[0].rate == 16000 and container.streams.audio[0].channels == 2
            assert sum(1 for _ in container.decode(video=0)) == 9
    webp = write_video(frames, str(tmp_path / "c.webp"), 16)
    with Image.open(webp) as im:
        assert im.n_frames == 9
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4", "c.webp"]  # no temporary files left behind
    with pytest.raises(ValueError, match="WEBP cannot carry the audio"):
        write_video(frames, str(tmp_path / "d.webp"), 16, audio=audio, sample_rate=16000)


def test_cli_generate_writes_mp4(tiny_dir, tmp_path, capsys):
    from aitk_inference.cli import main

    out = tmp_path / "clip.png"
    code = main(["generate", "--model", "wan21_1b", "--base", tiny_dir("wan21_1b"), "--device", "cpu", "--dtype", "fp32",
                 "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2", "--num-frames", "7",
                 "--fps", "12", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    with av.open(str(tmp_path / "clip.mp4")) as container:
        assert container.streams.video[0].average_rate == 12
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_compile_and_attention_kernel_apply_to_both_experts(load_tiny):
    """Wan 2.2 A14B's low-noise expert gets the same compile and attention settings as the high-noise one."""
    moe = load_tiny("wan22_14b_t2v", attention="sdpa_math")
    experts = moe.denoisers()
    assert [e is getattr(moe.pipe, n) for e, n in zip(experts, ("transformer", "transformer_2"))] == [True, True]
    for expert in experts:
        backends = {m.processor._attention_backend for m in expert.modules()
                    if hasattr(getattr(m, "processor", None), "_attention_backend")}
        assert backends == {"_native_math"}
    moe.compile_denoiser("regional", backend="eager")
    for expert in experts:
        assert all(block._compiled_call_impl is not None for block in expert.blocks)
    result = moe.generate(prompt="x", width=32, height=32, num_frames=5, steps=2)
    assert result.images.shape[:2] == (1, 5)


def test_wan22_i2v_first_frame_latent_is_ai_toolkits_posterior_draw(load_tiny):
    """Wan 2.2 A14B I2V: the transformer's first input (initial noise, mask channels, first-frame condition) equals
    what ai-toolkit's own preview code builds (goldens/wan22_i2v, MANIFEST §7) on the same tiny VAE, for two seeds;
    diffusers' stock pipeline (posterior mode) differs."""
    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import load_file

    folder = os.path.join(GOLDENS_DIR, "wan22_i2v")
    golden = load_file(os.path.join(folder, "aitk_i2v_latents.safetensors"))
    pipeline = load_tiny("wan22_14b_i2v")
    pipe = pipeline.pipe
    pipe.vae.load_state_dict(load_file(os.path.join(folder, "vae.safetensors")))
    control = Image.open(os.path.join(folder, "control.png")).convert("RGB")
    stock = WanImageToVideoPipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)

    def first_transformer_input(target, **call):
        seen = []

        def stop(module, args, kwargs):
            seen.append(kwargs["hidden_states"].clone())
            raise InterruptedError

        handle = target.transformer.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with pytest.raises(InterruptedError):
                call["run"]()
        finally:
            handle.remove()
        return seen[0]

    for seed in (42, 7):
        ours = first_transformer_input(pipe, run=lambda: pipeline.generate(
            "x", width=96, height=64, num_frames=5, steps=2, seed=seed, control_images=[control]))
        expected = golden[f"seed{seed}_latents"]
        assert ours.shape == expected.shape == (1, 36, 2, 8, 12)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        theirs = first_transformer_input(stock, run=lambda: stock(
            prompt="x", image=control.resize((96, 64), Image.LANCZOS), width=96, height=64, num_frames=5,
            num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent"))
        torch.testing.assert_close(theirs[:, :20], expected[:, :20], rtol=0, atol=1e-6)  # noise and mask agree
        assert (theirs[:, 20:] - expected[:, 20:]).abs().max() > 1e-3  # the mode is not ai-toolkit's draw
