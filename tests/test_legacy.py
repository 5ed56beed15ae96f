"""The legacy archs (sd2, sd3, pixart, pixart_sigma, auraflow, ssd, vega) against ai-toolkit's own code.

ai-toolkit runs them through its legacy ``StableDiffusion`` class with stock diffusers pipelines. The goldens in
``tests/goldens/legacy`` (MANIFEST "legacy") come from that code at its pinned diffusers: the schedule its sample path
sets (its ``get_sampler`` scheduler inside the pipeline class it builds), the seed-42 latents the first step receives,
its PixArt prompt encoding, two failures of its sample path that decide what we do, and the LoRA files its
``LoRASpecialNetwork`` saves for each arch with the outputs it computed. sd3 and auraflow's schedules and sd3's noise
are in ``tests/test_parity.py``'s tables.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from aitk_inference.pipelines.jobs.config import model_id_for_job
from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
from aitk_inference.pipelines.registry import REGISTRY
from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "legacy")
LEGACY_IDS = ("sd2", "ssd", "vega", "pixart", "pixart_sigma", "sd3", "auraflow")
DDPM_IDS = ("sd2", "ssd", "vega", "pixart", "pixart_sigma")  # sd3/auraflow: test_parity.py SCHEDULER_GOLDEN
NOISE_KEY = {"sd2": "sd", "ssd": "sd", "vega": "sd", "auraflow": "sd", "pixart": "pixart", "pixart_sigma": "pixart"}
LORA_CASES = {"sd2": "sd2", "ssd": "ssd", "vega": "vega", "sd3": "sd3", "pixart": "pixart", "auraflow": "auraflow"}
# (id, kind): ai-toolkit's LoRA for every case, its default LoKr for the UNet kohya, PEFT and lora_transformer_ layouts
LORA_FILES = [(model_id, "lora") for model_id in LORA_CASES] + [
    (model_id, "lokr") for model_id in ("sd2", "sd3", "pixart", "auraflow")]
LORA_ATOL = 1e-6  # ai-toolkit's own live and merged outputs differ by up to 1.2e-7


class _Captured(Exception):
    pass


def _golden_schedules():
    with open(os.path.join(ROOT, "schedules.json")) as f:
        return json.load(f)


SCHEDULES = _golden_schedules()


def _first_step(pipeline, width, height, steps, seed=42, **extra):
    """What set_timesteps leaves on the scheduler and the initial latents, from a real generate() stopped before the
    first denoiser call. The pipelines set the timesteps before they draw the latents, and DDPM's and flow matching's
    initial noise sigma is 1, so these latents are what ai-toolkit's first scheduler step received."""
    scheduler, pipe, seen = pipeline.pipe.scheduler, pipeline.pipe, {}
    set_timesteps, prepare_latents = scheduler.set_timesteps, pipe.prepare_latents

    def spy_set(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        seen["timesteps"] = scheduler.timesteps.clone().float()

    def spy_latents(*args, **kwargs):
        seen["latents"] = prepare_latents(*args, **kwargs).detach().clone()
        raise _Captured

    scheduler.set_timesteps, pipe.prepare_latents = spy_set, spy_latents
    try:
        with pytest.raises(_Captured):
            pipeline.generate(prompt="a photo", width=width, height=height, steps=steps, seed=seed, **extra)
    finally:
        del scheduler.set_timesteps, pipe.prepare_latents
    assert getattr(pipe.scheduler, "init_noise_sigma", 1.0) == 1.0  # FlowMatch Euler has none: it scales nothing
    return seen


@pytest.mark.parametrize("model_id", DDPM_IDS)
def test_ddpm_schedule_and_noise_match_ai_toolkit(model_id, load_tiny):
    """The DDPM timesteps ai-toolkit's sample path sets (2, 3 and 20 steps; SD 2 through StableDiffusionPipeline's
    steps_offset 1, SSD-1B/Vega as SDXL with 0, PixArt's linspace grid) and its seed-42 latents, binned for PixArt."""
    golden = SCHEDULES[model_id]
    pipeline = load_tiny(model_id)
    ours = {k: v for k, v in dict(pipeline.pipe.scheduler.config).items() if not k.startswith("_")}
    assert {k: ours[k] for k in REGISTRY[model_id].scheduler.config} == {
        k: golden["scheduler_config"][k] for k in REGISTRY[model_id].scheduler.config}
    noise = load_file(os.path.join(ROOT, "initial_noise.safetensors"))
    for key, run in golden["runs"].items():
        steps, width, height = (int(x) for x in key.replace("steps", "").replace("_w", " ").replace("_h", " ").split())
        seen = _first_step(pipeline, width, height, steps)
        assert seen["timesteps"].tolist() == run["timesteps"], f"{model_id} {key}"
        assert list(seen["latents"].shape) == run["latent_shape"]
        if steps == 2:
            assert torch.equal(seen["latents"], noise[f"{NOISE_KEY[model_id]}_seed42_w{width}_h{height}"]), key


def test_auraflow_noise_matches_ai_toolkit(load_tiny):
    """AuraFlow draws SD's 4-channel latents (its schedule is in test_parity.py's SCHEDULER_GOLDEN)."""
    noise = load_file(os.path.join(ROOT, "initial_noise.safetensors"))
    seen = _first_step(load_tiny("auraflow"), 512, 768, 2)
    assert torch.equal(seen["latents"], noise["sd_seed42_w512_h768"])
    assert SCHEDULES["auraflow"]["runs"]["steps2_w512_h768"]["latent_shape"] == [1, 4, 96, 64]


def test_sd3_and_auraflow_sample_without_the_configured_shift():
    """ai-toolkit's `flowmatch` sampler for SD3/AuraFlow states shift 3.0 and samples with 1.0 (MANIFEST "legacy")."""
    for model_id in ("sd3", "auraflow"):
        golden = SCHEDULES[model_id]
        assert golden["scheduler_config"]["shift"] == 3.0 and golden["scheduler_shift_used"] == 1.0
        assert REGISTRY[model_id].scheduler.config["shift"] == 1.0


def test_sd2_prediction_type_follows_the_jobs_is_v_pred(load_tiny):
    """ai-toolkit's prediction type is the job's model.is_v_pred (default epsilon), never the checkpoint's."""
    assert SCHEDULES["sd2"]["scheduler_config"]["prediction_type"] == "epsilon"
    assert SCHEDULES["sd2"]["scheduler_config_is_v_pred"]["prediction_type"] == "v_prediction"
    pipeline = load_tiny("sd2")
    assert pipeline.job_options({"arch": "sd2"}) == {"v_prediction": False}
    assert pipeline.job_options({"arch": "sd2", "is_v_pred": True}) == {"v_prediction": True}
    for option, expected in (({}, "v_prediction"), ({"v_prediction": False}, "epsilon")):
        _first_step(pipeline, 64, 64, 2, **option)
        assert pipeline.pipe.scheduler.config.prediction_type == expected
    with pytest.raises(ValueError, match="v_prediction"):
        pipeline.generate(prompt="a", width=64, height=64, steps=1, v_prediction="yes")
    with pytest.raises(ValueError, match="Unknown generation option"):
        load_tiny("ssd").generate(prompt="a", width=64, height=64, steps=1, v_prediction=True)


def test_pixart_fallbacks_ai_toolkit_cannot_sample():
    """Why pixart runs PixArtAlphaPipeline and neither id offers `flowmatch`: ai-toolkit's own path fails there."""
    assert SCHEDULES["pixart_alpha_1024_in_sigma_pipeline"] == {
        "use_additional_conditions": True, "error": "AttributeError: 'NoneType' object has no attribute 'flatten'"}
    assert SCHEDULES["pixart_flowmatch_fallback"]["scheduler_config"]["use_dynamic_shifting"] is True
    assert SCHEDULES["pixart_flowmatch_fallback"]["error"].startswith("ValueError: `mu` must be passed")
    assert REGISTRY["pixart"].pipeline_class == "PixArtAlphaPipeline"


@pytest.mark.parametrize("model_id", ["pixart", "pixart_sigma"])
def test_pixart_prompt_is_encoded_as_ai_toolkit_encodes_it(model_id, load_tiny):
    """120 / 300 T5 tokens with the mask, the text NOT lowercased (the stock pipelines lowercase it)."""
    golden = load_file(os.path.join(ROOT, "pixart_prompt_embeds.safetensors"))
    pipeline = load_tiny(model_id)
    embeds, mask = pipeline.encode_t5(["A Photo of a CAT"])
    torch.testing.assert_close(embeds, golden[f"{model_id}_prompt_embeds"], rtol=0, atol=1e-6)
    assert torch.equal(mask, golden[f"{model_id}_prompt_mask"])
    assert not torch.equal(pipeline.encode_t5(["a photo of a cat"])[0], embeds)


# ---------------------------------------------------------------------------------------------------------------- LoRA
def _case_model(case, kind="lora"):
    """The golden denoiser: its config, every parameter randn * 0.05 from seed 1234 in sorted-name order."""
    import diffusers

    with open(os.path.join(ROOT, f"{kind}_{case}", "config.json")) as f:
        config = json.load(f)
    model = getattr(diffusers, config.pop("_class_name")).from_config(config)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = load_file(os.path.join(ROOT, f"{kind}_{case}", "inputs.safetensors"))

    def forward():
        with torch.no_grad():
            if case in ("ssd", "vega"):
                x = {k: v for k, v in inputs.items() if k not in ("text_embeds", "time_ids")}
                return model(**x, added_cond_kwargs={k: inputs[k] for k in ("text_embeds", "time_ids")}).sample
            if case == "sd2":
                return model(**inputs).sample
            if case == "pixart":
                return model(**inputs, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                             return_dict=False)[0]
            return model(**inputs, return_dict=False)[0]

    return model.eval(), forward


def _lora_path(case, kind="lora"):
    name = f"tiny_{case}_lokr.safetensors" if kind == "lokr" else f"tiny_{case}_lora_r4_a2_fp16.safetensors"
    return os.path.join(ROOT, f"{kind}_{case}", name)


def _file_modules(path):
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in load_file(path)}


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("model_id,kind", LORA_FILES)
def test_lora_file_reproduces_ai_toolkit_outputs(model_id, kind, mode):
    """ai-toolkit's saved file: every module matched; its live (dynamic) or merged (fused) outputs at 1.0 and 0.5, the
    merged weights; removal restores the base (exactly for live PEFT adapters; LoKr is merged in every mode)."""
    case = LORA_CASES[model_id]
    folder, path = os.path.join(ROOT, f"{kind}_{case}"), _lora_path(case, kind)
    golden = load_file(os.path.join(folder, "outputs.safetensors"))
    flavour = "live" if mode == "dynamic" else "merged"
    model, forward = _case_model(case, kind)
    base = forward()
    torch.testing.assert_close(base, golden["base_output"], rtol=0, atol=LORA_ATOL)
    component = REGISTRY[model_id].family_class().denoiser
    stack = LoraStack({component: model}, mode, component, model_id)
    summary = stack.set([LoraRequest(path=path, strength=1.0)])
    assert summary[0]["modules"] == len(_file_modules(path))
    torch.testing.assert_close(forward(), golden[f"lora_{flavour}_m1.0"], rtol=0, atol=LORA_ATOL)
    if mode == "fused":
        for name, weight in load_file(os.path.join(folder, "effective_weights_m1.0.safetensors")).items():
            torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=LORA_ATOL, msg=name)
    stack.set([LoraRequest(path=path, strength=0.5)])
    torch.testing.assert_close(forward(), golden[f"lora_{flavour}_m0.5"], rtol=0, atol=LORA_ATOL)
    stack.clear()
    exact = mode == "dynamic" and kind == "lora"
    torch.testing.assert_close(forward(), base, rtol=0, atol=0 if exact else LORA_ATOL)


# The tiny SSD-1B / Vega UNets have two blocks, so their files carry only names an SD 1.5 file has too; the SDXL
# signature needs a third block or the second text encoder, which real SSD-1B / Vega files have.
@pytest.mark.parametrize("case,label", [("sd2", "SD 1.5 (kohya)"), ("sd3", "Stable Diffusion 3"),
                                        ("pixart", "PixArt (alpha / Sigma)"), ("auraflow", "AuraFlow")])
def test_ai_toolkit_lora_layouts_are_recognised(case, label):
    assert guess_architecture(load_file(_lora_path(case))) == label


@pytest.mark.parametrize("case,target", [("pixart", "sd3"), ("sd3", "auraflow"), ("auraflow", "pixart"),
                                         ("sd2", "auraflow"), ("sd3", "pixart")])
def test_a_lora_of_another_family_is_refused_with_its_family_named(case, target):
    label = guess_architecture(load_file(_lora_path(case)))
    model, _ = _case_model(target)
    stack = LoraStack({"transformer": model}, "dynamic", "transformer", target)
    with pytest.raises(LoraFormatError, match=label.split(" (")[0]):
        stack.set([LoraRequest(path=_lora_path(case), strength=1.0)])


# ---------------------------------------------------------------------------------------------------------------- jobs
@pytest.mark.parametrize("model_cfg,model_id", [
    ({"arch": "sd2"}, "sd2"), ({"is_v2": True, "is_v_pred": True}, "sd2"), ({"is_v3": True}, "sd3"),
    ({"arch": "pixart"}, "pixart"), ({"is_pixart": True}, "pixart"),
    ({"arch": "pixart", "is_pixart_sigma": True}, "pixart_sigma"),
    ({"is_pixart": True, "is_pixart_sigma": True}, "pixart_sigma"), ({"arch": "pixart_sigma"}, "pixart_sigma"),
    ({"arch": "pixart", "name_or_path": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}, "pixart"),  # no flag: 120 tokens
    ({"arch": "auraflow"}, "auraflow"), ({"is_auraflow": True}, "auraflow"),
    ({"is_xl": True, "is_ssd": True, "name_or_path": "segmind/SSD-1B"}, "ssd"), ({"arch": "ssd"}, "ssd"),
    ({"is_xl": True, "is_vega": True, "name_or_path": "segmind/Segmind-Vega"}, "vega"), ({"is_vega": True}, "vega"),
    ({"is_xl": True}, "sdxl"), ({}, "sd15"),
])
def test_jobs_map_to_the_legacy_ids(model_cfg, model_id):
    """ai-toolkit's arch, or its legacy is_* flags in ModelConfig's order."""
    assert model_id_for_job({"name_or_path": "x", **model_cfg}) == model_id


# ---------------------------------------------------------------------------------------------------------------- previews
PREVIEW_ATOL = 1e-5  # fp32; the same classes at another diffusers version may sum in another order
# PixArt's DDPM starts at t = 999, where x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) multiplies eps's float32 rounding by
# 1 / sqrt(ab_999) = 150 (the same effect as test_families.py's BATCH_ATOL_BY_ID); the largest difference seen is 3e-5
PREVIEW_ATOL_BY_ID = {"pixart": 1e-4, "pixart_sigma": 1e-4}


@pytest.mark.parametrize("model_id", LEGACY_IDS)
def test_two_step_preview_matches_ai_toolkit(model_id, load_tiny):
    """A whole 2-step preview (CFG with a negative, seed 42, 64x64; PixArt binned to 256 and resized back) as
    ai-toolkit's sample path renders it on the same tiny weights: its pipeline, scheduler and prompt encodings."""
    with open(os.path.join(ROOT, "previews.json")) as f:
        settings = json.load(f)[model_id]
    golden = load_file(os.path.join(ROOT, "previews.safetensors"))[model_id]
    extra = {"v_prediction": settings["v_prediction"]} if REGISTRY[model_id].options is not None else {}
    result = load_tiny(model_id).generate(
        prompt=settings["prompt"], negative=settings["negative"], width=settings["width"], height=settings["height"],
        steps=settings["steps"], guidance=settings["guidance"], seed=settings["seed"], **extra)
    ours = torch.from_numpy(result.images[0])
    torch.testing.assert_close(ours, golden, rtol=0, atol=PREVIEW_ATOL_BY_ID.get(model_id, PREVIEW_ATOL))
