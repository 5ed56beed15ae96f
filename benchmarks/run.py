"""Run the benchmark suite and write ``<out>/<date>-<device>.json``.

    python -m aitk_inference.benchmarks.run --models flux                 # FLUX.1-dev pipeline, full size, on CUDA
    python -m aitk_inference.benchmarks.run --models flux --forward-only zimage_turbo qwen_image wan21_14b
    python -m aitk_inference.benchmarks.run --size tiny --device cpu --dtype fp32 --variants dynamic fused
    python -m aitk_inference.benchmarks.run --models --forward-only flux --comfyui ~/ComfyUI   # + ComfyUI's own path
    python -m aitk_inference.benchmarks.run --models --forward-only wan21_14b --comfyui ~/ComfyUI   # (also for Wan)
    python -m aitk_inference.benchmarks.run --models --forward-only wan21_14b_81f --attention flash_attn_3_fp8
    python -m aitk_inference.benchmarks.run --models --reproduce-batch flux   # 8 previews: one by one vs batches of 4

``--models`` are timed through the whole pipeline (``load_pipeline`` on a local folder materialised with random
weights); ``--forward-only`` models are timed as one denoiser forward. BENCHMARKS.md describes every metric.
"""

from __future__ import annotations

import argparse
import os
import time

PIPELINE_MODELS = ("flux",)
FORWARD_MODELS = ("flux", "zimage_turbo", "qwen_image", "wan21_14b", "wan21_14b_81f", "hidream", "ltx2.5")


def parse_args(argv=None) -> argparse.Namespace:
    from ..pipelines.runtime.options import ATTENTION_KERNELS
    from .harness import VARIANTS

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["flux"], choices=PIPELINE_MODELS,
                        help="models timed through the whole pipeline")
    parser.add_argument("--forward-only", nargs="*", default=[], choices=FORWARD_MODELS,
                        help="models timed as one denoiser forward")
    parser.add_argument("--size", default="full", choices=("full", "tiny"), help="real architectures or tiny ones")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="speed paths to time besides the reference (dynamic), which always runs")
    parser.add_argument("--attention", default="sdpa", choices=list(ATTENTION_KERNELS),
                        help="the attention kernel of the --forward-only variants after plain; the reference and plain "
                        "keep sdpa")
    parser.add_argument("--steps", type=int, default=25, help="steps of the end-to-end image")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5, help="timed forwards per variant")
    parser.add_argument("--e2e-reps", type=int, default=2, help="timed images per variant (after one warm-up)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--workdir", default=None, help="where the random-weight model folder and LoRAs are written")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--drop-page-cache", action="store_true",
                        help="drop the OS page cache before the cold-load timings (needs root; slows the whole machine)")
    parser.add_argument("--comfyui", nargs="?", const=os.environ.get("COMFYUI_DIR", ""), default=None, metavar="DIR",
                        help="also time ComfyUI's own FLUX / Wan 2.1 14B path from this ComfyUI checkout (default: "
                        "$COMFYUI_DIR), after --forward-only flux / wan21_14b / wan21_14b_81f in the same run")
    parser.add_argument("--reproduce-batch", nargs="*", default=[], metavar="MODEL",
                        help="time reproduce of an 8-preview job one by one and batched, per model (full size: flux; "
                        "tiny: flux sdxl qwen_image zimage wan21_1b)")
    parser.add_argument("--reproduce-max-batch", type=int, default=4,
                        help="previews per call in the batched --reproduce-batch pass")
    parser.add_argument("--reproduce-previews", type=int, default=8, help="previews in the --reproduce-batch job (1..8)")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds; variants that would start too close to it are skipped")
    args = parser.parse_args(argv)
    from .reproduce_batch import MODELS as REPRODUCE_MODELS

    unknown = sorted(set(args.reproduce_batch) - set(REPRODUCE_MODELS))
    if unknown:
        parser.error(f"--reproduce-batch: {unknown} not among {list(REPRODUCE_MODELS)}")
    from .comfyui_reference import has_comfyui_reference

    if args.comfyui is not None and not any(has_comfyui_reference(m) for m in args.forward_only):
        with_reference = [m for m in FORWARD_MODELS if has_comfyui_reference(m)]
        parser.error(f"--comfyui compares with our forward of the same model: add --forward-only with one of "
                     f"{', '.join(with_reference)}")
    for name in ("steps", "image_size", "reps", "e2e_reps", "reproduce_max_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    return args


def main(argv=None) -> str:
    """Run what ``argv`` asks for; returns the path of the results file."""
    import torch

    from .comfyui_reference import bench_comfyui, has_comfyui_reference
    from .harness import Options, bench_flux_pipeline, bench_transformer, command_line, new_recorder

    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; use --size tiny --device cpu for a smoke run.")
    opts = Options(size=args.size, device=args.device, dtype=args.dtype, variants=tuple(args.variants),
                   steps=args.steps, step_timing_steps=min(10, args.steps), image_size=args.image_size,
                   reps=args.reps, e2e_reps=args.e2e_reps, compile_backend=args.compile_backend,
                   deadline=time.time() + args.time_budget, drop_page_cache=args.drop_page_cache,
                   attention=args.attention)
    if args.workdir:
        opts.workdir = args.workdir
    rec = new_recorder(args.out, args.device, command_line("run", argv), args.size)
    for model_id in args.forward_only:
        bench_transformer(model_id, opts, rec)
        if args.comfyui is not None and has_comfyui_reference(model_id):
            bench_comfyui(model_id, opts, rec, args.comfyui)
    for model_id in args.models:
        bench_flux_pipeline(opts, rec)
    for model_id in args.reproduce_batch:
        from .reproduce_batch import bench_reproduce_batch

        bench_reproduce_batch(model_id, opts, rec, args.reproduce_max_batch, args.reproduce_previews)
    print(f"[bench] wrote {rec.path}", flush=True)
    print_table(rec)
    return rec.path


def print_table(rec) -> None:
    print(f"\n{rec.meta['device']}  {rec.meta['versions']}")
    print(f"{'model':13s} {'metric':32s} {'variant':20s} {'value':>11s} {'unit':6s} {'ref':>11s} {'ratio':>6s}")
    for r in rec.records:
        ref = "" if r.reference_value is None else f"{r.reference_value:11.3f}"
        ratio = "" if r.ratio is None else f"{r.ratio:6.3f}"
        print(f"{r.model:13s} {r.metric:32s} {r.variant:20s} {r.value:11.3f} {r.unit:6s} {ref:>11s} {ratio:>6s}")


if __name__ == "__main__":
    main()
