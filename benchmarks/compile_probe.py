"""Time a regional compile plus a 2-step FLUX generate in a fresh process: run by the benchmark harness after its own
(cold) compile, with the same on-disk compile cache, to measure what the cache saves a later process.

    python -m aitk_inference.benchmarks.compile_probe --base FOLDER --lora FILE [--attention sdpa] [--size 1024]

Prints ``compile_first_call SECONDS`` and the number of graphs compiled.
"""

import argparse
import time


def main(argv=None) -> int:
    from ..pipelines.base import load_pipeline
    from ..pipelines.runtime.options import ATTENTION_KERNELS
    from .harness import PROMPT, compiled_graphs, sync

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.compile_probe")
    parser.add_argument("--base", required=True, help="the FLUX.1-dev diffusers folder")
    parser.add_argument("--lora", required=True, help="a LoRA file applied (fused) before compiling")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--attention", default="sdpa", choices=list(ATTENTION_KERNELS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    pipeline = load_pipeline("flux", base=args.base, device=args.device, dtype=args.dtype, lora_mode="fused",
                             attention=args.attention)
    pipeline.set_loras([args.lora])
    sync(args.device)
    started = time.perf_counter()
    pipeline.compile_denoiser("regional", backend=args.backend)
    pipeline.generate(prompt=PROMPT, width=args.size, height=args.size, guidance=4.0, seed=42, steps=2)
    sync(args.device)
    print(f"compile_first_call {time.perf_counter() - started:.3f} graphs {compiled_graphs()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
