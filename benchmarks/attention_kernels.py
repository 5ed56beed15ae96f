"""Attention kernels alone at FLUX.1's (1024x1024: 4,608 tokens x 24 heads) and Wan 2.1 14B's (480p x 81 frames:
32,760 tokens x 40 heads) shapes, head dim 128: ms, TFLOP/s and relative L2 against an fp32 reference; then FLUX's
attention with its q/k RMSNorm and rotary embedding in front, eager and compiled, with the GPU kernels' times.

    python -m aitk_inference.benchmarks.attention_kernels --out DIR
    python -m aitk_inference.benchmarks.attention_kernels --shapes tiny --device cpu --dtype fp32   # smoke run

Kernels: torch SDPA (cuDNN and FlashAttention-2, on the strided views diffusers passes and on contiguous copies),
FlashAttention-3 (the ``fa3-fwd`` wheel) in bf16 and in FP8 (per-tensor scales, and the library's per-head
``fp8_attention``, eager and compiled; quantization included), FlashAttention-4 (``flash-attn-4``) in bf16,
SageAttention 1 (8-bit QK). A kernel whose package is missing, or that cannot run on the device, is recorded with
the reason. Writes ``attention_kernels.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os

#: (batch, tokens, heads, head dim), the layout diffusers hands its attention backends
SHAPES = {
    "full": {"flux_1024": (1, 4608, 24, 128), "wan14b_480p_81f": (1, 32760, 40, 128)},
    "tiny": {"flux_tiny": (1, 64, 2, 16)},
}
#: above this many tokens the fp32 reference uses the memory-efficient kernel (the math one would not fit)
LONG_SEQUENCE = 10_000


def sdpa_kernels() -> dict:
    """torch's SDPA with one backend forced, on the (batch, heads, tokens, dim) views of diffusers' layout or on
    contiguous copies: name -> attention(query, key, value) in (batch, tokens, heads, dim)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend, contiguous: bool):
        def attention(query, key, value):
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
            if contiguous:
                query, key, value = (t.contiguous() for t in (query, key, value))
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                return F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
        return attention

    return {"sdpa_default_strided_view": forced(None, False),  # torch's choice: what diffusers' default runs
            "sdpa_cudnn_strided_view": forced(SDPBackend.CUDNN_ATTENTION, False),
            "sdpa_cudnn_contiguous": forced(SDPBackend.CUDNN_ATTENTION, True),
            "sdpa_flash2_contiguous": forced(SDPBackend.FLASH_ATTENTION, True),
            "sdpa_math_contiguous": forced(SDPBackend.MATH, True)}


def optional_kernels() -> tuple[dict, dict]:
    """The kernels of packages that may be missing: (name -> attention, package -> "ok" or why not)."""
    import torch

    kernels, found = {}, {}
    try:
        import fa3_fwd_interface as fa3

        from ..pipelines.runtime.accelerate import use_fa3_fwd_if_needed
        from ..pipelines.runtime.fp8_attention import fp8_attention

        def fa3_fp8_per_tensor(query, key, value):
            scales = [t.abs().amax().float() / torch.finfo(torch.float8_e4m3fn).max for t in (query, key, value)]
            query, key, value = ((t / s).to(torch.float8_e4m3fn) for t, s in zip((query, key, value), scales))
            batch, heads = query.shape[0], query.shape[2]
            descale = [s.reshape(1, 1).expand(batch, heads).contiguous() for s in scales]
            return fa3.flash_attn_func(query, key, value, q_descale=descale[0], k_descale=descale[1],
                                       v_descale=descale[2])

        use_fa3_fwd_if_needed()
        kernels["fa3_bf16"] = fa3.flash_attn_func
        kernels["fa3_fp8_per_tensor_with_quantization"] = fa3_fp8_per_tensor
        kernels["fa3_fp8_per_head_with_quantization"] = fp8_attention  # the library's attention="flash_attn_3_fp8"
        kernels["fa3_fp8_per_head_with_quantization_compiled"] = torch.compile(fp8_attention, fullgraph=True)
        found["fa3_fwd"] = "ok"
    except Exception as error:  # a missing package or one built for another torch: recorded, the rest runs
        found["fa3_fwd"] = repr(error)
    try:
        from flash_attn.cute import flash_attn_func as fa4

        kernels["fa4_bf16"] = fa4
        found["flash_attn_4"] = "ok"
    except Exception as error:
        found["flash_attn_4"] = repr(error)
    try:
        from sageattention import sageattn

        kernels["sage1"] = lambda query, key, value: sageattn(query, key, value, tensor_layout="NHD", is_causal=False)
        found["sageattention"] = "ok"
    except Exception as error:
        found["sageattention"] = repr(error)
    return kernels, found


def milliseconds(fn, device: str, reps: int) -> float:
    from .harness import timed

    return timed(fn, device, 3, reps) * 1000


def time_kernels(kernels: dict, shape: tuple, device: str, dtype, reps: int) -> dict:
    """Each kernel at ``shape``: ms, TFLOP/s and error against fp32 attention, or the error it raised."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .harness import relative_error

    batch, tokens, heads, head_dim = shape
    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3))
    reference_backend = SDPBackend.EFFICIENT_ATTENTION if tokens > LONG_SEQUENCE else SDPBackend.MATH
    with sdpa_kernel(reference_backend):
        expected = F.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (query, key, value))).transpose(1, 2)
    flops = 4 * batch * heads * tokens * tokens * head_dim
    results = {}
    for name, attention in kernels.items():
        try:
            out = attention(query, key, value)
            out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
            ms = milliseconds(lambda: attention(query, key, value), device, reps)
            results[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                             "relative_error_vs_fp32": round(relative_error(out, expected), 6)}
        except Exception as error:  # a kernel this device or dtype cannot run
            results[name] = {"error": repr(error)[:300]}
        print(f"[attention_kernels] {shape} {name}: {results[name]}", flush=True)
    return results


def flux_attention_block(shape: tuple, device: str, dtype, contiguous: bool):
    """FLUX's attention as a function of the fused q/k/v projection's output: q/k RMSNorm, the rotary embedding
    (pairs rotated in float32), then SDPA on diffusers' strided views or on contiguous copies."""
    import torch
    import torch.nn.functional as F

    batch, tokens, heads, head_dim = shape
    norm_weight = torch.ones(head_dim, device=device, dtype=dtype)
    angles = torch.randn(tokens, head_dim // 2, device=device, generator=torch.Generator(device).manual_seed(1))
    cos, sin = (f(angles).repeat_interleave(2, -1)[None, :, None] for f in (torch.cos, torch.sin))

    def rotate(t):
        real, imaginary = t.float().unflatten(-1, (-1, 2)).unbind(-1)
        swapped = torch.stack([-imaginary, real], -1).flatten(3)
        return (t.float() * cos + swapped * sin).to(t.dtype)

    def block(projected):
        query, key, value = projected.view(batch, tokens, 3, heads, head_dim).unbind(2)
        query = rotate(F.rms_norm(query, (head_dim,), norm_weight, 1e-6))
        key = rotate(F.rms_norm(key, (head_dim,), norm_weight, 1e-6))
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        if contiguous:
            query, key, value = (t.contiguous() for t in (query, key, value))
        return F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, tokens, -1)

    return block


def kernel_times(fn, device: str, calls: int = 10) -> dict:
    """The eight longest GPU kernels of ``fn()`` (ms per call; empty off CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not device.startswith("cuda"):
        return {}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {event.key[:90]: event.self_device_time_total / calls / 1000 for event in profiler.key_averages()}
    return {name: round(ms, 4) for name, ms in sorted(times.items(), key=lambda item: -item[1])[:8] if ms > 0.01}


def compiled_vs_eager(shape: tuple, device: str, dtype, reps: int, backend: str) -> dict:
    """FLUX's attention block eager and compiled (static shapes), strided and contiguous: ms and its kernels."""
    import torch

    projected = torch.randn(shape[0], shape[1], 3 * shape[2] * shape[3], device=device, dtype=dtype)
    results = {}
    for contiguous in (False, True):
        block = flux_attention_block(shape, device, dtype, contiguous)
        suffix = "_contiguous" if contiguous else ""
        for mode, fn in (("eager", block), ("compiled", torch.compile(block, dynamic=False, backend=backend))):
            results[mode + suffix] = {"ms": round(milliseconds(lambda: fn(projected), device, reps), 4),
                                      "kernels": kernel_times(lambda: fn(projected), device)}
            print(f"[attention_kernels] FLUX attention block {mode + suffix}: {results[mode + suffix]}", flush=True)
    return results


def main(argv=None) -> str:
    """Run what ``argv`` asks for; returns the path of the results file."""
    import torch

    from ..pipelines.runtime.accelerate import resolve_dtype
    from .harness import command_line, environment, write_result

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.attention_kernels",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="full", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--reps", type=int, default=30, help="timed calls per kernel (a quarter at Wan's length)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; use --shapes tiny --device cpu for a smoke run.")
    dtype = resolve_dtype(args.dtype, args.device)
    torch.manual_seed(0)
    kernels, found = optional_kernels()
    kernels = {**sdpa_kernels(), **kernels}
    result = {**environment(args.device), "command": command_line("attention_kernels", argv), "packages": found,
              "kernels": {}}
    for name, shape in SHAPES[args.shapes].items():
        reps = args.reps if shape[1] <= LONG_SEQUENCE else max(1, args.reps // 4)
        result["kernels"][name] = time_kernels(kernels, shape, args.device, dtype, reps)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    first_shape = next(iter(SHAPES[args.shapes].values()))
    result["flux_attention_block_compiled_vs_eager"] = compiled_vs_eager(first_shape, args.device, dtype, args.reps,
                                                                         args.compile_backend)
    os.makedirs(args.out, exist_ok=True)
    return write_result(args.out, "attention_kernels", result)


if __name__ == "__main__":
    main()
