"""The fused rotary embeddings of FLUX's, FLUX.2's, Krea 2's and Wan's attention (``runtime.rope``): the processors the
pipelines install give diffusers' own processors' output bit for bit, and a fused rotation is used only after its
first-call check. The compiled kernel itself needs CUDA (``tests/test_gpu.py``); here the check runs on functions
traced by dynamo."""

import numpy as np
import pytest
import torch
from PIL import Image

from aitk_inference.pipelines.runtime import rope


@pytest.fixture
def fresh_rope(monkeypatch):
    """The module's compile and check records, empty for one test and restored after it."""
    monkeypatch.setattr(rope, "_COMPILED", {})
    monkeypatch.setattr(rope, "_CHECKED", {})
    return rope


@pytest.mark.parametrize("model_id", ["flux", "chroma", "flux2_klein_4b", "krea2", "krea2_o_edit", "wan21_1b",
                                      "wan21_i2v_14b"])
def test_rotary_attention_layers_get_fused_rope_processors_with_diffusers_output(load_tiny, model_id, fresh_rope):
    pipeline = load_tiny(model_id)
    layers = [m for m in pipeline.pipe.transformer.modules() if hasattr(m, "processor")]
    assert layers and all(type(m.processor) in rope.FUSED_ROPE_PROCESSORS.values() for m in layers)
    diffusers_classes = {fused: original for original, fused in rope.FUSED_ROPE_PROCESSORS.items()}
    gen = dict(prompt="a red cube", width=64, height=64, steps=2, seed=5)
    if model_id.startswith("wan"):
        gen["num_frames"] = 5
    if "i2v" in model_id or "edit" in model_id:
        gen["control_images"] = [Image.new("RGB", (64, 64), (200, 90, 40))]
    ours = pipeline.generate(**gen).images
    for layer in layers:
        layer.processor = diffusers_classes[type(layer.processor)]()
    assert np.array_equal(ours, pipeline.generate(**gen).images)


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
    fresh_rope._COMPILED[(rope.flux_rotation, "cpu")] = traced
    x, frequencies = _rotation_inputs()
    want = apply_rotary_emb(x, frequencies, sequence_dim=1)
    for _ in range(3):
        assert torch.equal(rope.rotary(rope.flux_rotation, x, frequencies).view(torch.int16), want.view(torch.int16))
    assert len(calls) == 3  # the check, then used
    assert list(fresh_rope._CHECKED.values()) == [True]


def test_a_fused_rotation_that_differs_is_not_used(fresh_rope, caplog):
    from diffusers.models.embeddings import apply_rotary_emb

    calls = []

    def off_by_one(x, cos, sin):
        calls.append(x.shape)
        return rope.flux_rotation(x, cos, sin) + 1

    fresh_rope._COMPILED[(rope.flux_rotation, "cpu")] = off_by_one
    x, frequencies = _rotation_inputs()
    want = apply_rotary_emb(x, frequencies, sequence_dim=1)
    with caplog.at_level("INFO", logger=rope.__name__):
        for _ in range(3):
            assert torch.equal(rope.rotary(rope.flux_rotation, x, frequencies), want)
    assert len(calls) == 1 and list(fresh_rope._CHECKED.values()) == [False]
    assert "run eager: the fused kernel does not give the eager output" in caplog.text


def test_a_fused_rotation_that_cannot_compile_leaves_diffusers_function(fresh_rope, caplog):
    from diffusers.models.embeddings import apply_rotary_emb

    def broken(x, cos, sin):
        raise RuntimeError("no Triton for this GPU")

    fresh_rope._COMPILED[(rope.flux_rotation, "cpu")] = broken
    x, frequencies = _rotation_inputs()
    want = apply_rotary_emb(x, frequencies, sequence_dim=1)
    with caplog.at_level("WARNING", logger=rope.__name__):
        assert torch.equal(rope.rotary(rope.flux_rotation, x, frequencies), want)
    assert fresh_rope._COMPILED[(rope.flux_rotation, "cpu")] is None and "no Triton for this GPU" in caplog.text
