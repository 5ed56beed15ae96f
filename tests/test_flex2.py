"""Flex.2 (`flex2`): our own pipeline on a tiny random-weight Flex.2 (real FluxTransformer2DModel, 196 input channels)."""

import functools
import json
import os
import shutil

import numpy as np
import pytest

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = dict(width=64, height=64, steps=2)


def ramp_image(size=80, channels=3):
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    planes = [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 0.3, np.float32)]
    if channels == 4:
        planes.append((np.arange(size)[None, :] < size // 2).repeat(size, 0).astype(np.float32))  # right half: paint
    return np.stack(planes, -1)


@pytest.fixture(scope="module")
def flex2(load_tiny):
    return load_tiny("flex2")


@pytest.fixture(scope="module")
def base_image(flex2):
    return flex2.generate("a tiny cat", **SIZE).images


def test_tiny_transformer_has_flex2_channel_layout(flex2):
    config = flex2.pipe.transformer.config
    assert type(flex2.pipe).__name__ == "Flex2Pipeline"
    assert (config.in_channels, config.out_channels, config.guidance_embeds) == (4 * (3 * 16 + 1), 64, True)
    assert flex2.lora_mode == "fused"


def test_loads_hub_layout_without_running_remote_code(tiny_dir, flex2, tmp_path):
    """A folder shaped like ostris/Flex.2-preview: model_index.json names the repo's pipeline.py, which must never run."""
    import torch
    from diffusers import DiffusionPipeline

    from aitk_inference.pipelines.families.flex2 import Flex2Pipeline

    folder = tmp_path / "Flex.2-preview"
    shutil.copytree(tiny_dir("flex2"), folder, ignore=shutil.ignore_patterns("loras"))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name=["pipeline", "Flex2Pipeline"], tokenizer_2=["transformers", "T5TokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "pipeline.py").write_text('raise RuntimeError("hub remote code was executed")\n')

    with pytest.raises(ValueError, match="custom code in pipeline.py"):  # the generic loader wants to run it
        DiffusionPipeline.from_pretrained(str(folder))
    pipe = Flex2Pipeline.from_pretrained(str(folder), dtype=torch.float32)
    assert pipe.transformer.config.in_channels == 196
    for name, tensor in flex2.pipe.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], tensor), name


def test_control_image_changes_output_and_stop_zero_equals_strength_zero(flex2, base_image):
    base = base_image
    control = flex2.generate("a tiny cat", control_images=[ramp_image()], **SIZE).images
    assert np.abs(control - base).max() > 1e-3
    # Both leave the control block at zero on every step; both draw the control VAE sample before the noise.
    no_strength = flex2.generate("a tiny cat", control_images=[ramp_image()], control_strength=0.0, **SIZE).images
    stopped = flex2.generate("a tiny cat", control_images=[ramp_image()], control_stop=0.0, **SIZE).images
    assert np.array_equal(no_strength, stopped)
    assert np.abs(no_strength - control).max() > 1e-3


def test_inpaint_rgba_alpha_equals_explicit_mask(flex2, base_image):
    rgba = ramp_image(channels=4)
    base = base_image
    from_alpha = flex2.generate("a tiny cat", inpaint_image=rgba, **SIZE).images
    from_mask = flex2.generate("a tiny cat", inpaint_image=rgba[..., :3], inpaint_mask=1.0 - rgba[..., 3], **SIZE).images
    assert np.abs(from_alpha - base).max() > 1e-3
    np.testing.assert_allclose(from_alpha, from_mask, atol=1e-6)


def test_bad_inputs_raise_and_pipeline_stays_usable(flex2, tiny_dir, load_tiny, tmp_path):
    from aitk_inference.pipelines import load_pipeline

    with pytest.raises(ValueError, match="needs a mask"):
        flex2.generate("x", inpaint_image=ramp_image(), **SIZE)
    with pytest.raises(ValueError, match="without `inpaint_image`"):
        flex2.generate("x", inpaint_mask=np.ones((64, 64)), **SIZE)
    with pytest.raises(ValueError, match="control_stop"):
        flex2.generate("x", control_stop=1.5, **SIZE)
    with pytest.raises(ValueError, match="control_strength"):
        flex2.generate("x", control_strength=-1.0, **SIZE)
    with pytest.raises(ValueError, match="Unknown generation option"):
        flex2.generate("x", control_image_idx=0, **SIZE)
    with pytest.raises(ValueError, match="in_channels=64"):
        load_pipeline("flex2", base=tiny_dir("flux"), device="cpu", dtype="fp32")
    single = tmp_path / "Flex.2-preview.safetensors"
    single.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="single .safetensors"):
        load_pipeline("flex2", base=str(single), device="cpu", dtype="fp32")
    assert flex2.generate("x", **SIZE).images.shape == (1, 64, 64, 3)


def test_scheduler_timesteps_match_ai_toolkit(flex2, monkeypatch):
    with open(os.path.join(GOLDENS_DIR, "schedulers.json")) as f:
        expected = json.load(f)["flex2"]["runs"]["steps4_w64_h64"]
    scheduler = flex2.pipe.scheduler
    calls = []
    original = scheduler.set_timesteps

    @functools.wraps(original)  # retrieve_timesteps inspects the signature for `sigmas`
    def spy(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(dict(sigmas_in=kwargs["sigmas"], mu=kwargs["mu"], timesteps=scheduler.timesteps.clone(),
                          sigmas=scheduler.sigmas.clone()))

    monkeypatch.setattr(scheduler, "set_timesteps", spy)
    flex2.generate("a tiny cat", width=64, height=64, steps=4)
    assert len(calls) == 1
    call = calls[0]
    np.testing.assert_allclose(call["sigmas_in"], expected["sigmas_in"], atol=1e-12)
    assert call["mu"] == pytest.approx(expected["mu"])
    np.testing.assert_allclose(call["timesteps"].numpy(), expected["timesteps"], atol=1e-3)
    np.testing.assert_allclose(call["sigmas"].numpy(), expected["sigmas"], atol=1e-6)


def test_cli_demo(tiny_cache, tmp_path, capsys):
    from PIL import Image

    from aitk_inference.cli import main

    out = tmp_path / "flex2_demo.png"
    assert main(["demo", "--model", "flex2", "--out", str(out), "--quiet"]) == 0
    with Image.open(out) as im:
        assert json.loads(im.text["parameters"])["model"] == "flex2"
    assert "demo done" in capsys.readouterr().out


def test_job_control_images_route_inpaint_files(flex2, tmp_path):
    """reproduce passes a sample's ctrl_img through control_inputs: ai-toolkit's `*.inpaint.*` RGBA files fill the
    inpaint slot, other images the control slot."""
    from PIL import Image

    rgba = (ramp_image(channels=4) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ref.inpaint.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "pose.png")
    routed = flex2.control_inputs([str(tmp_path / "ref.inpaint.png")])
    assert routed["control_images"] == [] and routed["inpaint_image"].mode == "RGBA"
    assert flex2.control_inputs([str(tmp_path / "pose.png")]) == {"control_images": [str(tmp_path / "pose.png")]}
    np.testing.assert_array_equal(flex2.generate("a tiny cat", **routed, **SIZE).images,
                                  flex2.generate("a tiny cat", inpaint_image=Image.fromarray(rgba, "RGBA"), **SIZE).images)
