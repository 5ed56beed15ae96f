"""Where a denoising step's time goes, and what each compile-side option buys, on one full-size denoiser.

    python -m aitk_inference.benchmarks.step_profile --model flux --out DIR
    python -m aitk_inference.benchmarks.step_profile --model wan21_14b_81f --variants fused+compile fp8

In one process: the attention kernels alone at the model's shape (TFLOP/s each), then one denoiser forward per
variant, every variant on the same weights and inputs, each compared with the reference path (``dynamic``: a live
rank-16 PEFT adapter) measured first in the same run. Every variant also gets a GPU kernel breakdown from
``torch.profiler`` (GEMM, attention, other kernels, and the idle part of the forward). Variants build on each other
in the order given; ``fp8`` quantizes the LoRA-merged weights (what ``quantize="fp8", lora_mode="fused"`` runs) and so
comes last. The ``qkv`` variants fuse the q/k/v projections with diffusers' ``fuse_qkv_projections`` (for timing: a
LoRA change after it would not reach the fused copies) and try Inductor's tuning options on top; the 2026-12-03 run
found none of them faster than plain regional compile (BENCHMARKS.md), so the library does not use them.
``--attention KERNEL`` runs every variant after the reference with that attention kernel (e.g. the FP8 fast mode's
``flash_attn_3_fp8``: ``--variants fp8 --attention flash_attn_3_fp8``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

#: in run order; each one keeps what the ones before it set up (except that compile variants re-compile)
PROFILE_VARIANTS = ("fused", "fused+compile", "qkv+compile", "qkv+compile+tuned", "qkv+compile+autotune",
                    "qkv+compile+cudagraph", "fp8")
#: flux-fast's Inductor settings (coordinate-descent tuning of the generated kernels; GEMM epilogues left alone)
TUNED_INDUCTOR = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
                  "epilogue_fusion": False}
ATTENTION_BACKENDS = {"sdpa": "native", "sdpa_cudnn": "_native_cudnn", "sdpa_flash": "_native_flash",
                      "sdpa_efficient": "_native_efficient"}


def time_ms(fn, reps: int, device: str, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()``: between CUDA events on a GPU, by the host clock elsewhere."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def kernel_category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "_mm_", "sm90_", "scaled_mm")):
        return "gemm"
    return "other"


def kernel_breakdown(fn) -> dict:
    """GPU milliseconds per kernel category in one call of ``fn``, the call's wall time, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) * 1000
    totals, per_kernel = {"gemm": 0.0, "attention": 0.0, "other": 0.0}, {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.device_time / 1000 if hasattr(event, "device_time") else event.cuda_time / 1000
        totals[kernel_category(event.name)] += ms
        per_kernel[event.name] = per_kernel.get(event.name, 0.0) + ms
    busy = sum(totals.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {**{k: round(v, 2) for k, v in totals.items()}, "busy": round(busy, 2), "wall": round(wall, 2),
            "idle": round(max(0.0, wall - busy), 2), "top": [(n[:90], round(ms, 2)) for n, ms in top]}


def attention_sweep(model_id: str, workload, config, rec, reps: int) -> None:
    """Each attention backend alone at the model's attention shape, through diffusers' dispatcher."""
    import torch
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    tokens = attention_tokens(model_id, workload)
    flops = 4 * tokens * tokens * heads * head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    candidates = {name: (lambda b=backend: dispatch_attention_fn(q, k, v, backend=b))
                  for name, backend in ATTENTION_BACKENDS.items()}
    heads_first = [x.transpose(1, 2).contiguous() for x in (q, k, v)]

    def torch_kernel(kind):
        def run():
            with sdpa_kernel(kind):
                return torch.nn.functional.scaled_dot_product_attention(*heads_first).transpose(1, 2)
        return run

    # the kernels themselves on (B, H, S, D)-contiguous inputs, without the dispatcher's layout handling
    candidates.update({"cudnn_kernel_only": torch_kernel(SDPBackend.CUDNN_ATTENTION),
                       "flash_kernel_only": torch_kernel(SDPBackend.FLASH_ATTENTION)})
    reference = None
    for name, run in candidates.items():
        try:
            out = run()
            ms = time_ms(run, reps, "cuda")
        except Exception as e:  # a kernel this GPU or build does not have
            print(f"[profile] attention {name}: not usable ({type(e).__name__}: {str(e)[:160]})", flush=True)
            continue
        if reference is None:
            reference = out.float()
        err = float((out.float() - reference).norm() / reference.norm())
        rec.add(model_id, "attention_ms", name, ms, "ms", rec.records_value(model_id, "attention_ms", "sdpa"),
                notes=f"1x{tokens}x{heads}x{head_dim} bf16, {flops / ms / 1e9:.0f} TFLOP/s, "
                      f"rel. diff vs sdpa {err:.2e}")


def attention_tokens(model_id: str, workload) -> int:
    if model_id == "flux":
        return (workload.height // 2) * (workload.width // 2) + workload.text_tokens
    return workload.frames * (workload.height // 2) * (workload.width // 2)  # Wan self-attention


def main(argv=None) -> str:
    import torch

    from ..pipelines.lora.stack import LoraRequest, LoraStack
    from ..pipelines.runtime.options import ATTENTION_KERNELS
    from ..pipelines.runtime.quantize import fp8_unavailable, quantize_denoiser_fp8
    from .harness import command_line, compiled_graphs, lora_state_dict, new_recorder, relative_error
    from .models import WORKLOADS, build_transformer, forward_inputs
    from .run import print_table

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.step_profile", description=__doc__)
    parser.add_argument("--model", default="flux", choices=sorted(WORKLOADS["full"]))
    parser.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny: the CPU smoke run of the tests")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--variants", nargs="+", default=list(PROFILE_VARIANTS), choices=PROFILE_VARIANTS)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-attention-sweep", action="store_true")
    parser.add_argument("--attention", default="sdpa", choices=list(ATTENTION_KERNELS),
                        help="the attention kernel of the variants; the reference keeps sdpa")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later variants are skipped")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.attention != "sdpa" and any(v.startswith("qkv") for v in args.variants):
        parser.error("--attention with the qkv variants: a forced kernel gives the model the library's attention "
                     "processors, which take the unfused q/k/v projections; leave the qkv variants out")
    deadline = time.time() + args.time_budget

    on_gpu = args.device.startswith("cuda")
    rec = new_recorder(args.out, args.device, command_line("step_profile", argv), args.size)
    rec.path = rec.path.replace(".json", f"-{args.model}-profile.json")
    model_id = args.model
    workload = WORKLOADS[args.size][model_id]
    arch = workload.config_key(model_id)
    model = build_transformer(arch, args.size, args.device, torch.bfloat16 if on_gpu else torch.float32)
    if on_gpu and not args.no_attention_sweep:
        attention_sweep(model_id, workload, model.config, rec, args.reps)
    inputs = forward_inputs(arch, model, workload)
    lora = LoraRequest(state_dict=lora_state_dict(model, 16, 0, 0.01 if args.size == "full" else 0.3), name="r16")

    def forward():
        with torch.inference_mode():
            return model(**inputs)[0]

    def measure(variant: str, breakdown: bool = False, fn=forward, note: str = "") -> None:
        ms = time_ms(fn, args.reps, args.device)
        rec.add(model_id, "forward_ms", variant, ms, "ms", rec.reference(model_id, "forward_ms"),
                notes=f"{workload.label}; {workload.forwards_per_step} forward(s) per step{note}"
                + (f"; attention={args.attention}" if variant != "dynamic" and args.attention != "sdpa" else ""))
        if breakdown and on_gpu:
            parts = kernel_breakdown(fn)
            rec.add(model_id, "gpu_busy_ms", variant, parts["busy"], "ms", notes=str(parts))
            for name, ms_ in parts["top"]:
                print(f"[profile]   {ms_:9.2f} ms  {name}", flush=True)

    def recompile(variant: str, **compile_kwargs) -> None:
        torch._dynamo.reset()
        before = compiled_graphs()
        started = time.perf_counter()
        model.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend, **compile_kwargs)
        forward()
        if on_gpu:
            torch.cuda.synchronize()
        rec.add(model_id, "compile_first_call", variant, time.perf_counter() - started, "s",
                notes=f"{compiled_graphs() - before} graphs")

    stack = LoraStack({"transformer": model}, "dynamic", "transformer", model_id)
    stack.set([lora])
    measure("dynamic", breakdown=True)
    stack.set([])
    stack = LoraStack({"transformer": model}, "fused", "transformer", model_id)
    stack.set([lora])
    eager_out = forward()
    if args.attention != "sdpa":
        from ..pipelines.runtime.accelerate import set_attention_kernel

        set_attention_kernel([model], args.attention, args.device, model_id)
        rec.add(model_id, "attention_relative_error", args.attention, relative_error(forward(), eager_out), "rel L2",
                notes="one eager forward with this kernel vs diffusers' default (sdpa), the LoRA fused, same inputs")
    if "fused" in args.variants:
        measure("fused", breakdown=True)
    inductor = torch._inductor.config
    for variant in args.variants:
        if variant == "fused" or time.time() > deadline:
            continue
        if variant == "fused+compile":
            recompile(variant)
        elif variant == "qkv+compile":
            model.fuse_qkv_projections()  # diffusers' own: copies of the LoRA-merged q/k/v weights, for timing only
            recompile(variant)
            rec.add(model_id, "qkv_fused_relative_diff", variant, relative_error(forward(), eager_out), "rel L2",
                    notes="fused q/k/v (and text-stream) projections vs the eager unfused forward")
        elif variant == "qkv+compile+tuned":
            with inductor.patch(TUNED_INDUCTOR):
                recompile(variant)
        elif variant == "qkv+compile+autotune":
            recompile(variant, **({"mode": "max-autotune-no-cudagraphs"} if args.compile_backend == "inductor" else {}))
        elif variant == "qkv+compile+cudagraph":
            if not on_gpu:
                continue
            graph_forward = cuda_graph_of(forward)
            measure(variant, breakdown=True, fn=graph_forward, note="; the compiled forward replayed as one CUDA graph")
            continue
        elif variant == "fp8":
            why = fp8_unavailable(args.device)
            if why:
                print(f"[profile] fp8 skipped: {why}", flush=True)
                continue
            quantize_denoiser_fp8(model)  # LoRA already merged: the fast ceiling
            recompile(variant)
            rec.add(model_id, "fp8_relative_error", variant, relative_error(forward(), eager_out), "rel L2",
                    notes="FP8 weights of the LoRA-merged model vs bf16 eager fused, same inputs")
        measure(variant, breakdown=True)
        if variant != "fp8":  # FP8 weights cannot take an in-place merge
            before = compiled_graphs()
            stack.set([LoraRequest(state_dict=lora.state_dict, name=lora.name, strength=0.5)])
            stack.set([lora])
            forward()
            rec.add(model_id, "recompiles_after_strength_change", variant, compiled_graphs() - before, "graphs")
    print(f"[profile] wrote {rec.path}", flush=True)
    print_table(rec)
    return rec.path


def cuda_graph_of(fn):
    """``fn`` captured once as a CUDA graph; the returned callable replays it (same inputs, same output buffer)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


if __name__ == "__main__":
    main()
