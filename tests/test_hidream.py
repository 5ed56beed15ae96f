"""HiDream-I1 and HiDream-E1 on tiny random-weight pipelines of the real classes (CPU, 64x64, 2 steps)."""

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(width=64, height=64, steps=2, seed=3)


def control(seed=0):
    return np.random.RandomState(seed).rand(48, 80, 3).astype(np.float32)


def block_targets(transformer):
    """What ai-toolkit's HiDream preset trains: the block Linears except the routed experts."""
    return [(name, module) for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(("double_stream_blocks.", "single_stream_blocks."))
            and ".ff_i.experts." not in name]


def write_lora(pipe, path, alpha=None, seed=0):
    """ai-toolkit's HiDream layout (diffusion_model. + diffusers names), optionally with .alpha keys."""
    from safetensors.torch import save_file

    from aitk_inference.tiny.loras import make_state_dict

    sd = make_state_dict("peft_diffusion_model", block_targets(pipe.pipe.transformer), seed=seed)
    if alpha is not None:
        for key in [k for k in sd if k.endswith(".lora_A.weight")]:
            sd[key[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))
    return str(path), sd


# ---------------------------------------------------------------------------------------------------- scheduler
def aitk_flow_unipc_sigmas(steps, shift_at_set, shift=3.0, train_steps=1000):
    """ai-toolkit's FlowUniPCMultistepScheduler (hidream/src/schedulers/fm_solvers_unipc.py), re-derived: training
    sigmas 1 - linspace(1, 1/T, T) reversed, shifted by `shift` in float32; the step grid runs linearly from the
    largest to the smallest and is shifted again by the value given to set_timesteps; timesteps are sigma*T truncated."""
    train = torch.from_numpy(1.0 - np.linspace(1, 1 / train_steps, train_steps)[::-1].copy()).to(torch.float32)
    train = shift * train / (1 + (shift - 1) * train)
    grid = np.linspace(train[0].item(), train[-1].item(), steps + 1)[:-1]
    sigmas = shift_at_set * grid / (1 + (shift_at_set - 1) * grid)
    timesteps = torch.from_numpy(sigmas * train_steps).to(torch.int64)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), timesteps


def flux_mu(seq_len):
    return 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)


@pytest.mark.parametrize("steps", [2, 28, 50])
@pytest.mark.parametrize("model_id,max_seq", [("hidream", 4096), ("hidream", 16), ("hidream_e1", 4096)])
def test_scheduler_matches_ai_toolkit_flow_unipc(model_id, max_seq, steps):
    """I1: set_timesteps(shift=exp(mu)), mu from the transformer's max_seq; E1: the config's 3.0."""
    from diffusers import UniPCMultistepScheduler

    from aitk_inference.pipelines.families.hidream import flow_unipc_grid
    from aitk_inference.pipelines.registry import get_spec

    spec = get_spec(model_id)
    scheduler = UniPCMultistepScheduler.from_config(dict(spec.scheduler.config))
    mu = flux_mu(max_seq) if model_id == "hidream" else None
    scheduler.set_timesteps(sigmas=flow_unipc_grid(steps), mu=mu)
    sigmas, timesteps = aitk_flow_unipc_sigmas(steps, math.exp(mu) if mu is not None else 3.0)
    torch.testing.assert_close(scheduler.sigmas, sigmas, atol=1e-7, rtol=0)
    assert torch.equal(scheduler.timesteps, timesteps)
    assert scheduler.config.prediction_type == "flow_prediction" and scheduler.config.solver_order == 2


# ---------------------------------------------------------------------------------------------------- I1
def test_ai_toolkit_layout_matches_every_block_module_and_both_modes_honour_alpha(pipes, load_tiny, tmp_path):
    """ai-toolkit's HiDream file (diffusion_model. + diffusers names, alpha 2) matches every trained block module; live
    adapters scale it by alpha / rank as the merged weights do (equal to float32 rounding)."""
    pipe = pipes("hidream")
    base = pipe.generate("a red fox", **FAST).images
    lora, _ = write_lora(pipe, tmp_path / "l.safetensors", alpha=2.0)
    targets = block_targets(pipe.pipe.transformer)
    try:
        assert pipe.set_loras([(lora, 0.7)])[0]["modules"] == len(targets)
        dynamic = pipe.generate("a red fox", **FAST).images
        assert np.abs(dynamic - base).max() > 1e-3, "the LoRA must change the image"
    finally:
        pipe.set_loras([])

    fused_pipe = load_tiny("hidream", lora_mode="fused")
    fused_pipe.set_loras([(lora, 0.7)])
    assert np.abs(fused_pipe.generate("a red fox", **FAST).images - dynamic).max() < 1e-4


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_lora_alpha_is_honoured(load_tiny, tmp_path, alpha):
    """delta = strength * (alpha / rank) * B @ A per module (scale 1 without alpha); the reference ignores alpha."""
    pipe = load_tiny("hidream", lora_mode="fused")
    lora, sd = write_lora(pipe, tmp_path / "a.safetensors", alpha=alpha)
    name = "double_stream_blocks.0.block.attn1.to_q"
    weight = pipe.pipe.transformer.get_submodule(name).weight
    before = weight.detach().clone()
    pipe.set_loras([(lora, 0.5)])
    key = f"diffusion_model.{name}"
    scale = 1.0 if alpha is None else alpha / 4
    expected = 0.5 * scale * sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
    torch.testing.assert_close(weight.detach() - before, expected, atol=1e-6, rtol=1e-5)


def test_full_area_size(pipes):
    """Any size is rescaled to the transformer's full area (64*64 for the tiny one), aspect kept, floored to 16."""
    pipe = pipes("hidream")
    wide = pipe.generate("a red fox", width=128, height=64, steps=2, seed=3)
    assert (wide.width, wide.height) == (80, 32) and wide.images.shape == (1, 32, 80, 3)
    with pytest.raises(ValueError, match="image_guidance"):
        pipe.generate("a red fox", image_guidance=3.0, **FAST)


def test_lora_of_another_family_is_refused(pipes):
    from aitk_inference.pipelines.lora.stack import LoraRequest
    from aitk_inference.pipelines.lora.convert import LoraFormatError

    flux_keys = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist"):
        pipes("hidream").set_loras([LoraRequest(state_dict=flux_keys, name="flux")])


# ---------------------------------------------------------------------------------------------------- E1
def test_e1_uses_the_control_image_and_image_guidance(pipes):
    pipe = pipes("hidream_e1")
    first = pipe.generate("make it blue", control_images=[control(0)], **FAST)
    assert first.images.shape == (1, 64, 64, 3), "E1 samples at the requested size (no full-area rule)"
    other = pipe.generate("make it blue", control_images=[control(1)], **FAST).images
    assert np.abs(other - first.images).max() > 1e-4, "the control image must change the edit"
    stronger = pipe.generate("make it blue", control_images=[control(0)], image_guidance=4.0, **FAST).images
    assert np.abs(stronger - first.images).max() > 1e-4, "image guidance must matter"
    with pytest.raises(ValueError, match="image_guidance"):
        pipe.generate("make it blue", control_images=[control(0)], image_guidance="high", **FAST)
