"""LoRA soak: many LoRA switches and strength changes on one cached pipeline, with host and GPU memory recorded.

    python -m aitk_inference.benchmarks.soak --size tiny --device cpu --dtype fp32      # minutes on a CPU
    python -m aitk_inference.benchmarks.soak --size full --device cuda                  # FLUX.1-dev, random weights

Each iteration applies one of ``--files`` LoRA files (more than the converted-LoRA cache holds, so it evicts) at a new
strength through ``set_loras``, the path the nodes and the server take; every ``--every`` iterations it records the
process's resident memory, the GPU memory allocated and reserved, the converted-LoRA cache size and the adapters
injected into the denoiser. At the end the LoRA is removed and the denoiser's weights are compared with their values
before the first LoRA. Writes ``<out>/<date>-<device>-lora-soak.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from functools import partial


def resident_mib() -> float:
    """The process's resident set size (``VmRSS``), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def snapshot(pipeline, device: str) -> dict:
    import torch

    gc.collect()
    denoiser = getattr(pipeline.pipe, pipeline.denoiser)
    row = {"rss_mib": round(resident_mib(), 1), "converted_cached": len(pipeline.loras._loaded_cache),
           "adapters": len(getattr(denoiser, "peft_config", {}) or {})}
    if device.startswith("cuda"):
        row.update(gpu_allocated_mib=round(torch.cuda.memory_allocated() / 2**20, 1),
                   gpu_reserved_mib=round(torch.cuda.memory_reserved() / 2**20, 1))
    return row


def soak(pipeline, files: list[str], iterations: int, every: int, device: str) -> dict:
    """Switch LoRA files and strengths ``iterations`` times; returns the memory rows and the weight check."""
    import torch

    denoiser = getattr(pipeline.pipe, pipeline.denoiser)
    before = {name: p.detach().to("cpu", copy=True) for name, p in denoiser.named_parameters()}
    rows, started = [], time.perf_counter()
    for i in range(iterations):
        strength = round(0.1 + 0.9 * ((i * 37) % 100) / 100, 2)
        pipeline.set_loras([(files[i % len(files)], strength)])
        if i % every == 0 or i == iterations - 1:
            rows.append({"iteration": i, **snapshot(pipeline, device)})
    elapsed = time.perf_counter() - started
    pipeline.set_loras([])
    after = dict(denoiser.named_parameters())
    drift = {}
    for name, value in before.items():
        now = after[name].detach().cpu()
        if not torch.equal(now, value):
            drift[name] = float((now.float() - value.float()).abs().max() / value.float().abs().max())
    return {"rows": rows, "seconds": round(elapsed, 2), "per_switch_ms": round(1000 * elapsed / iterations, 2),
            "weights_changed_after_removal": len(drift), "parameters": len(before),
            "largest_relative_drift": max(drift.values(), default=0.0), "final": snapshot(pipeline, device)}


def growth(rows: list[dict], key: str) -> float | None:
    """``key`` at the last row minus its value at the second row (the first row still includes warm-up)."""
    if len(rows) < 3 or key not in rows[0]:
        return None
    return round(rows[-1][key] - rows[1][key], 1)


def main(argv=None) -> str:
    import torch
    from safetensors.torch import save_file

    from ..pipelines.base import load_pipeline
    from ..pipelines.lora.stack import MAX_CONVERTED_CACHED
    from ..pipelines.registry import get_spec
    from ..pipelines.runtime.accelerate import resolve_dtype
    from .harness import Options, device_slug, environment, lora_state_dict, materialize_flux
    from .models import build_flux_pipeline

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--modes", nargs="+", default=["dynamic", "fused"], choices=("dynamic", "fused"))
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="record memory every N iterations")
    parser.add_argument("--files", type=int, default=MAX_CONVERTED_CACHED + 4, help="distinct LoRA files")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    opts = Options(size=args.size, device=args.device, dtype=args.dtype, rank=args.rank)
    if args.workdir:
        opts.workdir = args.workdir
    spec = get_spec("flux")
    if args.size == "tiny":
        folder = materialize_flux(opts)
        make_pipeline = partial(load_pipeline, "flux", base=folder, device=args.device, dtype=args.dtype)
    else:  # full size: built in memory once (no 33 GB folder to write), wrapped once per mode
        torch_dtype = resolve_dtype(args.dtype, args.device)
        pipe = build_flux_pipeline(args.device, torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        make_pipeline = partial(spec.family_class(), spec, pipe, args.device, torch_dtype, "none",
                                source="random weights, in memory")
    lora_dir = os.path.join(opts.workdir, f"soak-loras-{args.size}")
    os.makedirs(lora_dir, exist_ok=True)

    result = {"environment": environment(args.device), "size": args.size, "dtype": args.dtype,
              "iterations": args.iterations, "files": args.files, "rank": args.rank,
              "converted_cache_limit": MAX_CONVERTED_CACHED, "modes": {}}
    for mode in args.modes:
        pipeline = make_pipeline(lora_mode=mode)
        denoiser = getattr(pipeline.pipe, pipeline.denoiser)
        files = []
        for seed in range(args.files):
            path = os.path.join(lora_dir, f"lora_{seed}.safetensors")
            if not os.path.isfile(path):
                sd = lora_state_dict(denoiser, args.rank, seed, std=0.01)
                save_file({k: v.to(resolve_dtype(args.dtype, "cpu")).contiguous() for k, v in sd.items()}, path)
            files.append(path)
        run = soak(pipeline, files, args.iterations, args.every, args.device)
        run["rss_growth_mib"] = growth(run["rows"], "rss_mib")
        run["gpu_allocated_growth_mib"] = growth(run["rows"], "gpu_allocated_mib")
        result["modes"][mode] = run
        print(f"[soak] {mode}: {args.iterations} switches in {run['seconds']} s ({run['per_switch_ms']} ms each); "
              f"RSS growth {run['rss_growth_mib']} MiB, GPU growth {run['gpu_allocated_growth_mib']} MiB, "
              f"cache {run['final']['converted_cached']}, weights changed after removal: "
              f"{run['weights_changed_after_removal']} of {run['parameters']} (largest drift "
              f"{run['largest_relative_drift']:.2e} of the weight's absmax)", flush=True)
        del pipeline, denoiser
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{time.strftime('%Y-%m-%d')}-{device_slug(result['environment']['device'])}"
                                  f"-lora-soak-{args.size}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(path)
    return path


if __name__ == "__main__":
    main()
