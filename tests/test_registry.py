"""The registry as data: every fact about a family in one place, and the rules derived from it."""

import dataclasses
import logging
import os

import pytest

from aitk_inference.pipelines.registry import (REGISTRY, AitkArch, Experts, Flux2Options, ModelSpec, aitk_arch_names,
                                               get_spec, model_id_for_arch)


@pytest.mark.parametrize("model_id", list(REGISTRY))
def test_options_are_the_type_the_family_reads(model_id):
    spec = REGISTRY[model_id]
    family = spec.family_class()
    if spec.options is None:
        return
    assert family.options_type is not None, f"{family.__name__} reads no options, but {model_id} sets {spec.options}"
    assert isinstance(spec.options, family.options_type)


def test_a_misspelt_option_is_an_error():
    with pytest.raises(TypeError, match="text_encoder_out_layer"):
        Flux2Options(text_encoder_out_layer=(9, 18, 27))
    with pytest.raises(TypeError, match="boundary"):
        dataclasses.replace(get_spec("flux"), boundary=0.9)


def test_bad_field_values_are_refused():
    spec = get_spec("flux")
    with pytest.raises(ValueError, match="lora_mode 'merged'"):
        dataclasses.replace(spec, lora_mode="merged")
    with pytest.raises(ValueError, match="guidance_kind 'cfgg'"):
        dataclasses.replace(spec, guidance_kind="cfgg")


def test_presets_leave_only_the_differences():
    """FLUX.1 and Flex.1 differ in id, base, LoRA mode, ai-toolkit arch and notes only."""
    flux, flex1 = get_spec("flux"), get_spec("flex1")
    differing = {f.name for f in dataclasses.fields(ModelSpec) if getattr(flux, f.name) != getattr(flex1, f.name)}
    assert differing == {"model_id", "base", "lora_mode", "aitk_archs", "notes"}


def test_two_expert_models_derive_their_lora_components():
    for spec in REGISTRY.values():
        if spec.experts is None:
            assert "transformer_2" not in spec.lora_components
        else:
            assert spec.lora_components == spec.experts.components == ("transformer", "transformer_2")
            assert spec.experts.boundary_ratio == 0.875  # ai-toolkit's, not the I2V checkpoint's 0.9


@pytest.mark.parametrize("name,side", [
    ("my_high_noise.safetensors", "high"),
    ("job_000001000_low_noise.safetensors", "low"),
    ("Job-HIGH-noise.safetensors", "high"),
    ("high_noise_style.safetensors", "high"),
    ("highnoise.safetensors", "high"),
    ("my_lora.safetensors", None),
    ("high_and_low_noise.safetensors", "low"),  # only "low" is followed by "noise"
    ("lora_high_noise_low_noise.safetensors", None),  # names both
    ("thigh_noise.safetensors", None),
])
def test_expert_side_from_the_file_name(name, side):
    assert Experts.side_from_name(f"/loras/{name}") == side


def test_expert_sibling_and_stem():
    assert Experts.sibling("/j/job_000000500_high_noise.safetensors") == "/j/job_000000500_low_noise.safetensors"
    assert Experts.sibling("/j/job-low-noise.safetensors") == "/j/job-high-noise.safetensors"
    assert Experts.sibling("/j/job.safetensors") is None
    stems = [Experts.file_stem("demo", side) for side in Experts.SIDES]
    assert stems == ["demo_high_noise", "demo_low_noise"]
    assert [Experts.side_from_name(stem + ".safetensors") for stem in stems] == list(Experts.SIDES)


@pytest.mark.parametrize("arch,name_or_path,model_id", [
    ("flux", "black-forest-labs/FLUX.1-dev", "flux"),
    ("flux", "ostris/Flex.1-alpha", "flex1"),
    ("flex1", "", "flex1"),
    ("zimage", "Tongyi-MAI/Z-Image", "zimage"),
    ("zimage", "Tongyi-MAI/Z-Image-Turbo", "zimage_turbo"),
    ("zimage", "ostris/Z-Image-De-Turbo", "zimage_deturbo"),  # the longest hint wins over "turbo"
    ("wan21", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan21_1b"),
    ("wan21", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan21_14b"),
    ("wan21_i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "wan21_i2v_14b480p"),
    ("wan22_14b", "", "wan22_14b_t2v"),
    ("qwen_image", "Qwen/Qwen-Image-2512", "qwen_image_2512"),
    ("qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2511", "qwen_image_edit_plus_2511"),
    ("sd1", "", "sd15"),
])
def test_ai_toolkit_arch_maps_to_an_id(arch, name_or_path, model_id):
    assert model_id_for_arch(arch, name_or_path) == model_id


def test_every_arch_has_one_default_and_unknown_archs_are_refused():
    for arch in aitk_arch_names():
        defaults = [s.model_id for s in REGISTRY.values() for a in s.aitk_archs if a == AitkArch(arch)]
        assert len(defaults) == 1, (arch, defaults)
    with pytest.raises(ValueError, match="model.arch 'no_such_arch' has no aitk-inference model; known archs: .*flux"):
        model_id_for_arch("no_such_arch")


def test_uses_negative_follows_the_guidance():
    """The negative prompt counts only with real CFG above guidance 1 whose unconditional pass encodes it."""
    turbo = get_spec("zimage_turbo")
    assert turbo.guidance == 1.0 and not turbo.uses_negative
    assert turbo.negative_has_effect(4.0)
    assert not get_spec("flux").negative_has_effect(4.0)  # guidance-distilled
    assert get_spec("chroma").negative_has_effect(4.0) and not get_spec("chroma").negative_has_effect(1.0)
    assert not get_spec("ideogram4").negative_has_effect(4.0)  # its unconditional pass is an empty prompt
    assert get_spec("sdxl").uses_negative and not get_spec("sdxl").negative_has_effect(1.0)


def test_negative_warning_is_true_at_the_requested_guidance(load_tiny, caplog):
    """zimage_turbo at guidance 4 runs CFG with the negative: no warning. At its default 1.0 it has no effect: warned."""
    pipeline = load_tiny("zimage_turbo")
    with caplog.at_level(logging.WARNING):
        pipeline.resolve_params("x", negative="blurry", guidance=4.0, width=64, height=64)
    assert "ignores the negative prompt" not in caplog.text
    with caplog.at_level(logging.WARNING):
        pipeline.resolve_params("x", negative="blurry", width=64, height=64)
    assert "zimage_turbo ignores the negative prompt at guidance 1.0" in caplog.text


def test_generated_tables_match_the_registry():
    """README.md's models table and each family page's defaults table are generated from the registry."""
    from aitk_inference.pipelines import tables

    assert tables.stale_files() == [], "run `python -m aitk_inference.pipelines.tables` and commit the result"
    readme = open(os.path.join(tables.ROOT, "README.md"), encoding="utf-8").read()
    assert all(f"| `{model_id}` |" in readme for model_id in REGISTRY)


def test_a_table_without_markers_is_an_error():
    from aitk_inference.pipelines import tables

    with pytest.raises(ValueError, match="needs exactly one pair of generated-table markers"):
        tables.render("# page without markers\n", "| a |", "docs/models/x.md")


@pytest.mark.parametrize("keys,label", [
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
      "lora_unet_down_blocks_2_attentions_0_proj_in.lora_down.weight"], "SDXL (kohya)"),
    (["diffusion_model.ref_image_refiner.0.attn.to_q.lora_A.weight",
      "diffusion_model.layers.0.attn.to_q.lora_A.weight",
      "diffusion_model.layers.1.attn.to_q.lora_A.weight"], "OmniGen2"),
    (["diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A.weight",
      "diffusion_model.transformer_2.blocks.0.self_attn.q.lora_A.weight"], "Wan 2.2 14B (combined high/low-noise file)"),
    (["diffusion_model.layers.0.attention.to_q.lora_A.weight",
      "diffusion_model.context_refiner.0.attention.to_q.lora_A.weight"], "Z-Image"),
    (["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
      "transformer.transformer_blocks.0.audio_attn1.to_q.lora_A.weight"], "LTX-2"),
    (["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
      "transformer.transformer_blocks.0.norm1.linear.lora_A.weight"], "CogView4"),
    (["diffusion_model.layers.0.mlp.linear_fc2.lora_A.weight",
      "diffusion_model.layers.0.mlp.gate_proj.lora_A.weight"], "ERNIE-Image"),
    (["diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight",
      "diffusion_model.blocks.0.adaln_modulation_self_attn.1.lora_A.weight"], "Anima (ComfyUI / original Cosmos names)"),
    (["transformer.unknown.0.proj.lora_A.weight"], None),
])
def test_a_refining_signature_wins_over_the_one_it_refines(keys, label):
    from aitk_inference.pipelines.lora.convert import guess_architecture

    assert guess_architecture(keys) == label
