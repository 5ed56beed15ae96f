"""FLUX.1-dev through ``load_pipeline(offload="auto")`` on a card whose memory this process may use is capped
(``torch.cuda.set_per_process_memory_fraction``), against the uncapped run in the same process: which placement auto
chose (and how much of the transformer's blocks it kept on the GPU), the time of a 1024x1024 image with a fused
rank-16 LoRA, its peak memory. Full-size random weights (the benchmark's FLUX folder, written once). ``--fp8-caps``
adds runs with ``quantize="fp8"`` (FP8 block weights, quantized on the host when the bf16 weights do not fit, as many
blocks kept as fit and the rest streamed when the FP8 weights do not fit either), timed against the first bf16 run
and against the uncapped FP8 run; ``--compile regional`` compiles every run (the resident blocks; streamed ones run
eager: see BENCHMARKS.md, "FP8 blocks that stream"). ``--layouts spread first`` times each capped run twice: with the
kept blocks spread between the streamed ones (``accelerate.blocks_to_keep``, the library's) and with the first
blocks kept (the layout before it), for the ratio in one run. GPU only:

    python3 -m aitk_inference.benchmarks.memory_caps --caps 0 24 12 --fp8-caps 0 24 12 --steps 4 --out DIR
"""

import argparse
import gc
import time


def keep_first_blocks(sizes: list[int], resident_bytes: int) -> list[bool]:
    """The first blocks that fit ``resident_bytes``, the rest streamed: the layout ``blocks_to_keep`` replaced."""
    keep = []
    for size in sizes:
        keep.append(all(keep) and size <= resident_bytes)
        resident_bytes -= size if keep[-1] else 0
    return keep


def main(argv=None) -> int:
    import torch

    from ..pipelines import load_pipeline
    from ..pipelines.lora.stack import LoraRequest
    from ..pipelines.runtime import accelerate
    from .harness import Options, lora_state_dict, materialize_flux, write_result

    parser = argparse.ArgumentParser()
    parser.add_argument("--caps", nargs="*", type=float, default=[0, 24, 12], help="GiB; 0 = the whole card")
    parser.add_argument("--fp8-caps", nargs="*", type=float, default=[], help="the same with quantize='fp8'")
    parser.add_argument("--compile", default="none", choices=["none", "regional"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=2, help="timed images per cap, after one warm-up")
    parser.add_argument("--layouts", nargs="+", default=["spread"], choices=["spread", "first"],
                        help="which blocks a capped run keeps on the GPU: spread (the library's) or the first ones")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    spread = accelerate.blocks_to_keep
    folder = materialize_flux(Options())
    total = torch.cuda.get_device_properties(0).total_memory
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
              "size": 1024, "compile": args.compile, "runs": []}
    runs = [(quantize, cap, layout) for quantize, caps in (("none", args.caps), ("fp8", args.fp8_caps))
            for cap in caps for layout in (args.layouts[:1] if cap == 0 else args.layouts)]
    for quantize, cap, layout in runs:
        torch.cuda.set_per_process_memory_fraction(1.0 if cap == 0 else cap * 2**30 / total)
        torch.cuda.reset_peak_memory_stats()
        accelerate.blocks_to_keep = spread if layout == "spread" else keep_first_blocks
        run = {"quantize": quantize, "cap_gib": cap or round(total / 2**30, 1), "uncapped": cap == 0}
        if cap:
            run["layout"] = layout
        pipeline = None
        try:
            started = time.perf_counter()
            pipeline = load_pipeline("flux", base=folder, device="cuda", dtype="bf16", offload="auto",
                                     lora_mode="fused", quantize=quantize, compile=args.compile)
            run["load_s"] = round(time.perf_counter() - started, 1)
            run["offload_chosen"] = pipeline.offload
            if pipeline.resident:
                run["resident_gib"] = {k: round(v / 2**30, 2) for k, v in pipeline.resident.items()}
                run["streamed_blocks"] = [index for index, (_, block) in enumerate(accelerate.blocks_in_order(
                    pipeline.pipe.transformer)) if accelerate.carries_offload_hook(block)]
            lora = lora_state_dict(pipeline.pipe.transformer, rank=16, seed=0, std=0.01)
            pipeline.set_loras([LoraRequest(state_dict=lora, strength=1.0, name="r16")])
            gen = dict(prompt="a photo of a cat", width=1024, height=1024, steps=args.steps, seed=1)
            started = time.perf_counter()
            pipeline.generate(**gen)  # warm-up (and the compile, with --compile)
            run["first_image_s"] = round(time.perf_counter() - started, 2)
            times = []
            for _ in range(args.images):
                torch.cuda.synchronize()
                started = time.perf_counter()
                pipeline.generate(**gen)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            run["image_s"] = round(sorted(times)[len(times) // 2], 2)
            run["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.OutOfMemoryError as error:
            run["error"] = f"out of memory: {str(error)[:200]}"
        except Exception as error:  # a combination that fails is a result too
            run["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        print(run, flush=True)
        result["runs"].append(run)
        pipeline = None
        gc.collect()
        torch.cuda.empty_cache()
    accelerate.blocks_to_keep = spread
    base = result["runs"][0].get("image_s")
    fp8_base = next((r.get("image_s") for r in result["runs"] if r["quantize"] == "fp8" and r["uncapped"]), None)
    for run in result["runs"]:
        if base and run.get("image_s"):
            run["ratio_vs_first"] = round(run["image_s"] / base, 3)
        if fp8_base and run["quantize"] == "fp8" and run.get("image_s"):
            run["ratio_vs_uncapped_fp8"] = round(run["image_s"] / fp8_base, 3)
    write_result(args.out, "memory_caps", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
