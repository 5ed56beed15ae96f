"""OmniGen2 (`omnigen2`): our pipeline, scheduler and transformer on a tiny random-weight model."""

import math
import re

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(width=64, height=64, steps=2, seed=5)

# Parameter names of the published OmniGen2/OmniGen2 transformer (from VectorSpaceLab/OmniGen2's
# transformer_omnigen2.py / block_lumina2.py and ComfyUI's OmniGen2 loader), with their shapes for the published
# config. N stands for a block index.
REAL_TOP_LEVEL = {
    "x_embedder.weight": (2520, 64), "x_embedder.bias": (2520,),
    "ref_image_patch_embedder.weight": (2520, 64), "ref_image_patch_embedder.bias": (2520,),
    "time_caption_embed.timestep_embedder.linear_1.weight": (1024, 256),
    "time_caption_embed.timestep_embedder.linear_1.bias": (1024,),
    "time_caption_embed.timestep_embedder.linear_2.weight": (1024, 1024),
    "time_caption_embed.timestep_embedder.linear_2.bias": (1024,),
    "time_caption_embed.caption_embedder.0.weight": (2048,),
    "time_caption_embed.caption_embedder.1.weight": (2520, 2048),
    "time_caption_embed.caption_embedder.1.bias": (2520,),
    "norm_out.linear_1.weight": (2520, 1024), "norm_out.linear_1.bias": (2520,),
    "norm_out.linear_2.weight": (64, 2520), "norm_out.linear_2.bias": (64,),
    "image_index_embedding": (5, 2520),
}
REAL_BLOCK = {
    "attn.to_q.weight": (2520, 2520), "attn.to_k.weight": (840, 2520), "attn.to_v.weight": (840, 2520),
    "attn.to_out.0.weight": (2520, 2520), "attn.norm_q.weight": (120,), "attn.norm_k.weight": (120,),
    "feed_forward.linear_1.weight": (10240, 2520), "feed_forward.linear_2.weight": (2520, 10240),
    "feed_forward.linear_3.weight": (10240, 2520),
    "norm2.weight": (2520,), "ffn_norm1.weight": (2520,), "ffn_norm2.weight": (2520,),
}
REAL_MODULATION = {"norm1.linear.weight": (10080, 1024), "norm1.linear.bias": (10080,), "norm1.norm.weight": (2520,)}
REAL_PLAIN_NORM = {"norm1.weight": (2520,)}
REAL_CONFIG = dict(
    patch_size=2, in_channels=16, hidden_size=2520, num_layers=32, num_refiner_layers=2, num_attention_heads=21,
    num_kv_heads=7, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, axes_dim_rope=(40, 40, 40),
    axes_lens=(1024, 1664, 1664), text_feat_dim=2048, timestep_scale=1000.0,
)


def real_key_shapes(num_layers: int, num_refiners: int) -> dict:
    shapes = dict(REAL_TOP_LEVEL)
    for stream, count, norm in (("layers", num_layers, REAL_MODULATION), ("noise_refiner", num_refiners, REAL_MODULATION),
                                ("ref_image_refiner", num_refiners, REAL_MODULATION),
                                ("context_refiner", num_refiners, REAL_PLAIN_NORM)):
        for n in range(count):
            shapes.update({f"{stream}.{n}.{k}": v for k, v in {**REAL_BLOCK, **norm}.items()})
    return shapes


@pytest.fixture(scope="module")
def omnigen2(load_tiny):
    return load_tiny("omnigen2")


@pytest.fixture(scope="module")
def fused(load_tiny):
    return load_tiny("omnigen2", lora_mode="fused")


@pytest.fixture(scope="module")
def base_image(omnigen2):
    return omnigen2.generate("a tiny cat", **FAST).images


def ramp(size=80):
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    return np.stack([np.tile(axis, (size, 1)), np.tile(axis[:, None], (1, size)), np.full((size, size), 0.3)], -1)


def block_targets(transformer):
    """What ai-toolkit's OmniGen2 LoRA trains: the Linears of noise_refiner, context_refiner and layers."""
    pattern = re.compile(r"^(noise_refiner|context_refiner|layers)\.\d+\.")
    return [(n, m) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and pattern.match(n)]


def test_transformer_has_the_published_weight_names_and_shapes():
    """The full-size config, built on the meta device, has exactly the checkpoint's parameter names and shapes."""
    from aitk_inference.pipelines.families.omnigen2_transformer import OmniGen2Transformer2DModel

    with torch.device("meta"):
        model = OmniGen2Transformer2DModel(**REAL_CONFIG)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == real_key_shapes(32, 2)


def test_tiny_checkpoint_loads_by_the_published_names(omnigen2, tiny_dir):
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families.omnigen2_transformer import OmniGen2Transformer2DModel

    transformer = omnigen2.pipe.transformer
    on_disk = load_file(f"{tiny_dir('omnigen2')}/transformer/diffusion_pytorch_model.safetensors")
    assert set(on_disk) == set(real_key_shapes(2, 1))
    reloaded = OmniGen2Transformer2DModel.from_pretrained(tiny_dir("omnigen2"), subfolder="transformer")
    for name, tensor in transformer.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert type(omnigen2.pipe).__name__ == "OmniGen2Pipeline" and type(omnigen2.pipe.mllm).__name__ == \
        "Qwen2_5_VLForConditionalGeneration"


def test_scheduler_is_omnigen2_dynamic_time_shift(omnigen2):
    """t_i = i/N shifted by t / (m - m t + t), m = sqrt(latent h * w) / 40, ending at 1; the same as diffusers'
    FlowMatch Euler with shift m in sigma = 1 - t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = omnigen2.pipe.scheduler
    steps, latent_side = 25, 128  # 1024 x 1024
    scheduler.set_timesteps(steps, num_tokens=latent_side * latent_side)
    m = latent_side / 40.0
    expected = [(i / steps) / (m - m * (i / steps) + i / steps) for i in range(steps)]
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert scheduler.grid[-1] == 1.0 and scheduler.timesteps[0] == 0.0

    diffusers_euler = FlowMatchEulerDiscreteScheduler(shift=m)
    diffusers_euler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    np.testing.assert_allclose(1.0 - diffusers_euler.sigmas.numpy(), scheduler.grid.numpy(), atol=1e-6)

    sample, velocity = torch.ones(1, 2), torch.full((1, 2), 0.5)
    out = scheduler.step(velocity, sample)
    torch.testing.assert_close(out, sample + (scheduler.grid[1] - scheduler.grid[0]) * velocity)


def test_prompt_is_chat_templated_twice_and_the_negative_is_encoded(omnigen2):
    calls = []
    encode = omnigen2.pipe.encode_prompt
    omnigen2.pipe.encode_prompt = lambda prompts, *a, **k: calls.append(list(prompts)) or encode(prompts, *a, **k)
    try:
        omnigen2.generate("a tiny cat", negative="blurry", **FAST)
        omnigen2.generate("a tiny cat", negative="blurry", **{**FAST, "guidance": 1.0})
    finally:
        del omnigen2.pipe.encode_prompt
    once = omnigen2.pipe.apply_chat_template
    # the pipeline templates again what the family templated; at guidance 1 the negative is never encoded
    assert calls == [[once("a tiny cat")], [once("blurry")], [once("a tiny cat")]]
    assert "a tiny cat" in once("a tiny cat") and once("a tiny cat").count("<|im_start|>system") == 1


def test_input_images_change_the_output(omnigen2, base_image):
    one = omnigen2.generate("a tiny cat", control_images=[ramp()], **FAST).images
    two = omnigen2.generate("a tiny cat", control_images=[ramp(), ramp()[::-1].copy()], **FAST).images
    assert np.abs(one - base_image).max() > 1e-3
    assert np.abs(two - one).max() > 1e-3
    assert np.array_equal(omnigen2.generate("a tiny cat", control_images=[ramp()], **FAST).images, one)


def test_ai_toolkit_layout_matches_every_trained_module(omnigen2, tmp_path):
    """ai-toolkit's OmniGen2 file (diffusion_model. names) covers the Linears of the noise and context refiners and of
    the main layers."""
    from aitk_inference.tiny.loras import write_lora

    targets = block_targets(omnigen2.pipe.transformer)
    path = write_lora(str(tmp_path / "omnigen2.safetensors"), "peft_diffusion_model", targets)
    try:
        assert omnigen2.set_loras([(path, 0.8)])[0]["modules"] == len(targets)
    finally:
        omnigen2.set_loras([])


def test_lora_of_another_family_is_rejected_clearly(omnigen2, tmp_path):
    from safetensors.torch import save_file

    key = "diffusion_model.single_transformer_blocks.0.attn.to_q"
    save_file({f"{key}.lora_A.weight": torch.ones(4, 32), f"{key}.lora_B.weight": torch.ones(32, 4)},
              str(tmp_path / "flux.safetensors"))
    with pytest.raises(ValueError, match="FLUX"):
        omnigen2.set_loras([(str(tmp_path / "flux.safetensors"), 1.0)])
    assert omnigen2.loras.describe() == []


def test_lora_alpha_is_honoured(fused, tmp_path):
    from safetensors.torch import save_file

    from aitk_inference.tiny.loras import make_state_dict

    pipe = fused
    targets = block_targets(pipe.pipe.transformer)[:3]
    rank, alpha = 4, 2.0
    state = make_state_dict("peft_diffusion_model", targets, rank=rank)
    state.update({f"diffusion_model.{name}.alpha": torch.tensor(alpha) for name, _ in targets})
    save_file(state, str(tmp_path / "alpha.safetensors"))
    name = targets[0][0]
    before = pipe.pipe.transformer.get_submodule(name).weight.detach().clone()
    pipe.set_loras([(str(tmp_path / "alpha.safetensors"), 0.5)])
    after = pipe.pipe.transformer.get_submodule(name).weight.detach().clone()
    pipe.set_loras([])
    expected = state[f"diffusion_model.{name}.lora_B.weight"] @ state[f"diffusion_model.{name}.lora_A.weight"]
    torch.testing.assert_close(after - before, 0.5 * (alpha / rank) * expected, atol=1e-6, rtol=1e-5)


def test_large_sizes_sample_at_one_megapixel_and_resize():
    from aitk_inference.pipelines.families.omnigen2 import reference_size, sampling_size

    assert sampling_size(1024, 1024) == (1024, 1024)
    w, h = sampling_size(1536, 1536)
    assert (w, h) == (1024, 1024) and w * h <= 1024 * 1024
    assert sampling_size(2048, 1024) == (int(2048 / math.sqrt(2)) // 16 * 16, int(1024 / math.sqrt(2)) // 16 * 16)
    assert reference_size(2000, 500) == (1024, 256)  # long side capped at 1024
    assert reference_size(100, 70) == (96, 64)  # never upscaled, floored to 16
