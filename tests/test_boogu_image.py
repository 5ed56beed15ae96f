"""Boogu-Image against ai-toolkit's own Boogu-Image code (goldens in tests/goldens/boogu_image, MANIFEST "boogu_image"),
on the tiny random-weight pipelines (CPU, float32).

ai-toolkit samples Boogu-Image with its own transformer, prompt encoding and Euler loop; the goldens are their outputs
on the tiny model's weights, so each test below runs our code on the same weights and inputs and compares."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN_DIR = os.path.join(GOLDENS_DIR, "boogu_image")
ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN_DIR, "boogu_image_aitk.json")) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(GOLDEN_DIR, "boogu_image_aitk.safetensors"))


def check(actual, expected):
    """Equal to ``ATOL``; the largest difference seen is printed (``pytest -s``) for the parity report."""
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL, rtol=0)
    print(f"max |ours - ai-toolkit| = {(actual.float() - expected.float()).abs().max().item():.3g}")


def text(tensors, key):
    features = tensors[f"features_{key}"]
    return features[None], torch.ones(1, features.shape[0], dtype=torch.long)


def unit_image(tensors, key):
    from aitk_inference.pipelines.families.krea2 import to_unit_tensor
    from PIL import Image

    return to_unit_tensor(Image.fromarray(tensors[key].numpy()))


def test_tiny_transformer_is_the_one_the_goldens_ran(pipes, golden):
    """The goldens ran ai-toolkit's transformer with the tiny builder's weights; a changed builder would make every
    comparison below meaningless, so its weights are pinned by their sum."""
    meta, _ = golden
    transformer = pipes("boogu_image").pipe.transformer
    total = sum(p.double().sum() for p in transformer.state_dict().values())
    assert float(total) == pytest.approx(meta["transformer_weight_sum"], abs=1e-9)
    config = json.loads(json.dumps({k: v for k, v in transformer.config.items() if not k.startswith("_")}))
    assert config == meta["transformer_config"]


# ------------------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_ai_toolkit(golden):
    from aitk_inference.pipelines.families.boogu_image import boogu_mu, boogu_schedule

    for name, run in golden[0]["schedules"].items():
        assert boogu_schedule(run["steps"], run["patch_tokens"]).tolist() == run["t"], name
        assert boogu_mu(run["patch_tokens"]) == pytest.approx(run["mu"], abs=1e-12), name


def test_transformer_gets_ai_toolkits_times_and_noise(pipes, golden):
    """What the transformer really receives: ai-toolkit's flow times, and the seed-42 float32 noise as the first
    step's latents."""
    meta, tensors = golden
    pipe = pipes("boogu_image")
    seen = []

    def spy(module, args, kwargs):
        seen.append((args[1].clone(), args[0].clone()))

    handle = pipe.pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        pipe.generate("a tiny red fox in the snow", width=64, height=64, steps=2, guidance=1.0, seed=42)
    finally:
        handle.remove()
    expected = meta["schedules"]["steps2_w64_h64"]["t"][:-1]
    assert [t.item() for t, _ in seen] == [np.float32(t) for t in expected]
    assert torch.equal(seen[0][1], tensors["noise_seed42_w64_h64"])


# ------------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("key", ["prompt", "negative", "long"])
def test_prompt_features_match_ai_toolkit(key, pipes, golden):
    """Boogu's system prompt, the chat template, natural length up to 1024 tokens, the last hidden state."""
    meta, tensors = golden
    with torch.inference_mode():
        ours = pipes("boogu_image").pipe.encode_one(meta["prompts"][key])
    expected = tensors[f"features_{key}"]
    assert ours.shape == expected.shape
    check(ours, expected)


def test_edit_prompt_features_match_ai_toolkit(pipes, golden):
    """The edit system prompt with one image item per reference (resized copies) before the text; the negative is
    encoded with the references too."""
    from aitk_inference.pipelines.families.boogu_image import vlm_image

    meta, tensors = golden
    pipe = pipes("boogu_image_edit").pipe
    with torch.inference_mode():
        two = pipe.encode_one(meta["prompts"]["prompt"], [vlm_image(unit_image(tensors, k), max_pixels=32 * 32)
                                                          for k in ("img_h60_w90", "img_h40_w56")])
        negative = pipe.encode_one("", [vlm_image(unit_image(tensors, "img_h40_w56"))])
    for ours, key in ((two, "edit_prompt_2refs"), (negative, "edit_negative_1ref")):
        assert ours.shape == tensors[f"features_{key}"].shape
        check(ours, tensors[f"features_{key}"])


def test_vlm_sizes_match_ai_toolkit(golden):
    from aitk_inference.pipelines.families.boogu_image import vlm_size

    for name, expected in golden[0]["vlm_sizes"].items():  # h{H}_w{W}_px{max pixels}_side{max side}
        height, width, pixels, side = (int(part.lstrip("hwpxside")) for part in name.split("_"))
        assert list(vlm_size(height, width, pixels, side)) == expected, name


# ------------------------------------------------------------------------------------------------------- forward
def test_forward_matches_ai_toolkits_transformer(pipes, golden):
    _, tensors = golden
    transformer = pipes("boogu_image").pipe.transformer
    with torch.inference_mode():
        ours = transformer(tensors["forward_latents"], torch.tensor([0.7]), *text(tensors, "prompt"))
    assert tensors["forward_velocity"].abs().max() > 0.1
    check(ours, tensors["forward_velocity"])


def test_forward_with_reference_latents_matches_ai_toolkit(pipes, golden):
    """Two references of different sizes: their own patch embedder, image-index embeddings, refiner and positions."""
    _, tensors = golden
    transformer = pipes("boogu_image_edit").pipe.transformer
    refs = [tensors["forward_ref_0"][None], tensors["forward_ref_1"][None]]
    with torch.inference_mode():
        ours = transformer(tensors["forward_latents"], torch.tensor([0.7]), *text(tensors, "prompt"), refs)
    check(ours, tensors["forward_velocity_refs"])
    assert (tensors["forward_velocity_refs"] - tensors["forward_velocity"]).abs().max() > 1e-3


def test_padded_batch_matches_ai_toolkit(pipes, golden):
    """Two prompts of different lengths, right-padded and masked, at two times."""
    _, tensors = golden
    long, short = tensors["features_prompt"], tensors["features_negative"]
    features = torch.zeros(2, long.shape[0], long.shape[1])
    mask = torch.zeros(2, long.shape[0], dtype=torch.long)
    features[0], features[1, : short.shape[0]] = long, short
    mask[0], mask[1, : short.shape[0]] = 1, 1
    with torch.inference_mode():
        ours = pipes("boogu_image").pipe.transformer(tensors["forward_batch_latents"], torch.tensor([0.7, 0.2]),
                                                     features, mask)
    check(ours, tensors["forward_velocity_batch"])


# ------------------------------------------------------------------------------------------------------- sampler
def sample(pipeline, **kwargs):
    """The family's own call with latent output (and with decoded output)."""
    params = pipeline.resolve_params("a tiny red fox in the snow", seed=42, **kwargs)
    results = {}
    for output_type in ("latent", "np"):
        call = pipeline.pipeline_kwargs(params)
        call.update(output_type=output_type, generator=torch.Generator("cpu").manual_seed(42),
                    num_inference_steps=params.steps)
        with torch.inference_mode():
            results[output_type] = pipeline.pipe(**call).images
    return results["latent"], results["np"][0]


@pytest.mark.parametrize("kwargs,key", [
    (dict(steps=3, guidance=4.0, width=96, height=64), "g4_steps3_w96_h64"),
    (dict(steps=2, guidance=1.0, width=64, height=64), "g1_steps2_w64_h64"),
])
def test_sampler_matches_ai_toolkits_preview_loop(kwargs, key, pipes, golden):
    """ai-toolkit's BooguImagePipeline.__call__ (its Euler loop, CFG u + g(c - u) above 1, float32 latents, decode)
    from the same noise; our prompt encoding feeds it. The decoded image equals its uint8 image to one level."""
    _, tensors = golden
    latents, image = sample(pipes("boogu_image"), **kwargs)
    check(latents, tensors[f"sampler_{key}"])
    assert np.abs(image * 255 - tensors[f"sampler_{key}_image"].numpy()).max() <= 1.0


def test_edit_sampler_matches_ai_toolkit_with_given_references(pipes, golden, monkeypatch):
    """The loop with reference latents in both passes (ai-toolkit given the same prompt features and latents)."""
    _, tensors = golden
    pipeline = pipes("boogu_image_edit")
    pipe = pipeline.pipe
    references = [tensors["forward_ref_0"], tensors["forward_ref_1"]]
    features = {"a tiny red fox in the snow": "edit_prompt_2refs", "": "edit_negative_1ref"}
    monkeypatch.setattr(pipe, "encode_references", lambda *args, **kwargs: references)
    monkeypatch.setattr(pipe, "encode_one", lambda prompt, images=None: tensors[f"features_{features[prompt]}"])
    grey = np.full((16, 16, 3), 0.5, dtype=np.float32)
    latents, image = sample(pipeline, steps=2, guidance=3.0, width=96, height=64, control_images=[grey])
    check(latents, tensors["sampler_edit_g3_steps2_w96_h64"])
    assert np.abs(image * 255 - tensors["sampler_edit_g3_steps2_w96_h64_image"].numpy()).max() <= 1.0


# ------------------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("match,keys,name", [(True, ["img_h50_w70", "img_h40_w56"], "match_w96_h64"),
                                             (False, ["img_h40_w56"], "cap")])
def test_reference_latents_match_ai_toolkit(match, keys, name, pipes, golden):
    """Resize rule, bilinear without antialias, VAE sample (seed 5 on CPU), shift and scale."""
    _, tensors = golden
    pipe = pipes("boogu_image_edit").pipe
    images = [unit_image(tensors, key) for key in keys]
    with torch.inference_mode():
        ours = pipe.encode_references(images, 96 * 64, match, torch.Generator("cpu").manual_seed(5))
    for i, latent in enumerate(ours):
        check(latent, tensors[f"ref_{name}_{i}"])


def test_reference_sizes_match_ai_toolkit(golden):
    from aitk_inference.pipelines.families.boogu_image import REFERENCE_MAX_PIXELS
    from aitk_inference.pipelines.families.krea2 import reference_size

    for name, expected in golden[0]["reference_sizes"].items():  # h{H}_w{W}_{match|cap}_target{pixels}
        height, width, rule, target = name.split("_")
        height, width, match, target = int(height[1:]), int(width[1:]), rule == "match", int(target[len("target"):])
        budget = target if match else REFERENCE_MAX_PIXELS
        assert list(reference_size(height, width, budget, match, 16)) == expected, name


def test_generate_feeds_the_references_of_each_seed(pipes):
    """generate(): the reference latents the transformer gets are the VAE sample drawn with the image's seed."""
    pipeline = pipes("boogu_image_edit")
    image = np.random.RandomState(0).rand(40, 56, 3).astype(np.float32)
    seen = []
    handle = pipeline.pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[4]))
    try:
        pipeline.generate("make it blue", width=64, height=64, steps=1, guidance=1.0, seed=7, control_images=[image])
    finally:
        handle.remove()
    from aitk_inference.pipelines.base import to_pil_rgb
    from aitk_inference.pipelines.families.krea2 import to_unit_tensor

    with torch.inference_mode():
        expected = pipeline.pipe.encode_references([to_unit_tensor(to_pil_rgb(image))], 64 * 64, False,
                                                   torch.Generator("cpu").manual_seed(7))
    assert len(seen) == 1 and torch.equal(seen[0][0][0], expected[0])


# ------------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("variant", ["lora_r4", "lokr"])
@pytest.mark.parametrize("mode", ["dynamic", "fused"])
def test_lora_saved_by_ai_toolkit_reproduces_its_outputs(variant, mode, pipes, golden):
    """ai-toolkit's own network + save code (diffusion_model. + the checkpoint's names, the 32 Linears of the double-
    and single-stream blocks; LoKr too): every module matches, and inactive / m1.0 / m0.5 / the merged weight are
    ai-toolkit's."""
    meta, tensors = golden
    outputs = load_file(os.path.join(GOLDEN_DIR, f"boogu_image_{variant}_outputs.safetensors"))
    path = os.path.join(GOLDEN_DIR, f"boogu_image_{variant}.safetensors")
    pipeline = pipes("boogu_image", lora_mode=mode)
    transformer = pipeline.pipe.transformer
    refs = [tensors["forward_ref_0"][None], tensors["forward_ref_1"][None]]

    def velocity():
        with torch.inference_mode():
            return transformer(tensors["forward_latents"], torch.tensor([0.7]), *text(tensors, "prompt"), refs)

    check(velocity(), outputs["inactive"])
    for strength in (1.0, 0.5):
        summary = pipeline.set_loras([(path, strength)])
        assert summary[0]["modules"] == meta["lora"][variant]["modules"] == 32
        check(velocity(), outputs[f"live_m{strength}"])
        if mode == "fused" and strength == 1.0:
            weights = dict(transformer.named_parameters())
            for name in ("double_stream_layers.0.img_instruct_attn.processor.img_to_q.weight",
                         "single_stream_layers.0.feed_forward.linear_2.weight"):
                check(weights[name].detach(), outputs[f"merged_{name}"])
    pipeline.set_loras([])
    check(velocity(), outputs["inactive"])


def test_boogu_lora_names_its_family_and_other_families_are_refused(pipes):
    """A Boogu file also carries OmniGen2's and Lumina2's block names; Boogu-Image's signature refines both."""
    from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
    from aitk_inference.pipelines.lora.stack import LoraRequest

    keys = load_file(os.path.join(GOLDEN_DIR, "boogu_image_lora_r4.safetensors"))
    assert guess_architecture(keys) == "Boogu-Image"
    assert guess_architecture(list(keys) + ["diffusion_model.ref_image_refiner.0.attn.to_q.lora_A.weight"]) == "Boogu-Image"
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="FLUX.1"):
        pipes("boogu_image").set_loras([LoraRequest(state_dict=flux, name="flux")])


# ------------------------------------------------------------------------------------------------------- options
def test_options_are_checked_and_the_edit_id_needs_references(pipes):
    with pytest.raises(ValueError, match="match_target_res"):
        pipes("boogu_image").generate("x", width=64, height=64, steps=1, match_target_res=True)
    with pytest.raises(ValueError, match="needs 1 control image"):
        pipes("boogu_image_edit").generate("x", width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="must be true or false"):
        pipes("boogu_image_edit").generate("x", width=64, height=64, steps=1, control_images=[np.zeros((16, 16, 3))],
                                           match_target_res="yes")


def test_edit_references_and_match_target_res_change_the_image(pipes):
    pipeline = pipes("boogu_image_edit")
    image = np.random.RandomState(0).rand(40, 56, 3).astype(np.float32)
    fast = dict(width=64, height=64, steps=1, seed=3, control_images=[image])
    base = pipeline.generate("make it blue", **fast).images
    matched = pipeline.generate("make it blue", match_target_res=True, **fast).images
    assert np.abs(matched - base).max() > 1e-5, "match_target_res must matter"
    second = pipeline.generate("make it blue", **{**fast, "control_images": [image, image[::-1].copy()]}).images
    assert np.abs(second - base).max() > 1e-5, "a second reference must matter"


def test_jobs_map_to_the_ids_and_pass_match_target_res(pipes):
    from aitk_inference.pipelines.jobs.config import model_id_for_job

    assert model_id_for_job({"arch": "boogu_image", "name_or_path": "Boogu/Boogu-Image-0.1-Base"}) == "boogu_image"
    assert model_id_for_job({"arch": "boogu_image_edit", "name_or_path": "x"}) == "boogu_image_edit"
    model = {"arch": "boogu_image_edit", "model_kwargs": {"match_target_res": True, "vlm_max_pixels": 1}}
    assert pipes("boogu_image_edit").job_options(model) == {"match_target_res": True}
    assert pipes("boogu_image").job_options({"arch": "boogu_image", "model_kwargs": {"match_target_res": True}}) == {}


def test_server_request_with_reference_images_runs_the_edit_id(pipes, tmp_path):
    """A /v1 request for the edit id: ``ctrl_img_1..2`` (base64) and request-level ``match_target_res``, with an
    ai-toolkit LoRA; mapped to the library and generated on the tiny model."""
    import base64
    import io

    from PIL import Image

    from aitk_inference.server.mapping import build_job
    from aitk_inference.server.schemas import InferenceInput
    from aitk_inference.server.settings import Settings

    (tmp_path / "b.safetensors").write_bytes(open(os.path.join(GOLDEN_DIR, "boogu_image_lora_r4.safetensors"), "rb").read())

    def encoded(color):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 24), color).save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    body = InferenceInput(model="boogu_image_edit", loras=[{"path": "b.safetensors"}], match_target_res=True,
                          prompts=[{"prompt": "make it blue", "width": 64, "height": 64, "sample_steps": 1, "seed": 1,
                                    "ctrl_img_1": encoded("red"), "ctrl_img_2": encoded("green")}])
    job = build_job("t", body, Settings.from_env({"WORKFLOWS_BASE_PATH": str(tmp_path)}))
    kwargs = job.prompts[0]
    assert kwargs["match_target_res"] is True and len(job.controls[0]) == 2
    pipeline = pipes("boogu_image_edit")
    summary = pipeline.set_loras([(job.loras[0].path, job.loras[0].strength)])
    try:
        assert summary[0]["modules"] == 32
        result = pipeline.generate(control_images=job.controls[0], **kwargs)
    finally:
        pipeline.set_loras([])
    assert result.images.shape == (1, 64, 64, 3)
