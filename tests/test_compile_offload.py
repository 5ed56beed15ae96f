"""Regional compile with CPU offloading, on the CPU (the tiny FLUX; Dynamo's ``eager`` backend, which traces the
same graphs as Inductor without generating kernels).

Regional compile traces each repeated block whole (``fullgraph=True``); diffusers' group offloading puts its onload
and offload, ``torch.compiler.disable()``d functions, inside each block's forward, so compiling such a block failed
at the first generate (``Unsupported: Skip inlining torch.compiler.disable()d function``): those blocks run eager.
The blocks ``offload="auto"`` streams (``streaming``) compile their ``forward``, the swap of their weights running
around the graph, and the resident ones compile whole, also after a LoRA change applies the offloading again. The
real hooks run here with the CPU as their onload device; tests/test_gpu.py runs the same under a GPU memory cap.
"""

import logging

import numpy as np
import pytest

from aitk_inference.pipelines.runtime import accelerate
from aitk_inference.pipelines.runtime.options import LoadOptionError, LoadOptions
from aitk_inference.tiny.loras import lora_targets, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "seed": 3}


def _compiled(pipeline) -> list:
    """Per repeated block: compiled ``whole``, its ``forward`` only, or nothing (False)."""
    return ["whole" if block._compiled_call_impl is not None else "forward" if "forward" in block.__dict__ else False
            for block in accelerate.repeated_blocks(pipeline.pipe.transformer)]


@pytest.fixture(scope="module")
def eager_images(pipes):
    return pipes("flux").generate(**GEN).images


@pytest.mark.parametrize("offload, compiled", [("group", [False, False]), ("sequential", [False, False]),
                                               ("model", ["whole", "whole"])])
def test_regional_compile_leaves_streamed_blocks_eager(load_tiny, eager_images, caplog, offload, compiled):
    """Every block streamed (group offloading at leaf level, accelerate's sequential hooks): nothing compiles, one
    warning says so, the images are the eager ones. Whole-component offload hooks the transformer, not its blocks:
    every block compiles. (Sequential offload cannot generate with the CPU as its execution device, compiled or not:
    accelerate fails moving the CLIP text encoder's weights back; tests/test_gpu.py generates with it.)"""
    pipeline = load_tiny("flux", offload=offload)
    with caplog.at_level(logging.WARNING, logger=accelerate.__name__):
        pipeline.compile_denoiser("regional", backend="eager")
    assert _compiled(pipeline) == compiled
    warnings = [r.getMessage() for r in caplog.records if "nothing to compile" in r.getMessage()]
    assert len(warnings) == (not any(compiled))
    if offload != "sequential":
        assert np.abs(pipeline.generate(**GEN).images - eager_images).max() <= 1e-5


def test_regional_compile_follows_the_resident_blocks_through_lora_changes(load_tiny, pipes, eager_images,
                                                                            monkeypatch, tmp_path):
    """offload="auto" streaming all but the first block (the budget is set here; the CPU stands in for the GPU): that
    block compiles whole, the streamed one its forward (its hooks outside the graph). A live LoRA adds adapter weights
    to every block, so the offloading applied again no longer fits the first block in the same bytes but fits the
    second, smaller one: the first block streams now and compiles its forward only (its hooks would fail a whole
    trace), the second compiles whole; once the LoRA is removed it is the other way again. Images match the
    uncompiled ones throughout."""
    transformer = pipes("flux").pipe.transformer
    first = accelerate.module_bytes(accelerate.blocks_in_order(transformer)[0][1])
    monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: 2**30)
    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "group")
    monkeypatch.setattr(accelerate, "resident_block_budget", lambda denoisers, budget, reserve: {"transformer": first})
    pipeline = load_tiny("flux", offload="auto", lora_mode="dynamic")
    assert pipeline.offload == "group" and pipeline.resident == {"transformer": first}
    assert [accelerate.carries_offload_hook(block) for block in accelerate.repeated_blocks(pipeline.pipe.transformer)] \
        == [False, True]
    pipeline.compile_denoiser("regional", backend="eager")
    assert _compiled(pipeline) == ["whole", "forward"]
    assert np.abs(pipeline.generate(**GEN).images - eager_images).max() <= 1e-5

    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", lora_targets(transformer))
    reference = load_tiny("flux", lora_mode="dynamic")
    for pipe in (pipeline, reference):
        pipe.set_loras([(lora, 0.8)])
    assert _compiled(pipeline) == ["forward", "whole"]
    assert np.abs(pipeline.generate(**GEN).images - reference.generate(**GEN).images).max() <= 1e-5
    pipeline.set_loras([])
    assert _compiled(pipeline) == ["whole", "forward"]
    assert np.abs(pipeline.generate(**GEN).images - eager_images).max() <= 1e-5


@pytest.mark.parametrize("offload", ["model", "sequential", "group"])
def test_full_compile_with_offload_is_refused_up_front(offload):
    with pytest.raises(LoadOptionError, match=f"compile='full' cannot be combined with offload='{offload}'.*"
                                              "use compile='regional'"):
        LoadOptions(offload=offload, compile="full")


def test_full_compile_refuses_what_auto_chose_before_placing(load_tiny, monkeypatch):
    monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: 2**30)
    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "model")
    monkeypatch.setattr(accelerate, "place", lambda *args: pytest.fail("placed before refusing"))
    with pytest.raises(LoadOptionError, match="offload='auto' chose 'model'.*use compile='regional'"):
        load_tiny("flux", offload="auto", compile="full")


def test_full_compile_of_an_offloaded_pipeline_is_refused(pipes):
    pipeline = pipes("flux", offload="model")
    with pytest.raises(LoadOptionError, match="compile='full' cannot be combined with offload='model'"):
        pipeline.compile_denoiser("full", backend="eager")
    assert pipeline.compiled is None
