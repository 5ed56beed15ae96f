"""FLUX.2-dev, FLUX.2-klein 4B/9B and Chroma on tiny random-weight pipelines of the real diffusers classes."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = ["flux2", "flux2_klein_4b", "flux2_klein_9b", "chroma"]
FAST = dict(width=64, height=64, steps=2, seed=3)


def bfl_pair(pipe, **kwargs):
    """(BFL-named, diffusers-named) LoRA tensors for the family's tiny transformer."""
    if pipe.spec.model_id == "chroma":
        from aitk_inference.tiny.chroma import bfl_lora_pair
    else:
        from aitk_inference.tiny.flux2 import bfl_lora_pair
    return bfl_lora_pair(pipe.pipe.transformer, **kwargs)


def request(tensors, strength, name):
    from aitk_inference.pipelines.lora.stack import LoraRequest

    return LoraRequest(state_dict=tensors, strength=strength, name=name)


@pytest.mark.parametrize("model_id", IDS)
def test_bfl_named_lora_equals_its_diffusers_named_twin(model_id, pipes, load_tiny):
    """A LoRA under ai-toolkit's original BFL names (fused qkv / linear1 split for diffusers) changes the image exactly
    as the same tensors under diffusers names, in dynamic mode and merged (fused mode)."""
    pipe = pipes(model_id)
    base = pipe.generate("a red fox", **FAST).images
    bfl, diffusers_named = bfl_pair(pipe)
    try:
        summary = pipe.set_loras([request(bfl, 0.8, "bfl")])[0]
        assert summary["modules"] > len([k for k in bfl if k.endswith("lora_A.weight")]), "fused projections are split"
        with_bfl = pipe.generate("a red fox", **FAST).images
        assert np.abs(with_bfl - base).max() > 1e-3, "the LoRA must change the image"
        pipe.set_loras([request(diffusers_named, 0.8, "diffusers")])
        with_diffusers = pipe.generate("a red fox", **FAST).images
        assert np.abs(with_diffusers - with_bfl).max() < 1e-5, "BFL names give the same result as diffusers names"
    finally:
        pipe.set_loras([])

    fused_pipe = load_tiny(model_id, lora_mode="fused")
    fused_pipe.set_loras([request(bfl, 0.8, "bfl")])
    assert np.abs(fused_pipe.generate("a red fox", **FAST).images - with_bfl).max() < 1e-4, "fused = dynamic"


def test_bfl_lokr_on_fused_projections_equals_the_split_full_layers(pipes):
    """ai-toolkit's full-rank LoKr on qkv (96 rows = 8 x 12: rows not aligned with thirds) and linear1."""
    pipe = pipes("flux2")
    g = torch.Generator().manual_seed(4)
    lokr, full = {}, {}
    for bfl, names, out_l, out_k in (
        ("double_blocks.0.img_attn.qkv", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                          "transformer_blocks.0.attn.to_v"], 8, 12),
        ("single_blocks.0.linear1", ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"], 16, 18),
    ):
        w1, w2 = torch.randn(out_l, 4, generator=g) * 0.3, torch.randn(out_k, 8, generator=g) * 0.3
        lokr.update({f"diffusion_model.{bfl}.lokr_w1": w1, f"diffusion_model.{bfl}.lokr_w2": w2,
                     f"diffusion_model.{bfl}.alpha": torch.tensor(1e10)})
        for name, diff in zip(names, torch.kron(w1, w2).chunk(len(names))):
            full[f"transformer.{name}.diff"] = diff
    base = pipe.generate("a red fox", **FAST).images
    try:
        pipe.set_loras([request(lokr, 1.0, "lokr")])
        with_lokr = pipe.generate("a red fox", **FAST).images
        pipe.set_loras([request(full, 1.0, "full")])
        with_full = pipe.generate("a red fox", **FAST).images
    finally:
        pipe.set_loras([])
    assert np.abs(with_lokr - base).max() > 1e-3
    assert np.abs(with_lokr - with_full).max() < 1e-5


@pytest.mark.parametrize("model_id", ["flux2", "flux2_klein_4b", "chroma"])
def test_lora_of_another_family_is_refused(model_id, pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError

    pipe = pipes(model_id)
    zimage = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 32),
              "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match=f"none of its 1 modules exist in model '{model_id}'.*Z-Image"):
        pipe.set_loras([request(zimage, 1.0, "zimage")])
    # FLUX.2 and Chroma share BFL names but not the module layout: each refuses the other's file
    other = pipes("chroma" if model_id != "chroma" else "flux2")
    with pytest.raises(LoraFormatError, match="FLUX.2 / FLUX.2-klein / Chroma"):
        pipe.set_loras([request(bfl_pair(other)[0], 1.0, "other")])
    assert pipe.loras.describe() == []


# ---------------------------------------------------------------------------------------------- schedules and noise
def _goldens(family):
    with open(os.path.join(GOLDENS_DIR, "schedulers.json")) as f:
        return json.load(f)[family]["runs"]


def test_bfl_schedule_matches_ai_toolkit():
    from aitk_inference.pipelines.families.flux2 import bfl_schedule

    for run in _goldens("flux2").values():
        steps = len(run["t_schedule_float32_list"]) - 1
        assert bfl_schedule(steps, run["image_seq_len"]) == run["t_schedule_float32_list"], run["call"]


@pytest.mark.parametrize("model_id", ["flux2", "flux2_klein_4b"])
def test_flux2_pipelines_sample_with_the_bfl_schedule(model_id, pipes):
    """The real pipeline call steps through exactly BFL's t values (4 steps, 64x64 -> 16 tokens)."""
    pipe = pipes(model_id)
    seen = []
    pipe.generate("a red fox", width=64, height=64, steps=4, progress=lambda step, total: seen.append(step))
    golden = _goldens("flux2")["steps4_w64_h64"]["t_schedule_float32_list"]
    assert pipe.pipe.scheduler.sigmas.tolist() == golden
    # the transformer receives timesteps / 1000 = t (float32 round trip)
    assert np.allclose(pipe.pipe.scheduler.timesteps.numpy() / 1000, golden[:-1], rtol=0, atol=1e-7)
    assert seen == [1, 2, 3, 4]


def test_chroma_scheduler_matches_ai_toolkit(pipes):
    pipe = pipes("chroma")
    pipe.generate("a red fox", width=64, height=64, steps=4, guidance=1.0)
    golden = _goldens("chroma")["steps4_w64_h64"]
    assert np.allclose(pipe.pipe.scheduler.timesteps.numpy(), golden["timesteps"], rtol=0, atol=1e-4)
    assert np.allclose(pipe.pipe.scheduler.sigmas.numpy(), golden["sigmas"], rtol=0, atol=1e-7)


def test_flux2_noise_is_ai_toolkits(pipes):
    """The pipeline draws ai-toolkit's FLUX.2 noise: randn (B, 128, H/16, W/16) from the seeded CPU generator."""
    from safetensors.torch import load_file

    goldens = load_file(os.path.join(GOLDENS_DIR, "noise", "initial_noise.safetensors"))
    pipe = pipes("flux2")
    drawn = []
    original = pipe.pipe.prepare_latents

    def spy(*args, **kwargs):
        latents, ids = original(*args, **kwargs)
        drawn.append(latents.clone())
        return latents, ids

    pipe.pipe.prepare_latents = spy
    try:
        pipe.generate("a red fox", width=64, height=64, steps=1, seed=42)
    finally:
        del pipe.pipe.prepare_latents
    assert torch.equal(drawn[0], goldens["flux2_seed42_w64_h64_float32_packed"])
    for dtype in ("float32", "bfloat16"):
        latents, _ = pipe.pipe.prepare_latents(1, 32, 768, 512, getattr(torch, dtype), "cpu",
                                               torch.Generator("cpu").manual_seed(42))
        assert torch.equal(latents, goldens[f"flux2_seed42_w512_h768_{dtype}_packed"]), dtype


# ---------------------------------------------------------------------------------------------- guidance and negatives
# (whether the negative prompt matters at the default guidance: every id in tests/test_families.py)
def test_flux2_dev_warns_about_the_negative_and_feeds_guidance_to_the_embedding(pipes, caplog):
    pipe = pipes("flux2")
    with caplog.at_level(logging.WARNING):
        with_negative = pipe.generate("a red fox", negative="blurry", **FAST).images
    assert "ignores the negative prompt" in caplog.text
    assert not np.array_equal(with_negative, pipe.generate("a red fox", guidance=1.5, **FAST).images), \
        "guidance feeds the guidance embedding"


def test_klein_cfg_is_off_at_guidance_one(pipes):
    pipe = pipes("flux2_klein_4b")
    default = pipe.generate("a red fox", **FAST).images
    # guidance 1: no CFG, so the negative has no effect (one forward per step)
    no_cfg = pipe.generate("a red fox", guidance=1.0, **FAST).images
    assert np.array_equal(no_cfg, pipe.generate("a red fox", guidance=1.0, negative="blurry", **FAST).images)
    assert not np.array_equal(no_cfg, default)


def test_chroma_encodes_the_negative_prompt_as_ai_toolkit_does(pipes):
    pipe = pipes("chroma")
    default = pipe.generate("a red fox", **FAST).images
    assert np.array_equal(pipe.generate("a red fox", negative="", **FAST).images, default)
    assert not np.array_equal(pipe.generate("a red fox", negative="blurry", **FAST).images, default)
    no_cfg = pipe.generate("a red fox", guidance=1.0, **FAST).images
    assert np.array_equal(pipe.generate("a red fox", guidance=1.0, negative="blurry", **FAST).images, no_cfg)
    with pytest.raises(ValueError, match="Unknown generation option"):
        pipe.generate("a red fox", use_negative=True, **FAST)


def test_chroma_encodes_t5_without_its_mask_and_masks_all_but_one_padding_token(pipes):
    pipe = pipes("chroma")
    embeds, mask = pipe.encode(["a red fox"])
    tokens = pipe.pipe.tokenizer(["a red fox"], padding="max_length", max_length=512, return_tensors="pt")
    length = int(tokens.attention_mask.sum())
    assert mask.shape == (1, 512) and mask[0, : length + 1].eq(1).all() and mask[0, length + 1:].eq(0).all()
    assert mask.dtype == torch.bool  # a float 0/1 mask would be added to the attention logits, masking nothing
    with torch.inference_mode():
        unmasked = pipe.pipe.text_encoder(tokens.input_ids)[0]
    assert torch.equal(embeds, unmasked)


# ---------------------------------------------------------------------------------------------- reference images
def test_flux2_reference_images(pipes):
    from PIL import Image

    pipe = pipes("flux2_klein_4b")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (72, 100, 3), dtype=np.uint8)) for _ in range(2)]
    plain = pipe.generate("a red fox", guidance=1.0, **FAST).images
    one = pipe.generate("a red fox", guidance=1.0, control_images=images[:1], **FAST).images
    two = pipe.generate("a red fox", guidance=1.0, control_images=images, **FAST).images
    assert one.shape == plain.shape and not np.array_equal(one, plain) and not np.array_equal(one, two)
    with pytest.raises(ValueError, match="at least 64x64"):
        pipe.generate("a red fox", control_images=[Image.new("RGB", (32, 128))], **FAST)


def test_reference_image_preparation_follows_ai_toolkit():
    from PIL import Image

    from aitk_inference.pipelines.families.flux2 import prepare_reference_image

    assert prepare_reference_image(Image.new("RGB", (100, 72))).size == (96, 64)  # centre crop, no resize
    assert prepare_reference_image(Image.new("RGB", (2048, 1024))).size == (1440, 720)  # int(1448.15) -> 1448 -> crop
    with pytest.raises(ValueError, match="at most 8:1"):
        prepare_reference_image(Image.new("RGB", (900, 100)))


# ---------------------------------------------------------------------------------------------- BFL renaming (pure)
def _convert(state_dict, mapper):
    from aitk_inference.pipelines.lora import convert as lora_convert

    return lora_convert.convert_ai_toolkit_lora(state_dict, "transformer", {}, getattr(lora_convert, mapper))


def test_bfl_qkv_split_keeps_each_modules_rank_and_alpha():
    g = torch.Generator().manual_seed(0)
    sd = {  # rank 4 with alpha 2 on the fused qkv, rank 2 without alpha on the projection
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, 8, generator=g),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(24, 4, generator=g),
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(2.0),
        "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 8, generator=g),
        "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(8, 2, generator=g),
    }
    patches = _convert(sd, "convert_bfl_to_diffusers_flux2").patches
    fused = sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"] @ \
        sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"] * (2.0 / 4)
    parts = [patches[("transformer", f"transformer_blocks.0.attn.{n}")] for n in ("to_q", "to_k", "to_v")]
    assert [p.rank for p in parts] == [4, 4, 4]
    assert torch.allclose(torch.cat([p.delta() for p in parts]), fused)
    proj = patches[("transformer", "transformer_blocks.0.attn.to_out.0")]
    assert proj.rank == 2 and torch.allclose(proj.delta(), sd["diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight"]
                                              @ sd["diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"])


def test_bfl_lokr_and_full_layers_split_exactly():
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(6, 2, generator=g), torch.randn(4, 4, generator=g)  # 24 x 8: w1 rows align with thirds
    odd_w1, odd_w2 = torch.randn(2, 2, generator=g), torch.randn(12, 4, generator=g)  # they do not: row ranges
    diff, diff_b = torch.randn(56, 8, generator=g), torch.randn(56, generator=g)  # 3 x 8 + MLP 32
    sd = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": w1,
          "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": w2,
          "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(float("inf")),
          "diffusion_model.double_blocks.0.txt_attn.qkv.lokr_w1": odd_w1,
          "diffusion_model.double_blocks.0.txt_attn.qkv.lokr_w2": odd_w2,
          "diffusion_model.single_blocks.0.linear1.diff": diff,
          "diffusion_model.single_blocks.0.linear1.diff_b": diff_b}
    patches = _convert(sd, "convert_bfl_to_diffusers_chroma").patches

    def stacked(names):
        return torch.cat([patches[("transformer", n)].delta() for n in names])

    img = [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")]
    assert {patches[("transformer", n)].kind for n in img} == {"lokr"}
    assert torch.allclose(stacked(img), torch.kron(w1, w2))
    txt = [f"transformer_blocks.0.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
    assert [(patches[("transformer", n)].kind, patches[("transformer", n)].rows) for n in txt] == \
        [("lokr", (0, 8)), ("lokr", (8, 16)), ("lokr", (16, 24))]
    assert [patches[("transformer", n)].delta_shape() for n in txt] == [(8, 8)] * 3
    assert torch.allclose(stacked(txt), torch.kron(odd_w1, odd_w2))
    # Chroma's linear1 is q, k, v (hidden = in_features rows each) then the MLP input
    single = [f"single_transformer_blocks.0.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert [patches[("transformer", n)].delta_shape() for n in single] == [(8, 8)] * 3 + [(32, 8)]
    assert torch.equal(stacked(single), diff)
    assert torch.equal(torch.cat([patches[("transformer", n)].tensors["diff_b"] for n in single]), diff_b)


def test_flux2_final_modulation_rows_are_swapped_and_names_pass_through():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g)
    sd = {"diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight": a,
          "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight": b,
          "diffusion_model.single_blocks.3.linear1.lora_A.weight": a,
          "diffusion_model.single_blocks.3.linear1.lora_B.weight": b,
          "transformer.transformer_blocks.1.ff.linear_in.lora_A.weight": a,
          "transformer.transformer_blocks.1.ff.linear_in.lora_B.weight": b}
    converted = _convert(sd, "convert_bfl_to_diffusers_flux2")
    norm = converted.patches[("transformer", "norm_out.linear")]
    assert torch.equal(norm.delta(), torch.cat([b[8:], b[:8]]) @ a), "BFL (shift, scale) -> diffusers (scale, shift)"
    assert torch.equal(converted.patches[("transformer", "single_transformer_blocks.3.attn.to_qkv_mlp_proj")].delta(), b @ a)
    assert ("transformer", "transformer_blocks.1.ff.linear_in") in converted.patches
    assert any("renamed from original BFL names" in note for note in converted.notes)


def test_flux2_diffusers_is_the_reference_implementations_name_for_flux2(load_tiny):
    """The reference's `flux2_diffusers` id runs FLUX.2-dev exactly as `flux2` does, a BFL-named LoRA included."""
    from aitk_inference.pipelines.registry import get_spec, model_id_for_arch

    same = {k: v for k, v in get_spec("flux2").describe().items() if k not in ("id", "notes")}
    assert {k: v for k, v in get_spec("flux2_diffusers").describe().items() if k not in ("id", "notes")} == same
    assert model_id_for_arch("flux2", "black-forest-labs/FLUX.2-dev") == "flux2"  # ai-toolkit's jobs stay on flux2
    outputs = []
    for model_id in ("flux2", "flux2_diffusers"):  # fresh pipelines: merged patches of other tests leave rounding
        pipeline = load_tiny(model_id)
        bfl, _ = bfl_pair(pipeline, seed=4)
        pipeline.set_loras([request(bfl, 0.8, "bfl")])
        outputs.append(pipeline.generate(prompt="a fox", **FAST).images)
    np.testing.assert_array_equal(outputs[0], outputs[1])
