"""Whether an eager FP8 layer is bound by its host-side dispatch: one Linear at a transformer's shapes, in bf16, with
the library's FP8 weights through torchao's dispatch (``F.linear`` on its tensor subclass), and through the library's
direct path (``quantize.fp8_linear_forward``, torchao's operations without the subclass; the input's quantization
eager, and compiled as one kernel), called 200 times each, and the mode the library picks for the shape; per
call, the time the host took to enqueue it and the wall time once the GPU finished. Where a path's host time is about
its wall time and above bf16's wall time, the layer waits on the CPU, not the GPU (Qwen-Image's eager FP8 image took
2.1-2.7x the bf16 one on an H100 before the direct path; BENCHMARKS.md). GPU only:

    python -m aitk_inference.benchmarks.fp8_dispatch --out DIR
"""

import argparse
import time

#: (tokens, in features, out features): Qwen-Image's attention and MLP Linears at 1024x1024, FLUX.1-dev's attention
SHAPES = ((4224, 3072, 3072), (4224, 3072, 12288), (4608, 3072, 3072))


def per_call_us(forward, x, calls: int) -> dict:
    """Host (enqueue) and wall microseconds per call of ``forward(x)``, after a warm-up."""
    import torch

    with torch.no_grad():
        for _ in range(20):
            forward(x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            forward(x)
        host = time.perf_counter() - started
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return {"host_us": round(host / calls * 1e6, 1), "wall_us": round(wall / calls * 1e6, 1)}


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F
    from torchao.quantization import quantize_

    from ..pipelines.runtime import quantize
    from ..pipelines.runtime.quantize import _fp8_linear_direct, fp8_config, fp8_linear_forward
    from .harness import environment, write_result

    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    rows = []
    for tokens, features_in, features_out in SHAPES:
        x = torch.randn(1, tokens, features_in, device="cuda", dtype=torch.bfloat16)
        row = {"tokens": tokens, "in": features_in, "out": features_out}
        layer = torch.nn.Linear(features_in, features_out, device="cuda", dtype=torch.bfloat16)
        row["bf16"] = per_call_us(layer, x, args.calls)
        quantize_(layer, fp8_config())
        row["fp8_torchao"] = per_call_us(lambda x: F.linear(x, layer.weight, layer.bias), x, args.calls)
        weight, bias = layer.weight, layer.bias
        row["fp8_direct"] = per_call_us(lambda x: _fp8_linear_direct(x, weight, bias), x, args.calls)
        row["fp8_direct_fused_quantization"] = per_call_us(lambda x: _fp8_linear_direct(x, weight, bias, True), x,
                                                           args.calls)
        fp8_linear_forward(layer, x)  # the first call of a shape picks its mode
        row["library_mode"] = next(iter(quantize._DIRECT_CHECKED.values()))
        quantize._DIRECT_CHECKED.clear()
        rows.append(row)
        print(row, flush=True)
    write_result(args.out, "fp8_dispatch", {**environment("cuda"), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
