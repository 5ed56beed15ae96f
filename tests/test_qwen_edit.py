"""Qwen-Image-Edit and Edit-Plus (2509/2511) on tiny random-weight pipelines of the real classes.

Each generation VAE-encodes its control images at about 1 MP (diffusers' fixed size), so the tests share their
generations through module fixtures.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(width=64, height=64, steps=2, seed=3)
# a high guidance makes the norm rescale (which ai-toolkit leaves out) visible on the tiny model
PLUS = dict(FAST, guidance=10.0, negative="blurry, low quality")


def picture(seed, size=(64, 80)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def edit_plus(load_tiny):
    return load_tiny("qwen_image_edit_plus")


@pytest.fixture(scope="module")
def recorded(edit_plus):
    """One Edit-Plus generation (guidance 4) with the transformer outputs and the scheduler inputs recorded."""
    pipe = edit_plus.pipe
    forwards, steps = [], []
    forward, step = pipe.transformer.forward, pipe.scheduler.step

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        forwards.append((kwargs["encoder_hidden_states"], out[0].clone()))
        return out

    def recording_step(model_output, *args, **kwargs):
        steps.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.transformer.forward, pipe.scheduler.step = recording_forward, recording_step
    try:
        result = edit_plus.generate("a red fox", control_images=[picture(0)], **PLUS)
    finally:
        del pipe.transformer.forward, pipe.scheduler.step
    return result, forwards, steps


def test_edit_plus_true_cfg_has_no_norm_rescale(edit_plus, recorded):
    result, forwards, steps = recorded
    assert len(forwards) == 4 and len(steps) == 2, "two forwards (cond, uncond) per step"
    for i, noise_pred in enumerate(steps):
        (cond_embeds, cond), (uncond_embeds, uncond) = forwards[2 * i], forwards[2 * i + 1]
        assert not torch.equal(cond_embeds, uncond_embeds), "the second forward uses the negative"
        by_hand = (uncond + 10.0 * (cond - uncond))[:, : noise_pred.shape[1]]
        torch.testing.assert_close(noise_pred, by_hand, rtol=0, atol=1e-6)
        c = cond[:, : noise_pred.shape[1]]
        rescaled = by_hand * (c.norm(dim=-1, keepdim=True) / by_hand.norm(dim=-1, keepdim=True))
        assert (noise_pred - rescaled).abs().max() > 1e-3, "diffusers' norm rescale must not be applied"

    # stock diffusers, given exactly what ai-toolkit passes (embeds, negative, true_cfg_scale), rescales: it differs
    params = edit_plus.resolve_params("a red fox", control_images=[picture(0)], **PLUS)
    stock = edit_plus.pipe(**edit_plus.pipeline_kwargs(params), num_inference_steps=2,
                           generator=torch.Generator("cpu").manual_seed(params.seed)).images
    assert np.abs(np.asarray(stock) - result.images).max() > 1e-4, "our runs are bit-exact; stock differs"


def test_edit_plus_second_image_matters(edit_plus, recorded):
    base = recorded[0].images
    assert base.shape == (1, 64, 64, 3) and np.isfinite(base).all()
    two = edit_plus.generate("a red fox", control_images=[picture(0), picture(1, (96, 64))], **PLUS)
    assert two.images.shape == base.shape and np.abs(two.images - base).max() > 1e-3, "a second image matters"


@pytest.fixture(scope="module")
def edit(load_tiny):
    return load_tiny("qwen_image_edit")


def test_registry_entries():
    from aitk_inference.pipelines import get_spec

    assert get_spec("qwen_image_edit").control_images == (1, 1)
    for model_id in ("qwen_image_edit_plus", "qwen_image_edit_plus_2511"):
        spec = get_spec(model_id)
        assert spec.control_images == (1, 3) and spec.guidance_kind == "true_cfg" and spec.divisor == 32
        assert spec.scheduler == get_spec("qwen_image").scheduler
    assert get_spec("qwen_image_edit_plus_2511").lora_mode == "fused"


def test_edit_scheduler_control_image_and_inputs(edit):
    with open(os.path.join(GOLDENS_DIR, "schedulers.json")) as f:
        expected = json.load(f)["qwen_image"]["runs"]["steps4_w64_h64"]["timesteps"]
    # guidance 1: one forward per step, no negative encoded
    run = dict(width=64, height=64, steps=4, seed=3, guidance=1.0)
    black = edit.generate("a red fox", control_images=[Image.new("RGB", (64, 80))], **run)
    np.testing.assert_allclose(edit.pipe.scheduler.timesteps.tolist(), expected, rtol=1e-6, atol=1e-4)
    white = edit.generate("a red fox", control_images=[Image.new("RGB", (64, 80), "white")], **run)
    assert np.abs(white.images - black.images).max() > 1e-3, "the control image must change the output"

    params = edit.resolve_params("a red fox", guidance=4.0, control_images=[picture(0)], **FAST)
    kwargs = edit.pipeline_kwargs(params)
    assert kwargs["image"].size == (64, 64), "Edit resizes the control image to the output size"
    assert kwargs["true_cfg_scale"] == 4.0 and kwargs["negative_prompt_embeds"] is not None
    assert "negative_prompt_embeds" not in edit.pipeline_kwargs(edit.resolve_params("x", guidance=1.0,
                                                                                    control_images=[picture(0)]))


def test_condition_sizes_follow_ai_toolkit(edit, edit_plus):
    # Edit: about 1 MP at the image's aspect ratio; Edit-Plus: about 384x384 with the ratio inverted (ai-toolkit)
    assert edit.condition_size(700, 1000) == (864, 1216)
    assert edit_plus.condition_size(700, 1000) == (448, 320)
    assert edit_plus.condition_size(512, 512) == (384, 384)
    tensors = edit_plus.condition_images([picture(0, (100, 70)), picture(1)])
    assert [tuple(t.shape) for t in tensors] == [(1, 3, 448, 320), (1, 3, 352, 416)]
    assert 0.0 <= float(tensors[0].min()) and float(tensors[0].max()) <= 1.0


def test_processor_loads_from_a_checkpoint_layout_without_torchvision(edit_plus, tmp_path):
    """The real checkpoints' processor folder: preprocessor_config.json (min/max_pixels) next to the tokenizer."""
    from aitk_inference.pipelines.families.qwen_image import QwenVLImageProcessor

    folder = tmp_path / "processor"
    edit_plus.pipe.tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 64 * 28 * 28, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }))
    loaded = QwenVLImageProcessor.from_pretrained(str(tmp_path), subfolder="processor")
    text = ["Picture 1: <|vision_start|><|image_pad|><|vision_end|> a fox"]
    ours, theirs = (p(text=text, images=[picture(2, (200, 120))], padding=True, return_tensors="pt")
                    for p in (loaded, edit_plus.pipe.processor))
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])


def test_condition_images_stay_within_0_and_1(edit):
    """Bilinear resizing can round a white pixel just above 1.0 (it did with one torch thread, which this module's
    ``one_thread`` fixture sets), which the Qwen2.5-VL processor refuses ("values outside the range [0, 1]"), stopping
    the generation."""
    tensor = edit.condition_images([Image.new("RGB", (64, 80), "white")])[0]
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0, float(tensor.max())
