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

    def fail_halfway(module, merged, dtype):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated failure while re-quantizing")
        real(module, merged, dtype)

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


# ---------------------------------------------------------------------------------------------------------------- FP8 rebuild
# torch casts to float8 on the CPU, so torchao's per-row FP8 weights can be made here (its hardware checks refuse the
# CPU, or an older GPU beside it, only because float8 *matmuls* need an FP8 GPU; no forward runs in these tests).

def _fp8_on_the_cpu(monkeypatch):
    from torchao.quantization import quant_api

    from aitk_inference.pipelines.runtime import quantize

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(quant_api, "is_sm_at_least_89", lambda: True)
    monkeypatch.setattr(quantize, "_FUSED_CHECKED", {})
    return quantize


def _fp8_bytes(transformer) -> dict:
    from aitk_inference.pipelines.runtime.quantize import is_quantized

    return {name: (m.weight.qdata.view(torch.uint8).clone(), m.weight.scale.view(torch.int32).clone())
            for name, m in transformer.named_modules() if hasattr(m, "weight") and is_quantized(m.weight)}


def _same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_fused_fp8_rows_give_torchaos_bytes(monkeypatch):
    """fp8_rows_ against torchao's per-row Float8Tensor.from_hp, byte for byte: weights whose rows span many
    magnitudes (tiny rows, rows with one outlier, values that round to float8 subnormals and ties) and a zero row."""
    from torchao.quantization import Float8Tensor, PerRow

    quantize = _fp8_on_the_cpu(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    for rows, columns in ((32, 64), (48, 16), (16, 272)):
        merged = torch.randn(rows, columns, generator=generator) * torch.logspace(-6, 3, rows)[:, None]
        merged[1, 3] = 1e4  # one outlier: the row's other values land in float8's subnormal range
        merged[2] = 0.0  # torchao's scale is 0 and its values NaN: the same bytes are asked for
        merged[3] = torch.arange(columns) * (448.0 / 2**10)  # exact ties between float8 values
        for float8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            want = Float8Tensor.from_hp(merged.to(torch.bfloat16), float8_dtype=float8, granularity=PerRow())
            qdata, scale = torch.empty_like(want.qdata), torch.empty_like(want.scale)
            quantize.fp8_rows_(merged, torch.bfloat16, qdata, scale)
            assert torch.equal(qdata.view(torch.uint8), want.qdata.view(torch.uint8))
            assert torch.equal(scale.view(torch.int32), want.scale.view(torch.int32))


def _two_fp8_fused_flux(load_tiny) -> list:
    """Two tiny FLUX pipelines in fused mode with their block Linears in FP8 (masters kept)."""
    from aitk_inference.pipelines.runtime.quantize import fp8_config, quantize_block_linears

    pipelines = []
    for _ in range(2):
        pipeline = load_tiny("flux", lora_mode="fused", dtype="bf16")
        quantize_block_linears(pipeline.pipe.transformer, fp8_config(), keep_master=True)
        pipelines.append(pipeline)
    return pipelines


def test_fp8_strength_changes_rebuild_with_the_fused_kernel_as_torchao_would(load_tiny, lora_files, monkeypatch):
    """The FP8 fast mode's LoRA changes on the tiny FLUX: the fused rebuild writes, into the same storage, the bytes
    torchao's quantize of the merged weights gives (the previous path, forced through a second pipeline)."""
    quantize = _fp8_on_the_cpu(monkeypatch)
    fused, previous = _two_fp8_fused_flux(load_tiny)
    layer = fused.pipe.transformer.transformer_blocks[0].attn.to_q
    storage = layer.weight.qdata.data_ptr(), layer.weight.scale.data_ptr()
    base = _fp8_bytes(fused.pipe.transformer)
    rebuilds = {"fused": 0}
    real = quantize.fp8_rows_

    def counted(*args):
        rebuilds["fused"] += 1
        real(*args)

    monkeypatch.setattr(quantize, "fp8_rows_", counted)
    for loras in ([(lora_files["peft"], 1.0)], [(lora_files["peft"], 0.3), (lora_files["lokr"], 0.5)], []):
        fused.set_loras(loras)
        with monkeypatch.context() as torchao_only:
            torchao_only.setattr(quantize, "_is_row_fp8", lambda weight: False)
            previous.set_loras(loras)
        assert _same_bytes(_fp8_bytes(fused.pipe.transformer), _fp8_bytes(previous.pipe.transformer))
    assert _same_bytes(_fp8_bytes(fused.pipe.transformer), base)
    assert all(quantize._FUSED_CHECKED.values()) and len(quantize._FUSED_CHECKED) >= 2  # one check per layer shape
    assert rebuilds["fused"] > len(quantize._FUSED_CHECKED)  # and the fused kernel wrote the rest
    assert (layer.weight.qdata.data_ptr(), layer.weight.scale.data_ptr()) == storage


def test_eager_fp8_layers_run_torchaos_operations_without_its_dispatch(load_tiny, lora_files, monkeypatch):
    """Outside torch.compile a per-row FP8 Linear runs torchao's operations directly: the first call of each layer
    shape checks them against torchao's own output, the image is bit for bit the one through torchao's dispatch, and a
    shape where the direct output differs keeps torchao's path."""
    quantize = _fp8_on_the_cpu(monkeypatch)
    monkeypatch.setattr(quantize, "_DIRECT_CHECKED", {})
    pipeline = _two_fp8_fused_flux(load_tiny)[0]
    pipeline.set_loras([(lora_files["peft"], 0.8)])
    calls = {"direct": 0}
    direct_path = quantize._fp8_linear_direct

    def counted(*args):
        calls["direct"] += 1
        return direct_path(*args)

    monkeypatch.setattr(quantize, "_fp8_linear_direct", counted)
    direct = pipeline.generate(**GEN).images
    shapes = len(quantize._DIRECT_CHECKED)
    assert shapes >= 2 and all(quantize._DIRECT_CHECKED.values())
    assert calls["direct"] > shapes  # checked once a shape, then used
    monkeypatch.setattr(quantize, "_DIRECT_CHECKED", dict.fromkeys(quantize._DIRECT_CHECKED, False))
    calls["direct"] = 0
    assert np.array_equal(pipeline.generate(**GEN).images, direct)  # torchao's dispatch throughout
    assert calls["direct"] == 0

    monkeypatch.setattr(quantize, "_DIRECT_CHECKED", {})
    monkeypatch.setattr(quantize, "_fp8_linear_direct", lambda *args: direct_path(*args) * 1.5)
    assert np.array_equal(pipeline.generate(**GEN).images, direct)
    assert len(quantize._DIRECT_CHECKED) == shapes and not any(quantize._DIRECT_CHECKED.values())


def test_eager_fp8_layers_quantize_their_input_in_one_compiled_kernel_where_it_gives_torchaos_bits(
        load_tiny, lora_files, monkeypatch, caplog):
    """Where the input's quantization compiles (CUDA; here a dynamo trace of it stands in for the compiled kernel),
    each layer shape's first call picks "fused" when that output is torchao's bit for bit, and the image is the one
    through torchao's dispatch; a compiled quantization that rounds differently, or that cannot compile (a warning,
    once), leaves the eager direct path."""
    from aitk_inference.pipelines.runtime import eager_rounding

    quantize = _fp8_on_the_cpu(monkeypatch)
    pipeline = _two_fp8_fused_flux(load_tiny)[0]
    pipeline.set_loras([(lora_files["peft"], 0.8)])
    compiled_quantization = (quantize._per_row_fp8, "cpu")
    with monkeypatch.context() as torchao_only:
        torchao_only.setattr(quantize, "_is_row_fp8", lambda weight: False)
        through_torchao = pipeline.generate(**GEN).images
    traced = torch.compile(quantize._per_row_fp8, backend="eager", dynamic=True, fullgraph=True)
    monkeypatch.setattr(eager_rounding, "_COMPILED", {compiled_quantization: traced})
    monkeypatch.setattr(quantize, "_DIRECT_CHECKED", {})
    assert np.array_equal(pipeline.generate(**GEN).images, through_torchao)
    assert len(quantize._DIRECT_CHECKED) >= 2 and set(quantize._DIRECT_CHECKED.values()) == {"fused"}

    def one_level_off(values, float8_dtype, lower=None, upper=None):
        quantized, scale = quantize._per_row_fp8(values, float8_dtype, lower, upper)
        return quantized, scale * 2

    monkeypatch.setattr(eager_rounding, "_COMPILED", {compiled_quantization: one_level_off})
    monkeypatch.setattr(quantize, "_DIRECT_CHECKED", {})
    assert np.array_equal(pipeline.generate(**GEN).images, through_torchao)
    assert set(quantize._DIRECT_CHECKED.values()) == {"eager"}

    def does_not_compile(*args):
        raise RuntimeError("no Triton for this GPU")

    monkeypatch.setattr(eager_rounding, "_COMPILED", {compiled_quantization: does_not_compile})
    monkeypatch.setattr(quantize, "_DIRECT_CHECKED", {})
    with caplog.at_level("WARNING", logger=quantize.__name__):
        assert np.array_equal(pipeline.generate(**GEN).images, through_torchao)
    assert set(quantize._DIRECT_CHECKED.values()) == {"eager"}
    assert eager_rounding._COMPILED[compiled_quantization] is None
    assert caplog.text.count("no Triton for this GPU") == 1


def test_a_fused_rebuild_that_differs_from_torchao_is_not_used(load_tiny, lora_files, monkeypatch, caplog):
    quantize = _fp8_on_the_cpu(monkeypatch)
    wrong, reference = _two_fp8_fused_flux(load_tiny)
    real = quantize.fp8_rows_

    def off_by_one_scale(merged, dtype, qdata, scale):  # a kernel that rounds one scale differently
        real(merged, dtype, qdata, scale)
        scale.view(torch.int32)[0] += 1

    monkeypatch.setattr(quantize, "fp8_rows_", off_by_one_scale)
    with caplog.at_level("WARNING", logger=quantize.__name__):
        wrong.set_loras([(lora_files["peft"], 0.7)])
    assert quantize._FUSED_CHECKED and not any(quantize._FUSED_CHECKED.values())
    assert "does not give torchao's bytes" in caplog.text
    monkeypatch.setattr(quantize, "fp8_rows_", real)
    monkeypatch.setattr(quantize, "_FUSED_CHECKED", {})
    reference.set_loras([(lora_files["peft"], 0.7)])
    assert _same_bytes(_fp8_bytes(wrong.pipe.transformer), _fp8_bytes(reference.pipe.transformer))


# ---------------------------------------------------------------------------------------------------------------- FP8 and offload="auto"
def test_fp8_weights_count_their_fp8_bytes_in_the_offload_budget(monkeypatch):
    from aitk_inference.pipelines.runtime.accelerate import module_bytes, tensor_bytes
    from aitk_inference.pipelines.runtime.quantize import fp8_config, is_quantized
    from torchao.quantization import quantize_

    _fp8_on_the_cpu(monkeypatch)
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    assert module_bytes(layer) == (64 * 32 + 32) * 2
    quantize_(layer, fp8_config())
    assert is_quantized(layer.weight) and layer.weight.element_size() == 2  # a bfloat16 face over float8 values
    assert tensor_bytes(layer.weight) == 64 * 32 + 32 * 4  # one byte a value, one float32 scale a row
    assert module_bytes(layer) == 64 * 32 + 32 * 4 + 32 * 2


@pytest.mark.parametrize("room", ["bf16 fits", "fp8 fits"])
def test_auto_offload_with_fp8_measures_and_places_fp8_blocks(load_tiny, monkeypatch, caplog, room):
    """offload="auto" with quantize="fp8": when the weights fit as they are, they are placed on the GPU and quantized
    there (as with offload="none"); else they are quantized first, on the host (each layer computed on the GPU), and
    auto plans with their FP8 bytes: all on the GPU when that fits. The budget is set here; a CPU stands in for the
    GPU. Loaded without compile, the log says that FP8 then runs slower than bf16."""
    from aitk_inference.pipelines import base
    from aitk_inference.pipelines.runtime import accelerate, options
    from aitk_inference.pipelines.runtime.quantize import (block_linear_names, fp8_config, is_quantized,
                                                           quantize_block_linears)

    quantize = _fp8_on_the_cpu(monkeypatch)
    monkeypatch.setattr(options, "fp8_unavailable", lambda device: None)
    monkeypatch.setattr(quantize, "fp8_unavailable", lambda device: None)
    monkeypatch.setattr(accelerate, "activation_reserve", lambda vae, video, pixels: 0)
    bf16 = load_tiny("flux", dtype="bf16").pipe
    bf16_sizes = accelerate.component_bytes(bf16)
    quantize_block_linears(bf16.transformer, fp8_config())
    fp8_sizes = accelerate.component_bytes(bf16)
    weights = [bf16.transformer.get_submodule(name).weight for name in block_linear_names(bf16.transformer)]
    # two bytes a value became one, plus a float32 scale a row
    assert bf16_sizes["transformer"] - fp8_sizes["transformer"] == sum(w.numel() - 4 * w.shape[0] for w in weights)
    budget = {"bf16 fits": sum(bf16_sizes.values()), "fp8 fits": sum(fp8_sizes.values())}[room]
    monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: budget)
    placed = {}

    def place(pipe, device, offload, resident=None, whole=()):
        layer = pipe.transformer.transformer_blocks[0].attn.to_q
        placed.update(offload=offload, resident=resident, quantized=is_quantized(layer.weight),
                      sizes=accelerate.component_bytes(pipe))

    monkeypatch.setattr(accelerate, "place", place)
    with caplog.at_level("WARNING", logger=base.__name__):
        pipeline = load_tiny("flux", dtype="bf16", quantize="fp8", offload="auto", lora_mode="fused")
    assert "flux: quantize='fp8' without compile saves GPU memory but runs slower than bf16" in caplog.text
    assert pipeline.quantize == "fp8" and pipeline.offload == placed["offload"] == "none"
    assert placed["quantized"] == (room != "bf16 fits") and placed["resident"] is None
    layer = pipeline.pipe.transformer.transformer_blocks[0].attn.to_q
    assert quantize.rebuild_device(layer).type == "cpu" and quantize.master_weight(layer).device.type == "cpu"


@pytest.mark.parametrize("lora_mode", ["fused", "dynamic"])
def test_auto_offload_streams_fp8_blocks_that_do_not_fit(load_tiny, lora_files, monkeypatch, lora_mode):
    """When even the FP8 weights do not fit, auto keeps the first FP8 blocks on the device and streams the rest
    (``streaming``; their FP8 weights rebuilt around host copies of their values and scales): the same FP8 bytes and
    the same images as FP8 without offloading, before and after LoRA changes (fused rebuilds write into the streamed
    blocks' host copies). A CPU stands in for the GPU: the hooks and the slots are the same; the moves between host
    and GPU are tests/test_gpu.py's."""
    from aitk_inference.pipelines.runtime import accelerate, options
    from aitk_inference.pipelines.runtime.quantize import is_quantized

    quantize = _fp8_on_the_cpu(monkeypatch)
    monkeypatch.setattr(options, "fp8_unavailable", lambda device: None)
    monkeypatch.setattr(quantize, "fp8_unavailable", lambda device: None)
    monkeypatch.setattr(accelerate, "activation_reserve", lambda vae, video, pixels: 0)
    roomy = load_tiny("flux", dtype="bf16", quantize="fp8", lora_mode=lora_mode)
    sizes = accelerate.component_bytes(roomy.pipe)
    blocks = [accelerate.module_bytes(b) for _, b in accelerate.blocks_in_order(roomy.pipe.transformer)]
    assert len(blocks) >= 2
    # what the transformer's other weights, two streamed blocks and the first block kept need
    budget = sizes["transformer"] - sum(blocks) + 2 * max(blocks) + blocks[0]
    monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: budget)
    streamed = load_tiny("flux", dtype="bf16", quantize="fp8", offload="auto", lora_mode=lora_mode)
    assert streamed.offload == "group" and streamed.quantize == "fp8"
    transformer = streamed.pipe.transformer
    order = [block for _, block in accelerate.blocks_in_order(transformer)]
    assert [accelerate.carries_offload_hook(b) for b in order] == [False] + [True] * (len(order) - 1)
    assert is_quantized(order[0].ff.net[2].weight) and isinstance(order[0].ff.net[2].weight, torch.nn.Parameter)
    streamed_weight = order[-1].proj_out.weight
    assert is_quantized(streamed_weight) and isinstance(streamed_weight, torch.nn.Parameter)
    assert _same_bytes(_fp8_bytes(transformer), _fp8_bytes(roomy.pipe.transformer))
    assert np.array_equal(streamed.generate(**GEN).images, roomy.generate(**GEN).images)
    for loras in ([(lora_files["peft"], 0.7)], [(lora_files["peft"], 0.4)], [(lora_files["kohya"], 1.0)]):
        for pipeline in (streamed, roomy):
            pipeline.set_loras(loras)
        assert _same_bytes(_fp8_bytes(transformer), _fp8_bytes(roomy.pipe.transformer))
        assert np.array_equal(streamed.generate(**GEN).images, roomy.generate(**GEN).images)


def test_fp8_quantizing_leaves_the_process_settings_alone(monkeypatch):
    """torchao's FP8 config would switch the whole process to TF32 float32 matmuls and to Inductor's coordinate-descent
    tuning (minutes of compile); ours leaves both as they are, at quantize time and at every rebuild."""
    from torch._inductor import config as inductor_config
    from torchao.quantization import quantize_

    from aitk_inference.pipelines.runtime.quantize import fp8_config, requantize_

    _fp8_on_the_cpu(monkeypatch)
    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    precision = torch.get_float32_matmul_precision()
    layer = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    quantize_(layer, fp8_config())
    layer.aitk_quantize_config = fp8_config()
    requantize_(layer, torch.randn(32, 64), torch.bfloat16)
    assert torch.get_float32_matmul_precision() == precision and not inductor_config.coordinate_descent_tuning
