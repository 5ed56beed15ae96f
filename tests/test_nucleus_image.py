"""Nucleus-Image (`nucleus_image`): diffusers' NucleusMoEImagePipeline sampled as ai-toolkit samples it, and LoRA/LoKr
files saved by ai-toolkit's own network code, compared with the goldens in ``goldens/nucleus_image`` (MANIFEST.md).

The scheduler (timesteps and sigmas of five runs) is checked by ``test_parity.py`` through ``schedulers.json``.
"""

import hashlib
import os

import pytest

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "nucleus_image")
PROMPT = "a tiny red fox in the snow"
# (width, height, steps, guidance, negative) of each preview ai-toolkit rendered, by golden key prefix
PREVIEWS = {
    "w64_h96_steps3_g4": (64, 96, 3, 4.0, ""),
    "w96_h64_steps2_g4_neg": (96, 64, 2, 4.0, "blurry, low quality"),
    "w64_h64_steps2_g1": (64, 64, 2, 1.0, ""),
}
# fp32 on the same weights and the same diffusers classes (ai-toolkit's pinned commit vs 0.42.1); the base model's
# output is bit-exact on the CPU that made the golden, 5e-7 away on an AVX2-only CPU (other float32 kernels)
ATOL = 1e-5
LORA_FILES = {"lora_r4": "tiny_nucleus_lora_r4.safetensors", "lokr_default": "tiny_nucleus_lokr_default.safetensors"}
# every Linear layer of the two blocks: attention (6) + img_mod + encoder_proj, then the dense MLP (2) in block 0 and
# the router gate and the shared expert (3) in block 1; the routed experts are not Linear layers
ADAPTED_MODULES = 21


class _Captured(Exception):
    pass


def _fingerprint(module):
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def nucleus(load_tiny):
    return load_tiny("nucleus_image")


@pytest.fixture(scope="module")
def previews():
    from safetensors import safe_open

    with safe_open(os.path.join(ROOT, "preview_latents.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_tiny_model_is_the_one_ai_toolkit_sampled(nucleus, previews):
    """The goldens were rendered on the tiny builder's weights; a change to the builder must regenerate them."""
    _, metadata = previews
    assert _fingerprint(nucleus.pipe.transformer) == metadata["transformer_sha256"]
    assert _fingerprint(nucleus.pipe.text_encoder) == metadata["text_encoder_sha256"]
    assert type(nucleus.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    kinds = {type(block.img_mlp).__name__ for block in nucleus.pipe.transformer.transformer_blocks}
    assert kinds == {"FeedForward", "NucleusMoELayer"}  # one dense block, one MoE block


def _render(pipeline, width, height, steps, guidance, negative):
    """Run generate() and return what ai-toolkit's spies recorded: the initial latents (first scheduler step), the
    final latents (the VAE decode input) and the text embeddings of each transformer call of the first step."""
    captured = {"embeds": []}
    pipe = pipeline.pipe
    step, decode, forward = pipe.scheduler.step, pipe.vae.decode, pipe.transformer.forward

    def spy_step(*args, **kwargs):
        captured.setdefault("initial", args[2].detach().clone())
        return step(*args, **kwargs)

    def spy_decode(latents, *args, **kwargs):
        captured["final"] = latents.detach().clone()
        raise _Captured

    def spy_forward(*args, **kwargs):
        if "initial" not in captured:
            captured["embeds"].append(kwargs["encoder_hidden_states"].detach().clone())
        return forward(*args, **kwargs)

    pipe.scheduler.step, pipe.vae.decode, pipe.transformer.forward = spy_step, spy_decode, spy_forward
    try:
        with pytest.raises(_Captured):
            pipeline.generate(PROMPT, negative=negative, width=width, height=height, steps=steps, guidance=guidance,
                              seed=42)
    finally:
        del pipe.scheduler.step, pipe.vae.decode, pipe.transformer.forward
    return captured


@pytest.mark.parametrize("name", list(PREVIEWS))
def test_preview_matches_ai_toolkit(name, nucleus, previews):
    """ai-toolkit's sample path (get_prompt_embeds, then generate_single_image through the pinned pipeline with its
    scheduler) and ours give the same text embeddings, the same seed-42 noise and the same final latents."""
    import torch

    golden, _ = previews
    width, height, steps, guidance, negative = PREVIEWS[name]
    seen = _render(nucleus, width, height, steps, guidance, negative)
    assert torch.equal(seen["initial"], golden[f"{name}_initial_latents"]), "initial noise differs from ai-toolkit's"
    expected_embeds = [golden["prompt_embeds"]]
    if guidance > 1:
        expected_embeds.append(golden["negative_embeds_blurry" if negative else "negative_embeds_empty"])
    assert len(seen["embeds"]) == len(expected_embeds)  # CFG's second pass exactly when guidance > 1
    for ours, theirs in zip(seen["embeds"], expected_embeds):
        torch.testing.assert_close(ours[0], theirs, rtol=0, atol=ATOL)
    torch.testing.assert_close(seen["final"], golden[f"{name}_final_latents"], rtol=0, atol=ATOL)


def test_initial_noise_is_the_flux1_packed_draw(nucleus):
    """At a larger non-square size the pipeline's draw (1, 1, 16, H/8, W/8) packed 2x2 is FLUX.1's packed seed-42
    noise that ai-toolkit recorded (noise/initial_noise.safetensors)."""
    import torch
    from safetensors.torch import load_file

    expected = load_file(os.path.join(GOLDENS_DIR, "noise", "initial_noise.safetensors"))
    seen = {}

    def spy_step(*args, **kwargs):
        seen["latents"] = args[2].detach().clone()
        raise _Captured

    nucleus.pipe.scheduler.step = spy_step
    try:
        with pytest.raises(_Captured):
            nucleus.generate("a photo", width=512, height=768, steps=2, seed=42)
    finally:
        del nucleus.pipe.scheduler.step
    assert torch.equal(seen["latents"], expected["flux1_seed42_w512_h768_float32_packed"])


# ---------------------------------------------------------------------------------------------------- LoRA files
def _base_case():
    from diffusers import NucleusMoEImageTransformer2DModel
    from safetensors.torch import load_file

    inputs = load_file(os.path.join(ROOT, "inputs.safetensors"))
    model = NucleusMoEImageTransformer2DModel.from_pretrained(os.path.join(ROOT, "base_transformer")).eval()

    def forward():
        import torch

        with torch.no_grad():
            return model(**inputs, img_shapes=[(1, 4, 4)], return_dict=False)[0]

    return model, forward


def _stack(model, mode):
    from aitk_inference.pipelines.families.nucleus_image import refuse_expert_keys
    from aitk_inference.pipelines.lora.stack import LoraStack

    return LoraStack({"transformer": model}, mode, "transformer", "nucleus_image", name_mapper=refuse_expert_keys)


def _file_modules(path):
    from safetensors.torch import load_file

    return {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in load_file(path)}


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", list(LORA_FILES))
def test_lora_file_reproduces_ai_toolkit_outputs(variant, mode):
    """Every module of the file ai-toolkit saved is matched, and the outputs are ai-toolkit's live (dynamic) or merged
    (fused) outputs at multipliers 1.0 and 0.5; fused weights equal ai-toolkit's merge_in weights."""
    import torch
    from safetensors.torch import load_file

    from aitk_inference.pipelines.lora.stack import LoraRequest

    folder = os.path.join(ROOT, variant)
    golden = load_file(os.path.join(folder, "outputs.safetensors"))
    path = os.path.join(folder, LORA_FILES[variant])
    flavour = "live" if mode == "dynamic" else "merged"
    model, forward = _base_case()
    base_output = forward()
    torch.testing.assert_close(base_output, golden["base_output"], rtol=0, atol=ATOL)

    assert len(_file_modules(path)) == ADAPTED_MODULES
    assert not any(".experts." in key for key in load_file(path))  # ai-toolkit never adapts the routed experts
    stack = _stack(model, mode)
    summary = stack.set([LoraRequest(path=path, strength=1.0)])
    assert summary[0]["modules"] == ADAPTED_MODULES
    torch.testing.assert_close(forward(), golden[f"lora_{flavour}_m1.0"], rtol=0, atol=ATOL)
    if mode == "fused":
        for name, weight in load_file(os.path.join(folder, "effective_weights_m1.0.safetensors")).items():
            torch.testing.assert_close(model.get_submodule(name).weight, weight, rtol=0, atol=1e-6, msg=name)

    stack.set([LoraRequest(path=path, strength=0.5)])
    assert stack.stats["rescales"] == 1
    torch.testing.assert_close(forward(), golden[f"lora_{flavour}_m0.5"], rtol=0, atol=ATOL)
    stack.clear()
    torch.testing.assert_close(forward(), base_output, rtol=0, atol=1e-6)


def test_ai_toolkit_lora_loads_through_the_pipeline_front_door(nucleus):
    """The golden file fits the tiny pipeline's transformer (the same builder weights): set_loras matches every module
    and the image changes; removing it restores the base image exactly."""
    import numpy as np

    path = os.path.join(ROOT, "lora_r4", LORA_FILES["lora_r4"])
    call = dict(width=64, height=64, steps=2, seed=1)
    base = nucleus.generate("a photo", **call).images
    try:
        summary = nucleus.set_loras([(path, 1.0)])
        assert summary[0]["modules"] == ADAPTED_MODULES
        assert not np.array_equal(nucleus.generate("a photo", **call).images, base)
    finally:
        nucleus.set_loras([])
    assert np.array_equal(nucleus.generate("a photo", **call).images, base)


def _request(state_dict):
    from aitk_inference.pipelines.lora.stack import LoraRequest

    return LoraRequest(state_dict=state_dict, name="handmade.safetensors")


def test_expert_keys_are_refused_with_the_reason(nucleus):
    """The routed experts are packed parameters that ai-toolkit's network never adapts: a file targeting them is
    refused by name instead of loading partly."""
    import torch

    from aitk_inference.pipelines.lora.convert import LoraFormatError

    state_dict = {
        "diffusion_model.transformer_blocks.1.attn.to_q.lora_A.weight": torch.zeros(4, 32),
        "diffusion_model.transformer_blocks.1.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        "diffusion_model.transformer_blocks.1.img_mlp.experts.gate_up_proj.lora_A.weight": torch.zeros(4, 32),
        "diffusion_model.transformer_blocks.1.img_mlp.experts.gate_up_proj.lora_B.weight": torch.zeros(64, 4),
    }
    with pytest.raises(LoraFormatError, match="routed MoE experts.*never adapt"):
        nucleus.check_lora(_request(state_dict))


def test_lora_signature_names_nucleus_and_other_families():
    """A Nucleus file is recognised as Nucleus (not Qwen-Image, whose block names it shares), and a Qwen-Image LoRA
    given to this model is refused with Qwen-Image named."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.lora.convert import guess_architecture

    keys = list(load_file(os.path.join(ROOT, "lora_r4", LORA_FILES["lora_r4"])))
    assert guess_architecture(keys) == "Nucleus-Image"
    qwen_keys = ["transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight",
                 "transformer.transformer_blocks.0.txt_mlp.net.0.proj.lora_A.weight"]
    assert guess_architecture(qwen_keys) == "Qwen-Image"


def test_lora_of_another_family_is_refused_with_its_name(nucleus):
    import torch

    from aitk_inference.pipelines.lora.convert import LoraFormatError

    state_dict = {
        "transformer.transformer_blocks.0.txt_mlp.net.0.proj.lora_A.weight": torch.zeros(4, 32),
        "transformer.transformer_blocks.0.txt_mlp.net.0.proj.lora_B.weight": torch.zeros(128, 4),
    }
    with pytest.raises(LoraFormatError, match="Qwen-Image"):
        nucleus.check_lora(_request(state_dict))
