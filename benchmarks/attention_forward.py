"""One denoiser forward per attention kernel, eager and regionally compiled, on the same weights and inputs in one
process: diffusers' default (``sdpa``: torch picks cuDNN on Hopper) against another kernel of the library's
``attention=`` (by default ``flash_attn_3``: FlashAttention-3, e.g. the ``fa3-fwd`` wheel, through diffusers' backend).

    python -m aitk_inference.benchmarks.attention_forward --models flux wan21_14b_81f --out DIR
    python -m aitk_inference.benchmarks.attention_forward --size tiny --device cpu --kernels sdpa sdpa_math

Writes ``attention_forward.json`` to ``--out``: per model and kernel the eager and compiled forward (median ms), the
first compiled call (s), each kernel's output against the first kernel's (relative L2) and the ratios to it.
"""

from __future__ import annotations

import argparse
import gc
import os
import time


def bench_model(model_id: str, kernels: list, size: str, device: str, dtype: str, reps: int,
                compile_backend: str = "inductor") -> dict:
    """Eager then compiled forwards of ``model_id`` with each of ``kernels``; the first kernel is the reference."""
    import torch

    from ..pipelines.runtime.accelerate import compile_denoiser, resolve_dtype, set_attention_kernel
    from .harness import relative_error, sync, timed
    from .models import WORKLOADS, build_transformer, forward_inputs

    workload = WORKLOADS[size][model_id]
    architecture = workload.config_key(model_id)
    model = build_transformer(architecture, size, device, resolve_dtype(dtype, device))
    inputs = forward_inputs(architecture, model, workload)

    def forward():
        with torch.inference_mode():
            return model(**inputs)[0]

    result = {"workload": workload.label}
    outputs = {}
    for kernel in kernels:
        set_attention_kernel([model], kernel, device, model_id)
        outputs[kernel] = forward()
        result[f"eager_{kernel}_ms"] = round(timed(forward, device, 1, reps) * 1000, 3)
        print(f"[attention_forward] {model_id} eager {kernel}: {result[f'eager_{kernel}_ms']} ms", flush=True)
    reference = kernels[0]
    for kernel in kernels[1:]:
        result[f"relative_error_{kernel}_vs_{reference}"] = relative_error(outputs[kernel], outputs[reference])
    del outputs
    compile_denoiser([model], "regional", backend=compile_backend)
    for kernel in kernels:
        set_attention_kernel([model], kernel, device, model_id)
        sync(device)
        started = time.perf_counter()
        forward()
        sync(device)
        result[f"compile_first_call_{kernel}_s"] = round(time.perf_counter() - started, 2)
        result[f"compiled_{kernel}_ms"] = round(timed(forward, device, 1, reps) * 1000, 3)
        print(f"[attention_forward] {model_id} compiled {kernel}: {result[f'compiled_{kernel}_ms']} ms", flush=True)
    for mode in ("eager", "compiled"):
        for kernel in kernels[1:]:
            result[f"{mode}_ratio_{kernel}_vs_{reference}"] = round(
                result[f"{mode}_{kernel}_ms"] / result[f"{mode}_{reference}_ms"], 4)
    return result


def main(argv=None) -> str:
    """Run what ``argv`` asks for; returns the path of the results file."""
    import torch

    from ..pipelines.runtime.options import ATTENTION_KERNELS
    from .harness import command_line, environment, write_result
    from .models import WORKLOADS

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.attention_forward",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["flux", "wan21_14b_81f"], choices=sorted(WORKLOADS["full"]))
    parser.add_argument("--kernels", nargs="+", default=["sdpa", "flash_attn_3"], choices=list(ATTENTION_KERNELS),
                        help="attention kernels in order; the first is the reference")
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--reps", type=int, default=5, help="timed forwards per kernel and mode")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if len(set(args.kernels)) < 2:
        parser.error("--kernels: give at least two different kernels to compare")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; use --size tiny --device cpu for a smoke run.")
    result = {**environment(args.device), "command": command_line("attention_forward", argv), "models": {}}
    os.makedirs(args.out, exist_ok=True)
    path = ""
    for model_id in args.models:
        result["models"][model_id] = bench_model(model_id, args.kernels, args.size, args.device, args.dtype,
                                                 args.reps, args.compile_backend)
        gc.collect()  # the model of the one before leaves the card
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        path = write_result(args.out, "attention_forward", result)  # after each model: a cut-short run keeps it
    return path


if __name__ == "__main__":
    main()
