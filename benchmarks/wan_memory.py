"""Peak GPU memory of Wan 14B at 1280x720 x 81 frames through our library's generate(), per offload mode, with
and without VAE tiling: full-size transformer(s) (random bf16 weights), full-size UMT5-XXL text encoder and Wan VAE.
Wan 2.1 runs 1 denoising step (2 transformer forwards with CFG) so that the run fits a short GPU lease; memory does
not grow with the step count. Wan 2.2 A14B has two experts of the same size and runs 2 steps, the first on the
high-noise expert and the second on the low-noise one (ai-toolkit's boundary 0.875 at shift 5), so both are used.

    python -m aitk_inference.benchmarks.wan_memory --model wan21_14b --runs group+tiling,sequential+tiling --out DIR
    python -m aitk_inference.benchmarks.wan_memory --model wan22_14b_t2v --runs none+tiling,model+tiling --out DIR

``auto`` runs ``offload="auto"`` as ``load_pipeline`` resolves it (the weights moved to the host first), with the
process's GPU memory capped at ``--cap-gib`` and ``--quantize fp8`` quantizing on the host when needed; it must come
last (group offloading and FP8 weights are not undone). ``--size 480p`` and ``--steps`` set the workload:

    python -m aitk_inference.benchmarks.wan_memory --model wan22_14b_t2v --size 480p --steps 4 \
        --runs none+tiling,auto+tiling --cap-gib 24 --quantize fp8 --out DIR
"""

import argparse
import json
import os
import time


SIZES = {"720p": (1280, 720), "480p": (832, 480)}


def main(argv=None) -> int:
    import diffusers
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from ..pipelines.registry import get_spec
    from ..tiny.tokenizers import t5_tokenizer
    from .models import build_transformer, randomize_

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--model", choices=["wan21_14b", "wan22_14b_t2v"], default="wan21_14b")
    parser.add_argument("--runs", default="none+tiling,model+tiling,none")
    parser.add_argument("--size", choices=sorted(SIZES), default="720p")
    parser.add_argument("--steps", type=int, help="default: 2 with two experts (one step each), else 1")
    parser.add_argument("--cap-gib", type=float, default=0, help="the GPU memory an auto run may use; 0: the card")
    parser.add_argument("--quantize", choices=["none", "fp8"], default="none", help="for the auto run")
    args = parser.parse_args(argv)
    if {"group", "auto"} & {run.partition("+")[0] for run in args.runs.split(",")[:-1]}:
        parser.error("a group or auto run must come last: group offloading and FP8 weights are not undone")
    dtype, device = torch.bfloat16, "cuda"
    spec = get_spec(args.model)
    two_experts = spec.experts is not None
    steps = args.steps or (2 if two_experts else 1)
    width, height = SIZES[args.size]
    started = time.perf_counter()
    # Wan 2.2 A14B's experts have Wan 2.1 14B's architecture
    experts = {"transformer": build_transformer("wan21_14b", "full", device, dtype)}
    if two_experts:
        experts["transformer_2"] = build_transformer("wan21_14b", "full", device, dtype, seed=1)
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                   num_heads=64, feed_forward_proj="gated-gelu")).to(dtype).eval()
        vae = diffusers.AutoencoderKLWan().to(dtype).eval()
    randomize_(text_encoder)
    pipe = diffusers.WanPipeline(tokenizer=t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                                 scheduler=spec.family_class().make_scheduler(spec), **experts,
                                 **({"boundary_ratio": spec.experts.boundary_ratio} if two_experts else {}))
    pipe.set_progress_bar_config(disable=True)
    pipeline = spec.family_class()(spec, pipe, device, dtype, "none", "dynamic", "random weights")
    built = time.perf_counter() - started
    records = []
    for run in args.runs.split(","):
        offload, _, tiling = run.partition("+")
        record = {"offload": offload, "vae_tiling": bool(tiling), "model": args.model,
                  "size": f"{width}x{height}x81", "steps": steps}
        if offload != pipeline.offload:
            pipe.remove_all_hooks()
            pipe.to("cpu")
            torch.cuda.empty_cache()
            if offload == "auto":
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total) or 1.0)
                pipeline.offload = "auto"
                t = time.perf_counter()
                pipeline.resolve_auto_offload(args.quantize)
                record.update(cap_gib=args.cap_gib or round(total / 2**30, 1), quantize=pipeline.quantize,
                              auto_chose=pipeline.offload, plan_and_quantize_s=round(time.perf_counter() - t, 1),
                              resident_gib={k: round(v / 2**30, 2) for k, v in (pipeline.resident or {}).items()},
                              placed_whole=sorted(pipeline.placed_whole))
            else:
                pipeline.offload = offload
            t = time.perf_counter()
            pipeline.place(pipe, device, pipeline.offload, pipeline.resident, pipeline.placed_whole)
            record["place_s"] = round(time.perf_counter() - t, 1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        stages = []
        try:
            result = pipeline.generate(prompt="a robot dancing", width=width, height=height, num_frames=81, steps=steps,
                                       vae_tiling=bool(tiling),
                                       progress=lambda step, total: stages.append(pipeline.stage))
            record.update(seconds=round(time.perf_counter() - t, 2), timings=result.timings,
                          frames=list(result.images.shape), stages=stages)
        except torch.cuda.OutOfMemoryError as e:
            record.update(error=f"CUDA out of memory: {str(e)[:160]}")
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        records.append(record)
        print(json.dumps(record), flush=True)
        with open(os.path.join(args.out, f"{args.model}_memory.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "diffusers": diffusers.__version__, "build_seconds": round(built, 1), "runs": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
