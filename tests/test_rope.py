"""The fused rotary embeddings of FLUX's, FLUX.2's, Krea 2's, Wan's and HiDream's attention (``runtime.rope``): the
processors the pipelines install give diffusers' own processors' output bit for bit, and a fused rotation is used
only after its first-call check. The compiled kernel itself needs CUDA (``tests/test_gpu.py``); here the check runs
on functions traced by dynamo."""

import numpy as np
import pytest
import torch
from PIL import Image

from aitk_inference.pipelines.registry import REGISTRY
from aitk_inference.pipelines.runtime import eager_rounding, rope

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_rope(monkeypatch):
    """The compile and check records, empty for one test and restored after it."""
    monkeypatch.setattr(eager_rounding, "_COMPILED", {})
    monkeypatch.setattr(rope, "_CHECKED", {})
    return rope


@pytest.mark.parametrize("model_id", ["flux", "chroma", "flux2_klein_4b", "krea2", "krea2_o_edit", "wan21_1b",
                                      "wan21_i2v_14b", "hidream", "hidream_e1", "ltx2", "ltx2.3"])
def test_rotary_attention_layers_get_fused_rope_processors_with_diffusers_output(load_tiny, model_id, fresh_rope):
    pipeline = load_tiny(model_id)
    layers = [m for m in pipeline.pipe.transformer.modules() if hasattr(m, "processor")]
    assert layers and all(type(m.processor) in rope.FUSED_ROPE_PROCESSORS.values() for m in layers)
    diffusers_classes = {fused: original for original, fused in rope.FUSED_ROPE_PROCESSORS.items()}
    spec = REGISTRY[model_id]
    gen = dict(prompt="a red cube", width=64, height=64, steps=2, seed=5)
    if spec.video:
        gen["num_frames"] = spec.video.frames(1)
    if spec.control_images[1]:  # a model that takes one gets one
        gen["control_images"] = [Image.new("RGB", (64, 64), (200, 90, 40))]
    ours = pipeline.generate(**gen)
    for layer in layers:
        layer.processor = diffusers_classes[type(layer.processor)]()
    theirs = pipeline.generate(**gen)
    assert np.array_equal(ours.images, theirs.images)
    assert (ours.audio is None) == (theirs.audio is None) and np.array_equal(ours.audio, theirs.audio)


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("rotary_dims", [16, 8], ids=["whole-head", "half-head"])
def test_hidream_fused_rope_processor_gives_diffusers_attention(single, rotary_dims):
    """Both of HiDream's layouts: the rotary embedding spans the whole head (I1, E1) or its first half."""
    from diffusers.models.transformers.transformer_hidream_image import (HiDreamAttention, HiDreamAttnProcessor,
                                                                         HiDreamImageEmbedND)

    torch.manual_seed(0)
    attn = HiDreamAttention(query_dim=32, heads=2, dim_head=16, processor=HiDreamAttnProcessor(), single=single)
    attn = attn.to(torch.bfloat16)
    image, text = torch.randn(2, 12, 32, dtype=torch.bfloat16), torch.randn(2, 5, 32, dtype=torch.bfloat16)
    tokens = 12 if single else 17
    ids = torch.randint(0, 8, (2, tokens, 3)).float()
    frequencies = HiDreamImageEmbedND(theta=10000, axes_dim=[rotary_dims // 2, rotary_dims // 4, rotary_dims // 4])(ids)
    masks = torch.ones(2, 12, dtype=torch.bfloat16)
    masks[1, 9:] = 0
    inputs = dict(hidden_states_masks=masks, image_rotary_emb=frequencies,
                  encoder_hidden_states=None if single else text)
    want = HiDreamAttnProcessor()(attn, image, **inputs)
    got = rope.HiDreamAttnProcessorFusedRope()(attn, image, **inputs)
    for expected, ours in zip(*((want, got) if not single else ((want,), (got,)))):
        assert torch.equal(expected.view(torch.int16), ours.view(torch.int16))


@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_ltx2_fused_rope_processors_give_diffusers_attention(rope_type):
    """LTX-2's layouts: self-attention, cross-attention with the key's own frequencies (audio to video) and an
    attention mask, per-head gates, and LTX-2.3's perturbation of the self-attention (partly and wholly perturbed)."""
    from diffusers.models.transformers.transformer_ltx2 import (LTX2Attention, LTX2AudioVideoAttnProcessor,
                                                                LTX2PerturbedAttnProcessor)

    torch.manual_seed(0)
    video, audio = torch.randn(2, 12, 32, dtype=torch.bfloat16), torch.randn(2, 7, 24, dtype=torch.bfloat16)

    def frequencies(tokens):
        shape = (2, 2, tokens, 8) if rope_type == "split" else (2, tokens, 32)
        angles = torch.rand(shape) * 6.3
        return angles.cos(), angles.sin()

    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    perturbation = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)[:, None, None]
    cases = [(None, dict(query_rotary_emb=frequencies(12))),
             (audio, dict(query_rotary_emb=frequencies(12), key_rotary_emb=frequencies(7), attention_mask=mask))]
    for gated in (False, True):
        for context, inputs in cases:
            attn = LTX2Attention(query_dim=32, heads=2, kv_heads=2, dim_head=16, cross_attention_dim=None
                                 if context is None else 24, rope_type=rope_type, apply_gated_attention=gated)
            attn = attn.to(torch.bfloat16)
            inputs = dict(inputs, encoder_hidden_states=context)
            pairs = [(LTX2AudioVideoAttnProcessor(), rope.LTX2AudioVideoAttnProcessorFusedRope(), {})]
            perturbations = ({"perturbation_mask": perturbation}, {"all_perturbed": True},
                             {"perturbation_mask": torch.zeros(2, 1, 1, dtype=torch.bfloat16)})
            pairs += [(LTX2PerturbedAttnProcessor(), rope.LTX2PerturbedAttnProcessorFusedRope(), extra)
                      for extra in ({},) + (perturbations if context is None else ())]  # self-attention only
            for theirs, ours, extra in pairs:
                want, got = theirs(attn, video, **inputs, **extra), ours(attn, video, **inputs, **extra)
                assert torch.equal(want.view(torch.int16), got.view(torch.int16)), (gated, context is None, extra)


def test_every_rotation_traces_as_one_graph_with_its_eager_result():
    """What CUDA compiles (``fullgraph=True``, dynamic shapes): each rotation traces without a graph break and the
    traced function gives the eager bits; here dynamo's eager backend stands in for Inductor."""
    from diffusers.models.transformers.transformer_hidream_image import HiDreamImageEmbedND

    x, (cos, sin) = _rotation_inputs()
    hidream = HiDreamImageEmbedND(theta=10000, axes_dim=[8, 4, 4])(torch.randint(0, 16, (1, 40, 3)).float())
    per_channel = torch.randn(2, 1, 40, 32).unbind(0)  # LTX-2's interleaved frequencies: (batch, tokens, channels)
    per_head = (cos[None, None, :, :8].expand(1, 2, 40, 8), sin[None, None, :, :8].expand(1, 2, 40, 8))
    cases = {rope.flux_rotation: (x, (cos, sin)), rope.wan_rotation: (x, (cos[None, :, None], sin[None, :, None])),
             rope.hidream_rotation: (x, (hidream,)), rope.ltx2_split_rotation: (x.flatten(2), per_head),
             rope.ltx2_interleaved_rotation: (x.flatten(2), per_channel)}
    assert set(rope.LTX2_ROTATIONS.values()) <= set(cases)
    for rotation, (values, freqs) in cases.items():
        traced = torch.compile(rotation, backend="eager", dynamic=True, fullgraph=True)
        assert torch.equal(traced(values, *freqs).view(torch.int16), rotation(values, *freqs).view(torch.int16))


def _rotation_inputs():
    from diffusers.models.embeddings import FluxPosEmbed

    torch.manual_seed(0)
    frequencies = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(torch.randint(0, 16, (40, 3)).float())
    return torch.randn(1, 40, 2, 16, dtype=torch.bfloat16), frequencies


def test_a_fused_rotation_is_used_after_it_gave_diffusers_bits_once(fresh_rope):
    from diffusers.models.embeddings import apply_rotary_emb

    calls = []

    def traced(x, cos, sin):
        calls.append(x.shape)
        return compiled(x, cos, sin)

    compiled = torch.compile(rope.flux_rotation, backend="eager", dynamic=True, fullgraph=True)
    eager_rounding._COMPILED[(rope.flux_rotation, "cpu")] = traced
    x, frequencies = _rotation_inputs()
    want = apply_rotary_emb(x, frequencies, sequence_dim=1)
    for _ in range(3):
        assert torch.equal(rope.rotary(rope.flux_rotation, x, *frequencies).view(torch.int16), want.view(torch.int16))
    assert len(calls) == 3  # the check, then used
    assert list(fresh_rope._CHECKED.values()) == [True]


def test_a_fused_rotation_that_differs_is_not_used(fresh_rope, caplog):
    from diffusers.models.embeddings import apply_rotary_emb

    calls = []

    def off_by_one(x, cos, sin):
        calls.append(x.shape)
        return rope.flux_rotation(x, cos, sin) + 1

    eager_rounding._COMPILED[(rope.flux_rotation, "cpu")] = off_by_one
    x, frequencies = _rotation_inputs()
    want = apply_rotary_emb(x, frequencies, sequence_dim=1)
    with caplog.at_level("INFO", logger=rope.__name__):
        for _ in range(3):
            assert torch.equal(rope.rotary(rope.flux_rotation, x, *frequencies), want)
    assert len(calls) == 1 and list(fresh_rope._CHECKED.values()) == [False]
    assert "run eager: the fused kernel does not give the eager output" in caplog.text


def test_a_fused_rotation_that_cannot_compile_leaves_diffusers_function(fresh_rope, caplog):
    from diffusers.models.embeddings import apply_rotary_emb

    def broken(x, cos, sin):
        raise RuntimeError("no Triton for this GPU")

    eager_rounding._COMPILED[(rope.flux_rotation, "cpu")] = broken
    x, frequencies = _rotation_inputs()
    want = apply_rotary_emb(x, frequencies, sequence_dim=1)
    with caplog.at_level("WARNING", logger=rope.__name__):
        assert torch.equal(rope.rotary(rope.flux_rotation, x, *frequencies), want)
    assert eager_rounding._COMPILED[(rope.flux_rotation, "cpu")] is None and "no Triton for this GPU" in caplog.text
