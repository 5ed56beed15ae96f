"""The benchmark harness on the tiny FLUX model (CPU): the code path the GPU run takes, and its results schema."""

import json
import math
import os
import time

import pytest
from aitk_inference.benchmarks.harness import RECORD_KEYS, SCHEMA_VERSION
from comfyui_harness import COMFYUI_DIR, ROOT, comfy_python, needs_comfyui


def test_tiny_flux_benchmark_writes_valid_results(tiny_dir, tmp_path):
    from aitk_inference.benchmarks.run import main

    tiny_dir("flux")
    path = main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--image-size", "64", "--steps", "2",
                 "--reps", "1", "--e2e-reps", "1", "--variants", "fused",
                 "--out", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")])
    with open(path) as f:
        payload = json.load(f)

    assert payload["schema"] == SCHEMA_VERSION and payload["size"] == "tiny"
    assert payload["versions"]["torch"] and payload["versions"]["diffusers"] and payload["device"]
    assert payload["command"].startswith("python -m aitk_inference.benchmarks.run --size tiny")
    records = payload["records"]
    for r in records:
        assert tuple(r) == RECORD_KEYS
        assert r["model"] == "flux" and isinstance(r["unit"], str) and math.isfinite(r["value"]) and r["value"] >= 0
        if r["reference_value"] is None:
            assert r["ratio"] is None
        else:
            assert math.isclose(r["ratio"], r["value"] / r["reference_value"], rel_tol=1e-3, abs_tol=5e-5)  # 4 decimals
    by_key = {(r["metric"], r["variant"]): r for r in records}
    for metric in ("image_e2e", "step", "strength_change", "lora_switch"):
        assert by_key[(metric, "dynamic")]["reference_value"] is None  # the reference itself
        assert by_key[(metric, "fused")]["reference_value"] == by_key[(metric, "dynamic")]["value"]
    assert by_key[("cold_load", "load_pipeline")]["reference_value"] == by_key[("raw_read", "read()")]["value"]
    assert {r["variant"] for r in records} == {"dynamic", "fused", "load_pipeline", "read()"}


def test_comfyui_reference_is_skipped_with_a_reason_without_comfyui(tiny_dir, tmp_path, monkeypatch, capsys):
    from aitk_inference.benchmarks.run import main

    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    tiny_dir("flux")
    fake_checkout = tmp_path / "fake-comfy"  # passes the checkout check: the tiny FLUX is refused before any import
    (fake_checkout / "comfy").mkdir(parents=True)
    (fake_checkout / "comfy" / "model_patcher.py").write_text("")
    for model_id, comfy_dir, reason in (("flux", tmp_path / "no-comfy", "is not a ComfyUI checkout"),
                                        ("wan21_14b", tmp_path / "no-comfy", "is not a ComfyUI checkout"),
                                        ("flux", fake_checkout, "no tiny FLUX loads (full size only)")):
        path = main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--models", "--forward-only", model_id,
                     "--variants", "fused", "--reps", "1", "--comfyui", str(comfy_dir),
                     "--out", str(tmp_path / model_id / comfy_dir.name), "--workdir", str(tmp_path / "work")])
        with open(path) as f:
            payload = json.load(f)
        [why] = payload["skipped"]
        assert reason in why and "skipped" in capsys.readouterr().out
        assert {(r["model"], r["variant"]) for r in payload["records"]} == {(model_id, "dynamic"), (model_id, "fused")}
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--device", "cpu", "--forward-only", "qwen_image", "--comfyui", str(tmp_path)])
    assert "add --forward-only with one of flux, wan21_14b, wan21_14b_81f" in capsys.readouterr().err


def _run_in_comfyuis_environment(tmp_path, module: str, *args: str) -> None:
    """``python -m aitk_inference.<module> args`` with ComfyUI's interpreter, which has this pack's dependencies but
    not the pack itself (it imports it through a link in ``tmp_path``); it must succeed."""
    import subprocess

    importable = tmp_path / "importable"
    importable.mkdir()
    (importable / "aitk_inference").symlink_to(ROOT, target_is_directory=True)
    finished = subprocess.run([comfy_python(), "-m", f"aitk_inference.{module}", *args], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(importable)})
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


@pytest.mark.parametrize("model_id", ["hidream", "ltx2.5"])
def test_tiny_forward_times_the_fused_rotary_embedding(tiny_dir, tmp_path, model_id):
    """HiDream's and LTX-2.5's forward-only runs, with the variant that swaps in the fused rotary embedding: timed, and
    the forward the same as with diffusers' processors."""
    from aitk_inference.benchmarks.run import main

    tiny_dir(model_id)
    path = main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--models", "--forward-only", model_id,
                 "--variants", "fused", "fused+rope", "--reps", "1", "--out", str(tmp_path / "results"),
                 "--workdir", str(tmp_path / "work")])
    with open(path) as f:
        by_key = {(r["metric"], r["variant"]): r for r in json.load(f)["records"]}
    for variant in ("dynamic", "fused", "fused+rope"):
        assert by_key[("forward_ms", variant)]["value"] > 0 and by_key[("forward_ms", variant)]["model"] == model_id
    assert by_key[("fused_rope_bitwise_equal", "fused+rope")]["value"] == 1.0


@pytest.mark.comfyui
@needs_comfyui
def test_comfyui_wan_reference_runs_the_same_model_and_lora_as_ours(tiny_cache, tmp_path):
    """ComfyUI's own Wan 2.1 path (in its environment) on a small Wan it can detect: every weight and LoRA key taken,
    and its forward equal to our fused one in fp32. The time budget leaves out its compile (it needs 150 s left)."""
    import re

    _run_in_comfyuis_environment(tmp_path, "benchmarks.run", "--size", "tiny", "--device", "cpu", "--dtype", "fp32",
                                 "--models", "--forward-only", "wan21_14b", "--variants", "fused", "--reps", "1",
                                 "--time-budget", "149", "--comfyui", COMFYUI_DIR, "--out", str(tmp_path / "results"),
                                 "--workdir", str(tmp_path / "work"))
    [path] = (tmp_path / "results").iterdir()
    by_key = {(r["metric"], r["variant"]): r for r in json.loads(path.read_text())["records"]}
    check = by_key[("comfyui_relative_error", "comfyui")]
    assert check["value"] < 1e-5
    patched, modules = map(int, re.search(r"(\d+) weights patched from (\d+) LoRA modules", check["notes"]).groups())
    assert patched == modules == 20  # 2 blocks x 10 Linear layers
    assert "0 LoRA keys not loaded, 0 model weights missing, 0 model weights unexpected" in check["notes"]
    assert by_key[("forward_ms", "comfyui")]["value"] > 0 and by_key[("strength_change_s", "comfyui")]["value"] > 0
    assert not any(variant.endswith("+compile") for _, variant in by_key)


@pytest.mark.comfyui
@needs_comfyui
def test_capped_comparison_streams_ours_and_runs_comfyuis_low_vram_path(tiny_cache, tmp_path):
    """benchmarks/comfyui_capped on the CPU (the CPU stands for the card, a cap of 0 GiB streams every block): ours
    streamed, eager and compiled, gives the uncapped output; ComfyUI's own path, with one and two streams, gives it
    within fp32 rounding (the weights it gets are copies taken before our LoRA was merged in place)."""
    _run_in_comfyuis_environment(tmp_path, "benchmarks.comfyui_capped", "--comfyui", COMFYUI_DIR, "--size", "tiny",
                                 "--device", "cpu", "--dtype", "fp32", "--model", "wan21_14b", "--cap-gib", "0",
                                 "--compile-backend", "eager", "--reps", "1", "--out", str(tmp_path))
    runs = {run["variant"]: run for run in json.loads((tmp_path / "comfyui_capped_wan21_14b_0gib.json").read_text())[
        "runs"]}
    assert set(runs) == {"ours_uncapped", "ours", "ours+compile", "comfyui", "comfyui+async_offload"}
    assert not any("error" in run for run in runs.values())
    for variant in ("ours", "ours+compile"):
        assert runs[variant]["blocks_kept"] == 0 and runs[variant]["blocks"] == 2
        assert runs[variant]["relative_error_vs_uncapped_fused"] < 1e-6
    for variant in ("comfyui", "comfyui+async_offload"):
        assert runs[variant]["relative_error_vs_uncapped_fused"] < 1e-5  # 5.8e-8 seen
        assert runs[variant]["forward_ms"] > 0


def test_tiny_flux_compile_variant_times_a_second_process(tiny_dir, tmp_path):
    """The compiled variant, and its probe in a new process that reads the same on-disk compile cache."""
    from aitk_inference.benchmarks.run import main

    tiny_dir("flux")
    path = main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--image-size", "64", "--steps", "2",
                 "--reps", "1", "--e2e-reps", "1", "--variants", "fused+compile", "--compile-backend", "eager",
                 "--out", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")])
    with open(path) as f:
        by_key = {(r["metric"], r["variant"]): r for r in json.load(f)["records"]}
    cold = by_key[("compile_first_call", "fused+compile")]
    warm = by_key[("compile_first_call", "fused+compile, cache from disk")]
    assert cold["value"] > 0 and warm["value"] > 0 and warm["reference_value"] == cold["value"]
    assert by_key[("recompiles_after_lora_change", "fused+compile")]["value"] == 0
    assert by_key[("step", "fused+compile")]["reference_value"] == by_key[("step", "dynamic")]["value"]


def test_tiny_attention_forward_compares_kernels_eager_and_compiled(tiny_dir, tmp_path):
    """benchmarks/attention_forward on the CPU: each kernel's eager and compiled forward of one model, its error and
    its ratios against the first kernel; one kernel alone is refused."""
    from aitk_inference.benchmarks.attention_forward import main

    tiny_dir("flux")
    path = main(["--models", "flux", "--kernels", "sdpa", "sdpa_math", "--size", "tiny", "--device", "cpu",
                 "--dtype", "fp32", "--compile-backend", "eager", "--reps", "1", "--out", str(tmp_path)])
    with open(path) as f:
        flux = json.load(f)["models"]["flux"]
    for mode in ("eager", "compiled"):
        assert flux[f"{mode}_sdpa_math_ms"] > 0
        ratio = flux[f"{mode}_sdpa_math_ms"] / flux[f"{mode}_sdpa_ms"]
        assert flux[f"{mode}_ratio_sdpa_math_vs_sdpa"] == round(ratio, 4)
    assert flux["compile_first_call_sdpa_s"] >= 0
    assert flux["relative_error_sdpa_math_vs_sdpa"] < 1e-5  # fp32: one attention, two kernels
    with pytest.raises(SystemExit):
        main(["--models", "flux", "--kernels", "sdpa", "--size", "tiny", "--device", "cpu"])


def test_attention_kernels_probe_records_each_kernel_or_why_it_cannot_run(tmp_path):
    """benchmarks/attention_kernels on the CPU at a tiny shape: the SDPA kernels the CPU has are timed and equal the
    fp32 attention, cuDNN's is recorded with its error, missing packages are named, and FLUX's attention block is
    timed eager and compiled."""
    from aitk_inference.benchmarks.attention_kernels import main

    path = main(["--shapes", "tiny", "--device", "cpu", "--dtype", "fp32", "--reps", "1", "--compile-backend", "eager",
                 "--out", str(tmp_path)])
    with open(path) as f:
        result = json.load(f)
    kernels = result["kernels"]["flux_tiny"]
    for name in ("sdpa_default_strided_view", "sdpa_math_contiguous"):
        assert kernels[name]["ms"] > 0 and kernels[name]["relative_error_vs_fp32"] < 1e-5
    assert "error" in kernels["sdpa_cudnn_contiguous"]  # a CUDA-only kernel
    assert set(result["packages"]) == {"fa3_fwd", "flash_attn_4", "sageattention"}
    block = result["flux_attention_block_compiled_vs_eager"]
    assert set(block) == {"eager", "compiled", "eager_contiguous", "compiled_contiguous"}
    assert all(row["ms"] > 0 and row["kernels"] == {} for row in block.values())  # no GPU kernels on the CPU


def test_tiny_step_profile_times_each_variant_against_the_reference(tiny_dir, tmp_path):
    """The step profiler's CPU path: every variant's forward is recorded against the live-adapter reference; with
    ``--attention`` the variants run that kernel and its error is recorded."""
    from aitk_inference.benchmarks.step_profile import main

    tiny_dir("flux")
    path = main(["--model", "flux", "--size", "tiny", "--device", "cpu", "--compile-backend", "eager", "--reps", "1",
                 "--variants", "fused", "fused+compile", "qkv+compile", "--out", str(tmp_path)])
    with open(path) as f:
        by_key = {(r["metric"], r["variant"]): r for r in json.load(f)["records"]}
    reference = by_key[("forward_ms", "dynamic")]["value"]
    for variant in ("fused", "fused+compile", "qkv+compile"):
        assert by_key[("forward_ms", variant)]["reference_value"] == reference
    assert by_key[("recompiles_after_strength_change", "fused+compile")]["value"] == 0
    assert by_key[("qkv_fused_relative_diff", "qkv+compile")]["value"] < 1e-5  # fp32: same numbers
    with pytest.raises(SystemExit):  # not a kernel of the library
        main(["--model", "flux", "--size", "tiny", "--attention", "fast"])
    with pytest.raises(SystemExit):  # the library's processors take no fused q/k/v
        main(["--model", "flux", "--size", "tiny", "--variants", "qkv+compile", "--attention", "sdpa_math"])
    path = main(["--model", "flux", "--size", "tiny", "--device", "cpu", "--compile-backend", "eager", "--reps", "1",
                 "--no-attention-sweep", "--variants", "fused", "--attention", "sdpa_math", "--out", str(tmp_path)])
    with open(path) as f:
        by_key = {(r["metric"], r["variant"]): r for r in json.load(f)["records"]}
    assert by_key[("attention_relative_error", "sdpa_math")]["value"] < 1e-5
    assert "attention=sdpa_math" in by_key[("forward_ms", "fused")]["notes"]


def test_tiny_lora_soak_keeps_caches_bounded_and_dynamic_exact(tiny_dir, tmp_path):
    """The soak on the tiny FLUX model: switches among more files than the converted-LoRA cache holds keep that cache
    at its limit and at most one adapter injected; removing the LoRA restores every weight bit for bit in dynamic mode
    and within a float32 rounding per change in fused mode."""
    from aitk_inference.benchmarks.soak import main
    from aitk_inference.pipelines.lora.stack import MAX_CONVERTED_CACHED

    tiny_dir("flux")
    path = main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--iterations", "24", "--every", "6",
                 "--files", str(MAX_CONVERTED_CACHED + 2), "--rank", "4", "--out", str(tmp_path / "results"),
                 "--workdir", str(tmp_path / "work")])
    with open(path) as f:
        payload = json.load(f)
    for mode, run in payload["modes"].items():
        assert len(run["rows"]) == 5 and run["rows"][-1]["iteration"] == 23
        assert all(row["converted_cached"] <= MAX_CONVERTED_CACHED for row in run["rows"])
        assert run["final"]["converted_cached"] == MAX_CONVERTED_CACHED
        assert all(row["adapters"] == (1 if mode == "dynamic" else 0) for row in run["rows"])
        assert run["final"]["adapters"] == 0
        assert math.isfinite(run["rss_growth_mib"])
    assert payload["modes"]["dynamic"]["weights_changed_after_removal"] == 0
    assert payload["modes"]["fused"]["largest_relative_drift"] < 1e-5


def test_reproduce_batch_times_one_by_one_and_batched_in_one_run(tiny_dir, tmp_path):
    """``--reproduce-batch``: the job one by one (the reference) and in batches, same run (2 previews: 2 calls, then 1)."""
    from aitk_inference.benchmarks.run import main

    tiny_dir("flux")
    path = main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--models", "--reproduce-batch", "flux",
                 "--reproduce-previews", "2", "--reproduce-max-batch", "2", "--image-size", "64", "--steps", "1",
                 "--out", str(tmp_path / "results"),
                 "--workdir", str(tmp_path / "work")])
    with open(path) as f:
        records = {(r["metric"], r["variant"]): r for r in json.load(f)["records"]}
    one = records[("reproduce_images_per_min", "one_by_one")]
    batched = records[("reproduce_images_per_min", "batch_2")]
    assert one["value"] > 0 and batched["reference_value"] == one["value"]
    assert "2 call(s)" in one["notes"] and "1 call(s)" in batched["notes"]
    assert records[("reproduce_batch_vs_one_by_one", "batch_2")]["value"] <= 1  # 8-bit levels


def test_memory_caps_reads_the_streaming_layout_without_keeping_the_blocks(tiny_dir):
    """A list of the blocks left in the run loop's scope kept them (and, through the streamed blocks' hooks, the
    streamer's slots) after the pipeline was dropped: the 8.63 GiB the ninth session saw on the GPU. The layout is read
    through ``streaming_layout``, which keeps nothing."""
    import gc
    import weakref

    from aitk_inference.benchmarks.memory_caps import streaming_layout
    from aitk_inference.pipelines.runtime import accelerate
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir("flux"), subfolder="transformer")
    sizes = [accelerate.module_bytes(block) for _, block in accelerate.blocks_in_order(transformer)]
    accelerate.offload_blocks_keeping_resident(transformer, "cpu", sum(sizes) * 3 // 5)
    blocks = [weakref.ref(block) for _, block in accelerate.blocks_in_order(transformer)]
    streamed = [index for index, ref in enumerate(blocks) if accelerate.carries_offload_hook(ref())]
    assert 0 < len(streamed) < len(blocks)
    assert streaming_layout(transformer) == {
        "streamed_blocks": streamed, "streamed_gib_per_forward": round(sum(sizes[i] for i in streamed) / 2**30, 2)}
    transformer = None
    gc.collect()
    assert [ref() for ref in blocks] == [None] * len(blocks)


def test_what_is_left_names_the_list_that_keeps_blocks_after_their_model(tiny_dir):
    """What ``memory_caps`` reports when a dropped run leaves memory allocated: the module classes holding the most of
    it, and what keeps the largest; here blocks held by a list in a running function (a holder the garbage collector
    does not see), their transformer gone. Meta tensors stand for the GPU's (nothing else in the process has any)."""
    import gc
    import weakref

    import torch
    from aitk_inference.benchmarks.memory_caps import what_is_left
    from aitk_inference.pipelines.runtime import accelerate
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(tiny_dir("flux"), subfolder="transformer"))
    kept = accelerate.blocks_in_order(transformer)
    gone = weakref.ref(transformer)
    transformer = None
    gc.collect()
    assert gone() is None

    left = what_is_left(most=2, device_type="meta")["left_modules"]
    assert set(left) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}  # the largest kept modules
    single = left["FluxSingleTransformerBlock"]
    assert single["count"] == 1 and single["largest_gib"] == round(accelerate.module_bytes(kept[-1][1]) / 2**30, 2)
    assert single["largest_kept_by"].startswith("held by an untracked holder (a running function's local variable?): "
                                                "list [('transformer_blocks.0', FluxTransformerBlock(")


def _fake_nvidia_smi(folder, known: dict) -> None:
    """An ``nvidia-smi`` on PATH that answers ``--query-gpu`` for the fields in ``known`` (every 20 ms with ``-lms``)
    and fails, as a driver does, for a query with any other field."""
    import sys

    script = folder / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\nimport sys, time\nknown = {known!r}\n"
                      "fields = next(a for a in sys.argv if a.startswith('--query-gpu=')).split('=', 1)[1].split(',')\n"
                      "if any(f not in known for f in fields):\n"
                      "    sys.exit('Field is not a valid field to query.')\n"
                      "while True:\n"
                      "    print(', '.join(known[f] for f in fields), flush=True)\n"
                      "    if '-lms' not in sys.argv:\n"
                      "        break\n"
                      "    time.sleep(0.02)\n")
    script.chmod(0o755)


def test_card_state_reads_nvidia_smi_and_leaves_out_what_the_driver_does_not_know(tmp_path, monkeypatch):
    from aitk_inference.benchmarks.harness import CARD_LOAD, CardMonitor, Recorder, card_state

    _fake_nvidia_smi(tmp_path, {"uuid": "GPU-1234", "clocks.sm": "1980", "clocks.memory": "2619",
                                "power.draw": "690.50", "temperature.gpu": "61", "utilization.gpu": "0"})
    monkeypatch.setenv("PATH", str(tmp_path))
    # an older driver: it does not know clocks_event_reasons.active, so each field is asked alone
    load = {"clocks.sm": 1980.0, "clocks.memory": 2619.0, "power.draw": 690.5, "temperature.gpu": 61.0}
    assert card_state("GPU-1234", CARD_LOAD) == load
    monitor = CardMonitor.start("GPU-1234")
    recorder = Recorder(str(tmp_path / "r.json"), {"card": {"uuid": "GPU-1234"}}, monitor=monitor)
    _wait_for_samples(monitor, 3)
    # the card never busy: the reading just after the time
    assert recorder.add("flux", "forward_ms", "fused", 100.0, "ms").card == load
    assert recorder.add("flux", "peak_memory", "fused", 11.7, "GiB").card is None
    monitor.close()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert card_state("GPU-1234", CARD_LOAD) is None
    assert CardMonitor.start("GPU-1234") is None


def _wait_for_samples(monitor, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(monitor.samples) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(monitor.samples) >= count


def test_card_monitor_reports_the_card_while_busy_since_the_record_before(tmp_path, monkeypatch):
    """A timing's ``card`` summarises the samples nvidia-smi took while the card was busy since the record before:
    clock-event reasons as nvidia-smi writes them, the lowest SM clock and the highest power."""
    from aitk_inference.benchmarks.harness import CardMonitor, Recorder

    _fake_nvidia_smi(tmp_path, {"clocks.sm": "1755", "clocks.memory": "2619", "power.draw": "699.10",
                                "temperature.gpu": "70", "clocks_event_reasons.active": "0x0000000000000004",
                                "utilization.gpu": "100"})
    monkeypatch.setenv("PATH", str(tmp_path))
    monitor = CardMonitor.start("GPU-1234")
    try:
        recorder = Recorder(str(tmp_path / "r.json"), {"card": {"uuid": "GPU-1234"}}, monitor=monitor)
        _wait_for_samples(monitor, 3)
        card = recorder.add("flux", "forward_ms", "fp8", 100.0, "ms").card
        assert card.pop("busy_samples") >= 3
        assert card == {"clocks.sm": 1755.0, "clocks.memory": 2619.0, "power.draw": 699.1, "temperature.gpu": 70.0,
                        "clocks_event_reasons.active": ["0x0000000000000004"], "clocks.sm.min": 1755.0,
                        "power.draw.max": 699.1, "temperature.gpu.max": 70.0}
        assert monitor.busy_since(time.monotonic() + 60) is None  # no sample after the record: not a busy card
    finally:
        monitor.close()


def test_tiny_forward_resize_variant_times_the_compiled_blocks_again_after_another_size(tmp_path):
    """``resize``: one forward at another size recompiles the compiled blocks (dynamic shapes), and the last compiled
    variant is timed again at the workload's size against the reference."""
    from aitk_inference.benchmarks.run import main

    path = main(["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--models", "--forward-only", "flux",
                 "--variants", "fused+compile", "resize", "--compile-backend", "eager", "--reps", "1",
                 "--out", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")])
    with open(path) as f:
        by_key = {(r["metric"], r["variant"]): r for r in json.load(f)["records"]}
    recompiles = by_key[("recompiles_after_size_change", "fused+compile")]
    assert recompiles["value"] >= 1 and "6x6 latents instead of 8x8" in recompiles["notes"]
    resized = by_key[("forward_ms", "fused+compile+resize")]
    assert resized["value"] > 0 and resized["reference_value"] == by_key[("forward_ms", "dynamic")]["value"]
