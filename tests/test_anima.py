"""Anima against ai-toolkit's own code (goldens/anima, MANIFEST §anima): the tiny weights, ai-toolkit's prompt
encoding, whole samples (initial noise, the timesteps the transformer receives, the decoded image), and the LoRA and
LoKr files its network saves in ComfyUI / original Cosmos names, LLM adapter included."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ANIMA_GOLDENS = os.path.join(GOLDENS_DIR, "anima")
SAMPLE_ATOL = 1e-5  # fp32; the same blocks and weights, pinned diffusers vs 0.42.1
LORA_ATOL = 1e-6  # the base output already differs by 4.2e-7 (pinned diffusers vs 0.42.1), ai-toolkit's live vs
# merged outputs by 4.8e-7 (report.json)
LORA_VARIANTS = ["lora_r4", "lokr_default"]


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(ANIMA_GOLDENS, "sample.json")) as f:
        return json.load(f), load_file(os.path.join(ANIMA_GOLDENS, "sample.safetensors"))


@pytest.fixture(scope="module")
def anima(pipes):
    return pipes("anima")


def test_tiny_weights_are_the_ones_ai_toolkit_ran(anima, golden):
    """The goldens were computed on our tiny builder's components (built with the pinned diffusers): same weights."""
    expected = golden[0]["weights_checksum"]
    for name, total in expected.items():
        module = getattr(anima.pipe, name)
        assert float(sum(p.detach().double().sum() for p in module.parameters())) == pytest.approx(total, rel=1e-12), name


@pytest.mark.parametrize("sample", ["empty_negative", "negative"])
def test_prompt_encoding_matches_ai_toolkit(sample, anima, golden):
    """ai-toolkit's get_prompt_embeds: Qwen3 states times the adapter mask; an empty prompt is one pad token whose
    state the LLM adapter sees (diffusers' AnimaTextEncoderStep would zero and mask it)."""
    from aitk_inference.pipelines.families.anima import encode_qwen, t5_token_ids

    meta, tensors = golden[0]["samples"][sample], golden[1]
    for prefix, prompt in (("prompt", meta["prompt"]), ("negative", meta["negative"])):
        embeds, mask = encode_qwen(anima.pipe, [prompt], torch.device("cpu"), torch.float32)
        ids, ids_mask = t5_token_ids(anima.pipe, [prompt], torch.device("cpu"))
        torch.testing.assert_close(embeds, tensors[f"{sample}_{prefix}_qwen_embeds"], rtol=0, atol=1e-6)
        assert torch.equal(mask, tensors[f"{sample}_{prefix}_qwen_mask"])
        assert torch.equal(ids, tensors[f"{sample}_{prefix}_t5_ids"])
        assert torch.equal(ids_mask, tensors[f"{sample}_{prefix}_t5_mask"])
    if not meta["negative"]:
        assert tensors[f"{sample}_negative_qwen_mask"].tolist() == [[1]]
        assert tensors[f"{sample}_negative_qwen_embeds"].abs().sum() > 0


@pytest.mark.parametrize("sample", ["empty_negative", "negative"])
def test_sample_matches_ai_toolkit(sample, anima, golden):
    """generate() = ai-toolkit's preview: the same seed-``seed`` noise (bit for bit), the same timesteps fed to the
    transformer (t / 1000 of the shifted schedule, one per CFG pass), the same image."""
    meta, tensors = golden[0]["samples"][sample], golden[1]
    seen = {"timesteps": []}
    scheduler = anima.pipe.scheduler
    original_step = scheduler.step

    def step(model_output, timestep, sample_latents, *args, **kwargs):
        seen.setdefault("latents", sample_latents.clone())
        return original_step(model_output, timestep, sample_latents, *args, **kwargs)

    scheduler.step = step
    hook = anima.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen["timesteps"].append(kwargs["timestep"].clone()), with_kwargs=True)
    try:
        result = anima.generate(meta["prompt"], negative=meta["negative"], width=meta["width"],
                                height=meta["height"], steps=meta["steps"], guidance=meta["guidance"],
                                seed=meta["seed"])
    finally:
        hook.remove()
        del scheduler.step
    assert torch.equal(seen["latents"], tensors[f"{sample}_initial_latents"])
    assert len(seen["timesteps"]) == meta["transformer_passes"]
    assert torch.equal(torch.stack(seen["timesteps"]), tensors[f"{sample}_transformer_timesteps"])
    expected = tensors[f"{sample}_image"].numpy()  # ai-toolkit's generate_single_image returns image 0
    assert result.images.shape == (1, *expected.shape)
    assert np.abs(result.images[0] - expected).max() <= SAMPLE_ATOL


def test_initial_noise_is_flux1_float32_draw(golden):
    """Anima's (1, 16, 1, H/8, W/8) float32 draw holds the same numbers as FLUX.1's unpacked seed-42 draw (the
    registry-wide noise golden, which is 4-D)."""
    flux = load_file(os.path.join(GOLDENS_DIR, "noise", "initial_noise.safetensors"))
    anima_noise = golden[1]["empty_negative_initial_latents"]
    assert torch.equal(anima_noise.squeeze(2), flux["flux1_seed42_w64_h64_float32_unpacked"])


def _prediction(pipe, inputs):
    """ai-toolkit's AnimaModel.get_noise_prediction: the LLM adapter, then the transformer at t / 1000 with a zero
    padding mask."""
    with torch.no_grad():
        conditioning = pipe.text_conditioner(
            source_hidden_states=inputs["qwen_embeds"], target_input_ids=inputs["t5_ids"],
            target_attention_mask=inputs["t5_mask"], source_attention_mask=inputs["qwen_mask"])
        latents = inputs["latents"].unsqueeze(2)
        padding_mask = latents.new_zeros(1, 1, latents.shape[-2] * 8, latents.shape[-1] * 8)
        output = pipe.transformer(hidden_states=latents, timestep=inputs["timestep"] / 1000,
                                  encoder_hidden_states=conditioning, padding_mask=padding_mask, return_dict=False)[0]
    return output.squeeze(2)


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_lora_file_reproduces_ai_toolkit_outputs(variant, mode, load_tiny):
    """The file ai-toolkit saved (Cosmos names + llm_adapter) loads with every module matched, on the transformer and
    the text conditioner, and gives ai-toolkit's outputs at 1.0 and 0.5; fused weights equal its merge_in weights."""
    folder = os.path.join(ANIMA_GOLDENS, variant)
    outputs = load_file(os.path.join(folder, "outputs.safetensors"))
    with open(os.path.join(folder, "report.json")) as f:
        report = json.load(f)
    inputs = load_file(os.path.join(ANIMA_GOLDENS, "lora_inputs.safetensors"))
    path = os.path.join(folder, report["file"])
    pipeline = load_tiny("anima", lora_mode=mode)
    pipe = pipeline.pipe
    base = _prediction(pipe, inputs)
    torch.testing.assert_close(base, outputs["base_output"], rtol=0, atol=LORA_ATOL)

    summary = pipeline.set_loras([(path, 1.0)])
    assert summary[0]["modules"] == report["modules"] == 53
    assert set(summary[0]["components"]) == {"transformer", "text_conditioner"}
    flavour = "live" if mode == "dynamic" else "merged"
    torch.testing.assert_close(_prediction(pipe, inputs), outputs[f"lora_{flavour}_m1.0"], rtol=0, atol=LORA_ATOL)
    if mode == "fused":
        for name, weight in load_file(os.path.join(folder, "effective_weights_m1.0.safetensors")).items():
            component, _, parameter = name.partition(".")
            torch.testing.assert_close(getattr(pipe, component).get_parameter(parameter), weight, rtol=0,
                                       atol=LORA_ATOL, msg=name)
    pipeline.set_loras([(path, 0.5)])
    torch.testing.assert_close(_prediction(pipe, inputs), outputs["lora_live_m0.5"], rtol=0, atol=LORA_ATOL)
    pipeline.set_loras([])
    torch.testing.assert_close(_prediction(pipe, inputs), base, rtol=0, atol=LORA_ATOL)


def test_cosmos_names_map_onto_every_module():
    """Each original name ai-toolkit writes, block or top level, lands on a real module of the tiny models."""
    from aitk_inference.pipelines.families.anima import anima_original_to_diffusers
    from aitk_inference.pipelines.lora.convert import ConvertedLora
    from aitk_inference.tiny.anima import anima_components

    components = anima_components()
    names = ["blocks.1.adaln_modulation_mlp.2", "blocks.0.mlp.layer1", "blocks.0.cross_attn.output_proj",
             "final_layer.adaln_modulation.1", "final_layer.linear", "t_embedder.1.linear_2", "x_embedder.proj.1",
             "llm_adapter.blocks.0.mlp.0", "llm_adapter.out_proj", "text_conditioner.blocks.1.cross_attn.o_proj",
             "transformer_blocks.1.attn2.to_v"]
    converted = anima_original_to_diffusers(ConvertedLora({("transformer", n): None for n in names}, "peft"))
    for component, path in converted.patches:
        assert isinstance(components[component].get_submodule(path), torch.nn.Linear), (component, path)
    assert converted.layout == "peft+cosmos_names"


def test_lora_of_another_family_is_refused(anima):
    """A Wan LoRA (original Wan names, which Anima's Cosmos names resemble) is refused with Wan named; Anima's own
    keys are told apart from Wan's."""
    from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
    from aitk_inference.pipelines.lora.stack import LoraRequest

    wan = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 32),
           "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'anima'.*Wan"):
        anima.set_loras([LoraRequest(state_dict=wan, strength=1.0, name="wan")])
    assert anima.loras.describe() == []
    for key in ("diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight",
                "diffusion_model.blocks.3.adaln_modulation_cross_attn.1.lora_A.weight",
                "diffusion_model.llm_adapter.blocks.0.self_attn.q_proj.lora_A.weight"):
        assert guess_architecture([key]).startswith("Anima"), key


def test_offload_is_refused_with_the_reason():
    from aitk_inference.pipelines import load_pipeline

    with pytest.raises(ValueError, match="no CPU offloading"):
        load_pipeline("anima", base="unused", device="cpu", offload="model")


def test_make_tiny_native_lora_matches_every_module(load_tiny, tmp_path):
    """make-tiny's Anima LoRA (Cosmos names + llm_adapter) patches every Linear of the blocks and of the LLM adapter."""
    from aitk_inference.tiny.anima import write_native_loras

    pipeline = load_tiny("anima")
    (path,) = write_native_loras(pipeline.pipe, str(tmp_path)).values()
    linears = sum(isinstance(m, torch.nn.Linear) for n, m in pipeline.pipe.transformer.named_modules()
                  if n.startswith("transformer_blocks."))
    linears += sum(isinstance(m, torch.nn.Linear) for m in pipeline.pipe.text_conditioner.modules())
    base = pipeline.generate("a cat", width=64, height=64, steps=1).images
    summary = pipeline.set_loras([(path, 1.0)])
    assert summary[0]["modules"] == linears == 53
    assert np.abs(pipeline.generate("a cat", width=64, height=64, steps=1).images - base).max() > 1e-3


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_interrupt_stops_within_a_step_and_is_not_logged_as_an_error(anima):
    """The progress callback runs after every denoising step (our step-end block); raising from it stops sampling,
    and diffusers' per-block "Error in block" echo of the exception is not logged (its library logger does not
    propagate, so the handler sits on it)."""
    from aitk_inference.pipelines.base import GenerationInterrupted

    steps = []

    def stop_after_two(step, total):
        steps.append((step, total))
        if step == 2:
            raise GenerationInterrupted("stop")

    records = _Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        with pytest.raises(GenerationInterrupted):
            anima.generate("a cat", width=64, height=64, steps=4, progress=stop_after_two)
        logging.getLogger("diffusers.modular_pipelines.modular_pipeline").error("Error in block: (echo check)")
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert steps == [(1, 4), (2, 4)]
    # the handler sees diffusers' records (the check record above, logged outside a generation), but no echo
    assert [m for m in records.messages if "Error in block" in m] == ["Error in block: (echo check)"]
    assert anima.generate("a cat", width=64, height=64, steps=1).images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("guidance", [0.5, 1.0, 2.0])
def test_negative_matters_at_every_guidance_but_one(guidance, anima):
    """The modular guider runs CFG unless the guidance is 1, below 1 too: the registry's ``cfg_unless_one``."""
    run = dict(prompt="a cat", width=64, height=64, steps=1, guidance=guidance)
    changed = np.abs(anima.generate(negative="", **run).images - anima.generate(negative="blurry", **run).images).max()
    assert anima.spec.negative_has_effect(guidance) == (guidance != 1.0)
    assert (changed > 1e-4) == (guidance != 1.0), changed
