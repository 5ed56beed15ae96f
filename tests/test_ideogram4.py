"""Ideogram 4 against ai-toolkit's own code (goldens in ``tests/goldens/ideogram4``, MANIFEST "ideogram4").

ai-toolkit samples Ideogram 4 with its own transformer, VAE and loop (``extensions_built_in/diffusion_models/ideogram4``);
we run diffusers 0.42's ``Ideogram4Transformer2DModel`` and ``AutoencoderKLFlux2`` in our own loop. On the same tiny
weights this checks: the transformer's output (after our conversion of Ideogram's module names), the sigmas, what the
transformer receives at every call of a whole generation (seed-42 noise, times, packed conditioning), the first
conditional and unconditional predictions, the final latents and the decoded image, the size floor; the LoRA and
LoKr files ai-toolkit saves for this arch, and its unconditional LoRA, active in the unconditional pass only.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from aitk_inference.pipelines.families.ideogram4 import (LATENT_SCALE, LATENT_SHIFT, UNCONDITIONAL,
                                                          convert_original_transformer, ideogram4_sigmas)
from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
from aitk_inference.pipelines.registry import REGISTRY
from aitk_inference.tiny.ideogram4 import TRANSFORMER_CONFIG
from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "ideogram4")
# fp32. Predictions and latents reach about 10 in magnitude, so summation-order differences scale with them:
# absolute 1e-5 plus relative 1e-5.
ATOL = RTOL = 1e-5
LORA_FILES = [("lora_r4_fp16", "tiny_ideogram_lora_r4_fp16.safetensors"),
              ("lokr_default", "tiny_ideogram_lokr_default.safetensors")]
UNCOND_LORA = os.path.join(ROOT, "uncond_lora", "tiny_ideogram_uncond_lora.safetensors")
MAIN_LORA = os.path.join(ROOT, *LORA_FILES[0])


def _json(name):
    with open(os.path.join(ROOT, name)) as f:
        return json.load(f)


def _state_hash(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def golden_transformer():
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(**TRANSFORMER_CONFIG).eval()
    model.load_state_dict(convert_original_transformer(load_file(os.path.join(ROOT, "transformer_aitk.safetensors"))),
                          strict=True)
    return model


def forward(model):
    """ai-toolkit's transformer call (its keyword names) on diffusers' class."""
    inputs = load_file(os.path.join(ROOT, "inputs.safetensors"))
    with torch.no_grad():
        return model(hidden_states=inputs["x"], timestep=inputs["t"], encoder_hidden_states=inputs["llm_features"],
                     position_ids=inputs["position_ids"], segment_ids=inputs["segment_ids"],
                     indicator=inputs["indicator"], return_dict=False)[0]


def _golden_pipeline(load_tiny, **load_kwargs):
    pipeline = load_tiny("ideogram4", **load_kwargs)
    transformer = pipeline.pipe.transformer
    transformer.load_state_dict(golden_transformer().state_dict(), strict=True)
    return pipeline


@pytest.fixture(scope="module")
def golden_pipeline(load_tiny):
    """The tiny ideogram4 pipeline with ai-toolkit's golden transformer weights (text encoder and VAE: the tiny
    builder's, the ones the goldens were made with; see test_tiny_components_are_the_goldens)."""
    return _golden_pipeline(load_tiny)


def _record(pipeline, **generate):
    """generate() with hooks: what the transformer receives and returns at each call, the latents the decoder gets
    and the VAE's output."""
    transformer, vae = pipeline.pipe.transformer, pipeline.pipe.vae
    calls, decoded = [], {}

    def pre(module, args, kwargs):
        calls.append({k: kwargs[k].detach().clone() for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                                               "position_ids", "segment_ids", "indicator")})

    def post(module, args, kwargs, output):
        calls[-1]["output"] = output[0].detach().clone()

    original_decode = vae.decode

    def decode(z, *args, **kwargs):
        decoded["z"] = z.detach().clone()
        out = original_decode(z, *args, **kwargs)
        decoded["images"] = out[0].detach().clone()
        return out

    handles = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
               transformer.register_forward_hook(post, with_kwargs=True)]
    vae.decode = decode
    try:
        result = pipeline.generate(**generate)
    finally:
        del vae.decode
        for handle in handles:
            handle.remove()
    return result, calls, decoded


def _patched_latents(z):
    """ai-toolkit's stored latents (B, 128, h/16, w/16) from the VAE input (B, 32, h/8, w/8): the inverse of our
    decode's unpatching and denormalisation."""
    b, c, h, w = z.shape
    patched = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
    shift = torch.tensor(LATENT_SHIFT).view(1, -1, 1, 1)
    scale = torch.tensor(LATENT_SCALE).view(1, -1, 1, 1)
    return (patched - shift) / scale


# ------------------------------------------------------------------------------------------------------ components
def test_tiny_components_are_the_goldens(golden_pipeline):
    """The goldens were made with the tiny builder's text encoder and VAE (their hashes are recorded there)."""
    config = _json("config.json")
    assert _state_hash(golden_pipeline.pipe.text_encoder) == config["text_encoder_sha256"]
    assert _state_hash(golden_pipeline.pipe.vae) == config["vae_sha256"]
    assert golden_pipeline.pipe.unconditional_transformer is None


def test_diffusers_transformer_equals_ai_toolkits():
    """ai-toolkit's own transformer and diffusers' class, same weights (converted from Ideogram's names: fused
    attention.qkv split, attention.o renamed), a batch of two with different text lengths (masked padding) and
    times, packed as ai-toolkit's predict_velocity packs them."""
    golden = load_file(os.path.join(ROOT, "lora_r4_fp16", "outputs.safetensors"))["base_output"]
    torch.testing.assert_close(forward(golden_transformer()), golden, rtol=RTOL, atol=ATOL)


def test_fp8_checkpoint_weights_are_folded():
    """ai-toolkit's checkpoint stores FP8 Linear weights with a per-row ``.weight_scale``: converted to w * scale."""
    weight = torch.randn(96, 32)
    scale = torch.rand(96) + 0.5
    fp8 = weight.to(torch.float8_e4m3fn)
    out = convert_original_transformer({"layers.0.attention.qkv.weight": fp8,
                                        "layers.0.attention.qkv.weight_scale": scale,
                                        "layers.0.attention.o.weight": weight[:32]})
    folded = fp8.to(torch.float32) * scale[:, None]
    assert sorted(out) == ["layers.0.attention.to_k.weight", "layers.0.attention.to_out.0.weight",
                           "layers.0.attention.to_q.weight", "layers.0.attention.to_v.weight"]
    assert torch.equal(torch.cat([out[f"layers.0.attention.to_{n}.weight"] for n in "qkv"]), folded)
    assert torch.equal(out["layers.0.attention.to_out.0.weight"], weight[:32])


def test_checkpoint_in_ai_toolkit_layout_loads(tmp_path, golden_pipeline):
    """A folder in ai-toolkit's layout (no model_index.json; transformer/ in Ideogram's names, vae/ and the text
    encoder in diffusers/transformers form) loads with the converted transformer."""
    from aitk_inference.pipelines import load_pipeline

    pipe = golden_pipeline.pipe
    (tmp_path / "transformer").mkdir()
    save_file(load_file(os.path.join(ROOT, "transformer_aitk.safetensors")),
              str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    with open(tmp_path / "transformer" / "config.json", "w") as f:
        json.dump(dict(pipe.transformer.config), f)
    pipe.vae.save_pretrained(tmp_path / "vae")
    pipe.text_encoder.save_pretrained(tmp_path / "text_encoder")
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_pipeline("ideogram4", base=str(tmp_path), device="cpu", dtype="fp32")
    for name, value in pipe.transformer.state_dict().items():
        assert torch.equal(loaded.pipe.transformer.state_dict()[name], value), name
    assert torch.equal(loaded.pipe.transformer.rotary_emb.inv_freq, pipe.transformer.rotary_emb.inv_freq)
    assert _state_hash(loaded.pipe.vae) == _state_hash(pipe.vae)
    kwargs = dict(prompt="a photo", width=64, height=64, steps=1, guidance=4.0, seed=42)
    # not bit for bit: the loaded weights sit in other memory (alignment picks other CPU kernels), about 1e-6 apart
    np.testing.assert_allclose(loaded.generate(**kwargs).images, golden_pipeline.generate(**kwargs).images,
                               rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("key", list(_json("schedules.json")["runs"]))
def test_schedule_matches_ai_toolkit(key):
    import re

    steps, width, height = map(int, re.match(r"steps(\d+)_w(\d+)_h(\d+)$", key).groups())
    options = REGISTRY["ideogram4"].options
    assert (options.schedule_mu, options.schedule_std) == (0.0, 1.75) == tuple(_json("schedules.json")["defaults"].values())
    ours = ideogram4_sigmas(steps, width, height, options.schedule_mu, options.schedule_std)
    torch.testing.assert_close(ours, torch.tensor(_json("schedules.json")["runs"][key]), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- sampling
SAMPLING = _json("report.json")["sampling"]


def _loras_for(info):
    loras = []
    if info["main_lora"] is not None:
        loras.append(LoraRequest(path=MAIN_LORA, strength=info["main_lora"]["multiplier"]))
    if info["uncond_lora"]:
        loras.append(LoraRequest(path=UNCOND_LORA, side=UNCONDITIONAL))
    return loras


@pytest.mark.parametrize("name", list(SAMPLING))
def test_sampling_matches_ai_toolkit(name, golden_pipeline, load_tiny):
    """ai-toolkit's generate_single_image (prompt "a photo", seed 42; its unconditional LoRA and a 0.5 LoRA where
    the case has them) against our generate(): the sampled size, the seed-42 draw, every call's time, the packed
    conditioning, the first conditional and unconditional predictions, the final latents and the 8-bit image."""
    info = SAMPLING[name]
    golden = load_file(os.path.join(ROOT, "sampling.safetensors"))
    pipeline = golden_pipeline
    pipeline.set_loras(_loras_for(info))
    try:
        width, height = info["requested"]
        result, calls, decoded = _record(pipeline, prompt=info["prompt"], width=width, height=height,
                                         steps=info["steps"], guidance=info["guidance"], seed=42)
    finally:
        pipeline.set_loras([])
    assert [result.width, result.height] == info["sampled"]
    assert len(calls) == info["transformer_calls"]
    assert torch.equal(calls[0]["hidden_states"], golden[f"{name}_call0_x"])  # the seed-42 draw times sigma 0
    for i, call in enumerate(calls):
        assert torch.equal(call["timestep"], golden[f"{name}_call{i}_t"]), f"{name} call {i} time"
        if f"{name}_call{i}_output" in golden:
            torch.testing.assert_close(call["output"], golden[f"{name}_call{i}_output"], rtol=RTOL, atol=ATOL,
                                       msg=f"{name} call {i} output")
        for ours, theirs in (("encoder_hidden_states", "llm_features"), ("position_ids", "position_ids"),
                             ("segment_ids", "segment_ids"), ("indicator", "indicator")):
            if f"{name}_call{i}_{theirs}" in golden:
                torch.testing.assert_close(call[ours], golden[f"{name}_call{i}_{theirs}"], rtol=RTOL, atol=ATOL,
                                           msg=f"{name} call {i} {theirs}")
    torch.testing.assert_close(_patched_latents(decoded["z"]), golden[f"{name}_final_latents"], rtol=RTOL, atol=ATOL)
    if f"{name}_decoded" in golden:
        torch.testing.assert_close(decoded["images"], golden[f"{name}_decoded"], rtol=RTOL, atol=ATOL)
    ours = np.round(result.images[0] * 255.0)
    assert np.abs(ours - golden[f"{name}_image"].numpy().astype(np.float64)).max() <= 1.0


def test_prompt_embedding_matches_ai_toolkit(golden_pipeline):
    """ai-toolkit's get_prompt_embeds (chat template, no padding, 13 Qwen3-VL layers concatenated per token)."""
    golden = load_file(os.path.join(ROOT, "sampling.safetensors"))["cfg_w64_h96_prompt_embeds"]
    with torch.no_grad():
        ours = golden_pipeline.encode_prompt("a photo")
    torch.testing.assert_close(ours[0], golden, rtol=RTOL, atol=ATOL)


def test_both_loras_fused_mode_matches_ai_toolkit(load_tiny):
    """Fused LoRA mode: the LoRA merged, the unconditional LoRA still a live adapter switched per pass."""
    pipeline = _golden_pipeline(load_tiny, lora_mode="fused")
    name = "both_loras_w64_h64"
    info = SAMPLING[name]
    golden = load_file(os.path.join(ROOT, "sampling.safetensors"))
    pipeline.set_loras(_loras_for(info))
    described = {entry["side"]: entry for entry in pipeline.loras.describe()}
    assert described[UNCONDITIONAL]["layout"] and described[None]["strength"] == 0.5
    result, calls, decoded = _record(pipeline, prompt=info["prompt"], width=64, height=64, steps=info["steps"],
                                     guidance=info["guidance"], seed=42)
    for i in (0, 1):
        torch.testing.assert_close(calls[i]["output"], golden[f"{name}_call{i}_output"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(_patched_latents(decoded["z"]), golden[f"{name}_final_latents"], rtol=RTOL, atol=ATOL)


def test_unconditional_lora_acts_in_the_unconditional_pass_only(golden_pipeline):
    """Without CFG there is no unconditional pass: the unconditional LoRA changes nothing, bit for bit; with CFG the
    conditional prediction is untouched and the unconditional one moves."""
    kwargs = dict(prompt="a photo", width=64, height=64, steps=1, seed=42)
    plain = golden_pipeline.generate(guidance=1.0, **kwargs).images
    _, plain_calls, _ = _record(golden_pipeline, guidance=4.0, **kwargs)
    summary = golden_pipeline.set_loras([LoraRequest(path=UNCOND_LORA, side=UNCONDITIONAL)])
    try:
        assert np.array_equal(golden_pipeline.generate(guidance=1.0, **kwargs).images, plain)
        _, calls, _ = _record(golden_pipeline, guidance=4.0, **kwargs)
    finally:
        golden_pipeline.set_loras([])
    assert torch.equal(calls[0]["output"], plain_calls[0]["output"])
    assert (calls[1]["output"] - plain_calls[1]["output"]).abs().max() > 1e-2
    # every module of the file matched: 19 Linears, the two fused qkv split into three each
    assert summary[0]["modules"] == _json("report.json")["uncond_lora"]["n_modules"] + 2 * 2 == 23


def test_unconditional_side_is_checked(golden_pipeline):
    lokr = os.path.join(ROOT, *LORA_FILES[1])
    with pytest.raises(LoraFormatError, match="must be a plain LoRA"):
        golden_pipeline.check_lora(LoraRequest(path=lokr, side=UNCONDITIONAL))
    with pytest.raises(ValueError, match="'uncond'"):
        golden_pipeline.check_lora(LoraRequest(path=MAIN_LORA, side="high"))
    with pytest.raises(ValueError, match="not a pass side"):
        with golden_pipeline.loras.pass_side("high"):
            pass


# ------------------------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant,filename", LORA_FILES)
def test_lora_file_reproduces_ai_toolkit_outputs(variant, filename, mode):
    """The file ai-toolkit saved (``diffusion_model.`` + Ideogram's names) loads with every module matched (each
    fused qkv onto three modules) and gives ai-toolkit's outputs: live network (dynamic mode) or merged (fused mode),
    at 1.0 and after a change to 0.5."""
    from aitk_inference.pipelines.families.ideogram4 import ideogram4_original_to_diffusers

    folder = os.path.join(ROOT, variant)
    golden = load_file(os.path.join(folder, "outputs.safetensors"))
    path = os.path.join(folder, filename)
    flavour = "live" if mode == "dynamic" else "merged"
    file_modules = {key.rsplit(".", 2)[0] if ".lora_" in key else key.rsplit(".", 1)[0] for key in load_file(path)}
    assert len(file_modules) == _json("report.json")[variant]["n_modules"] == 12
    fused_qkv = sum(m.endswith(".attention.qkv") for m in file_modules)

    model = golden_transformer()
    torch.testing.assert_close(forward(model), golden["base_output"], rtol=RTOL, atol=ATOL)
    stack = LoraStack({"transformer": model}, mode, "transformer", "ideogram4",
                      name_mapper=ideogram4_original_to_diffusers)
    summary = stack.set([LoraRequest(path=path, strength=1.0)])
    assert summary[0]["modules"] == len(file_modules) + 2 * fused_qkv
    torch.testing.assert_close(forward(model), golden[f"lora_{flavour}_m1.0"], rtol=RTOL, atol=ATOL)
    if mode == "fused":
        effective = load_file(os.path.join(folder, "effective_weights_m1.0.safetensors"))
        for name, weight in effective.items():
            layer = name.rsplit(".", 2)[0]
            if name.endswith("attention.qkv.weight"):
                ours = torch.cat([model.get_parameter(f"{layer}.to_{n}.weight") for n in "qkv"])
            elif name.endswith("attention.o.weight"):
                ours = model.get_parameter(f"{layer}.to_out.0.weight")
            else:
                ours = model.get_parameter(name)
            torch.testing.assert_close(ours, weight, rtol=RTOL, atol=ATOL, msg=name)
    stack.set([LoraRequest(path=path, strength=0.5)])
    torch.testing.assert_close(forward(model), golden[f"lora_{flavour}_m0.5"], rtol=RTOL, atol=ATOL)
    stack.clear()
    torch.testing.assert_close(forward(model), golden["base_output"], rtol=RTOL, atol=ATOL)


def test_lora_signature_names_the_family():
    """An Ideogram 4 LoRA is recognised as one (not as Z-Image, whose feed_forward.w1 it shares); given to another
    model it is refused with Ideogram 4 named, and another family's LoRA given to Ideogram 4 is refused with that
    family named."""
    from diffusers import FluxTransformer2DModel

    from aitk_inference.pipelines.families.ideogram4 import ideogram4_original_to_diffusers

    for path in (MAIN_LORA, UNCOND_LORA, os.path.join(ROOT, *LORA_FILES[1])):
        assert guess_architecture(load_file(path)) == "Ideogram 4"
    flux = FluxTransformer2DModel.from_pretrained(os.path.join(GOLDENS_DIR, "lora_flux", "base_transformer"))
    with pytest.raises(LoraFormatError, match="Ideogram 4"):
        LoraStack({"transformer": flux}, "dynamic", "transformer", "flux").set([LoraRequest(path=MAIN_LORA)])
    flux_lora = os.path.join(GOLDENS_DIR, "lora_flux", "lora_r4_a2_fp16", "tiny_flux_lora_r4_a2_fp16.safetensors")
    with pytest.raises(LoraFormatError, match="FLUX.1"):
        LoraStack({"transformer": golden_transformer()}, "dynamic", "transformer", "ideogram4",
                  name_mapper=ideogram4_original_to_diffusers).set([LoraRequest(path=flux_lora)])


def test_server_and_nodes_take_the_unconditional_side(golden_pipeline):
    """The HTTP API's LoRA ``transformer`` field takes ``uncond`` for Ideogram 4 (and still refuses it elsewhere), and
    the Apply LoRA node's check resolves it to the unconditional pass."""
    from aitk_inference.nodes import core
    from aitk_inference.server.errors import APIError
    from aitk_inference.server.mapping import _check_lora_layout
    from aitk_inference.server.schemas import InferenceInput

    def body(model):
        return InferenceInput(model=model, prompts=[{"prompt": "a photo"}],
                              loras=[{"path": "style.safetensors"}, {"path": "negative.safetensors",
                                                                     "transformer": UNCONDITIONAL}])

    _check_lora_layout("ideogram4", REGISTRY["ideogram4"], body("ideogram4"), max_loras=4)
    with pytest.raises(APIError) as error:
        _check_lora_layout("flux", REGISTRY["flux"], body("flux"), max_loras=4)
    assert error.value.code == "MOE_FORMAT_NOT_SUPPORTED"
    checked = golden_pipeline.check_lora((UNCOND_LORA, 1.0, UNCONDITIONAL))
    assert checked.request.side == UNCONDITIONAL and UNCONDITIONAL in core.TRANSFORMER_SIDES


def test_reproduce_applies_the_jobs_unconditional_lora(tmp_path):
    """A job whose model section sets ``unconditional_lora_path`` (relative to the job folder) gets that LoRA on the
    unconditional pass beside its own; another model's job with one is refused."""
    import dataclasses
    import shutil

    from aitk_inference.pipelines.jobs.config import TrainingJob
    from aitk_inference.pipelines.jobs.reproduce import job_side_loras

    shutil.copy(UNCOND_LORA, tmp_path / "negative.safetensors")
    job = TrainingJob(config_path=str(tmp_path / "config.yaml"), folder=str(tmp_path), name="job",
                      process={"model": {"arch": "ideogram4", "unconditional_lora_path": "negative.safetensors"}})
    assert job.model_id == "ideogram4"
    (request,) = job_side_loras(job, REGISTRY["ideogram4"])
    assert (request.path, request.side, request.strength) == (str(tmp_path / "negative.safetensors"), UNCONDITIONAL,
                                                              1.0)
    assert job_side_loras(dataclasses.replace(job, process={"model": {"arch": "ideogram4"}}), REGISTRY["ideogram4"]) == []
    with pytest.raises(ValueError, match="unconditional_lora_path"):
        job_side_loras(job, REGISTRY["flux"])


def test_schedule_options_match_ai_toolkits_model_kwargs(golden_pipeline):
    """ai-toolkit's sampler reads ``model_kwargs.ideogram_schedule_mu``/``_std``: our ``schedule_mu``/``schedule_std``
    generation options (a job's values through ``job_options``) give its sigmas, and the transformer receives the
    flow times ``1 - sigma`` of them."""
    key, run = next(iter(_json("schedules.json")["custom"].items()))
    golden = torch.tensor(run["sigmas"])
    assert golden_pipeline.job_options({"model_kwargs": {"ideogram_schedule_mu": run["mu"],
                                                         "ideogram_schedule_std": run["std"]}}) == {
        "schedule_mu": run["mu"], "schedule_std": run["std"]}
    assert golden_pipeline.job_options({"model_kwargs": {}}) == {}
    _, calls, _ = _record(golden_pipeline, prompt="a photo", width=768, height=512, steps=4, guidance=1.0, seed=42,
                          schedule_mu=run["mu"], schedule_std=run["std"])
    assert torch.equal(torch.cat([call["timestep"] for call in calls]), 1.0 - golden[:-1])
    with pytest.raises(ValueError, match="schedule_std"):
        golden_pipeline.generate(prompt="a photo", width=64, height=64, steps=1, schedule_std=0.0)
    with pytest.raises(ValueError, match="takes schedule_mu, schedule_std"):
        golden_pipeline.generate(prompt="a photo", width=64, height=64, steps=1, shift=3.0)


def test_make_tiny_native_loras_load(golden_pipeline, tmp_path):
    """make-tiny's files in ai-toolkit's layout (Ideogram names) load with every module matched, the unconditional one
    on its side."""
    from aitk_inference.tiny.ideogram4 import write_native_loras

    paths = write_native_loras(golden_pipeline.pipe, str(tmp_path))
    main, uncond = paths.values()
    assert golden_pipeline.check_lora(main).summary()["modules"] == 2 * (6 + 2)  # qkv onto three
    assert golden_pipeline.check_lora((uncond, 1.0, UNCONDITIONAL)).summary()["modules"] == 2 * (6 + 2) + 7
