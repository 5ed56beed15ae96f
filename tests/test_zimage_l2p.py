"""Z-Image L2P against ai-toolkit's own L2P code (goldens in tests/goldens/zimage_l2p; see its MANIFEST section).

ai-toolkit's L2P transformer (its patched ``ZImageTransformer2DModel`` with ``MicroDiffusionModel``) was built at toy
trunk widths, its decoder at the released widths, every parameter filled by :func:`fill_deterministic`; the goldens hold
its forward, three whole previews through its ``generate_images`` (``ZImagePipeline`` with its identity VAE) and the
LoRA / LoKr files its network saved for this arch with the outputs it computed. Here our transformer, filled the same
way (same parameter names, asserted), runs through our pipeline.
"""

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR, assert_lora_file_reproduces_ai_toolkit, lora_file_modules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "zimage_l2p")
ATOL = 1e-5  # float32
LORA_ATOL = 1e-6  # ai-toolkit's own live and merged outputs differ by up to 2.4e-7


def golden(name="generation.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ROOT, "report.json")) as f:
        return json.load(f)


def fill_deterministic(module, seed):
    """What the golden script did to ai-toolkit's module: every parameter in sorted name order from one generator,
    matrices randn / sqrt(fan_in), norm weights 1 + 0.1 randn, other vectors 0.05 randn."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def golden_transformer(report):
    """Our transformer with the golden's trunk config, the released decoder widths and the golden's weights."""
    from aitk_inference.pipelines.families.zimage_l2p import DECODER_CHANNELS, ZImageL2PTransformer2DModel

    model = ZImageL2PTransformer2DModel(**report["transformer_config"], decoder_channels=DECODER_CHANNELS)
    fill_deterministic(model, report["fill_seed"])
    return model.eval()


@pytest.fixture(scope="module")
def transformer(report):
    return golden_transformer(report)


@pytest.fixture(scope="module")
def golden_pipeline(tmp_path_factory, transformer):
    """Our family pipeline (normal load path) on the golden transformer and the tiny Z-Image text encoder."""
    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.pipelines.families.zimage_l2p import ZImageL2PPipeline
    from aitk_inference.tiny.zimage import zimage_components

    folder = str(tmp_path_factory.mktemp("l2p_golden_pipeline"))
    components = zimage_components(transformer)
    del components["vae"]
    ZImageL2PPipeline(**components).save_pretrained(folder)
    return load_pipeline("zimage_l2p", base=folder, device="cpu", dtype="fp32")


def test_parameter_names_are_ai_toolkits(transformer, report):
    """Every parameter of ai-toolkit's L2P module, same name and shape (the checkpoint's keys), and no final layer."""
    ours = {name: list(p.shape) for name, p in transformer.named_parameters()}
    assert sorted(ours) == report["parameter_names"]
    assert ours == report["parameter_shapes"]
    assert not any(name.startswith("all_final_layer.") for name in ours)


def test_patched_forward_matches_ai_toolkit(transformer):
    """Batch of 2, 32x48 pixels, captions of 5 and 9 tokens (padding on both sides), two timesteps."""
    data = golden()
    with torch.no_grad():
        output = transformer(list(data["forward_x"].unbind(0)), data["forward_t"],
                             [data["forward_cap0"], data["forward_cap1"]], return_dict=False)[0]
    torch.testing.assert_close(torch.stack(output), data["forward_output"], rtol=0, atol=ATOL)


def test_prompt_encoding_matches_ai_toolkit(golden_pipeline, report):
    data = golden()
    pipe = golden_pipeline.pipe
    for name in ("prompt", "negative"):
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(report[name], do_classifier_free_guidance=False, device="cpu")
        torch.testing.assert_close(embeds[0], data[f"{name}_embeds"], rtol=0, atol=ATOL, msg=name)


# golden key -> (width, height, steps, guidance): CFG square and non-square; guidance 1 = no CFG pass
GENERATIONS = {"w64_h64_steps2_g4.0": (64, 64, 2, 4.0), "w96_h64_steps2_g4.0": (96, 64, 2, 4.0),
               "w64_h64_steps2_g1.0": (64, 64, 2, 1.0)}


@pytest.mark.parametrize("key", list(GENERATIONS))
def test_whole_preview_matches_ai_toolkit(key, golden_pipeline, report):
    """Seed 42 through generate(): the initial noise, the times and batch the transformer gets, the final pixels and
    the 8-bit image equal ai-toolkit's generate_images."""
    data = golden()
    width, height, steps, guidance = GENERATIONS[key]
    model = golden_pipeline.pipe.transformer
    calls = []
    original = model.forward

    def spy(x, t, cap_feats, *args, **kwargs):
        calls.append({"x": torch.stack(x).clone(), "t": t.clone()})
        return original(x, t, cap_feats, *args, **kwargs)

    model.forward = spy
    try:
        result = golden_pipeline.generate(report["prompt"], negative=report["negative"], width=width, height=height,
                                          steps=steps, guidance=guidance, seed=42)
    finally:
        del model.forward
    assert [len(c["x"]) for c in calls] == report["generations"][key]["batch_per_call"]
    assert torch.equal(torch.stack([c["t"] for c in calls]), data[f"{key}_timesteps_fed"])
    assert torch.equal(calls[0]["x"][:1], data[f"{key}_initial_noise"])
    expected = ((data[f"{key}_final_latents"] / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(result.images, expected, rtol=0, atol=ATOL)
    ours_uint8 = np.asarray(result.to_pil()[0], dtype=np.int16)
    assert np.abs(ours_uint8 - data[f"{key}_image_uint8"].numpy().astype(np.int16)).max() <= 1


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", ["lora_r4_a2", "lokr_default"])
def test_ai_toolkit_lora_file_matches_every_module_and_its_outputs(variant, mode, report, transformer):
    """The file ai-toolkit's network saved for this arch (its main layers' Linears) loads with every module matched;
    at 1.0 and 0.5 it gives ai-toolkit's outputs, fused weights equal its merge, removing it restores the base."""


    path = os.path.join(ROOT, variant, f"tiny_l2p_{variant}.safetensors")
    outputs, inputs = golden(os.path.join(variant, "outputs.safetensors")), golden("lora_inputs.safetensors")
    assert len(lora_file_modules(path)) == report["lora"][variant]["n_modules"] == 16
    model = transformer

    def forward():
        with torch.no_grad():
            return model(list(inputs["x"].unbind(0)), inputs["t"], [inputs["cap"]], return_dict=False)[0][0]

    assert_lora_file_reproduces_ai_toolkit(
        model, forward, mode, "zimage_l2p", path, outputs,
        lambda: golden(os.path.join(variant, "effective_weights_m1.0.safetensors")), ATOL, LORA_ATOL)


def test_lora_of_another_family_is_refused_with_its_family_named(pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    pipe = pipes("zimage_l2p")
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'zimage_l2p'.*FLUX.1"):
        pipe.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    assert pipe.loras.describe() == []


def test_a_latent_zimage_checkpoint_is_refused(tmp_path):
    """A Z-Image (VAE-latent) transformer file is not an L2P checkpoint: ai-toolkit would graft a random decoder on
    it for training; for sampling we refuse it by name."""
    from safetensors.torch import save_file

    from aitk_inference.pipelines.families.zimage_l2p import load_l2p_transformer
    from aitk_inference.tiny.zimage import zimage_transformer

    path = str(tmp_path / "zimage.safetensors")
    save_file({k: v.contiguous() for k, v in zimage_transformer().state_dict().items()}, path)
    with pytest.raises(ValueError, match="not a Z-Image L2P checkpoint"):
        load_l2p_transformer(path, torch.float32)


def test_checkpoint_file_is_found_where_ai_toolkit_jobs_name_it(tmp_path, monkeypatch):
    """A file, a folder holding the options' file name, the base hub repo, or an ai-toolkit hub path
    ``owner/repo/file.safetensors``."""
    import huggingface_hub

    from aitk_inference.pipelines.families.zimage_l2p import ZImageL2PFamilyPipeline
    from aitk_inference.pipelines.registry import REGISTRY

    spec = REGISTRY["zimage_l2p"]
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: downloads.append((repo, name)) or name)
    (tmp_path / spec.options.checkpoint_file).write_bytes(b"")
    find = ZImageL2PFamilyPipeline.checkpoint_file
    assert find(spec, str(tmp_path)) == str(tmp_path / spec.options.checkpoint_file)
    assert find(spec, str(tmp_path / spec.options.checkpoint_file)) == str(tmp_path / spec.options.checkpoint_file)
    find(spec, "zhen-nan/L2P")
    find(spec, "zhen-nan/L2P/other.safetensors")
    assert downloads == [("zhen-nan/L2P", "model-1k-merge.safetensors"), ("zhen-nan/L2P", "other.safetensors")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model-1k-merge.safetensors"):
        find(spec, str(empty))
