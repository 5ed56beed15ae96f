"""Fused LoRAs on quantized weights (the FP8 fast mode's mechanics), on the CPU.

FP8 matmuls need a CUDA GPU (tests/test_gpu.py covers them), but the bookkeeping is the same for any torchao
quantized weight: a host master copy per layer, ``quantize(master + sum(strength * delta))`` rebuilt in place after
each change, the previous set restored on failure. torchao's int8 weight-only recipe runs on the CPU, so these tests
run that code on the tiny FLUX model with it.
"""

import numpy as np
import pytest
import torch

from aitk_inference.tiny.loras import lora_targets, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")

torchao = pytest.importorskip("torchao", reason="quantized-weight LoRA tests need torchao (in requirements-ci.txt; "
                                                 "pip install torchao)")

GEN = dict(prompt="a cat", width=64, height=64, steps=2, seed=3)


def _int8_config():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(version=2)


def _quantized(load_tiny, keep_master=True):
    from aitk_inference.pipelines.runtime.quantize import quantize_block_linears

    pipeline = load_tiny("flux", lora_mode="fused", dtype="bf16")
    count = quantize_block_linears(pipeline.pipe.transformer, _int8_config(), keep_master=keep_master)
    return pipeline, count


def _weights(transformer) -> dict:
    from aitk_inference.pipelines.runtime.quantize import is_quantized

    return {name: m.weight.dequantize().clone() for name, m in transformer.named_modules()
            if hasattr(m, "weight") and is_quantized(m.weight)}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, load_tiny):
    folder = tmp_path_factory.mktemp("qloras")
    targets = lora_targets(load_tiny("flux").pipe.transformer)
    return {layout: write_lora(str(folder / f"{layout}.safetensors"), layout, targets, seed=seed)
            for seed, layout in enumerate(("peft", "lokr", "kohya"))}


def test_fused_lora_on_quantized_weights_equals_quantizing_the_merged_model(load_tiny, lora_files):
    from aitk_inference.pipelines.runtime.quantize import quantize_block_linears

    quantized, count = _quantized(load_tiny)
    assert count == len(lora_targets(quantized.pipe.transformer)) > 0
    quantized.set_loras([(lora_files["peft"], 0.8)])
    # the reference: the same LoRA merged in plain fused mode, then the merged weights quantized
    merged = load_tiny("flux", lora_mode="fused", dtype="bf16")
    merged.set_loras([(lora_files["peft"], 0.8)])
    quantize_block_linears(merged.pipe.transformer, _int8_config())
    got, want = _weights(quantized.pipe.transformer), _weights(merged.pipe.transformer)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert np.array_equal(quantized.generate(**GEN).images, merged.generate(**GEN).images)


def test_changes_rebuild_in_place_and_removal_restores_the_base(load_tiny, lora_files):
    quantized, _ = _quantized(load_tiny)
    transformer = quantized.pipe.transformer
    base_weights, base_image = _weights(transformer), quantized.generate(**GEN).images
    layer = transformer.transformer_blocks[0].attn.to_q
    tensor, storage = layer.weight, layer.weight.qdata.data_ptr()

    quantized.set_loras([(lora_files["peft"], 1.0), (lora_files["lokr"], 0.5)])  # LoKr is merged too
    stacked = quantized.generate(**GEN).images
    assert not np.array_equal(stacked, base_image)
    # a strength change gives the weights a fresh application at that strength gives
    quantized.set_loras([(lora_files["peft"], 0.3), (lora_files["lokr"], 0.5)])
    changed = _weights(transformer)
    fresh, _ = _quantized(load_tiny)
    fresh.set_loras([(lora_files["peft"], 0.3), (lora_files["lokr"], 0.5)])
    assert all(torch.equal(changed[k], v) for k, v in _weights(fresh.pipe.transformer).items())
    # same quantized tensors, same storage: compiled graphs that read them stay valid
    assert layer.weight is tensor and layer.weight.qdata.data_ptr() == storage
    quantized.set_loras([])
    assert all(torch.equal(base_weights[k], v) for k, v in _weights(transformer).items())
    assert np.array_equal(quantized.generate(**GEN).images, base_image)


def test_a_failed_rebuild_puts_back_the_previous_set(load_tiny, lora_files, monkeypatch):
    from aitk_inference.pipelines.lora import stack as lora_module

    quantized, _ = _quantized(load_tiny)
    quantized.set_loras([(lora_files["peft"], 1.0)])
    before, image = _weights(quantized.pipe.transformer), quantized.generate(**GEN).images
    real, calls = lora_module.requantize_, {"n": 0}

    def fail_halfway(module, weight):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated failure while re-quantizing")
        real(module, weight)

    monkeypatch.setattr(lora_module, "requantize_", fail_halfway)
    with pytest.raises(RuntimeError, match="simulated failure"):
        quantized.set_loras([(lora_files["kohya"], 0.6)])
    monkeypatch.setattr(lora_module, "requantize_", real)
    assert [e["strength"] for e in quantized.loras.describe()] == [1.0]
    assert all(torch.equal(before[k], v) for k, v in _weights(quantized.pipe.transformer).items())
    assert np.array_equal(quantized.generate(**GEN).images, image)


def test_quantized_weights_without_a_master_refuse_merged_patches(load_tiny, lora_files):
    from aitk_inference.pipelines.lora.stack import LoraFormatError

    quantized, _ = _quantized(load_tiny, keep_master=False)
    with pytest.raises(LoraFormatError, match="lora_mode='fused'"):
        quantized.set_loras([(lora_files["peft"], 1.0)])
    assert quantized.loras.describe() == []
