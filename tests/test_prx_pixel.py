"""PRXPixel against ai-toolkit's own PRX pixel code (goldens in tests/goldens/prx_pixel; see its MANIFEST section).

The goldens hold a tiny checkpoint (ai-toolkit's vendored transformer class, a Qwen3-VL text model), ai-toolkit's
forward of that transformer, four whole generations through its ``BaseModel.generate_images`` and the LoRA / LoKr files
its network saved for this arch with the outputs it computed. Here the same weights run through diffusers'
``PRXTransformer2DModel`` and our pipeline.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR, assert_lora_file_reproduces_ai_toolkit, lora_file_modules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "prx_pixel")
ATOL = 1e-5  # float32; ai-toolkit runs the guidance passes one by one, we batch them
LORA_ATOL = 1e-6  # ai-toolkit's own live and merged outputs differ by up to 1.5e-7


def golden(name="generation.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ROOT, "report.json")) as f:
        return json.load(f)


def golden_transformer():
    from diffusers import PRXTransformer2DModel

    return PRXTransformer2DModel.from_pretrained(os.path.join(ROOT, "checkpoint", "transformer")).eval()


@pytest.fixture(scope="module")
def golden_pipeline(tmp_path_factory):
    """Our family pipeline on the golden checkpoint (loaded through the normal load path)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline
    from transformers import Qwen3VLTextModel

    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.pipelines.registry import PRX_FLOWMATCH
    from aitk_inference.tiny.tokenizers import qwen_tokenizer

    folder = str(tmp_path_factory.mktemp("prx_golden_pipeline"))
    PRXPixelPipeline(
        transformer=golden_transformer(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(PRX_FLOWMATCH),
        text_encoder=Qwen3VLTextModel.from_pretrained(os.path.join(ROOT, "checkpoint", "text_encoder")),
        tokenizer=qwen_tokenizer(),
    ).save_pretrained(folder)
    return load_pipeline("prx_pixel", base=folder, device="cpu", dtype="fp32")


def test_transformer_forward_matches_ai_toolkit():
    """diffusers' PRXTransformer2DModel on ai-toolkit's weights gives its vendored class's output (padding mask,
    batch of 2, non-square, two timesteps)."""
    data = golden()
    inputs = {k[len("forward_"):]: v for k, v in data.items() if k.startswith("forward_") and k != "forward_output"}
    with torch.no_grad():
        output = golden_transformer()(**inputs, return_dict=False)[0]
    torch.testing.assert_close(output, data["forward_output"], rtol=0, atol=ATOL)


def test_prompt_encoding_matches_ai_toolkit(golden_pipeline, report):
    """256 tokens, padded, not cleaned (the prompt has an HTML entity the stock pipeline would unescape)."""
    data = golden()
    pipe = golden_pipeline.pipe
    for name, text in (("prompt", report["prompt"]), ("negative", report["negative"])):
        ids = pipe.tokenizer([text], padding="max_length", max_length=256, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, data[f"{name}_input_ids"]), name
        with torch.no_grad():
            embeds, mask = pipe.encode_prompts([text], torch.float32)
        assert torch.equal(mask.long(), data[f"{name}_mask"]), name
        torch.testing.assert_close(embeds, data[f"{name}_embeds"], rtol=0, atol=ATOL, msg=name)


# golden key -> (width, height, steps, guidance): CFG; non-square, 3 steps; no guidance pass at 1; guidance below 1
GENERATIONS = {"w64_h64_steps2_g4.0": (64, 64, 2, 4.0), "w96_h64_steps3_g4.0": (96, 64, 3, 4.0),
               "w64_h64_steps2_g1.0": (64, 64, 2, 1.0), "w64_h64_steps2_g0.5": (64, 64, 2, 0.5)}


@pytest.mark.parametrize("key", list(GENERATIONS))
def test_whole_generation_matches_ai_toolkit(key, golden_pipeline, report):
    """Seed 42 through generate(): the noise, the flow times the transformer gets, the number of passes, the final
    pixels and the 8-bit image equal what ai-toolkit's generate_images produced."""
    data = golden()
    width, height, steps, guidance = GENERATIONS[key]
    transformer = golden_pipeline.pipe.transformer
    calls = []
    original = transformer.forward

    def spy(*args, **kwargs):
        calls.append({"hidden_states": kwargs["hidden_states"].clone(), "timestep": kwargs["timestep"].clone()})
        return original(*args, **kwargs)

    transformer.forward = spy
    try:
        result = golden_pipeline.generate(report["prompt"], negative=report["negative"], width=width, height=height,
                                          steps=steps, guidance=guidance, seed=42)
    finally:
        del transformer.forward
    fed = data[f"{key}_timesteps_fed"].flatten()
    passes = 2 if guidance != 1.0 else 1
    assert len(fed) == steps * passes and len(calls) == steps  # ai-toolkit: one pass per prompt; we batch them
    for call, expected in zip(calls, fed[::passes]):
        assert torch.equal(call["timestep"], expected.expand(passes))
    if f"{key}_initial_noise" in data:
        assert torch.equal(calls[0]["hidden_states"][:1], data[f"{key}_initial_noise"])
    final = data[f"{key}_final_latents"]
    expected_image = ((final.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(result.images, expected_image, rtol=0, atol=ATOL)
    ours_uint8 = np.asarray(result.to_pil()[0], dtype=np.int16)
    assert np.abs(ours_uint8 - data[f"{key}_image_uint8"].numpy().astype(np.int16)).max() <= 1


def test_noise_is_float32_whatever_the_dtype(load_tiny):
    """ai-toolkit draws the noise in float32 and keeps the latents there; a bf16 model gets the same noise."""
    noise = golden()["w96_h64_steps3_g4.0_initial_noise"]
    pipeline = load_tiny("prx_pixel", dtype="bf16")
    seen = {}

    class Captured(Exception):
        pass

    def capture(model_output, timestep, sample, **kwargs):
        seen["latents"] = sample.clone()
        raise Captured

    pipeline.pipe.scheduler.step = capture
    with pytest.raises(Captured):
        pipeline.generate("a photo", width=96, height=64, steps=2, seed=42)
    assert seen["latents"].dtype == torch.float32 and torch.equal(seen["latents"], noise)


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", ["lora_r4_a2", "lokr_default"])
def test_ai_toolkit_lora_file_matches_every_module_and_its_outputs(variant, mode, report):
    """The file ai-toolkit's network saved for this arch loads with every module matched; at 1.0 and 0.5 it gives
    ai-toolkit's outputs, fused weights equal its merge, and removing it restores the base."""


    folder = os.path.join(ROOT, variant)
    path = os.path.join(folder, f"tiny_prx_{variant}.safetensors")
    outputs, inputs = golden(os.path.join(variant, "outputs.safetensors")), golden("lora_inputs.safetensors")
    assert len(lora_file_modules(path)) == report["lora"][variant]["n_modules"] == 14
    model = golden_transformer()

    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    assert_lora_file_reproduces_ai_toolkit(
        model, forward, mode, "prx_pixel", path, outputs,
        lambda: golden(os.path.join(variant, "effective_weights_m1.0.safetensors")), ATOL, LORA_ATOL)


def test_lora_of_another_family_is_refused_with_its_family_named(pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    pipe = pipes("prx_pixel")
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'prx_pixel'.*FLUX.1"):
        pipe.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    prx_lora = os.path.join(ROOT, "lora_r4_a2", "tiny_prx_lora_r4_a2.safetensors")
    with pytest.raises(LoraFormatError, match="PRXPixel"):
        pipes("flux").set_loras([LoraRequest(path=prx_lora)])
    assert pipe.loras.describe() == []


def test_negative_prompt_runs_below_guidance_one(pipes):
    """ai-toolkit applies guidance whenever it is not 1: at 0.5 the negative prompt matters, at 1 it does not."""
    pipe = pipes("prx_pixel")
    fast = dict(width=64, height=64, steps=2, seed=3)
    for guidance, matters in ((0.5, True), (1.0, False)):
        plain = pipe.generate("a red fox", negative="", guidance=guidance, **fast).images
        negative = pipe.generate("a red fox", negative="blurry", guidance=guidance, **fast).images
        assert (np.abs(plain - negative).max() > 1e-6) == matters == pipe.spec.negative_has_effect(guidance)


def test_every_linear_loads_for_a_whole_model_lora():
    """A job with ``transformer_only: false`` trains every Linear (patch and text projections, time and resolution
    embedders, final layer): ai-toolkit saves them under the same diffusers names, so all of them match."""
    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
    from aitk_inference.tiny.loras import make_state_dict

    model = golden_transformer()
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert any(not name.startswith("blocks.") for name, _ in targets)
    stack = LoraStack({"transformer": model}, "dynamic", "transformer", "prx_pixel")
    request = LoraRequest(state_dict=make_state_dict("peft_diffusion_model", targets), name="all_linears")
    assert stack.set([request])[0]["modules"] == len(targets)
