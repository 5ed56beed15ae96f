"""ERNIE-Image against ai-toolkit's own code (goldens in ``tests/goldens/ernie_image``, MANIFEST "ernie_image").

ai-toolkit samples ERNIE-Image with its own copy of the transformer and diffusers' ``ErnieImagePipeline`` at the
diffusers commit it pins; we run diffusers 0.42's classes. On the same tiny weights this checks: the transformer's
output, the schedule, everything the transformer receives while sampling (initial noise, timesteps, prompt and
negative embeddings), its first prediction and the final latents after the CFG combination and Euler steps, the size
floor, and the LoRA and LoKr files ai-toolkit saves for this arch (every module matched, live and merged outputs).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
from aitk_inference.pipelines.registry import REGISTRY
from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "ernie_image")
# fp32. The tiny model's predictions and latents reach about 8 in magnitude, so summation-order differences scale with
# them: absolute 1e-5 plus relative 1e-5 (the largest differences seen are 1e-6 on the transformer outputs and 7e-6 on
# the final latents).
ATOL = RTOL = 1e-5
LORA_FILES = [("lora_r4_fp16", "tiny_ernie_lora_r4_fp16.safetensors"),
              ("lokr_default", "tiny_ernie_lokr_default.safetensors")]


def _json(name):
    with open(os.path.join(ROOT, name)) as f:
        return json.load(f)


def golden_transformer():
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(**_json("transformer_config.json")).eval()
    model.load_state_dict(load_file(os.path.join(ROOT, "transformer.safetensors")), strict=True)
    return model


def forward(model):
    with torch.no_grad():
        return model(**load_file(os.path.join(ROOT, "inputs.safetensors")), return_dict=False)[0]


@pytest.fixture(scope="module")
def golden_pipeline(load_tiny):
    """The tiny ernie_image pipeline with ai-toolkit's golden transformer and text encoder weights."""
    pipeline = load_tiny("ernie_image")
    pipeline.pipe.transformer.load_state_dict(load_file(os.path.join(ROOT, "transformer.safetensors")), strict=True)
    pipeline.pipe.text_encoder.load_state_dict(load_file(os.path.join(ROOT, "text_encoder.safetensors")), strict=True)
    return pipeline


def _record(pipeline, **generate):
    """generate() with hooks: what the transformer receives and returns at each call, and the scheduler's last
    ``prev_sample`` (the final latents before the VAE)."""
    transformer, scheduler = pipeline.pipe.transformer, pipeline.pipe.scheduler
    calls, steps = [], []

    def pre(module, args, kwargs):
        calls.append({k: kwargs[k].detach().clone() for k in ("hidden_states", "timestep", "text_bth", "text_lens")})

    def post(module, args, kwargs, output):
        calls[-1]["output"] = output[0].detach().clone()

    original_step = scheduler.step

    def step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        steps.append(out.prev_sample.detach().clone())
        return out

    handles = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
               transformer.register_forward_hook(post, with_kwargs=True)]
    scheduler.step = step
    try:
        result = pipeline.generate(**generate)
    finally:
        del scheduler.step
        for handle in handles:
            handle.remove()
    return result, calls, steps


# ------------------------------------------------------------------------------------------------------ transformer
def test_diffusers_transformer_equals_ai_toolkits():
    """ai-toolkit's batch-first copy of the transformer and diffusers' class, same weights, a batch of two with
    different text lengths (masked padding) and timesteps."""
    golden = load_file(os.path.join(ROOT, "lora_r4_fp16", "outputs.safetensors"))["base_output"]
    torch.testing.assert_close(forward(golden_transformer()), golden, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------------- schedule
def test_registry_scheduler_is_ai_toolkits():
    ours = dict(REGISTRY["ernie_image"].scheduler.config)
    assert REGISTRY["ernie_image"].scheduler.class_name == "FlowMatchEulerDiscreteScheduler"
    assert ours == _json("schedules.json")["scheduler_config"]


@pytest.mark.parametrize("key", list(_json("schedules.json")["runs"]))
def test_schedule_matches_ai_toolkit(key, golden_pipeline):
    """The sigmas the pipeline passes to ``set_timesteps`` and the resulting timesteps/sigmas (spy on the call)."""
    import re

    steps, width, height = map(int, re.match(r"steps(\d+)_w(\d+)_h(\d+)$", key).groups())
    run = _json("schedules.json")["runs"][key]
    scheduler = golden_pipeline.pipe.scheduler
    seen = {}

    class Captured(Exception):
        pass

    original = scheduler.set_timesteps

    def spy(*args, **kwargs):
        original(*args, **kwargs)
        seen.update(sigmas_in=kwargs["sigmas"], timesteps=scheduler.timesteps.clone(), sigmas=scheduler.sigmas.clone())
        raise Captured

    scheduler.set_timesteps = spy
    try:
        with pytest.raises(Captured):
            golden_pipeline.generate(prompt="a photo", width=width, height=height, steps=steps, seed=42)
    finally:
        del scheduler.set_timesteps
    torch.testing.assert_close(torch.as_tensor(seen["sigmas_in"], dtype=torch.float32),
                               torch.tensor(run["sigmas_in"]), rtol=0, atol=0)
    torch.testing.assert_close(seen["sigmas"], torch.tensor(run["sigmas"]), rtol=0, atol=0)
    torch.testing.assert_close(seen["timesteps"], torch.tensor(run["timesteps"]), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", list(_json("report.json")["sampling"]))
def test_sampling_matches_ai_toolkit(name, golden_pipeline, load_tiny):
    """ai-toolkit's generate_images (prompt "a photo", empty negative, seed 42) against our generate(): the noise,
    each call's timesteps and embeddings, the first prediction and the final latents; the size ai-toolkit floors to.
    bf16: the initial noise only (drawn in the transformer dtype)."""
    info = _json("report.json")["sampling"][name]
    golden = load_file(os.path.join(ROOT, "sampling.safetensors"))
    pipeline = load_tiny("ernie_image", dtype="bf16") if name.startswith("bf16") else golden_pipeline
    width, height = info["requested"]
    result, calls, steps = _record(pipeline, prompt=info["prompt"], negative=info["negative"], width=width,
                                   height=height, steps=info["steps"], guidance=info["guidance"], seed=42)
    assert [result.width, result.height] == info["sampled"]
    if name.startswith("bf16"):
        assert torch.equal(calls[0]["hidden_states"][:1], golden[f"{name}_noise"])
        return
    assert len(calls) == info["transformer_calls"]
    assert torch.equal(calls[0]["hidden_states"], golden[f"{name}_call0_hidden_states"])  # the seed-42 draw
    for i, call in enumerate(calls):
        for key in ("hidden_states", "timestep", "text_bth", "text_lens", "output"):
            if f"{name}_call{i}_{key}" in golden:
                torch.testing.assert_close(call[key], golden[f"{name}_call{i}_{key}"], rtol=RTOL, atol=ATOL,
                                           msg=f"{name} call {i} {key}")
    torch.testing.assert_close(steps[-1], golden[f"{name}_final_latents"], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant,filename", LORA_FILES)
def test_lora_file_reproduces_ai_toolkit_outputs(variant, filename, mode):
    """The file ai-toolkit saved (``diffusion_model.`` + diffusers names) loads with every module matched and gives
    ai-toolkit's outputs: live network (dynamic mode) or merged (fused mode), at 1.0 and after a change to 0.5."""
    folder = os.path.join(ROOT, variant)
    golden = load_file(os.path.join(folder, "outputs.safetensors"))
    path = os.path.join(folder, filename)
    flavour = "live" if mode == "dynamic" else "merged"
    file_modules = {key.rsplit(".", 2)[0] if ".lora_" in key else key.rsplit(".", 1)[0] for key in load_file(path)}
    assert len(file_modules) == _json("report.json")[variant]["n_modules"] == 14

    model = golden_transformer()
    torch.testing.assert_close(forward(model), golden["base_output"], rtol=RTOL, atol=ATOL)
    stack = LoraStack({"transformer": model}, mode, "transformer", "ernie_image")
    summary = stack.set([LoraRequest(path=path, strength=1.0)])
    assert summary[0]["modules"] == len(file_modules)
    torch.testing.assert_close(forward(model), golden[f"lora_{flavour}_m1.0"], rtol=RTOL, atol=ATOL)
    if mode == "fused":
        for name, weight in load_file(os.path.join(folder, "effective_weights_m1.0.safetensors")).items():
            torch.testing.assert_close(model.get_parameter(name), weight, rtol=RTOL, atol=ATOL, msg=name)
    stack.set([LoraRequest(path=path, strength=0.5)])
    torch.testing.assert_close(forward(model), golden[f"lora_{flavour}_m0.5"], rtol=RTOL, atol=ATOL)
    stack.clear()
    torch.testing.assert_close(forward(model), golden["base_output"], rtol=RTOL, atol=ATOL)


def test_lora_signature_names_the_family():
    """An ERNIE-Image LoRA is recognised as one; given to another model it is refused with ERNIE-Image named, and
    another family's LoRA given to ERNIE-Image is refused with that family named."""
    from diffusers import FluxTransformer2DModel

    ernie_lora = os.path.join(ROOT, *LORA_FILES[0])
    assert guess_architecture(load_file(ernie_lora)) == "ERNIE-Image"
    flux = FluxTransformer2DModel.from_pretrained(os.path.join(GOLDENS_DIR, "lora_flux", "base_transformer"))
    with pytest.raises(LoraFormatError, match="ERNIE-Image"):
        LoraStack({"transformer": flux}, "dynamic", "transformer", "flux").set([LoraRequest(path=ernie_lora)])
    flux_lora = os.path.join(GOLDENS_DIR, "lora_flux", "lora_r4_a2_fp16", "tiny_flux_lora_r4_a2_fp16.safetensors")
    with pytest.raises(LoraFormatError, match="FLUX.1"):
        LoraStack({"transformer": golden_transformer()}, "dynamic", "transformer", "ernie_image").set(
            [LoraRequest(path=flux_lora)])


# ------------------------------------------------------------------------------------------------ prompt enhancer
def test_prompt_enhancer_is_neither_loaded_nor_used(golden_pipeline, monkeypatch):
    """ai-toolkit builds its pipeline without the checkpoint's prompt enhancer, so prompts are never rewritten: we
    load it as None and, should a pipeline carry one anyway, call with use_pe=False."""
    from aitk_inference.pipelines.base import AITKPipeline
    from aitk_inference.pipelines.families.ernie_image import ErnieImageFamilyPipeline

    seen = {}
    monkeypatch.setattr(AITKPipeline, "load_diffusers_pipeline",
                        classmethod(lambda cls, spec, source, torch_dtype, **overrides: seen.update(overrides)))
    ErnieImageFamilyPipeline.load_diffusers_pipeline(REGISTRY["ernie_image"], "baidu/ERNIE-Image", torch.float32)
    assert seen["pe"] is None and seen["pe_tokenizer"] is None

    class Enhancer(torch.nn.Linear):  # a stand-in chat model: pipelines read a component's .device
        device = torch.device("cpu")

    pipe = golden_pipeline.pipe
    monkeypatch.setattr(pipe, "pe", Enhancer(1, 1))
    monkeypatch.setattr(pipe, "pe_tokenizer", pipe.tokenizer)

    def rewrite(*args, **kwargs):
        raise AssertionError("the prompt was sent to the prompt enhancer")

    monkeypatch.setattr(pipe, "_enhance_prompt_with_pe", rewrite)
    result = golden_pipeline.generate(prompt="a photo", width=64, height=64, steps=1, seed=42)
    assert result.images.shape == (1, 64, 64, 3)
