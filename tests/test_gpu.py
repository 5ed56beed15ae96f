"""Checks that need a CUDA GPU (skipped elsewhere): LoRA application under every offload mode, FP8 weights with LoRA
adapters and with fused LoRAs, and the attention kernels.

Run on a GPU machine with ``python -m pytest tests/test_gpu.py``; the same check ran on an H100 (see the notes of the
core issue): dynamic mode equals offload none bit for bit, fused mode within float32 rounding of the live adapters.
Every registry id also runs on the GPU in bfloat16 with a LoRA, live and fused.
"""

import numpy as np
import pytest
import torch

from aitk_inference.pipelines.registry import REGISTRY
from aitk_inference.tiny.loras import lora_targets, write_lora
from family_streaming import one_id_per_family, pretend_the_weights_do_not_fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("offload", ["model", "sequential", "group"])
@pytest.mark.parametrize("lora_mode", ["dynamic", "fused"])
def test_loras_under_offload_match_no_offload(load_tiny, tmp_path, offload, lora_mode):
    reference = load_tiny("flux", device="cuda")
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", lora_targets(reference.pipe.transformer))
    offloaded = load_tiny("flux", device="cuda", offload=offload, lora_mode=lora_mode)
    tolerance = 0.0 if lora_mode == "dynamic" else 2e-4
    for strength in (0.7, 0.3, 0.0):
        reference.set_loras([(lora, strength)])
        offloaded.set_loras([(lora, strength)])
        want = reference.generate(prompt="x", width=64, height=64, steps=2).images
        got = offloaded.generate(prompt="x", width=64, height=64, steps=2).images
        assert np.abs(got - want).max() <= tolerance


def _relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _lora_reaches_fp8(reference, fp8, lora, gen) -> tuple:
    """Apply ``lora`` at 1.0 to a bf16 and an FP8 pipeline; check that the FP8 images stay near the bf16 ones and that
    the LoRA moves the FP8 model as much as the bf16 one (it is not rounded away). Returns the FP8 images without
    and with the LoRA."""
    base_bf16, base_fp8 = reference.generate(**gen).images, fp8.generate(**gen).images
    reference.set_loras([(lora, 1.0)])
    fp8.set_loras([(lora, 1.0)])
    lora_bf16, lora_fp8 = reference.generate(**gen).images, fp8.generate(**gen).images
    assert 0 < _relative(lora_fp8, lora_bf16) < 0.25
    assert 0.5 < _relative(lora_fp8, base_fp8) / _relative(lora_bf16, base_bf16) < 2.0
    return base_fp8, lora_fp8


def test_fp8_weights_run_loras_as_adapters(load_tiny, tmp_path):
    from aitk_inference.pipelines.lora.stack import LoraFormatError
    from aitk_inference.pipelines.runtime.quantize import fp8_unavailable, is_quantized

    if fp8_unavailable("cuda"):
        pytest.skip(fp8_unavailable("cuda"))
    reference = load_tiny("flux", device="cuda", dtype="bf16")
    fp8 = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", lora_mode="dynamic")
    assert fp8.quantize == "fp8" and fp8.lora_mode == "dynamic"
    assert sum(is_quantized(m.weight) for m in fp8.pipe.transformer.modules() if hasattr(m, "weight")) == 20
    targets = lora_targets(reference.pipe.transformer)
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", targets)
    gen = dict(prompt="x", width=64, height=64, steps=2)
    base_fp8, _ = _lora_reaches_fp8(reference, fp8, lora, gen)
    fp8.set_loras([(lora, 0.0)])
    assert np.array_equal(fp8.generate(**gen).images, base_fp8)
    lokr = write_lora(str(tmp_path / "k.safetensors"), "lokr", targets)
    with pytest.raises(LoraFormatError, match="FP8"):
        fp8.set_loras([(lokr, 1.0)])
    assert [entry["strength"] for entry in fp8.loras.describe()] == [0.0]  # the previous set is kept


def test_fp8_fused_mode_merges_loras_before_quantizing(load_tiny, tmp_path):
    from torch._dynamo.utils import counters

    from aitk_inference.pipelines.runtime.quantize import fp8_unavailable

    if fp8_unavailable("cuda"):
        pytest.skip(fp8_unavailable("cuda"))
    reference = load_tiny("flux", device="cuda", dtype="bf16", lora_mode="fused")
    fp8 = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", lora_mode="fused", compile="regional")
    targets = lora_targets(reference.pipe.transformer)
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", targets)
    lokr = write_lora(str(tmp_path / "k.safetensors"), "lokr", targets)
    gen = dict(prompt="x", width=64, height=64, steps=2)
    base_fp8, lora_fp8 = _lora_reaches_fp8(reference, fp8, lora, gen)
    graphs = counters["stats"]["unique_graphs"]
    fp8.set_loras([(lora, 0.4), (lokr, 0.5)])  # a strength change and a LoKr file (merged, then quantized)
    stacked = fp8.generate(**gen).images
    fp8.set_loras([(lora, 1.0)])
    assert np.array_equal(fp8.generate(**gen).images, lora_fp8)  # rebuilt from the master: no drift
    assert counters["stats"]["unique_graphs"] == graphs  # the compiled FP8 blocks were reused
    assert not np.array_equal(stacked, lora_fp8)
    fp8.set_loras([])
    assert np.array_equal(fp8.generate(**gen).images, base_fp8)


@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_compiled_live_adapters_switch_loras_past_the_recompile_limit(load_tiny, tmp_path, quantize):
    """Inductor's regional compile with live adapters (bf16, and the FP8 fast mode's adapters next to FP8 weights):
    LoRAs of one rank switch without a new graph, and nine ranks (past torch's default of 8 graphs) all generate,
    near the uncompiled pipeline's images (tests/test_compile_lora.py checks the same on the CPU with Dynamo alone)."""
    from torch._dynamo.utils import counters

    from aitk_inference.pipelines.runtime.quantize import fp8_unavailable

    if quantize == "fp8" and fp8_unavailable("cuda"):
        pytest.skip(fp8_unavailable("cuda"))
    options = dict(device="cuda", dtype="bf16", quantize=quantize, lora_mode="dynamic")
    compiled, eager = load_tiny("flux", compile="regional", **options), load_tiny("flux", **options)
    targets = lora_targets(eager.pipe.transformer)
    gen = dict(prompt="x", width=64, height=64, steps=2)

    def switch_and_compare(lora):
        for pipe in (compiled, eager):
            pipe.set_loras([lora])
        assert _relative(compiled.generate(**gen).images, eager.generate(**gen).images) < 0.05

    same_rank = [write_lora(str(tmp_path / f"rank4_{seed}.safetensors"), "peft", targets, rank=4, seed=seed)
                 for seed in range(3)]
    switch_and_compare(same_rank[0])
    graphs = counters["stats"]["unique_graphs"]
    for lora in same_rank[1:]:
        switch_and_compare(lora)
    assert counters["stats"]["unique_graphs"] == graphs
    for rank in (1, 2, 3, 5, 6, 7, 8, 9):
        switch_and_compare(write_lora(str(tmp_path / f"rank{rank}.safetensors"), "peft", targets, rank=rank,
                                      seed=rank))


@pytest.mark.parametrize("model_id", ["flux", "hidream"])
@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
def test_attention_kernels_agree_with_the_default(load_tiny, kernel, model_id):
    gen = dict(prompt="x", width=64, height=64, steps=2)
    default = load_tiny(model_id, device="cuda", dtype="bf16").generate(**gen).images
    chosen = load_tiny(model_id, device="cuda", dtype="bf16", attention=kernel)
    assert chosen.attention == kernel
    assert_kernels_agree(chosen.generate(**gen).images, default, f"{model_id} {kernel}")


def assert_kernels_agree(images, default, label: str) -> None:
    """Two bf16 attention kernels on a random tiny model: a few pixels may differ by several 8-bit levels (HiDream's
    did by 0.033 with FlashAttention-2 and -3), the image by little."""
    difference = np.abs(images - default)
    print(f"{label}: mean |kernel - sdpa| {difference.mean():.4f}, max {difference.max():.4f}")
    assert difference.mean() < 0.005 and difference.max() < 0.05


def test_auto_offload_follows_the_memory_it_may_use(load_tiny, monkeypatch):
    gen = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 5}
    roomy = load_tiny("flux", device="cuda", dtype="bf16", offload="auto")
    assert roomy.offload == "none"
    monkeypatch.setenv("AITK_MAX_GPU_MEMORY_GIB", "0.5")  # less than the room kept for activations
    tight = load_tiny("flux", device="cuda", dtype="bf16", offload="auto")
    assert tight.offload == "group"
    assert np.abs(tight.generate(**gen).images - roomy.generate(**gen).images).max() < 0.03
    monkeypatch.setenv("AITK_MAX_GPU_MEMORY_GIB", "lots")
    with pytest.raises(ValueError, match="AITK_MAX_GPU_MEMORY_GIB='lots' is not a number of GiB"):
        load_tiny("flux", device="cuda", dtype="bf16", offload="auto")


def _streaming_setup(load_tiny, monkeypatch, lora_mode):
    """The tiny FLUX all on the GPU, its blocks' bytes in forward order and what else its transformer needs on the GPU
    while streaming (the rest and two blocks in flight), with no room kept for activations."""
    from aitk_inference.pipelines.runtime import accelerate

    gen = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 5}
    roomy = load_tiny("flux", device="cuda", dtype="bf16", lora_mode=lora_mode)
    transformer = roomy.pipe.transformer
    blocks = [accelerate.module_bytes(block) for _, block in accelerate.blocks_in_order(transformer)]
    overhead = accelerate.module_bytes(transformer) - sum(blocks) + 2 * max(blocks)
    monkeypatch.setattr(accelerate, "activation_reserve", lambda vae, video, pixels: 0)
    return gen, roomy, blocks, overhead


@pytest.mark.parametrize("lora_mode", ["fused", "dynamic"])
def test_auto_offload_streams_only_the_blocks_that_do_not_fit(load_tiny, monkeypatch, tmp_path, lora_mode):
    """Between "everything fits" and "nothing fits", auto keeps as many of the denoiser's blocks on the GPU as fit
    (the first among them) and streams the rest; images match the all-on-GPU run, with a LoRA too, and a LoRA change
    keeps as many bytes resident."""
    from aitk_inference.pipelines.runtime import accelerate

    gen, roomy, blocks, overhead = _streaming_setup(load_tiny, monkeypatch, lora_mode)
    transformer = roomy.pipe.transformer
    # the tiny transformer is not the largest component (whole-component offload would fit): ask for streaming,
    # which the CPU tests of choose_offload cover; the budget then decides how many blocks stay
    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "group")
    budget = overhead + sum(blocks[: len(blocks) // 2])
    monkeypatch.setenv("AITK_MAX_GPU_MEMORY_GIB", str((torch.cuda.memory_reserved() + budget) / 2**30))
    partial = load_tiny("flux", device="cuda", dtype="bf16", offload="auto", lora_mode=lora_mode)
    assert partial.offload == "group" and 0 < partial.resident["transformer"] < sum(blocks)

    def devices():
        return [next(block.parameters()).device.type for _, block in accelerate.blocks_in_order(partial.pipe.transformer)]

    placed = devices()
    assert placed[0] == "cuda" and "cpu" in placed
    assert np.abs(partial.generate(**gen).images - roomy.generate(**gen).images).max() < 0.03
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", lora_targets(transformer))
    for pipeline in (roomy, partial):
        pipeline.set_loras([(lora, 0.8)])
    after = devices()  # live adapters add their weights to every block: one block fewer may fit the same bytes
    assert placed.count("cuda") - (lora_mode == "dynamic") <= after.count("cuda") <= placed.count("cuda")
    assert np.abs(partial.generate(**gen).images - roomy.generate(**gen).images).max() < 0.03


def test_streamed_blocks_spread_between_kept_ones_give_the_all_on_gpu_output():
    """A FLUX transformer with 8 blocks and room for about half their bytes: the streamed blocks sit between kept ones
    (``blocks_to_keep``), each copied into a slot on the copy stream while the blocks before it run (the first one
    fetched when it starts, the next ones prefetched, the first again after the last). Every forward equals the
    forward with every weight on the GPU, bit for bit, and between forwards the streamed weights are on the host."""
    import copy

    from diffusers import FluxTransformer2DModel

    from aitk_inference.pipelines.runtime import accelerate

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=6,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).to(torch.bfloat16).eval()
    streamed = copy.deepcopy(model)
    model.to("cuda")
    inputs = {"hidden_states": torch.randn(1, 64, 16), "encoder_hidden_states": torch.randn(1, 8, 32),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(8, 3)}
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
              for k, v in inputs.items()}
    with torch.inference_mode():
        want = model(**inputs)[0]
    sizes = [accelerate.module_bytes(block) for _, block in accelerate.blocks_in_order(streamed)]
    kept = accelerate.offload_blocks_keeping_resident(streamed, "cuda", sum(sizes) // 2)
    placed = [next(block.parameters()).device.type for _, block in accelerate.blocks_in_order(streamed)]
    gaps = [i for i, device in enumerate(placed) if device == "cpu"]
    assert placed[0] == "cuda" and 2 <= len(gaps) == len(placed) - kept
    assert all(b - a > 1 for a, b in zip(gaps, gaps[1:]))  # no two streamed blocks in a row
    for _ in range(3):
        with torch.inference_mode():
            assert torch.equal(streamed(**inputs)[0], want)
        assert [next(block.parameters()).device.type for _, block in accelerate.blocks_in_order(streamed)] == placed


@pytest.mark.parametrize("lora_mode", ["fused", "dynamic"])
def test_regional_compile_with_auto_offload_compiles_the_resident_blocks(load_tiny, monkeypatch, tmp_path, lora_mode):
    """compile="regional" with offload="auto" streaming blocks under a memory cap: the first (resident) block
    compiles whole with Inductor, the streamed one its forward (the hooks that swap its weights in run around the
    graph), and the images match the uncompiled capped run, also after a LoRA change places the blocks again.
    Whole-component offload (``model``) compiles every block whole and matches too."""
    from aitk_inference.pipelines.runtime import accelerate

    gen, roomy, blocks, overhead = _streaming_setup(load_tiny, monkeypatch, lora_mode)
    transformer = roomy.pipe.transformer
    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "group")

    def capped(**options):  # room for the first block only, on top of what this process holds by then
        room = torch.cuda.memory_reserved() + overhead + blocks[0]
        monkeypatch.setenv("AITK_MAX_GPU_MEMORY_GIB", str(room / 2**30))
        return load_tiny("flux", device="cuda", dtype="bf16", offload="auto", lora_mode=lora_mode, **options)

    eager, compiled = capped(), capped(compile="regional")
    model = load_tiny("flux", device="cuda", dtype="bf16", offload="model", lora_mode=lora_mode, compile="regional")

    def compiled_blocks(pipeline):
        return ["whole" if b._compiled_call_impl is not None else "forward" if "forward" in b.__dict__ else False
                for b in accelerate.repeated_blocks(pipeline.pipe.transformer)]

    assert compiled.offload == eager.offload == "group" and compiled.resident == eager.resident
    assert compiled_blocks(compiled) == ["whole", "forward"] and compiled_blocks(model) == ["whole", "whole"]
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", lora_targets(transformer))
    for strength in (None, 0.8):
        if strength is not None:
            for pipeline in (roomy, eager, compiled, model):
                pipeline.set_loras([(lora, strength)])
        want = eager.generate(**gen).images
        assert np.abs(compiled.generate(**gen).images - want).max() < 0.03
        assert np.abs(model.generate(**gen).images - roomy.generate(**gen).images).max() < 0.03
    # live adapters add their weights to every block: the first no longer fits and streams, the smaller second one
    # fits its bytes and stays; how each block compiles follows
    assert compiled_blocks(compiled) == (["whole", "forward"] if lora_mode == "fused" else ["forward", "whole"])


@pytest.mark.parametrize("model_id", ["flux", "hidream"])
def test_flash_attention_3_agrees_with_the_default_or_says_how_to_install_it(load_tiny, model_id):
    from aitk_inference.pipelines.runtime.accelerate import use_fa3_fwd_if_needed

    gen = dict(prompt="x", width=64, height=64, steps=2)
    if not use_fa3_fwd_if_needed():
        with pytest.raises(ValueError, match="pip install fa3-fwd"):
            load_tiny(model_id, device="cuda", dtype="bf16", attention="flash_attn_3")
        pytest.skip("FlashAttention-3 (flash_attn_interface or fa3-fwd) is not installed: only its error was checked")
    default = load_tiny(model_id, device="cuda", dtype="bf16").generate(**gen).images
    chosen = load_tiny(model_id, device="cuda", dtype="bf16", attention="flash_attn_3")
    assert_kernels_agree(chosen.generate(**gen).images, default, f"{model_id} flash_attn_3")


def test_fp8_master_on_the_gpu_gives_the_weights_of_the_host_master(load_tiny, tmp_path):
    """Fused FP8 mode re-quantizes from the kept original weights: kept on the GPU (no copy) or in pinned host memory,
    every strength change and removal must give the same FP8 values bit for bit."""

    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
    from aitk_inference.pipelines.runtime.quantize import (block_linear_names, fp8_unavailable, master_weight,
                                                           quantize_denoiser_fp8)

    if fp8_unavailable("cuda"):
        pytest.skip(fp8_unavailable("cuda"))
    stacks = {}
    for place in ("gpu", "host"):
        denoiser = load_tiny("flux", device="cuda", dtype="bf16").pipe.transformer
        quantize_denoiser_fp8(denoiser, keep_master=True, master=place)
        names = block_linear_names(denoiser)
        assert {master_weight(denoiser.get_submodule(n)).device.type for n in names} == {
            "cuda" if place == "gpu" else "cpu"}
        stacks[place] = (denoiser, names, LoraStack({"transformer": denoiser}, "fused", "transformer", "flux"))
    lora = write_lora(str(tmp_path / "lora.safetensors"), "peft", lora_targets(stacks["gpu"][0]))

    def fp8_values(place):
        denoiser, names, _ = stacks[place]
        return [denoiser.get_submodule(n).weight.qdata.clone() for n in names]

    before = fp8_values("gpu")
    for strengths in ([1.0], [0.4], []):
        for place in stacks:
            stacks[place][2].set([LoraRequest(path=lora, strength=s) for s in strengths])
        gpu, host = fp8_values("gpu"), fp8_values("host")
        assert all(torch.equal(a, b) for a, b in zip(gpu, host))
        assert any(not torch.equal(a, b) for a, b in zip(gpu, before)) == bool(strengths)


def _loras_and_inputs(pipeline, tmp_path) -> tuple[list[str], dict]:
    """LoRA files on every block Linear of ``pipeline``'s denoiser (one per expert where it has two), and generation
    inputs the id takes (its control images, its frame count)."""
    from PIL import Image

    spec = pipeline.spec
    names = [spec.experts.file_stem("lora", side) for side in spec.experts.SIDES] if spec.experts else ["lora"]
    loras = [write_lora(str(tmp_path / f"{name}.safetensors"), "peft",
                        lora_targets(getattr(pipeline.pipe, pipeline.denoiser)), seed=i) for i, name in enumerate(names)]
    inputs = dict(width=64, height=64, steps=2, seed=42,
                  control_images=[Image.new("RGB", (64, 64), (120, 30, 200))] * spec.control_images[0])
    if spec.video is not None:
        inputs["num_frames"] = spec.video.frames(2)
    return loras, inputs


@pytest.mark.parametrize("lora_mode", ["dynamic", "fused"])
@pytest.mark.parametrize("model_id", list(REGISTRY))
def test_every_id_runs_on_cuda_in_bf16_with_a_lora(model_id, lora_mode, load_tiny, tmp_path):
    """Every registry id on the GPU in bfloat16 with a LoRA on every block Linear, live and fused: device and dtype
    mix-ups (a tensor left on the CPU, a float32 buffer) only show here."""
    pipeline = load_tiny(model_id, device="cuda", dtype="bf16", lora_mode=lora_mode)
    denoiser = getattr(pipeline.pipe, pipeline.denoiser)
    loras, inputs = _loras_and_inputs(pipeline, tmp_path)
    assert all(summary["modules"] > 0 for summary in pipeline.set_loras(loras))
    result = pipeline.generate("a tiny photo of sks", **inputs)
    output = result.audio if result.is_audio else result.images
    assert denoiser.device.type == "cuda" and denoiser.dtype == torch.bfloat16
    assert np.isfinite(output).all() and np.std(output) > 0


@pytest.mark.parametrize("model_id", one_id_per_family())
def test_every_family_streams_its_denoiser_blocks_on_cuda(model_id, load_tiny, monkeypatch, tmp_path):
    """offload="auto" where the weights do not fit, for one id of every family on the GPU (modular pipelines, whose
    execution device comes from the components' offloading, ACE-Step's VAE placed whole, HiDream-O1's nested
    layers): some blocks stream, the output is the all-on-GPU one's within float32 rounding, with a LoRA."""
    from aitk_inference.pipelines.runtime import accelerate
    from aitk_inference.pipelines.runtime.streaming import is_streamed

    whole = load_tiny(model_id, device="cuda")
    pretend_the_weights_do_not_fit(monkeypatch)
    streamed = load_tiny(model_id, device="cuda", offload="auto")
    assert streamed.offload == "group"
    for denoiser in streamed.denoisers():
        assert any(is_streamed(block) for _, block in accelerate.blocks_in_order(denoiser))
    loras, inputs = _loras_and_inputs(whole, tmp_path)
    for pipeline in (whole, streamed):
        pipeline.set_loras(loras)
    want, got = (pipeline.generate("a tiny photo of sks", **inputs) for pipeline in (whole, streamed))
    want, got = ((r.audio if r.is_audio else r.images) for r in (want, got))
    assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max() < 1e-4


def test_fp8_fused_rebuild_gives_torchaos_bytes_on_the_gpu(load_tiny, tmp_path, monkeypatch):
    """The FP8 fast mode's strength change rebuilds each layer with one compiled kernel (runtime.quantize.fp8_rows_);
    every layer shape must pass its first-use byte comparison with torchao's quantize (else it would silently keep the
    slower path), and later rebuilds must match torchao's bytes too."""
    from aitk_inference.pipelines.runtime import eager_rounding, quantize

    if quantize.fp8_unavailable("cuda"):
        pytest.skip(quantize.fp8_unavailable("cuda"))
    monkeypatch.setattr(quantize, "_FUSED_CHECKED", {})
    fused = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", lora_mode="fused")
    previous = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", lora_mode="fused")
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", lora_targets(fused.pipe.transformer))

    def fp8_bytes(pipeline):
        return [(m.weight.qdata.view(torch.uint8).clone(), m.weight.scale.view(torch.int32).clone())
                for m in pipeline.pipe.transformer.modules()
                if hasattr(m, "weight") and quantize.is_quantized(m.weight)]

    for strength in (1.0, 0.4, -0.7):
        fused.set_loras([(lora, strength)])
        with monkeypatch.context() as torchao_only:
            torchao_only.setattr(quantize, "_is_row_fp8", lambda weight: False)
            previous.set_loras([(lora, strength)])
        assert all(torch.equal(a, b) for pair in zip(fp8_bytes(fused), fp8_bytes(previous)) for a, b in zip(*pair))
    assert quantize._FUSED_CHECKED and all(quantize._FUSED_CHECKED.values()), quantize._FUSED_CHECKED
    assert eager_rounding._COMPILED.get((quantize.fp8_rows_, "cuda")) is not None, \
        "the fused rebuild did not compile (is Triton installed?)"


@pytest.mark.parametrize("lora_mode", ["fused", "dynamic"])
def test_fp8_with_auto_offload_places_fp8_weights_that_fit_and_streams_the_rest(load_tiny, monkeypatch, tmp_path,
                                                                               lora_mode):
    """quantize="fp8" with offload="auto" under a cap that the bf16 weights do not fit but their FP8 copies do: the
    weights are quantized on the host (each layer computed on the GPU), then placed whole on the GPU, with the FP8
    values and the image of FP8 without offload. Under a cap that the FP8 weights do not fit either, the first block
    stays on the GPU and the other streams (its FP8 values and scales copied as they are): the same FP8 values
    and image, compiled (both blocks) or not, also after LoRA changes (fused mode rebuilds the streamed block's host
    copy)."""
    from aitk_inference.pipelines.runtime import accelerate, quantize

    if quantize.fp8_unavailable("cuda"):
        pytest.skip(quantize.fp8_unavailable("cuda"))
    gen = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 5}
    bf16_bytes = sum(accelerate.component_bytes(load_tiny("flux", dtype="bf16").pipe).values())
    roomy = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", lora_mode=lora_mode)
    fp8_bytes = sum(accelerate.component_bytes(roomy.pipe).values())
    assert fp8_bytes < bf16_bytes
    monkeypatch.setattr(accelerate, "activation_reserve", lambda vae, video, pixels: 0)
    torch.cuda.empty_cache()

    def cap(budget):  # the host quantization empties the allocator's cache: measure without it
        torch.cuda.empty_cache()
        monkeypatch.setenv("AITK_MAX_GPU_MEMORY_GIB", str((torch.cuda.memory_reserved() + budget) / 2**30))

    cap((fp8_bytes + bf16_bytes) // 2)
    capped = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", offload="auto", lora_mode=lora_mode)
    assert capped.offload == "none" and capped.quantize == "fp8"
    assert {p.device.type for p in capped.pipe.transformer.parameters()} == {"cuda"}

    def values(pipeline):
        return [(m.weight.qdata.view(torch.uint8).cpu(), m.weight.scale.cpu())
                for m in pipeline.pipe.transformer.modules() if isinstance(m, torch.nn.Linear)
                and quantize.is_quantized(m.weight)]

    assert all(torch.equal(a, b) for pair in zip(values(capped), values(roomy)) for a, b in zip(*pair))
    assert np.array_equal(capped.generate(**gen).images, roomy.generate(**gen).images)
    blocks = [accelerate.module_bytes(b) for _, b in accelerate.blocks_in_order(roomy.pipe.transformer)]
    transformer_rest = accelerate.module_bytes(roomy.pipe.transformer) - sum(blocks)
    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "group")
    cap(transformer_rest + 2 * max(blocks) + blocks[0])
    streamed = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", offload="auto", lora_mode=lora_mode)
    cap(transformer_rest + 2 * max(blocks) + blocks[0])
    compiled = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", offload="auto", lora_mode=lora_mode,
                         compile="regional")
    for pipeline in (streamed, compiled):
        assert pipeline.offload == "group" and pipeline.quantize == "fp8"
        order = [block for _, block in accelerate.blocks_in_order(pipeline.pipe.transformer)]
        assert [accelerate.carries_offload_hook(b) for b in order] == [False] + [True] * (len(order) - 1)
        assert next(order[0].parameters()).device.type == "cuda" and next(order[-1].parameters()).device.type == "cpu"
        assert all(torch.equal(a, b) for pair in zip(values(pipeline), values(roomy)) for a, b in zip(*pair))
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", lora_targets(roomy.pipe.transformer))
    for strength in (None, 0.8, 0.3):
        if strength is not None:
            for pipeline in (roomy, streamed, compiled):
                pipeline.set_loras([(lora, strength)])
        want = roomy.generate(**gen).images
        assert np.array_equal(streamed.generate(**gen).images, want)
        # Inductor's fused activation quantization can round an FP8 scale one step away from eager's (0.033 seen)
        assert np.abs(compiled.generate(**gen).images - want).max() < 0.06
        assert all(torch.equal(a, b) for pair in zip(values(streamed), values(roomy)) for a, b in zip(*pair))


@pytest.mark.parametrize("compile", ["none", "regional"])
def test_a_dropped_pipeline_that_streams_blocks_gives_its_gpu_memory_back(load_tiny, monkeypatch, tmp_path, compile):
    """A pipeline whose blocks stream (compiled or not, through a LoRA change) is freed when its last reference goes,
    and with it every byte it held on the GPU: a memory-capped process (or ComfyUI's cache) loads the next one in
    the same room."""
    import gc
    import weakref

    from aitk_inference.benchmarks.harness import referrer_path
    from aitk_inference.pipelines.runtime import accelerate

    gen, roomy, blocks, overhead = _streaming_setup(load_tiny, monkeypatch, "fused")
    roomy.generate(**gen)  # the libraries' one-off GPU allocations (workspaces) come before the baseline
    lora = write_lora(str(tmp_path / "l.safetensors"), "peft", lora_targets(roomy.pipe.transformer))
    del roomy
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "group")
    budget = overhead + sum(blocks[: len(blocks) // 2])
    monkeypatch.setenv("AITK_MAX_GPU_MEMORY_GIB", str((torch.cuda.memory_reserved() + budget) / 2**30))
    pipeline = load_tiny("flux", device="cuda", dtype="bf16", offload="auto", compile=compile, lora_mode="fused")
    assert 0 < pipeline.resident["transformer"] < sum(blocks)
    pipeline.generate(**gen)
    pipeline.set_loras([(lora, 0.8)])
    pipeline.generate(**gen)
    transformer = weakref.ref(pipeline.pipe.transformer)
    del pipeline
    gc.collect()
    assert transformer() is None, referrer_path(transformer())
    assert torch.cuda.memory_allocated() == baseline


@pytest.mark.parametrize("tokens,heads,dtype", [(4608, 24, torch.bfloat16), (4608, 24, torch.float16),
                                                (1536, 24, torch.float32), (777, 3, torch.bfloat16)])
def test_fused_rotary_embeddings_give_the_eager_bits_on_the_gpu(tokens, heads, dtype):
    """At FLUX.1-dev's 1024x1024 shape (512 text + 4096 image tokens, 24 heads of 128) and odd ones, every compiled
    rotation (FLUX's, Wan's, HiDream's, LTX-2's two) is used after its first-call check and gives the eager rotation
    bit for bit (FLUX's is diffusers' ``apply_rotary_emb``; Wan's frequencies come shaped as ``WanRotaryPosEmbed`` gives
    them, HiDream's as ``HiDreamImageEmbedND`` with HiDream-I1's axes, LTX-2's in its split and interleaved layouts)."""
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb
    from diffusers.models.transformers.transformer_hidream_image import HiDreamImageEmbedND, apply_rope
    from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

    from aitk_inference.pipelines.runtime import eager_rounding, rope

    torch.manual_seed(0)
    ids = torch.cat([torch.zeros(tokens // 9, 3), torch.randint(0, 64, (tokens - tokens // 9, 3)).float()]).cuda()
    frequencies = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    wan_frequencies = tuple(f[None, :, None, :] for f in frequencies)
    hidream_frequencies = (HiDreamImageEmbedND(theta=10000, axes_dim=[64, 32, 32])(ids[None]),)
    angles = torch.rand(1, heads, tokens, 64, device="cuda") * 6.3  # LTX-2's split layout: (batch, heads, tokens, 64)
    split_frequencies = (angles.cos(), angles.sin())
    interleaved_frequencies = tuple(f.repeat(1, heads)[None] for f in frequencies)  # (batch, tokens, channels)
    for _ in range(3):
        x = torch.randn(1, tokens, heads, 128, device="cuda", dtype=dtype) * 4
        channels = x.flatten(2)
        expected = {
            rope.flux_rotation: (x, frequencies, apply_rotary_emb(x, frequencies, sequence_dim=1)),
            rope.wan_rotation: (x, wan_frequencies, rope.wan_rotation(x, *wan_frequencies)),
            rope.hidream_rotation: (x, hidream_frequencies, apply_rope(x, x, *hidream_frequencies)[0]),
            rope.ltx2_split_rotation: (channels, split_frequencies,
                                       apply_split_rotary_emb(channels, split_frequencies)),
            rope.ltx2_interleaved_rotation: (channels, interleaved_frequencies,
                                             apply_interleaved_rotary_emb(channels, interleaved_frequencies))}
        for rotation, (values, freqs, want) in expected.items():
            assert torch.equal(rope.rotary(rotation, values, *freqs).view(torch.uint8), want.view(torch.uint8))
    for rotation, (values, freqs, _) in expected.items():
        assert eager_rounding._COMPILED.get((rotation, "cuda")) is not None, \
            "no compiled rotation (is Triton installed?)"
        key = (rotation, "cuda:0", tuple(values.shape), values.stride(), dtype,
               *((tuple(f.shape), f.stride(), f.dtype) for f in freqs))
        assert rope._CHECKED[key], f"{rotation.__name__}: the compiled rotation does not give the eager bits"


@pytest.mark.parametrize("model_id", ["flux", "flux2_klein_4b", "wan21_1b", "hidream", "ltx2"])
def test_the_fused_rotary_embedding_gives_diffusers_image_on_the_gpu(load_tiny, model_id):
    """FLUX's, FLUX.2's, Wan's, HiDream's and LTX-2's attention layers run the fused rotary embedding on CUDA, with the
    image of diffusers' own attention processors."""
    from aitk_inference.pipelines.runtime import rope

    pipeline = load_tiny(model_id, device="cuda", dtype="bf16")
    layers = [m for m in pipeline.pipe.transformer.modules() if hasattr(m, "processor")]
    assert layers and all(type(m.processor) in rope.FUSED_ROPE_PROCESSORS.values() for m in layers)
    video = REGISTRY[model_id].video
    gen = dict(prompt="x", width=64, height=64, steps=2, seed=3, **({"num_frames": video.frames(1)} if video else {}))
    fused = [pipeline.generate(**gen).images for _ in range(2)]
    rotation = {"wan21_1b": rope.wan_rotation, "hidream": rope.hidream_rotation,
                "ltx2": rope.ltx2_split_rotation}.get(model_id, rope.flux_rotation)
    checked = [fused for key, fused in rope._CHECKED.items() if key[0] is rotation]
    assert checked and all(checked), rope._CHECKED
    diffusers_classes = {fused: original for original, fused in rope.FUSED_ROPE_PROCESSORS.items()}
    for layer in layers:
        layer.processor = diffusers_classes[type(layer.processor)]()
    assert np.array_equal(fused[0], pipeline.generate(**gen).images)
    assert np.array_equal(fused[1], fused[0])


def test_eager_fp8_layers_quantize_their_input_in_one_kernel_with_torchaos_bits_on_the_gpu(load_tiny, monkeypatch):
    """Eager FP8 layers on CUDA run the direct path with the input's quantization compiled ("fused" for every layer
    shape after its check), and the image is bit for bit the one through torchao's dispatch."""
    from aitk_inference.pipelines.runtime import quantize

    if quantize.fp8_unavailable("cuda"):
        pytest.skip(quantize.fp8_unavailable("cuda"))
    monkeypatch.setattr(quantize, "_DIRECT_CHECKED", {})
    fp8 = load_tiny("flux", device="cuda", dtype="bf16", quantize="fp8", lora_mode="fused")
    gen = dict(prompt="x", width=64, height=64, steps=2, seed=1)
    direct = [fp8.generate(**gen).images for _ in range(2)]
    modes = set(quantize._DIRECT_CHECKED.values())
    assert modes == {"fused"}, quantize._DIRECT_CHECKED
    with monkeypatch.context() as torchao_only:
        torchao_only.setattr(quantize, "_is_row_fp8", lambda weight: False)
        assert np.array_equal(fp8.generate(**gen).images, direct[0])
    assert np.array_equal(direct[1], direct[0])


# tiny Wan's 12-wide and LTX-2's 4-wide heads are refused (FlashAttention-3 takes multiples of 8)
@pytest.mark.parametrize("model_id", ["flux", "flux2_klein_4b", "krea2", "hidream"])
def test_fp8_attention_runs_the_attention_layers_in_fp8_close_to_the_default(load_tiny, monkeypatch, model_id):
    """attention="flash_attn_3_fp8" hands every attention layer runtime.rope covers to FlashAttention-3's FP8 kernel
    (e4m3 inputs, one scale per image and head), eager and compiled, within a few levels of the bf16 image."""
    from diffusers.models import attention_dispatch

    from aitk_inference.pipelines.runtime.accelerate import repeated_blocks, use_fa3_fwd_if_needed
    from aitk_inference.pipelines.runtime.rope import FusedRopeProcessor

    if not use_fa3_fwd_if_needed():
        pytest.skip("FlashAttention-3 (flash_attn_interface or fa3-fwd) is not installed")
    kernel = attention_dispatch.flash_attn_3_func
    fp8_calls = []

    def recording(q, k, v, **kwargs):
        if q.dtype == torch.float8_e4m3fn:
            fp8_calls.append((kwargs["q_descale"].shape, kwargs["k_descale"].dtype))
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(attention_dispatch, "flash_attn_3_func", recording)
    video = REGISTRY[model_id].video
    gen = dict(prompt="x", width=64, height=64, steps=2, seed=3, **({"num_frames": video.frames(1)} if video else {}))
    reference = load_tiny(model_id, device="cuda", dtype="bf16")
    default = reference.generate(**gen).images
    # HiDream's transformer declares no repeated blocks: it compiles whole
    compiled = "regional" if repeated_blocks(reference.pipe.transformer) else "full"
    for compile in ("none", compiled):
        pipeline = load_tiny(model_id, device="cuda", dtype="bf16", attention="flash_attn_3_fp8", compile=compile)
        processors = [m.processor for m in pipeline.pipe.transformer.modules()
                      if isinstance(getattr(m, "processor", None), FusedRopeProcessor)]
        assert processors and all(p.fp8_attention for p in processors)
        fp8_calls.clear()
        images = pipeline.generate(**gen).images
        assert fp8_calls and all(dtype == torch.float32 and len(shape) == 2 for shape, dtype in fp8_calls)
        difference = np.abs(images.astype(np.float32) - default.astype(np.float32))
        print(f"{model_id} compile={compile}: mean |fp8 - bf16| {difference.mean():.4f}, max {difference.max():.4f}")
        assert difference.mean() < 0.03
