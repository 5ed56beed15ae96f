"""Peak GPU memory of Wan 2.1 14B at 1280x720 x 81 frames through our library's generate(), per offload mode, with
and without VAE tiling: full-size transformer (random bf16 weights), full-size UMT5-XXL text encoder and Wan VAE,
1 denoising step (2 transformer forwards with CFG) so that the run fits a short GPU lease; memory does not grow with
the step count.

    python -m aitk_inference.benchmarks.wan_memory --out DIR
"""

import argparse
import json
import os
import time


def main(argv=None) -> int:
    import diffusers
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from ..pipelines.registry import get_spec
    from ..tiny.tokenizers import t5_tokenizer
    from .models import build_transformer, randomize_

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--runs", default="none+tiling,model+tiling,none")
    args = parser.parse_args(argv)
    dtype, device = torch.bfloat16, "cuda"
    spec = get_spec("wan21_14b")
    started = time.perf_counter()
    transformer = build_transformer("wan21_14b", "full", device, dtype)
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                   num_heads=64, feed_forward_proj="gated-gelu")).to(dtype).eval()
        vae = diffusers.AutoencoderKLWan().to(dtype).eval()
    randomize_(text_encoder)
    pipe = diffusers.WanPipeline(tokenizer=t5_tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae,
                                 scheduler=spec.family_class().make_scheduler(spec))
    pipe.set_progress_bar_config(disable=True)
    pipeline = spec.family_class()(spec, pipe, device, dtype, "none", "dynamic", "random weights")
    built = time.perf_counter() - started
    records = []
    for run in args.runs.split(","):
        offload, _, tiling = run.partition("+")
        if offload != pipeline.offload:
            pipe.remove_all_hooks()
            pipe.to("cpu")
            torch.cuda.empty_cache()
            pipeline.place(pipe, device, offload)
            pipeline.offload = offload
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        record = {"offload": offload, "vae_tiling": bool(tiling), "size": "1280x720x81", "steps": 1}
        try:
            result = pipeline.generate(prompt="a robot dancing", width=1280, height=720, num_frames=81, steps=1,
                                       vae_tiling=bool(tiling))
            record.update(seconds=round(time.perf_counter() - t, 2), timings=result.timings,
                          frames=list(result.images.shape))
        except torch.cuda.OutOfMemoryError as e:
            record.update(error=f"CUDA out of memory: {str(e)[:160]}")
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        records.append(record)
        print(json.dumps(record), flush=True)
        with open(os.path.join(args.out, "wan_memory.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "diffusers": diffusers.__version__, "build_seconds": round(built, 1), "runs": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
