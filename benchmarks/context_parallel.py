"""Context parallelism (the ``parallel`` load option): the speed-up of one denoiser forward sharded over the GPUs
``torchrun`` starts, against the same forward on one GPU, and the peak GPU memory of each. The transformer is full
size with random bf16 weights (``benchmarks/models.py``; every rank draws the same), the inputs one forward of the
workload (FLUX.1-dev 1024x1024, Wan 2.1 14B 1280x720 x 81 frames). Rank 0 first times the forward alone (the others
wait), then every rank shards it as ``--parallel`` says and times it again; rank 0 writes one JSON file.

    torchrun --nproc-per-node 2 -m aitk_inference.benchmarks.context_parallel --model wan21_14b_720p_81f \\
        --parallel ulysses=2 --out DIR
    torchrun --nproc-per-node 4 -m aitk_inference.benchmarks.context_parallel --model flux --parallel ring=4 \\
        --attention sdpa_cudnn --out DIR

``--size tiny --device cpu --dtype fp32`` runs the same code on the tiny kit's transformer with gloo (a check of the
script, not a measurement).
"""

import argparse
import json
import os
import time


def _timed(forward, reps: int, device: str) -> tuple[float, object]:
    """Seconds per call of ``forward`` over ``reps`` calls after one warm-up call, and the last output."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    output = forward()
    sync()
    started = time.perf_counter()
    for _ in range(reps):
        output = forward()
    sync()
    return (time.perf_counter() - started) / reps, output


def _peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    from ..pipelines.runtime import accelerate, parallel
    from ..pipelines.runtime.options import LoadOptions, parallel_world_size, parse_parallel
    from .models import WORKLOADS, build_transformer, forward_inputs

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["flux", "wan21_14b_720p_81f"], default="flux")
    parser.add_argument("--parallel", default="ulysses=2", help="as the load option: ulysses=N, ring=N, both")
    parser.add_argument("--attention", default="sdpa", help="the attention kernel (ring needs sdpa_cudnn, sdpa_flash, "
                                                            "flash_attn or sage)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    options = LoadOptions(parallel=args.parallel, attention=args.attention, dtype=args.dtype)  # checks the pair
    rank, local_rank, world_size = parallel.launch()
    if parallel_world_size(parse_parallel(options.parallel)) != world_size:
        parser.error(f"--parallel {options.parallel} needs torchrun --nproc-per-node "
                     f"{parallel_world_size(parse_parallel(options.parallel))} (this run has {world_size} processes)")
    device = f"cuda:{local_rank}" if args.device == "cuda" else args.device
    dtype = accelerate.resolve_dtype(options.dtype, device)
    parallel.init_process_group(device)
    workload = WORKLOADS[args.size][args.model]
    architecture = workload.config_key(args.model)
    transformer = build_transformer(architecture, args.size, device, dtype)
    accelerate.set_attention_kernel([transformer], args.attention, device, architecture)
    inputs = forward_inputs(architecture, transformer, workload)

    def forward():
        with torch.inference_mode():
            return transformer(**inputs)[0]

    record = {"model": args.model, "workload": workload.label, "size": args.size, "dtype": str(dtype),
              "attention": args.attention, "parallel": options.parallel, "world_size": world_size,
              "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
              "torch": torch.__version__}
    one_gpu = None
    if rank == 0:
        _reset_peak(device)
        record["one_gpu_seconds"], one_gpu = _timed(forward, args.reps, device)
        record["one_gpu_peak_gib"] = _peak_gib(device)
        print(json.dumps(record), flush=True)
    dist.barrier()

    parallel.enable_context_parallel([transformer], options.parallel, device)
    _reset_peak(device)
    seconds, sharded = _timed(forward, args.reps, device)
    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, {"seconds": seconds, "peak_gib": _peak_gib(device)})
    if rank == 0:
        difference = (sharded.float() - one_gpu.float())
        record.update(parallel_seconds=max(r["seconds"] for r in per_rank),
                      peak_gib_per_rank=[r["peak_gib"] for r in per_rank],
                      max_abs_difference=float(difference.abs().max()),
                      relative_l2_difference=float(difference.norm() / one_gpu.float().norm()))
        record["speedup"] = round(record["one_gpu_seconds"] / record["parallel_seconds"], 3)
        print(json.dumps(record), flush=True)
        os.makedirs(args.out, exist_ok=True)
        name = f"context-parallel-{args.model}-{options.parallel.replace('=', '').replace(',', '-')}-{args.attention}"
        with open(os.path.join(args.out, f"{name}{'' if args.size == 'full' else '-' + args.size}.json"), "w") as f:
            json.dump(record, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
