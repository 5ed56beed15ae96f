"""HiDream-O1 against ai-toolkit's own HiDream-O1 code (goldens in tests/goldens/hidream_o1; see its MANIFEST section).

The goldens were made by ai-toolkit's vendored Qwen3-VL generator and its pipeline on the weights of our tiny builder
(saved in the published layout): its prompt tokens, its forward on fixed inputs, its schedule, three whole previews
through ``BaseModel.generate_images`` and the LoRA / LoKr files its network saved with the outputs it computed.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "hidream_o1")
ATOL = 1e-5  # float32
LORA_ATOL = 1e-6
BF16_PIXEL_STEP = 2**-8  # one bfloat16 step of a latent in [0, 1), after the decode (x + 1) / 2  # ai-toolkit's own live and merged outputs differ by up to 1.8e-7


def golden(name="generation.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ROOT, "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def o1(pipes):
    return pipes("hidream_o1")


def test_tiny_weights_are_the_goldens_weights(o1, report):
    """The goldens ran on our builder's weights; a builder change would silently void every comparison here."""
    state = o1.pipe.transformer.state_dict()
    for name, checksum in report["weight_checksums"].items():
        assert float(state[name].double().sum()) == pytest.approx(checksum, rel=0, abs=1e-9), name
    assert o1.pipe.transformer.timestep_token_id == report["tms_token_id"]


def test_prompt_tokens_match_ai_toolkit(o1, report):
    """Chat template with the generation prompt, then <|boi_token|><|tms_token|>; the empty negative is encoded."""
    data = golden()
    for name, text in (("prompt", report["prompt"]), ("negative", report["negative"]), ("empty", "")):
        assert torch.equal(o1.pipe.encode_prompt(text), data[f"{name}_input_ids"]), name


def test_positions_and_attention_pattern():
    """Text at 0..L-1 on every axis, the image at 4096 + (0, row, column) (ai-toolkit's t2i rope index); the text
    before the timestep token attends causally, the timestep token and the image attend to everything (the golden's
    token types), which our two-pass attention function computes."""
    from types import SimpleNamespace

    from aitk_inference.pipelines.families.hidream_o1 import generation_attention, rotary_positions

    data = golden()
    text_length = data["prompt_input_ids"].shape[1]
    assert torch.equal(rotary_positions(text_length, 1, 2), data["forward_position_ids"])
    generated = data["forward_token_types"][0].bool()
    assert generated.sum() == 3 and generated[text_length - 1:].all()  # the timestep token and the 2 patches
    length = text_length + 2
    allowed = torch.ones(length, length).tril().bool() | generated[:, None]
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, length, 8, generator=g) for _ in range(3))
    output, _ = generation_attention(SimpleNamespace(), query, key, value, None, causal_length=text_length - 1,
                                     scaling=8**-0.5, dropout=0.0)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed).transpose(1, 2)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)


def test_forward_matches_ai_toolkit(o1):
    """Our Qwen3VLModel subclass on the same weights gives the vendored class's sampling forward (attention
    pattern, timestep token, pixel patch embed and head)."""
    from aitk_inference.pipelines.families.hidream_o1 import rotary_positions

    data = golden()
    ids = data["prompt_input_ids"]
    with torch.no_grad():
        x0 = o1.pipe.transformer(ids, data["forward_vinputs"], data["forward_timestep"],
                                 rotary_positions(ids.shape[1], 1, 2), text_attends_causally=ids.shape[1] - 1)
    torch.testing.assert_close(x0, data["forward_x_pred_flash1"], rtol=0, atol=ATOL)


def test_published_layout_loads(tmp_path, o1):
    """A Qwen3VLForConditionalGeneration folder (``model.`` prefix, an ``lm_head``, tokenizer at the top, no
    model_index.json) loads through load_pipeline with every generation weight, the lm_head left out; a single file or
    another folder is refused with the reason."""
    from safetensors.torch import save_file

    from aitk_inference.pipelines import load_pipeline

    ours = o1.pipe.transformer
    state = {"model." + k: v.contiguous() for k, v in ours.state_dict().items()}
    text = ours.config.text_config
    state["lm_head.weight"] = torch.zeros(text.vocab_size, text.hidden_size)
    ours.config.save_pretrained(tmp_path)
    save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    o1.pipe.tokenizer.save_pretrained(tmp_path)
    loaded = load_pipeline("hidream_o1", base=str(tmp_path), device="cpu", dtype="fp32").pipe.transformer
    assert not hasattr(loaded, "lm_head")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="not the single file"):
        load_pipeline("hidream_o1", base=os.path.join(tmp_path, "model.safetensors"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a HiDream-O1 folder"):
        load_pipeline("hidream_o1", base=str(tmp_path / "empty"), device="cpu")


def test_schedule_matches_ai_toolkit(o1, report):
    """Static shift 3.0: the timesteps and sigmas of ai-toolkit's scheduler for 1, 2, 3 and 30 steps."""
    scheduler = o1.pipe.scheduler
    for steps, expected in report["schedule"].items():
        scheduler.set_timesteps(int(steps))
        assert scheduler.timesteps.tolist() == expected["timesteps"], steps
        assert scheduler.sigmas.tolist() == expected["sigmas"], steps


# golden key -> (width, height, steps, guidance): CFG; non-square, 3 steps; no guidance pass at 1
GENERATIONS = {"w64_h64_steps2_g4.0": (64, 64, 2, 4.0), "w96_h64_steps3_g4.0": (96, 64, 3, 4.0),
               "w64_h64_steps2_g1.0": (64, 64, 2, 1.0)}


@pytest.mark.parametrize("key", list(GENERATIONS))
def test_whole_preview_matches_ai_toolkit(key, o1, report):
    """Seed 42 through generate(): the prompt of each pass, the progress the model gets, the bfloat16 initial noise
    (8 x randn), the final bfloat16 pixels and the 8-bit image equal ai-toolkit's generate_images."""
    data = golden()
    width, height, steps, guidance = GENERATIONS[key]
    transformer = o1.pipe.transformer
    calls = []
    original = transformer.forward

    def spy(input_ids, pixel_patches, progress, *args, **kwargs):
        calls.append({"input_ids": input_ids.clone(), "pixel_patches": pixel_patches.clone(), "progress": progress})
        return original(input_ids, pixel_patches, progress, *args, **kwargs)

    transformer.forward = spy
    try:
        result = o1.generate(report["prompt"], negative=report["negative"], width=width, height=height, steps=steps,
                             guidance=guidance, seed=42)
    finally:
        del transformer.forward
    expected_calls = report["generations"][key]
    assert [c["input_ids"].tolist() for c in calls] == expected_calls["input_ids_per_call"]
    assert torch.equal(torch.stack([c["progress"] for c in calls]), data[f"{key}_timesteps_fed"])
    if f"{key}_initial_vinputs" in data:
        assert torch.equal(calls[0]["pixel_patches"], data[f"{key}_initial_vinputs"].float())
    from aitk_inference.pipelines.families.hidream_o1 import PATCH_SIZE
    from aitk_inference.pipelines.families.pixel_space import unpatchify_pixels

    final = unpatchify_pixels(data[f"{key}_final_latents"], height, width, PATCH_SIZE)
    expected_image = ((final + 1) / 2).float().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    # The latents are bfloat16 between steps, so a float32 rounding difference of the forward can flip the bfloat16
    # rounding of a few latents: those pixels differ by one bfloat16 step of x + 1 (2**-7), halved by the decode.
    difference = np.abs(result.images - expected_image)
    assert difference.max() <= BF16_PIXEL_STEP + ATOL
    assert (difference > ATOL).mean() < 0.01
    ours_uint8 = np.asarray(result.to_pil()[0], dtype=np.int16)
    assert np.abs(ours_uint8 - data[f"{key}_image_uint8"].numpy().astype(np.int16)).max() <= 1


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", ["lora_r4_a2", "lokr_default"])
def test_ai_toolkit_lora_file_matches_every_module_and_its_outputs(variant, mode, o1, report):
    """The file ai-toolkit's network saved for this arch (diffusion_model. + names without .model.) loads with every
    module matched; at 1.0 and 0.5 it gives ai-toolkit's outputs, fused weights equal its merge, and removing it
    restores the base."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families.hidream_o1 import drop_lm_head, rotary_positions
    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack

    path = os.path.join(ROOT, variant, f"tiny_o1_{variant}.safetensors")
    outputs, inputs = golden(os.path.join(variant, "outputs.safetensors")), golden("lora_inputs.safetensors")
    file_modules = {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in load_file(path)}
    assert len(file_modules) == report["lora"][variant]["n_modules"] == 14
    model = o1.pipe.transformer
    ids = inputs["input_ids"]
    positions = rotary_positions(ids.shape[1], 1, 2)
    assert torch.equal(positions, inputs["position_ids"])

    def forward():
        with torch.no_grad():
            return model(ids, inputs["vinputs"], inputs["timestep"], positions, text_attends_causally=ids.shape[1] - 1)

    torch.testing.assert_close(forward(), outputs["base_output"], rtol=0, atol=ATOL)
    stack = LoraStack({"transformer": model}, mode, "transformer", "hidream_o1", name_mapper=drop_lm_head)
    try:
        assert stack.set([LoraRequest(path=path, strength=1.0)])[0]["modules"] == len(file_modules)
        torch.testing.assert_close(forward(), outputs["lora_live_m1.0"], rtol=0, atol=ATOL)
        torch.testing.assert_close(forward(), outputs["lora_merged_m1.0"], rtol=0, atol=ATOL)
        if mode == "fused":
            for name, weight in golden(os.path.join(variant, "effective_weights_m1.0.safetensors")).items():
                torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=LORA_ATOL, msg=name)
        stack.set([LoraRequest(path=path, strength=0.5)])
        torch.testing.assert_close(forward(), outputs["lora_live_m0.5"], rtol=0, atol=ATOL)
    finally:
        stack.clear()
    torch.testing.assert_close(forward(), outputs["base_output"], rtol=0, atol=ATOL)


def test_lm_head_patches_are_left_out_with_a_note(o1):
    """ai-toolkit adapts lm_head only with transformer_only: false; it plays no part in image generation."""
    from aitk_inference.pipelines.lora.stack import LoraRequest

    hidden = o1.pipe.transformer.config.text_config.hidden_size
    keys = {"diffusion_model.lm_head.lora_A.weight": torch.zeros(4, hidden),
            "diffusion_model.lm_head.lora_B.weight": torch.zeros(10, 4),
            "diffusion_model.t_embedder1.mlp.0.lora_A.weight": torch.zeros(4, 256),
            "diffusion_model.t_embedder1.mlp.0.lora_B.weight": torch.zeros(hidden, 4)}
    checked = o1.check_lora(LoraRequest(state_dict=keys, name="with_head"))
    assert checked.summary()["modules"] == 1
    assert any("lm_head left out" in note for note in checked.loaded.converted.notes)


def test_lora_of_another_family_is_refused_with_its_family_named(pipes, o1):
    from aitk_inference.pipelines.lora.convert import LoraFormatError
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'hidream_o1'.*FLUX.1"):
        o1.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    o1_lora = os.path.join(ROOT, "lora_r4_a2", "tiny_o1_lora_r4_a2.safetensors")
    with pytest.raises(LoraFormatError, match="HiDream-O1"):
        pipes("flux").set_loras([LoraRequest(path=o1_lora)])
    assert o1.loras.describe() == []


def test_noise_and_latents_stay_bfloat16_for_a_float32_model(o1):
    """ai-toolkit's pipeline keeps the latents in bfloat16 whatever the model dtype: the model sees bfloat16 values."""
    seen = []
    original = o1.pipe.transformer.forward

    def spy(input_ids, pixel_patches, *args, **kwargs):
        seen.append(pixel_patches)
        return original(input_ids, pixel_patches, *args, **kwargs)

    o1.pipe.transformer.forward = spy
    try:
        o1.generate("a photo", width=64, height=32, steps=2, guidance=1.0, seed=1)
    finally:
        del o1.pipe.transformer.forward
    for patches in seen:
        assert torch.equal(patches, patches.to(torch.bfloat16).float())


def test_noise_scale_option_and_job_kwargs(o1):
    """ai-toolkit's model_kwargs.noise_scale_inference (else noise_scale) scales the initial noise; ours is the
    noise_scale generation option (a power of two scales bfloat16 exactly)."""
    seen = []
    original = o1.pipe.transformer.forward

    def spy(input_ids, pixel_patches, *args, **kwargs):
        seen.append(pixel_patches)
        return original(input_ids, pixel_patches, *args, **kwargs)

    o1.pipe.transformer.forward = spy
    try:
        for options in ({}, {"noise_scale": 4.0}):
            o1.generate("a photo", width=64, height=32, steps=1, guidance=1.0, seed=1, **options)
    finally:
        del o1.pipe.transformer.forward
    assert torch.equal(seen[1], seen[0] / 2)
    assert o1.job_options({"model_kwargs": {"noise_scale": 6, "noise_scale_inference": 4}}) == {"noise_scale": 4.0}
    assert o1.job_options({"model_kwargs": {"noise_scale": 6}}) == {"noise_scale": 6.0}
    assert o1.job_options({"arch": "hidream_o1"}) == {}
    with pytest.raises(ValueError, match="noise_scale"):
        o1.generate("a photo", width=64, height=32, steps=1, noise_scale=0)
    with pytest.raises(ValueError, match="Unknown generation option"):
        o1.generate("a photo", width=64, height=32, steps=1, shift=2.0)
