"""A regionally compiled denoiser through many LoRA changes, as a long-lived ComfyUI or server process makes them (the
tiny FLUX on the CPU; Dynamo's ``eager`` backend traces the same graphs as Inductor without generating kernels).

With ``lora_mode="dynamic"`` the LoRAs are PEFT adapters inside the compiled blocks, and Dynamo's guards name them:
a new adapter name per LoRA compiled new graphs at every switch, and the ninth LoRA raised Dynamo's recompile-limit
error (``fullgraph`` turns the limit into an error) in the middle of a generate.
"""

import numpy as np
import pytest

from aitk_inference.tiny.loras import lora_targets, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "seed": 3}


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_dynamic_loras_switch_without_new_graphs_and_past_the_recompile_limit(load_tiny, tmp_path):
    """A LoRA that replaces another of the same rank takes over its adapter name: the switch compiles nothing. LoRAs
    of nine ranks compile a graph each per block class, more than torch's default limit of 8 per function, and every
    image still equals the uncompiled pipeline's."""
    pipeline = load_tiny("flux", lora_mode="dynamic")
    reference = load_tiny("flux", lora_mode="dynamic")
    pipeline.compile_denoiser("regional", backend="eager")
    targets = lora_targets(pipeline.pipe.transformer)

    def switch_and_compare(lora: str) -> None:
        for pipe in (pipeline, reference):
            pipe.set_loras([lora])
        assert np.abs(pipeline.generate(**GEN).images - reference.generate(**GEN).images).max() <= 1e-5

    same_rank = [write_lora(str(tmp_path / f"rank4_{seed}.safetensors"), "peft", targets, rank=4, seed=seed)
                 for seed in range(3)]
    switch_and_compare(same_rank[0])
    graphs = _graphs()
    for lora in same_rank[1:]:
        switch_and_compare(lora)
    assert _graphs() == graphs
    for rank in (1, 2, 3, 5, 6, 7, 8, 9):
        switch_and_compare(write_lora(str(tmp_path / f"rank{rank}.safetensors"), "peft", targets, rank=rank,
                                      seed=rank))
    assert _graphs() >= graphs + 8


def test_a_compiled_pipeline_past_the_recompile_limit_says_what_to_do(load_tiny, tmp_path, monkeypatch):
    """Should a process still reach the limit, generate ends in a ValueError naming the cause and the ways out
    instead of Dynamo's error, and the graphs compiled before keep working."""
    import torch._dynamo

    pipeline = load_tiny("flux", lora_mode="dynamic")
    pipeline.compile_denoiser("regional", backend="eager")
    targets = lora_targets(pipeline.pipe.transformer)
    # ranks no other test compiles: the graphs of a block class are shared by every pipeline of the process
    known = write_lora(str(tmp_path / "rank11.safetensors"), "peft", targets, rank=11)
    pipeline.set_loras([known])
    images = pipeline.generate(**GEN).images
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    pipeline.set_loras([write_lora(str(tmp_path / "rank13.safetensors"), "peft", targets, rank=13)])
    with pytest.raises(ValueError, match=r"flux: the compiled blocks already hold torch's limit of 1 graphs .*"
                                         r"lora_mode='fused'"):
        pipeline.generate(**GEN)
    pipeline.set_loras([known])
    assert np.array_equal(pipeline.generate(**GEN).images, images)
