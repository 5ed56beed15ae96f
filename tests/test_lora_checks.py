"""The one LoRA front door (``AITKPipeline.check_lora``): the ComfyUI nodes apply exactly what the library applies,
and a LoRA holding NaN or inf is refused before it can touch a cached pipeline's weights."""

import math
import re

import numpy as np
import pytest
import torch

from aitk_inference.pipelines.lora import STRENGTH_RANGE
from aitk_inference.pipelines.lora.convert import LoraFormatError, convert_ai_toolkit_lora
from aitk_inference.pipelines.runtime import cache
from aitk_inference.pipelines.runtime.options import LoadOptions
from aitk_inference.tiny.loras import lora_targets, make_state_dict, save_lora, write_lora
from aitk_inference.tiny.wan import original_wan_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

FLUX_RUN = dict(prompt="a photo of a cat", width=64, height=64, steps=2, seed=7)


@pytest.fixture(scope="module", autouse=True)
def empty_cache():
    """These tests load through the shared pipeline cache (as the nodes and the server do); leave it empty."""
    cache.evict()
    yield
    cache.evict()


# ------------------------------------------------------------------------------------------------ one front door
def test_strength_limits_come_from_one_constant():
    from aitk_inference.nodes.schema import APPLY
    from aitk_inference.server.schemas import LoraItem

    strength = next(field for field in APPLY.inputs if field.name == "strength")
    assert (strength.min, strength.max) == STRENGTH_RANGE
    bounds = {type(m).__name__: m for m in LoraItem.model_fields["network_multiplier"].metadata}
    assert (bounds["Ge"].ge, bounds["Le"].le) == STRENGTH_RANGE


def test_apply_node_infers_the_expert_like_the_library(tiny_dir, tmp_path):
    """Wan 2.2 A14B: a ``*_high_noise`` file given to the Apply node with transformer "none" goes to the high-noise
    expert, as ``set_loras`` puts it, and Sample's frames equal the library's bit for bit."""
    from aitk_inference.nodes import core

    handle = core.load("wan22_14b_t2v", tiny_dir("wan22_14b_t2v"), "fp32", "none", "cpu")
    pipeline = handle.get_pipeline()
    lora = save_lora(str(tmp_path / "style_high_noise.safetensors"),
                     original_wan_state_dict(pipeline.pipe.transformer, seed=3))
    settings = dict(prompt="a cat surfing", negative="", width=64, height=64, steps=2, guidance=4.0, seed=7,
                    batch_size=1, num_frames=5, fps=16)

    with_lora = core.apply_lora(handle, lora, 0.8, "none")
    assert with_lora.loras == ((lora, 0.8, "high"),)
    from_nodes = core.sample(with_lora, progress=None, **settings)

    pipeline.set_loras([])
    base = pipeline.generate(**settings).images
    summary = pipeline.set_loras([(lora, 0.8)])
    from_library = pipeline.generate(**settings)
    pipeline.set_loras([])
    assert summary[0]["components"] == ["transformer"] and from_library.loras[0]["side"] == "high"
    assert np.abs(from_library.images - base).max() > 1e-3  # the LoRA really changes the frames
    np.testing.assert_array_equal(from_nodes.images.numpy(), from_library.images.reshape(-1, *base.shape[2:]))


# ------------------------------------------------------------------------------------------------ non-finite tensors
@pytest.mark.parametrize("layout,tensor,value,holds", [
    ("peft", "lora_B.weight", math.nan, "NaN"),
    ("kohya", "lora_down.weight", math.inf, "inf"),
    ("lokr", "lokr_w1", -math.inf, "inf"),
    ("full", "diff", math.nan, "NaN"),
])
def test_conversion_refuses_non_finite_tensors(layout, tensor, value, holds):
    linear = torch.nn.Linear(8, 6)
    state_dict = make_state_dict(layout, [("blocks.0.proj", linear)])
    key = next(k for k in state_dict if k.endswith("." + tensor))
    state_dict[key][0, 0] = value
    module_key = key[: -len("." + tensor)]
    name = tensor.split(".")[0]
    with pytest.raises(LoraFormatError, match=re.escape(f"bad.safetensors: {module_key}: {name} holds {holds}. ")
                       + ".*training diverged; use an earlier checkpoint"):
        convert_ai_toolkit_lora(state_dict, "transformer", {"transformer": ["blocks.0.proj"]}, label="bad.safetensors")


def test_lokr_alpha_rule_with_non_finite_alpha():
    """A full-rank LoKr ignores its stored alpha (ai-toolkit writes 1e10 or inf there); a factored one would scale by
    it, so a non-finite alpha there is refused."""
    linear = torch.nn.Linear(8, 6)
    full = make_state_dict("lokr", [("blocks.0.proj", linear)])
    full["transformer.blocks.0.proj.alpha"] = torch.tensor(math.inf)
    converted = convert_ai_toolkit_lora(full, "transformer", {})
    assert all(torch.isfinite(t).all() for p in converted.patches.values() for t in p.tensors.values())
    factored = make_state_dict("lokr_factored", [("blocks.0.proj", linear)])
    factored["transformer.blocks.0.proj.alpha"] = torch.tensor(math.inf)
    with pytest.raises(LoraFormatError, match="non-finite alpha"):
        convert_ai_toolkit_lora(factored, "transformer", {})


def _weights(pipeline) -> dict:
    return {k: v.detach().clone() for k, v in pipeline.pipe.transformer.state_dict().items()}


def _assert_same_weights(pipeline, before: dict) -> None:
    after = pipeline.pipe.transformer.state_dict()
    assert list(after) == list(before)
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert not changed, f"weights changed by a refused LoRA: {changed[:3]}"


@pytest.mark.parametrize("mode", ["fused", "dynamic"])
def test_nan_lora_is_refused_and_leaves_the_cached_pipeline_as_it_was(mode, tiny_dir, tmp_path):
    pipeline = cache.get_pipeline("flux", LoadOptions(base=tiny_dir("flux"), device="cpu", dtype="fp32", lora_mode=mode))
    assert pipeline.lora_mode == mode and not pipeline.loras.active
    targets = lora_targets(pipeline.pipe.transformer, limit=8)
    good = write_lora(str(tmp_path / "good.safetensors"), "peft", targets, seed=1)
    diverged = make_state_dict("peft", targets, seed=2)
    first = f"transformer.{targets[0][0]}"
    diverged[f"{first}.lora_B.weight"][1, 2] = math.nan
    bad = save_lora(str(tmp_path / "diverged.safetensors"), diverged)
    refused = re.escape(f"diverged.safetensors: {first}: lora_B holds NaN")

    # without any LoRA
    weights, image = _weights(pipeline), pipeline.generate(**FLUX_RUN).images
    with pytest.raises(LoraFormatError, match=refused):
        pipeline.set_loras([(bad, 1.0)])
    _assert_same_weights(pipeline, weights)
    assert not pipeline.loras.active
    np.testing.assert_array_equal(pipeline.generate(**FLUX_RUN).images, image)

    # with a valid LoRA active: replacing it, or stacking on it, keeps it exactly as it was
    pipeline.set_loras([(good, 0.7)])
    weights, image = _weights(pipeline), pipeline.generate(**FLUX_RUN).images
    for change in ([(bad, 1.0)], [(good, 0.7), (bad, 0.5)], [(good, 1.0), (bad, 0.5)]):
        with pytest.raises(LoraFormatError, match=refused):
            pipeline.set_loras(change)
        _assert_same_weights(pipeline, weights)
        assert [(entry["name"], entry["strength"]) for entry in pipeline.loras.describe()] == [("good.safetensors", 0.7)]
        np.testing.assert_array_equal(pipeline.generate(**FLUX_RUN).images, image)
    pipeline.set_loras([])


def test_apply_node_refuses_a_nan_lora(tiny_dir, tmp_path):
    from aitk_inference.nodes import core

    handle = core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu")
    targets = lora_targets(handle.get_pipeline().pipe.transformer, limit=2)
    diverged = make_state_dict("peft", targets, seed=2)
    diverged[f"transformer.{targets[1][0]}.lora_A.weight"][0, 0] = math.inf
    bad = save_lora(str(tmp_path / "diverged.safetensors"), diverged)
    with pytest.raises(LoraFormatError, match=re.escape(f"transformer.{targets[1][0]}: lora_A holds inf")):
        core.apply_lora(handle, bad, 1.0, "none")


def test_merge_replay_is_skipped_only_where_overflow_is_impossible():
    """The fused merge guard replays a change on scratch weights unless the factors bound its growth far below the
    range of a bfloat16/float32 weight; float16 weights, LoKr and huge factors always get the replay."""
    import torch

    from aitk_inference.pipelines.lora.convert import ModulePatch
    from aitk_inference.pipelines.lora.stack import _cannot_overflow

    small = ModulePatch(kind="lora", tensors={"up": torch.full((8, 4), 0.5), "down": torch.full((4, 6), -2.0)})
    huge = ModulePatch(kind="lora", tensors={"up": torch.full((8, 4), 1e16), "down": torch.full((4, 6), 1e16)})
    lokr = ModulePatch(kind="lokr", tensors={"w1": torch.ones(2, 2), "w2": torch.ones(4, 3)})
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.zeros(8, 6, dtype=dtype)
        assert _cannot_overflow(weight, [(small, 1.0, "a"), (small, -0.5, "a")])
        assert not _cannot_overflow(weight, [(small, 1.0, "a"), (huge, 1.0, "b")])
        assert not _cannot_overflow(weight, [(lokr, 1.0, "c")])
    assert not _cannot_overflow(torch.zeros(8, 6, dtype=torch.float16), [(small, 1.0, "a")])
