"""Chroma Radiance against ai-toolkit's own chroma_radiance code (goldens in tests/goldens/chroma_radiance; see its
MANIFEST section).

The goldens hold a tiny checkpoint in original names (saved from ai-toolkit's ``Chroma`` radiance module) with a tiny
T5, ai-toolkit's forward of that module, the schedules its pipeline sets, three whole generations through its
``BaseModel.generate_images`` and the LoRA / LoKr files its network saved for this arch with the outputs it computed.
Here the same weights run through our ``ChromaRadianceTransformer2DModel`` and pipeline.
"""

import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR, assert_lora_file_reproduces_ai_toolkit, lora_file_modules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "chroma_radiance")
CHECKPOINT = os.path.join(ROOT, "checkpoint", "chroma_radiance_tiny.safetensors")
ATOL = 1e-5  # float32; ai-toolkit runs the guidance passes one by one, we batch them
LORA_ATOL = 1e-6  # ai-toolkit's own live and merged outputs differ by up to 6e-8


def golden(name="generation.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ROOT, "report.json")) as f:
        return json.load(f)


def attended(token_mask: torch.Tensor) -> torch.Tensor:
    """ai-toolkit's transformer mask from its token mask: the tokens plus the first padding token."""
    lengths = token_mask.sum(dim=1, keepdim=True)
    return (torch.arange(token_mask.shape[1])[None] < lengths + 1).long()


def golden_transformer():
    """The golden checkpoint file (original names) loaded with ``load_state_dict`` as it is."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families.chroma_radiance_transformer import (
        ChromaRadianceTransformer2DModel, config_from_state_dict,
    )

    state = load_file(CHECKPOINT)
    model = ChromaRadianceTransformer2DModel(**config_from_state_dict(state, axes_dim=(4, 6, 6)))
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def golden_pipeline(tmp_path_factory):
    """Our family pipeline on the golden checkpoint: read from the single file with its T5 (from_checkpoint), saved,
    then loaded through the normal load path."""
    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.pipelines.families.chroma_radiance import ChromaRadiancePipeline
    from aitk_inference.pipelines.registry import ChromaRadianceOptions

    options = ChromaRadianceOptions(text_encoder=os.path.join(ROOT, "checkpoint"), text_encoder_subfolder="text_encoder",
                                    tokenizer_subfolder="tokenizer")
    folder = str(tmp_path_factory.mktemp("radiance_golden_pipeline"))
    ChromaRadiancePipeline.from_checkpoint(CHECKPOINT, options, axes_dim=(4, 6, 6)).save_pretrained(folder)
    return load_pipeline("chroma_radiance", base=folder, device="cpu", dtype="fp32")


def test_tiny_builder_is_the_golden_checkpoint(report):
    """The registry's tiny model has the golden checkpoint's sizes and weights, bit for bit."""
    from safetensors.torch import load_file

    from aitk_inference.tiny.chroma_radiance import TRANSFORMER_CONFIG, chroma_radiance_transformer

    expected = load_file(CHECKPOINT)
    ours = chroma_radiance_transformer().state_dict()
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    assert {**TRANSFORMER_CONFIG, "axes_dim": list(TRANSFORMER_CONFIG["axes_dim"])} == report["transformer_params"]


def test_transformer_forward_matches_ai_toolkit():
    """Our transformer on ai-toolkit's weights gives its module's output (two images of 16x32 with different text
    masks and timesteps; ai-toolkit ran them one per call, as its previews do, we batch them)."""
    data = golden()
    with torch.no_grad():
        output = golden_transformer()(data["forward_img"], data["forward_txt"], data["forward_timesteps"],
                                      attended(data["forward_txt_mask"]), return_dict=False)[0]
    torch.testing.assert_close(output, data["forward_output"], rtol=0, atol=ATOL)


def test_prompt_encoding_matches_ai_toolkit(golden_pipeline, report):
    """512 tokens, padded, T5 without its mask; the transformer mask is the tokens plus one padding token."""
    data = golden()
    pipe = golden_pipeline.pipe
    for name, text in (("prompt", report["prompt"]), ("negative", report["negative"]), ("empty", "")):
        ids = pipe.tokenizer([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids.to(torch.int32), data[f"{name}_input_ids"]), name
        embeds, mask = golden_pipeline.encode([text])
        assert torch.equal(mask.long(), attended((torch.arange(512) < data[f"{name}_mask_length"]).long()[None])), name
        if name == "prompt":
            torch.testing.assert_close(embeds[:, :40], data["prompt_embeds_head"], rtol=0, atol=ATOL)


def test_scheduler_config_is_ai_toolkits(golden_pipeline, report):
    config = dict(golden_pipeline.pipe.scheduler.config)
    assert {k: config[k] for k in report["scheduler_config"]} == report["scheduler_config"]


class Stop(Exception):
    pass


@pytest.mark.parametrize("key", ["steps1_w64_h64", "steps2_w64_h64", "steps3_w96_h64", "steps8_w512_h768",
                                 "steps25_w1024_h1024"])
def test_schedule_matches_ai_toolkit(key, golden_pipeline, report):
    """The sigmas and mu our pipeline passes and the scheduler's resulting state equal ai-toolkit's pipeline run
    (mu from the channel count: the same at every size)."""
    expected = report["schedules"][key]
    steps, width, height = map(int, re.fullmatch(r"steps(\d+)_w(\d+)_h(\d+)", key).groups())
    scheduler = golden_pipeline.pipe.scheduler
    original = scheduler.set_timesteps
    seen = {}

    def spy(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        original(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        seen.update(sigmas_in=[float(s) for s in sigmas], mu=float(mu), timesteps=scheduler.timesteps.tolist(),
                    sigmas=scheduler.sigmas.tolist())
        raise Stop

    scheduler.set_timesteps = spy
    try:
        with pytest.raises(Stop):
            golden_pipeline.generate("a photo", width=width, height=height, steps=steps, guidance=1.0)
    finally:
        del scheduler.set_timesteps
    assert seen == expected


# golden key -> (width, height, steps, guidance, negative): CFG with an empty negative; non-square, 3 steps, negative
# "blurry"; no CFG at guidance 1
GENERATIONS = {"w64_h64_steps2_g4.0": (64, 64, 2, 4.0, ""), "w96_h64_steps3_g4.0": (96, 64, 3, 4.0, "blurry"),
               "w64_h64_steps2_g1.0": (64, 64, 2, 1.0, "")}


@pytest.mark.parametrize("key", list(GENERATIONS))
def test_whole_generation_matches_ai_toolkit(key, golden_pipeline, report):
    """Seed 42 through generate(): the noise, the flow times, guidance inputs and masks the transformer gets, the
    number of passes, the final pixels and the 8-bit image equal what ai-toolkit's generate_images produced (its
    unconditional pass encodes the sample's negative prompt)."""
    data = golden()
    width, height, steps, guidance, negative = GENERATIONS[key]
    assert report["generations"][key]["negative"] == negative
    transformer = golden_pipeline.pipe.transformer
    calls = []
    original = transformer.forward

    def spy(*args, **kwargs):
        calls.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})
        return original(*args, **kwargs)

    transformer.forward = spy
    try:
        result = golden_pipeline.generate(report["prompt"], negative=negative, width=width, height=height, steps=steps,
                                          guidance=guidance, seed=42)
    finally:
        del transformer.forward
    passes = 2 if guidance > 1 else 1
    fed = data[f"{key}_timesteps_fed"].flatten()
    lengths = data[f"{key}_txt_mask_lengths_fed"].flatten()
    assert len(fed) == steps * passes and len(calls) == steps  # ai-toolkit: one pass per prompt; we batch them
    for i, call in enumerate(calls):
        step_times, step_lengths = fed[i * passes:(i + 1) * passes], lengths[i * passes:(i + 1) * passes]
        # ai-toolkit's order is (conditional, unconditional); ours [unconditional, conditional]
        assert torch.equal(call["timestep"], step_times.flip(0))
        assert torch.equal(call["attention_mask"].sum(dim=1), step_lengths.flip(0) + 1)
        assert torch.equal(call["guidance"], torch.zeros(passes))
    assert torch.equal(data[f"{key}_guidance_fed"], torch.zeros(steps * passes, 1))
    if f"{key}_initial_noise" in data:
        assert torch.equal(calls[0]["hidden_states"][:1], data[f"{key}_initial_noise"])
    final = data[f"{key}_final_latents"]
    expected_image = ((final / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(result.images, expected_image, rtol=0, atol=ATOL)
    ours_uint8 = np.asarray(result.to_pil()[0], dtype=np.int16)
    assert np.abs(ours_uint8 - data[f"{key}_image_uint8"].numpy().astype(np.int16)).max() <= 1


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant,modules", [("lora_r4_a2", 20), ("lokr_default", 20), ("lora_all_layers", 30)])
def test_ai_toolkit_lora_file_matches_every_module_and_its_outputs(variant, modules, mode, report):
    """The file ai-toolkit's network saved for this arch (blocks only, its default; or every Linear with
    ``transformer_only: false``) loads with every module matched; at 1.0 and 0.5 it gives ai-toolkit's outputs, fused
    weights equal its merge, and removing it restores the base."""


    folder = os.path.join(ROOT, variant)
    path = os.path.join(folder, f"tiny_radiance_{variant}.safetensors")
    outputs, inputs = golden(os.path.join(variant, "outputs.safetensors")), golden("lora_inputs.safetensors")
    assert len(lora_file_modules(path)) == report["lora"][variant]["n_modules"] == modules
    model = golden_transformer()

    def forward():
        with torch.no_grad():
            return model(inputs["img"], inputs["txt"], inputs["timesteps"], attended(inputs["txt_mask"]),
                         return_dict=False)[0]

    assert_lora_file_reproduces_ai_toolkit(
        model, forward, mode, "chroma_radiance", path, outputs,
        lambda: golden(os.path.join(variant, "effective_weights_m1.0.safetensors")), ATOL, LORA_ATOL)


def test_lora_of_another_family_is_refused_with_its_family_named(pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    pipe = pipes("chroma_radiance")
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'chroma_radiance'.*FLUX.1"):
        pipe.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    radiance_lora = os.path.join(ROOT, "lora_all_layers", "tiny_radiance_lora_all_layers.safetensors")
    with pytest.raises(LoraFormatError, match="Chroma Radiance"):
        pipes("chroma").set_loras([LoraRequest(path=radiance_lora)])
    assert pipe.loras.describe() == []


def test_checkpoints_ai_toolkit_cannot_load_are_refused():
    """ai-toolkit loads Radiance strictly into its velocity model with the conv head: x0 / sequential-id files (marker
    keys) and the linear-head layout fail there, so their previews cannot exist; we say why."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families.chroma_radiance_transformer import config_from_state_dict

    state = load_file(CHECKPOINT)
    for marker in ("__x0__", "__sequential__"):
        with pytest.raises(ValueError, match=f"{marker}.*velocity prediction"):
            config_from_state_dict({**state, marker: torch.zeros(0)}, axes_dim=(4, 6, 6))
    with pytest.raises(ValueError, match="heads are 16 wide"):
        config_from_state_dict(state)
    with pytest.raises(ValueError, match="Not a Chroma Radiance checkpoint"):
        config_from_state_dict({k: v for k, v in state.items() if not k.startswith("img_in_patch")})


def test_bf16_model_keeps_the_pixel_embedder_in_float32(load_tiny):
    """ai-toolkit's NeRF embedder converts itself to float32 on first use; ours stays float32 from loading (a saved
    folder or an original-name file), and a bf16 model samples."""
    from aitk_inference.pipelines.families.chroma_radiance import ChromaRadiancePipeline
    from aitk_inference.pipelines.registry import ChromaRadianceOptions

    pipeline = load_tiny("chroma_radiance", dtype="bf16")
    options = ChromaRadianceOptions(text_encoder=os.path.join(ROOT, "checkpoint"), text_encoder_subfolder="text_encoder",
                                    tokenizer_subfolder="tokenizer")
    from_file = ChromaRadiancePipeline.from_checkpoint(CHECKPOINT, options, dtype=torch.bfloat16, axes_dim=(4, 6, 6))
    for transformer in (pipeline.pipe.transformer, from_file.transformer):
        assert transformer.nerf_image_embedder.embedder[0].weight.dtype == torch.float32
        assert transformer.txt_in.weight.dtype == torch.bfloat16
    images = pipeline.generate("a photo", width=64, height=64, steps=1).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_a_folder_that_is_no_checkpoint_is_refused_with_what_to_give(tmp_path):
    from aitk_inference.pipelines import load_pipeline

    with pytest.raises(FileNotFoundError, match="neither a Chroma Radiance checkpoint file nor a saved pipeline"):
        load_pipeline("chroma_radiance", base=str(tmp_path), device="cpu", dtype="fp32")
