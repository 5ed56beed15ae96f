"""SD 1.5 and SDXL on tiny random-weight pipelines: ai-toolkit's sampling wiring and kohya LoRAs (unet, LoCon convs,
text encoders) checked against direct computations."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aitk_inference.pipelines.lora.stack import LoraRequest
from aitk_inference.pipelines.lora.convert import LoraFormatError
from aitk_inference.tiny.loras import kohya_reference_deltas, kohya_targets, make_kohya_state_dict, write_kohya_lora

MODEL_IDS = ("sd15", "sdxl")
SIZE, STEPS = 64, 2

# ai-toolkit toolkit/sampler.py sd_config, restated independently of the registry, as DDPMScheduler reads it.
AITK_DDPM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)
# ai-toolkit passes that scheduler to StableDiffusionPipeline(...), whose __init__ rewrites steps_offset to 1; the SDXL
# pipeline keeps 0 (ai-toolkit's own SD 1.x run: tests/goldens/e2e/sd15)
AITK_STEPS_OFFSET = {"sd15": 1, "sdxl": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MODEL_IDS)
def model_id(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(model_id, load_tiny):
    return load_tiny(model_id)


@pytest.fixture(scope="module")
def fused_pipe(model_id, load_tiny):
    return load_tiny(model_id, lora_mode="fused")


@pytest.fixture
def clean(pipe):
    pipe.set_loras([])
    yield pipe
    pipe.set_loras([])


def run(pipeline, **kwargs):
    kwargs = {"prompt": "a photo of a cat", "width": SIZE, "height": SIZE, "steps": STEPS, "seed": 7, **kwargs}
    return pipeline.generate(**kwargs).images


def test_registry_defaults_and_sampling_setup(pipe, model_id):
    from diffusers import DDPMScheduler

    spec = pipe.spec
    assert (spec.steps, spec.guidance, spec.divisor, spec.guidance_kind, spec.uses_negative) == (30, 6.0, 8, "cfg", True)
    assert (spec.width, spec.height) == ((512, 512) if model_id == "sd15" else (1024, 1024))
    assert pipe.denoiser == "unet"
    scheduler = pipe.pipe.scheduler
    assert isinstance(scheduler, DDPMScheduler)
    aitk_ddpm = {**AITK_DDPM, "steps_offset": AITK_STEPS_OFFSET[model_id]}
    assert {k: scheduler.config[k] for k in aitk_ddpm} == aitk_ddpm
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == ([751, 501, 251, 1] if model_id == "sd15" else [750, 500, 250, 0])
    if model_id == "sdxl":
        assert pipe.pipe.config.force_zeros_for_empty_prompt is False
        assert pipe.pipe.watermark is None
    else:
        assert pipe.pipe.safety_checker is None


def test_matches_ai_toolkit_sample_call(clean, model_id):
    """Our generate() equals ai-toolkit's call: DDPM from its own config (steps_offset as its pipeline leaves it),
    prompt and empty negative
    each encoded (never zeroed), embeddings passed in, noise from torch.manual_seed(seed) (the global CPU RNG)."""
    from diffusers import DDPMScheduler

    ours = run(clean, negative="")
    sd = clean.pipe
    kept = sd.scheduler
    sd.scheduler = DDPMScheduler(**{**AITK_DDPM, "steps_offset": AITK_STEPS_OFFSET[model_id]})
    try:
        with torch.inference_mode():
            if model_id == "sdxl":
                pe, _, pooled, _ = sd.encode_prompt("a photo of a cat", device="cpu", do_classifier_free_guidance=False)
                ne, _, npooled, _ = sd.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
                embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne,
                              negative_pooled_prompt_embeds=npooled, guidance_rescale=0.0)
            else:
                pe, _ = sd.encode_prompt("a photo of a cat", "cpu", 1, False)
                ne, _ = sd.encode_prompt("", "cpu", 1, False)
                embeds = dict(prompt_embeds=pe, negative_prompt_embeds=ne)
            theirs = sd(**embeds, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=6.0,
                        generator=torch.manual_seed(7), output_type="np").images
    finally:
        sd.scheduler = kept
    np.testing.assert_array_equal(ours, theirs)


def test_noise_comes_only_from_the_seed(clean):
    torch.manual_seed(1)
    first = run(clean)
    torch.manual_seed(12345)  # the global RNG must not matter: DDPM's per-step noise comes from our seeded generator
    torch.rand(100)
    np.testing.assert_array_equal(run(clean), first)


def test_size_snaps_down_to_multiple_of_8(clean):
    result = clean.generate(prompt="x", width=100, height=70, steps=1, seed=1)
    assert (result.params.width, result.params.height) == (96, 64)
    assert result.images.shape == (1, 64, 96, 3)


def _resolve(pipeline, key):
    """(component module, module path) of a kohya key, resolved here independently of the converter."""
    for prefix, component in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                              ("lora_te_", "text_encoder")):
        if key.startswith(prefix):
            module = getattr(pipeline.pipe, component)
            names = {n.replace(".", "_"): n for n, _ in module.named_modules()}
            return module, names[key[len(prefix):]]
    raise AssertionError(key)


def _kind(weight):
    return "linear" if weight.dim() == 2 else f"conv{weight.shape[-1]}x{weight.shape[-2]}"


def _few_of_each_kind(targets, per_kind=3):
    """Up to ``per_kind`` targets per (key prefix, module kind): every variant covered, PEFT injection kept fast."""
    counts, chosen = {}, []
    for key, module in targets:
        group = (key.split("_")[1], _kind(module.weight))
        if counts.get(group, 0) < per_kind:
            counts[group] = counts.get(group, 0) + 1
            chosen.append((key, module))
    return chosen


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("alpha,conv_alpha", [(1.0, 1.0), (8.0, 1.0), (None, None)], ids=["alpha1", "alpha8", "no_alpha"])
def test_kohya_variants_give_the_direct_delta(request, model_id, mode, alpha, conv_alpha):
    """unet Linear, 1x1 conv, 3x3 LoCon conv and text-encoder modules, each with alpha/rank scaling (missing alpha:
    scale 1), equal a direct computation of strength * (alpha / rank) * up . down in both LoRA modes."""
    pipeline = request.getfixturevalue("pipe" if mode == "dynamic" else "fused_pipe")
    pipeline.set_loras([])
    targets = _few_of_each_kind(kohya_targets(pipeline.pipe, conv3x3=True, text_encoders=True))
    state_dict = make_kohya_state_dict(targets, rank=4, alpha=alpha, conv_rank=2, conv_alpha=conv_alpha, seed=3)
    expected = kohya_reference_deltas(state_dict)
    before = {key: module.weight.detach().clone() for key, module in targets}
    strength = 0.7
    summary = pipeline.set_loras([LoraRequest(state_dict=state_dict, strength=strength, name="kohya")])
    wanted_components = {"unet", "text_encoder"} | ({"text_encoder_2"} if model_id == "sdxl" else set())
    assert summary[0]["modules"] == len(targets) and set(summary[0]["components"]) == wanted_components

    kinds = set()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, _ in targets:
            component, path = _resolve(pipeline, key)
            module = component.get_submodule(path)
            delta = strength * expected[key]
            kinds.add((key.split("_")[1], _kind(delta)))
            if mode == "fused":
                torch.testing.assert_close(module.weight - before[key], delta, rtol=1e-4, atol=1e-6)
                continue
            base = module.base_layer
            if delta.dim() == 2:
                x = torch.randn(3, delta.shape[1], generator=gen)
                want = F.linear(x, delta)
            else:
                x = torch.randn(1, delta.shape[1], 6, 6, generator=gen)
                want = F.conv2d(x, delta, stride=base.stride, padding=base.padding)
            torch.testing.assert_close(module(x) - base(x), want, rtol=1e-4, atol=1e-5)
    te_prefixes = {"te1", "te2"} if model_id == "sdxl" else {"te"}
    assert {("unet", "linear"), ("unet", "conv1x1"), ("unet", "conv3x3")} <= kinds
    assert {p for p, _ in kinds if p != "unet"} == te_prefixes

    pipeline.set_loras([])
    for key, module in targets:
        if mode == "dynamic":  # PEFT layers removed: the original modules are back, bit for bit
            assert torch.equal(module.weight, before[key])
        else:
            torch.testing.assert_close(module.weight, before[key], rtol=0, atol=1e-6)


def test_fused_equals_dynamic_for_kohya_files(clean, fused_pipe, tmp_path):
    """Kohya files with LoCon 3x3 convs and text-encoder modules: merged equals live adapters to float32 rounding."""
    targets = kohya_targets(clean.pipe, conv3x3=True, text_encoders=True)
    lora = write_kohya_lora(str(tmp_path / "lora.safetensors"), targets, seed=0, rank=4, alpha=1.0)
    clean.set_loras([(lora, 0.8)])
    fused_pipe.set_loras([(lora, 0.8)])
    try:
        dynamic, fused = run(clean), run(fused_pipe)
        assert np.abs(dynamic - run(clean, prompt="x")).max() > 1e-3
        np.testing.assert_allclose(fused, dynamic, rtol=0, atol=1e-4)
    finally:
        fused_pipe.set_loras([])


def test_flux_lora_is_refused_naming_flux(clean):
    g = torch.Generator().manual_seed(0)
    flux = {f"transformer.single_transformer_blocks.0.attn.to_{p}.lora_{ab}.weight": torch.randn(4, 32, generator=g)
            if ab == "A" else torch.randn(32, 4, generator=g) for p in "qkv" for ab in "AB"}
    with pytest.raises(LoraFormatError, match="FLUX"):
        clean.set_loras([LoraRequest(state_dict=flux, name="flux_lora")])
    assert clean.loras.describe() == []


def test_demo_and_make_tiny_cli(model_id, tiny_cache, pipe, tmp_path):
    from PIL import Image

    from aitk_inference.cli import main

    if model_id == "sdxl":
        out = tmp_path / "demo.png"
        assert main(["demo", "--model", "sdxl", "--out", str(out), "--quiet"]) == 0
        with Image.open(out) as image:
            assert image.size == (64, 64)
            assert json.loads(image.text["parameters"])["model"] == "sdxl"

    folder = tmp_path / "tiny"
    assert main(["make-tiny", "--model", model_id, "--out", str(folder)]) == 0
    files = sorted(os.listdir(folder / "loras"))
    assert files == ["tiny_kohya.safetensors", "tiny_kohya_locon.safetensors", "tiny_kohya_te.safetensors"]
    pipe.set_loras([])
    try:
        for name in files:
            summary = pipe.set_loras([str(folder / "loras" / name)])[0]
            assert summary["layout"] == "kohya"
            assert ("text_encoder" in summary["components"]) == (name == "tiny_kohya_te.safetensors")
    finally:
        pipe.set_loras([])


def test_sdxl_second_encoder_negative_and_guidance_rescale(pipes):
    """``negative_2`` reaches SDXL's second text encoder only and ``guidance_rescale`` the pipeline, as ai-toolkit's
    previews pass them (goldens/prompt_flags.json); the output equals the stock pipeline's given the same values."""
    pipeline = pipes("sdxl")
    call = dict(prompt="a photo of a cat", negative="blurry", width=SIZE, height=SIZE, steps=STEPS, seed=7)
    plain = pipeline.generate(**call).images
    np.testing.assert_array_equal(pipeline.generate(negative_2="blurry", **call).images, plain)
    for options in ({"negative_2": "cartoon"}, {"guidance_rescale": 0.7}):
        ours = pipeline.generate(**call, **options).images
        assert not np.array_equal(ours, plain), options
        stock = pipeline.pipe(
            prompt="a photo of a cat", negative_prompt="blurry", negative_prompt_2=options.get("negative_2"),
            guidance_rescale=options.get("guidance_rescale", 0.0), width=SIZE, height=SIZE,
            num_inference_steps=STEPS, guidance_scale=pipeline.spec.guidance,
            generator=torch.Generator("cpu").manual_seed(7), output_type="np",
        ).images
        np.testing.assert_allclose(ours, stock, atol=1e-6)
    # an empty second negative (a job without `neg` whose prompt has `--n`), which the stock pipeline would replace by
    # the first: the unconditional embeddings are the first encoder's "blurry" and the second encoder's ""
    pipe = pipeline.pipe
    blurry, _, _, _ = pipe.encode_prompt(prompt="blurry", device="cpu", do_classifier_free_guidance=False)
    empty, _, empty_pooled, _ = pipe.encode_prompt(prompt="", device="cpu", do_classifier_free_guidance=False)
    width = pipe.text_encoder.config.hidden_size
    assert not torch.equal(blurry[..., width:], empty[..., width:])
    stock = pipe(
        prompt="a photo of a cat", negative_prompt_embeds=torch.cat([blurry[..., :width], empty[..., width:]], -1),
        negative_pooled_prompt_embeds=empty_pooled, width=SIZE, height=SIZE, num_inference_steps=STEPS,
        guidance_scale=pipeline.spec.guidance, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
    ).images
    np.testing.assert_allclose(pipeline.generate(negative_2="", **call).images, stock, atol=1e-6)
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipeline.generate(guidance_rescale=1.5, **call)
    with pytest.raises(ValueError, match="takes none"):
        pipes("sd15").generate(negative_2="cartoon", **call)
