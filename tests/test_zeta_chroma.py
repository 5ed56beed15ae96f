"""Zeta-Chroma against ai-toolkit's own Zeta-Chroma code (goldens in tests/goldens/zeta_chroma; see its MANIFEST
section).

ai-toolkit's ``ZImageDCT`` ran on the weights ``tiny/zeta_chroma.py`` draws (too large to commit: they are rebuilt by
the same rule, and their per-parameter sums are in ``report.json``), with the tiny Qwen3 text model of
``tiny/zimage.py``. The goldens hold its transformer forward, its two schedules, its prompt encoding, five whole
generations through ``BaseModel.generate_images`` and the LoRA / LoKr files its network saved for this arch with the
outputs it computed. Here the same weights run through our transformer and pipeline.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR, assert_lora_file_reproduces_ai_toolkit, lora_file_modules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "zeta_chroma")
ATOL = 1e-5  # float32; ai-toolkit runs the guidance passes one after the other, we batch them
LORA_ATOL = 5e-6  # the whole-model LoRA moves outputs up to about 4; ai-toolkit's own live and merged differ by 1.7e-6


def golden(name="generation.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ROOT, "report.json")) as f:
        return json.load(f)


def transformer():
    from aitk_inference.tiny.zeta_chroma import zeta_chroma_transformer

    return zeta_chroma_transformer()


def forward_inputs(data, prefix):
    """The golden's ZImageDCT keyword inputs, as our forward takes them (the image mask is all ones there)."""
    inputs = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    assert inputs.pop("img_mask").all()
    return inputs


def test_tiny_weights_are_the_golden_weights(report):
    sums = {name: float(value.double().sum()) for name, value in transformer().state_dict().items()}
    assert sums.keys() == report["transformer_param_sums"].keys()
    for name, expected in report["transformer_param_sums"].items():
        assert sums[name] == pytest.approx(expected, rel=1e-12, abs=1e-12), name


def test_transformer_forward_matches_ai_toolkit():
    """Our transformer on ai-toolkit's weights gives ZImageDCT's velocity (padded text, batch of 2, two times)."""
    data = golden()
    inputs = {k: v for k, v in forward_inputs(data, "forward_").items() if k not in ("output", "x0")}
    model = transformer()
    with torch.no_grad():
        velocity = model(**inputs)
    torch.testing.assert_close(velocity, data["forward_output"], rtol=0, atol=ATOL)


def test_schedules_match_ai_toolkit(report):
    from aitk_inference.pipelines.families.zeta_chroma import flow_times

    for key, expected in report["schedules"].items():
        steps, patches = (int(part.lstrip("stepsatch")) for part in key.split("_"))
        assert flow_times(steps, patches, low_step=False) == expected, key
    for key, expected in report["low_step_schedules"].items():
        assert flow_times(int(key[len("steps"):]), 4096, low_step=True) == expected, key


def test_prompt_encoding_matches_ai_toolkit(pipes, report):
    data = golden()
    pipe = pipes("zeta_chroma").pipe
    for name in ("prompt", "negative", "long_negative"):
        with torch.no_grad():
            embeds, mask = pipe.encode_prompts([report[name]], torch.float32)
        assert torch.equal(mask.long(), data[f"{name}_mask"]), name
        if f"{name}_embeds" in data:
            torch.testing.assert_close(embeds, data[f"{name}_embeds"], rtol=0, atol=ATOL, msg=name)


# golden key -> (width, height, steps, guidance, negative report key): CFG; non-square, 3 steps; low-step schedule;
# 9 steps at guidance 1 (shifted, one pass); a negative longer than the prompt moves the image positions at guidance 1
GENERATIONS = {
    "w64_h64_steps2_g4.0": (64, 64, 2, 4.0, "negative"),
    "w96_h64_steps3_g4.0": (96, 64, 3, 4.0, "negative"),
    "w64_h64_steps2_g1.0": (64, 64, 2, 1.0, "negative"),
    "w64_h64_steps9_g1.0": (64, 64, 9, 1.0, "negative"),
    "w64_h64_steps2_g1.0_longneg": (64, 64, 2, 1.0, "long_negative"),
}


@pytest.mark.parametrize("key", list(GENERATIONS))
def test_whole_generation_matches_ai_toolkit(key, pipes, report):
    """Seed 42 through generate(): the noise, the flow times and image positions the transformer gets, the number of
    passes, the final pixels and the 8-bit image equal what ai-toolkit's generate_images produced."""
    data = golden()
    width, height, steps, guidance, negative = GENERATIONS[key]
    pipeline = pipes("zeta_chroma")
    model = pipeline.pipe.transformer
    calls = []
    original = model.forward

    def spy(**kwargs):
        calls.append({name: kwargs[name].clone() for name in ("img", "img_ids", "timesteps")})
        return original(**kwargs)

    model.forward = spy
    try:
        result = pipeline.generate(report["prompt"], negative=report[negative], width=width, height=height,
                                   steps=steps, guidance=guidance, seed=42)
    finally:
        del model.forward
    fed = data[f"{key}_timesteps_fed"].flatten()
    passes = 2 if guidance > 1.0 else 1
    assert len(fed) == steps * passes == report["generations"][key]["transformer_calls"] and len(calls) == steps
    for call, expected in zip(calls, fed[::passes]):
        assert torch.equal(call["timesteps"], expected.expand(passes))
    assert torch.equal(calls[0]["img_ids"][:1], data[f"{key}_img_ids"])
    if f"{key}_initial_noise" in data:
        assert torch.equal(calls[0]["img"][:1], data[f"{key}_initial_noise"])
    if f"{key}_pixels" in data:
        expected = ((data[f"{key}_pixels"] / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(result.images, expected, rtol=0, atol=ATOL)
    if f"{key}_image_uint8" in data:
        ours = np.asarray(result.to_pil()[0], dtype=np.int16)
        assert np.abs(ours - data[f"{key}_image_uint8"].numpy().astype(np.int16)).max() <= 1


def test_long_negative_moves_the_image_positions(report):
    """ai-toolkit starts the image's rope positions after the longer of prompt and negative, also at guidance 1."""
    offsets = {key: report["generations"][key]["image_offset"] for key in ("w64_h64_steps2_g1.0",
                                                                              "w64_h64_steps2_g1.0_longneg")}
    assert offsets["w64_h64_steps2_g1.0_longneg"] > offsets["w64_h64_steps2_g1.0"]
    plain, longneg = (golden()[f"{key}_pixels"] for key in offsets)
    assert (plain - longneg).abs().max() > 1e-3


def test_ai_toolkit_ignores_its_cfg_options(report):
    """ai-toolkit's pipeline accepts cfg_normalization / cfg_truncation and never reads them (its sampler never sets
    them either): the same generation with both set is identical, so ours has no such options."""
    import inspect

    from aitk_inference.pipelines.families.zeta_chroma import ZetaChromaPipeline

    assert report["cfg_options_max_diff"] == 0.0
    assert not {"cfg_normalization", "cfg_truncation"} & set(inspect.signature(ZetaChromaPipeline.__call__).parameters)


def test_single_file_checkpoint_loads_with_x0_detection(tmp_path):
    """The published layout: one .safetensors of the transformer; x0 prediction exactly when it holds ``__x0__``."""
    from safetensors.torch import save_file

    from aitk_inference.pipelines.families.zeta_chroma import load_transformer_file, resolve_transformer_file
    from aitk_inference.tiny.zeta_chroma import TRANSFORMER_CONFIG

    data = golden()
    inputs = {k: v for k, v in forward_inputs(data, "forward_").items() if k not in ("output", "x0")}
    state = {k: v.contiguous() for k, v in transformer().state_dict().items()}
    path = str(tmp_path / "zeta.safetensors")
    save_file(state, path)
    assert resolve_transformer_file(str(tmp_path), "zeta.safetensors") == path == resolve_transformer_file(path, "x")
    with pytest.raises(FileNotFoundError, match="other.safetensors"):
        resolve_transformer_file(str(tmp_path), "other.safetensors")
    save_file({k: v for k, v in state.items() if k != "__x0__"}, str(tmp_path / "no_x0.safetensors"))
    for name, expected in (("zeta", "forward_output"), ("no_x0", "forward_x0")):
        model = load_transformer_file(str(tmp_path / f"{name}.safetensors"), torch.float32, TRANSFORMER_CONFIG)
        assert model.config.use_x0 == (name == "zeta")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs), data[expected], rtol=0, atol=ATOL, msg=name)


def test_hub_file_path_as_ai_toolkit_accepts_it(monkeypatch):
    """``owner/repo/file.safetensors`` (ai-toolkit's UI default) downloads that file; a repo id, the default file."""
    import huggingface_hub

    from aitk_inference.pipelines.families.zeta_chroma import resolve_transformer_file

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename: asked.append((repo_id, filename)) or "/cache/file")
    assert resolve_transformer_file("lodestones/Zeta-Chroma/other.safetensors", "default.safetensors") == "/cache/file"
    resolve_transformer_file("lodestones/Zeta-Chroma", "default.safetensors")
    assert asked == [("lodestones/Zeta-Chroma", "other.safetensors"), ("lodestones/Zeta-Chroma", "default.safetensors")]


def test_bfloat16_draws_the_noise_in_the_model_dtype(load_tiny):
    """ai-toolkit draws the noise in the transformer's dtype and keeps the latents there; the DCT embedder's Linear
    stays float32 (as ai-toolkit's embedder leaves itself)."""
    from diffusers.utils.torch_utils import randn_tensor

    pipeline = load_tiny("zeta_chroma", dtype="bf16")
    model = pipeline.pipe.transformer
    assert model.dec_net.input_embedder.embedder[0].weight.dtype == torch.float32
    assert model.x_embedder.weight.dtype == torch.bfloat16
    seen = []
    original = model.forward

    def spy(**kwargs):
        seen.append(kwargs["img"].clone())
        return original(**kwargs)

    model.forward = spy
    result = pipeline.generate("a photo", width=64, height=64, steps=2, guidance=1.0, seed=42)
    expected = randn_tensor((1, 4, 3072), generator=torch.Generator().manual_seed(42), dtype=torch.bfloat16)
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], expected)
    assert np.isfinite(result.images).all()


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", ["lora_r4_a2", "lokr_default", "lora_all_r4_a4"])
def test_ai_toolkit_lora_file_matches_every_module_and_its_outputs(variant, mode, report):
    """The file ai-toolkit's network saved for this arch loads with every module matched; at 1.0 and 0.5 it gives
    ai-toolkit's outputs, fused weights equal its merge, and removing it restores the base. ``lora_all_r4_a4`` is a
    ``transformer_only: false`` job: every Linear, the DCT head's included."""


    folder = os.path.join(ROOT, variant)
    path = os.path.join(folder, f"tiny_zeta_{variant}.safetensors")
    outputs = golden(os.path.join(variant, "outputs.safetensors"))
    inputs = forward_inputs(golden("lora_inputs.safetensors"), "")
    modules = 44 if variant == "lora_all_r4_a4" else 16
    assert len(lora_file_modules(path)) == report["lora"][variant]["n_modules"] == modules
    model = transformer()

    def forward():
        with torch.no_grad():
            return model(**inputs)

    assert_lora_file_reproduces_ai_toolkit(
        model, forward, mode, "zeta_chroma", path, outputs,
        lambda: golden(os.path.join(variant, "effective_weights_m1.0.safetensors")), ATOL, LORA_ATOL)


def test_lora_of_another_family_is_refused_with_its_family_named(pipes):
    """A FLUX.1 file on Zeta-Chroma, and a whole-model Zeta-Chroma file (its DCT head) on Z-Image, are refused with
    the family named. A file of ``layers.N`` modules only cannot be told from a Z-Image LoRA by its keys."""
    from aitk_inference.pipelines.lora.convert import LoraFormatError
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    pipe = pipes("zeta_chroma")
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'zeta_chroma'.*FLUX.1"):
        pipe.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    whole_model_lora = os.path.join(ROOT, "lora_all_r4_a4", "tiny_zeta_lora_all_r4_a4.safetensors")
    with pytest.raises(LoraFormatError, match="Zeta-Chroma"):
        pipes("zimage").set_loras([LoraRequest(path=whole_model_lora)])
    assert pipe.loras.describe() == []
