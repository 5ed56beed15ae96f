"""Krea 2 against ai-toolkit's own Krea 2 code (goldens in tests/goldens/krea2, MANIFEST "krea2"), on the tiny
random-weight pipelines of the real diffusers classes (CPU, float32).

ai-toolkit samples Krea 2 with its own transformer (``SingleStreamDiT``), prompt encoder and Euler loop; the goldens
are their outputs on the tiny model's weights (renamed to ai-toolkit's names), so each test below runs our code on the
same weights and inputs and compares."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN_DIR = os.path.join(GOLDENS_DIR, "krea2")
ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN_DIR, "krea2_aitk.json")) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(GOLDEN_DIR, "krea2_aitk.safetensors"))


def check(actual, expected):
    """Equal to ``ATOL``; the largest difference seen is printed (``pytest -s``) for the parity report."""
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    print(f"max |ours - ai-toolkit| = {(actual.float() - expected.float()).abs().max().item():.3g}")


def unpack(pipe, packed, height, width):
    """Packed ``(B, L, 64)`` latents -> ``(B, 16, H/8, W/8)``."""
    return pipe._unpack_latents(packed, height, width)[:, :, 0]


def pack(pipe, latents):
    batch, channels, height, width = latents.shape
    return pipe._pack_latents(latents, batch, channels, height, width)


def features_and_mask(features):
    return features[None], torch.ones(1, features.shape[0], dtype=torch.bool)


def image_positions(pipe, text_len, height, width):
    return pipe.prepare_position_ids(text_len, height // 2, width // 2, "cpu")


def test_tiny_transformer_is_the_one_the_goldens_ran(pipes, golden):
    """The goldens ran ai-toolkit's SingleStreamDiT with the tiny builder's weights; a changed builder would make every
    comparison below meaningless, so its weights are pinned by their sum."""
    meta, _ = golden
    transformer = pipes("krea2").pipe.transformer
    total = sum(p.double().sum() for p in transformer.state_dict().values())
    assert float(total) == pytest.approx(meta["transformer_weight_sum"], abs=1e-9)


# ------------------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_ai_toolkit(golden):
    from aitk_inference.pipelines.families.krea2 import krea2_schedule

    for name, run in golden[0]["schedules"].items():
        ours = krea2_schedule(run["steps"], run["image_seq_len"], run["mu"])
        assert ours == run["t"], name


@pytest.mark.parametrize("model_id,width,height", [("krea2", 64, 64), ("krea2_turbo", 64, 64)])
def test_transformer_gets_ai_toolkits_times_and_noise(model_id, width, height, pipes, golden):
    """What the transformer really receives: ai-toolkit's flow times (Turbo shifted like Raw), and the seed-42 float32
    noise as the first step's latents."""
    meta, tensors = golden
    pipe = pipes(model_id)
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["timestep"].clone(), kwargs["hidden_states"].clone()))

    handle = pipe.pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        pipe.generate("a tiny red fox in the snow", width=width, height=height, steps=2, guidance=1.0, seed=42)
    finally:
        handle.remove()
    expected = meta["schedules"][f"steps2_w{width}_h{height}_muNone"]["t"][:-1]
    assert [t.item() for t, _ in seen] == [np.float32(t) for t in expected]
    first = unpack(pipe.pipe, seen[0][1], height, width)
    assert torch.equal(first, tensors[f"noise_seed42_w{width}_h{height}"])


# ------------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("key", ["prompt", "negative", "long"])
def test_prompt_features_match_ai_toolkit(key, pipes, golden):
    """Natural length, up to 512 prompt tokens plus the separately tokenized suffix, prefix dropped."""
    meta, tensors = golden
    ours = pipes("krea2").pipe.encode_one(meta["prompts"][key])
    expected = tensors[f"features_{key}"]
    assert ours.shape == expected.shape
    check(ours, expected)


def test_batch_of_prompts_is_padded_and_masked(pipes, golden):
    meta, tensors = golden
    pipe = pipes("krea2").pipe
    batch, mask = pipe.encode_batch([meta["prompts"]["prompt"], meta["prompts"]["negative"]])
    short = tensors["features_negative"].shape[0]
    assert batch.shape[1] == tensors["features_prompt"].shape[0]
    assert mask[0].all() and mask[1, :short].all() and not mask[1, short:].any()
    assert not batch[1, short:].any()


# ------------------------------------------------------------------------------------------------------- forward
def test_forward_matches_ai_toolkits_predict_velocity(pipes, golden):
    _, tensors = golden
    pipe = pipes("krea2").pipe
    text, mask = features_and_mask(tensors["features_prompt"])
    latents = tensors["forward_latents"]
    positions = image_positions(pipe, text.shape[1], 8, 12)
    ours = pipe.velocity(pack(pipe, latents), torch.tensor([0.7]), text, mask, positions)
    check(unpack(pipe, ours, 64, 96), tensors["forward_velocity"])


@pytest.mark.parametrize("isolated,t,key", [
    (False, 0.7, "forward_velocity_refs"),
    (True, 0.7, "forward_velocity_refs_isolated"),
    (True, 0.3, "forward_velocity_refs_isolated_t03"),
])
def test_forward_with_reference_latents_matches_ai_toolkit(isolated, t, key, pipes, golden):
    """Two references of different sizes at rotary index 1 and 2, modulated at t = 0; isolated = kv_cache."""
    _, tensors = golden
    pipe = pipes("krea2").pipe
    text, mask = features_and_mask(tensors["features_prompt"])
    references, reference_ids = pipe.reference_tokens([tensors["forward_ref_0"], tensors["forward_ref_1"]])
    positions = torch.cat([image_positions(pipe, text.shape[1], 8, 12), reference_ids])
    ours = pipe.velocity(pack(pipe, tensors["forward_latents"]), torch.tensor([t]), text, mask, positions, references,
                         isolated)
    check(unpack(pipe, ours, 64, 96), tensors[key])


def test_cached_reference_keys_and_values_match_ai_toolkits_cache(pipes, golden):
    """kv_cache: a first call at t = 0.7 fills the cache, the call at t = 0.3 leaves the references out and attends to
    the cached keys/values, as ai-toolkit's ref_kv_cache does; both calls also equal the uncached isolated forward."""
    from aitk_inference.pipelines.families.krea2 import ReferenceKV

    _, tensors = golden
    pipe = pipes("krea2").pipe
    text, mask = features_and_mask(tensors["features_prompt"])
    references, reference_ids = pipe.reference_tokens([tensors["forward_ref_0"], tensors["forward_ref_1"]])
    positions = torch.cat([image_positions(pipe, text.shape[1], 8, 12), reference_ids])
    latents, cache = pack(pipe, tensors["forward_latents"]), ReferenceKV()
    first = pipe.velocity(latents, torch.tensor([0.7]), text, mask, positions, references, True, cache)
    assert cache.blocks is not None and len(cache.blocks) == len(pipe.transformer.transformer_blocks)
    check(unpack(pipe, first, 64, 96), tensors["forward_velocity_refs_isolated"])
    second = pipe.velocity(latents, torch.tensor([0.3]), text, mask, positions, references, True, cache)
    check(unpack(pipe, second, 64, 96), tensors["forward_velocity_refs_kv_cached"])
    with pytest.raises(ValueError, match="isolate_references"):
        pipe.velocity(latents, torch.tensor([0.3]), text, mask, positions, references, False, ReferenceKV())


# ------------------------------------------------------------------------------------------------------- sampler
def sample_latents(pipeline, **kwargs):
    """The family's own call (guidance mapped to ai-toolkit's g - 1) with latent output, unpacked."""
    params = pipeline.resolve_params("a tiny red fox in the snow", seed=42, **kwargs)
    call = pipeline.pipeline_kwargs(params)
    call.update(output_type="latent", generator=torch.Generator("cpu").manual_seed(42),
                num_inference_steps=params.steps)
    with torch.inference_mode():
        packed = pipeline.pipe(**call).images
    return unpack(pipeline.pipe, packed, params.height, params.width)


@pytest.mark.parametrize("model_id,kwargs,key", [
    ("krea2", dict(steps=3, guidance=4.0, width=96, height=64), "sampler_raw_g4_steps3_w96_h64"),
    ("krea2_turbo", dict(steps=2, guidance=1.0, width=64, height=64), "sampler_turbo_g1_steps2_w64_h64"),
    ("krea2", dict(steps=2, guidance=2.0, width=64, height=64, schedule_mu=1.15), "sampler_mu115_g2_steps2_w64_h64"),
])
def test_sampler_matches_ai_toolkits_preview_loop(model_id, kwargs, key, pipes, golden):
    """ai-toolkit's Krea2Pipeline.__call__ (its Euler loop, CFG c + (g-1)(c - u), float32 latents) from the same
    noise; our prompt encoding feeds it."""
    ours = sample_latents(pipes(model_id), **kwargs)
    check(ours, golden[1][key])


@pytest.mark.parametrize("kv_cache,key", [(False, "sampler_edit_g3_steps2_w96_h64"),
                                          (True, "sampler_edit_kv_g3_steps2_w96_h64")])
def test_edit_sampler_matches_ai_toolkit_with_given_reference_latents(kv_cache, key, pipes, golden, monkeypatch):
    """The loop with reference tokens (ai-toolkit: text-only prompt features, two given reference latents)."""
    _, tensors = golden
    pipeline = pipes("krea2_o_edit")
    pipe = pipeline.pipe
    references = [tensors["forward_ref_0"], tensors["forward_ref_1"]]
    encode_one = pipe.encode_one
    monkeypatch.setattr(pipe, "encode_references", lambda *args, **kwargs: references)
    monkeypatch.setattr(pipe, "encode_one", lambda prompt, images=None: encode_one(prompt))
    grey = np.full((16, 16, 3), 0.5, dtype=np.float32)
    ours = sample_latents(pipeline, steps=2, guidance=3.0, width=96, height=64, control_images=[grey],
                          kv_cache=kv_cache)
    check(ours, tensors[key])


# ------------------------------------------------------------------------------------------------------- references
def unit_image(tensors, key):
    from aitk_inference.pipelines.families.krea2 import to_unit_tensor
    from PIL import Image

    return to_unit_tensor(Image.fromarray(tensors[key].numpy()))


@pytest.mark.parametrize("match,keys,name", [(True, ["img_h50_w70", "img_h40_w56"], "match_w96_h64"),
                                             (False, ["img_h40_w56"], "cap")])
def test_reference_latents_match_ai_toolkit(match, keys, name, pipes, golden):
    """Resize rule, bilinear without antialias, VAE sample (seed 5 on CPU) and normalization."""
    _, tensors = golden
    pipe = pipes("krea2_o_edit").pipe
    images = [unit_image(tensors, key) for key in keys]
    with torch.inference_mode():
        ours = pipe.encode_references(images, 96 * 64, match, torch.Generator("cpu").manual_seed(5))
    for i, latent in enumerate(ours):
        check(latent, tensors[f"ref_{name}_{i}"])


def test_reference_sizes_match_ai_toolkit(golden):
    from aitk_inference.pipelines.families.krea2 import REFERENCE_MAX_PIXELS, reference_size

    for name, expected in golden[0]["reference_sizes"].items():  # h{H}_w{W}_{match|cap}_target{pixels}
        height, width, rule, target = name.split("_")
        height, width, match, target = int(height[1:]), int(width[1:]), rule == "match", int(target[len("target"):])
        budget = target if match else REFERENCE_MAX_PIXELS
        assert list(reference_size(height, width, budget, match, 16)) == expected, name


def test_vlm_copy_matches_ai_toolkit(golden):
    """Downscaled (never up) to the pixel budget, bicubic with antialias, clamped."""
    from aitk_inference.pipelines.families.krea2 import vlm_image

    _, tensors = golden
    for key in ("img_h60_w90", "img_h40_w56"):
        ours = vlm_image(unit_image(tensors, key), budget=48 * 48)
        check(ours, tensors[f"vlm_{key}_budget2304"])


def test_prompt_with_a_reference_image_matches_ai_toolkit(pipes, golden):
    """The Qwen3-VL prompt with ``Picture 1: <|vision_start|><|image_pad|><|vision_end|>`` and the image's copy."""
    from aitk_inference.pipelines.families.krea2 import vlm_image

    meta, tensors = golden
    pipe = pipes("krea2_o_edit").pipe
    with torch.inference_mode():
        ours = pipe.encode_one(meta["prompts"]["prompt"], [vlm_image(unit_image(tensors, "img_h60_w90"))])
    expected = tensors["features_prompt_with_image"]
    assert ours.shape == expected.shape
    check(ours, expected)


# ------------------------------------------------------------------------------------------------------- LoRA
AITK_TO_DIFFUSERS_WEIGHT = {"blocks.1.attn.wq.weight": "transformer_blocks.1.attn.to_q.weight",
                            "txtfusion.refiner_blocks.0.mlp.down.weight": "text_fusion.refiner_blocks.0.ff.down.weight"}


@pytest.mark.parametrize("variant", ["lora_r4", "lokr"])
@pytest.mark.parametrize("mode", ["dynamic", "fused"])
def test_lora_saved_by_ai_toolkit_reproduces_its_outputs(variant, mode, pipes, golden):
    """ai-toolkit's own network + save code (diffusion_model. + original Krea names, 48 modules including the
    text-fusion blocks; LoKr too): every module matches, and inactive / m1.0 / m0.5 / the merged weight are ai-toolkit's."""
    meta, tensors = golden
    outputs = load_file(os.path.join(GOLDEN_DIR, f"krea2_{variant}_outputs.safetensors"))
    path = os.path.join(GOLDEN_DIR, f"krea2_{variant}.safetensors")
    pipeline = pipes("krea2", lora_mode=mode)
    pipe = pipeline.pipe
    text, mask = features_and_mask(tensors["features_prompt"])
    positions = image_positions(pipe, text.shape[1], 8, 12)

    def velocity():
        with torch.inference_mode():
            out = pipe.velocity(pack(pipe, tensors["forward_latents"]), torch.tensor([0.7]), text, mask, positions)
        return unpack(pipe, out, 64, 96)

    check(velocity(), outputs["inactive"])
    for strength in (1.0, 0.5):
        summary = pipeline.set_loras([(path, strength)])
        assert summary[0]["modules"] == meta["lora"][variant]["modules"] == 48
        check(velocity(), outputs[f"live_m{strength}"])
        if mode == "fused" and strength == 1.0:
            weights = dict(pipe.transformer.named_parameters())
            for original, ours in AITK_TO_DIFFUSERS_WEIGHT.items():
                check(weights[ours].detach(), outputs[f"merged_{original}"])
    pipeline.set_loras([])
    check(velocity(), outputs["inactive"])


def test_krea_lora_names_its_family_and_other_families_are_refused(pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
    from aitk_inference.pipelines.lora.stack import LoraRequest

    keys = load_file(os.path.join(GOLDEN_DIR, "krea2_lora_r4.safetensors"))
    assert guess_architecture(keys) == "Krea 2"
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="FLUX.1"):
        pipes("krea2").set_loras([LoraRequest(state_dict=flux, name="flux")])


# ------------------------------------------------------------------------------------------------------- options
def test_options_are_checked_and_edit_ids_need_references(pipes):
    pipeline = pipes("krea2_turbo")
    with pytest.raises(ValueError, match="kv_cache"):
        pipeline.generate("x", width=64, height=64, steps=1, kv_cache=True)
    with pytest.raises(ValueError, match="schedule_mu"):
        pipeline.generate("x", width=64, height=64, steps=1, schedule_mu="high")
    with pytest.raises(ValueError, match="needs 1 control image"):
        pipes("krea2_o_edit").generate("x", width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="must be true or false"):
        pipes("krea2_o_edit").generate("x", width=64, height=64, steps=1, control_images=[np.zeros((16, 16, 3))],
                                       kv_cache="yes")


def test_edit_options_change_the_image(pipes):
    pipeline = pipes("krea2_o_edit")
    image = np.random.RandomState(0).rand(40, 56, 3).astype(np.float32)
    fast = dict(width=64, height=64, steps=2, seed=3, control_images=[image])
    base = pipeline.generate("make it blue", **fast).images
    for option in ("kv_cache", "match_target_res"):
        other = pipeline.generate("make it blue", **{option: False}, **fast).images
        assert np.abs(other - base).max() > 1e-5, f"{option} must matter"
    second = pipeline.generate("make it blue", **{**fast, "control_images": [image, image[::-1].copy()]}).images
    assert np.abs(second - base).max() > 1e-5, "a second reference must matter"


def test_job_arch_tags_map_to_the_edit_ids():
    from aitk_inference.pipelines.jobs.config import model_id_for_job

    assert model_id_for_job({"arch": "krea2", "name_or_path": "krea/Krea-2-Raw"}) == "krea2"
    assert model_id_for_job({"arch": "krea2:turbo", "name_or_path": "krea/Krea-2-Turbo"}) == "krea2_turbo"
    assert model_id_for_job({"arch": "krea2:o_edit", "name_or_path": "krea/Krea-2-Raw"}) == "krea2_o_edit"
    assert model_id_for_job({"arch": "krea2:o_edit_turbo", "name_or_path": "x"}) == "krea2_o_edit_turbo"
    assert model_id_for_job({"arch": "zimage:turbo", "name_or_path": "Tongyi-MAI/Z-Image-Turbo"}) == "zimage_turbo"


def test_reproduce_passes_the_jobs_model_kwargs(pipes):
    model = {"arch": "krea2:o_edit", "model_kwargs": {"edit": True, "kv_cache": False, "match_target_res": True,
                                                      "schedule_mu": 1.0, "checkpoint_filename": "raw.safetensors"}}
    assert pipes("krea2_o_edit").job_options(model) == {"kv_cache": False, "match_target_res": True, "schedule_mu": 1.0}
    assert pipes("krea2").job_options({"arch": "krea2", "model_kwargs": {"schedule_mu": 1.15}}) == {"schedule_mu": 1.15}
    assert pipes("krea2_turbo").job_options({"arch": "krea2:turbo"}) == {}
    # a job without them ran with ai-toolkit's model-class defaults, not the o_edit preset's (the end-to-end job)
    assert pipes("krea2_o_edit").job_options({"arch": "krea2:o_edit", "model_kwargs": {"edit": True}}) == {
        "kv_cache": False, "match_target_res": False}
    with pytest.raises(ValueError, match="--model krea2_o_edit"):
        pipes("krea2").job_options({"arch": "krea2", "model_kwargs": {"edit": True}})


def test_server_request_of_the_reference_shape_runs_an_edit_id(pipes, tmp_path):
    """The reference's /v1 request for Krea 2 edit: ``ctrl_img_1..3`` (base64), request-level ``kv_cache`` and
    ``match_target_res``; mapped to the library and generated on the tiny model."""
    import base64
    import io

    from PIL import Image

    from aitk_inference.server.mapping import build_job
    from aitk_inference.server.schemas import InferenceInput
    from aitk_inference.server.settings import Settings

    (tmp_path / "k.safetensors").write_bytes(open(os.path.join(GOLDEN_DIR, "krea2_lora_r4.safetensors"), "rb").read())

    def encoded(color):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 24), color).save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    body = InferenceInput(model="krea2_o_edit", loras=[{"path": "k.safetensors"}], kv_cache=False,
                          match_target_res=False,
                          prompts=[{"prompt": "make it blue", "width": 64, "height": 64, "sample_steps": 1, "seed": 1,
                                    "ctrl_img_1": encoded("red"), "ctrl_img_2": encoded("green"),
                                    "ctrl_img_3": encoded("white")}])
    job = build_job("t", body, Settings.from_env({"WORKFLOWS_BASE_PATH": str(tmp_path)}))
    kwargs = job.prompts[0]
    assert kwargs["kv_cache"] is False and kwargs["match_target_res"] is False and len(job.controls[0]) == 3
    pipeline = pipes("krea2_o_edit")
    pipeline.set_loras([(job.loras[0].path, job.loras[0].strength)])
    try:
        result = pipeline.generate(control_images=job.controls[0], **kwargs)
    finally:
        pipeline.set_loras([])
    assert result.images.shape == (1, 64, 64, 3)


def test_make_tiny_writes_loras_in_ai_toolkits_krea_names(pipes, tmp_path):
    """``write_native_loras``: every Linear (48 on the tiny model, as ai-toolkit's own file) under original names, as
    LoRA and LoKr; both load with every module matched and change the output."""
    from aitk_inference.tiny.krea2 import write_native_loras

    pipeline = pipes("krea2")
    files = write_native_loras(pipeline.pipe, str(tmp_path))
    fast = dict(width=64, height=64, steps=1, seed=3)
    base = pipeline.generate("a fox", **fast).images
    for label, path in files.items():
        assert "blocks.0.attn.wq" in " ".join(load_file(path)), label
        summary = pipeline.set_loras([(path, 1.0)])
        assert summary[0]["modules"] == 48, label
        assert np.abs(pipeline.generate("a fox", **fast).images - base).max() > 1e-4, label
    pipeline.set_loras([])
