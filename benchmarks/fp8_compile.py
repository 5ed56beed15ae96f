"""The FP8 denoiser's regional compile on full-size FLUX.1-dev (random bf16 weights, FP8 block Linears, one 1024x1024
forward with 512 text tokens): compile plus first forward, and the compiled forward's time, each in a fresh process:

* ``ours, cold``: ``runtime.quantize.fp8_config()`` (torchao's recipe without its process-wide Inductor settings),
  empty compile cache;
* ``ours, cache from disk``: the same in a new process reading the cache the first one wrote (Inductor's FX graph
  and AOTAutograd caches under the project's compile cache folder, ``runtime.accelerate.use_persistent_compile_cache``);
* ``torchao settings, cold``: the recipe as torchao ships it (``set_inductor_config=True``: coordinate-descent tuning
  of every kernel, TF32 float32 matmuls), empty cache: what the library did before.

GPU only: ``python3 -m aitk_inference.benchmarks.fp8_compile --out DIR [--timeout 240]`` (writes fp8_compile.json).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RUNS = (("ours", "cold"), ("ours", "cache from disk"), ("torchao settings", "cold"))


def child(settings: str) -> None:
    import torch
    from torch._dynamo.utils import counters
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    from ..pipelines.runtime.accelerate import compile_denoiser
    from ..pipelines.runtime.quantize import fp8_config, quantize_block_linears
    from .harness import compiled_graphs, timed
    from .models import WORKLOADS, build_transformer, forward_inputs

    model = build_transformer("flux", "full", "cuda", torch.bfloat16)
    inputs = forward_inputs("flux", model, WORKLOADS["full"]["flux"])
    config = (fp8_config() if settings == "ours"
              else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=True))
    quantize_block_linears(model, config)

    def forward():
        with torch.inference_mode():
            return model(**inputs)[0]

    compile_denoiser([model], "regional")
    torch.cuda.synchronize()
    started = time.perf_counter()
    forward()
    torch.cuda.synchronize()
    result = {"compile_first_call_s": round(time.perf_counter() - started, 2), "graphs": compiled_graphs(),
              "forward_ms": round(timed(forward, "cuda", 2, 5) * 1000, 2),
              "inductor_counters": {k: v for k, v in counters["inductor"].items() if "cache" in k},
              "aot_autograd_counters": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
              "float32_matmul_precision": torch.get_float32_matmul_precision(),
              "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None) -> int:
    from .harness import write_result

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.fp8_compile")
    parser.add_argument("--out", default=".")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run (each is a new process)")
    parser.add_argument("--child", choices=["ours", "torchao settings"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import torch

    folders = {"ours": tempfile.mkdtemp(prefix="fp8_cache_ours_"),
               "torchao settings": tempfile.mkdtemp(prefix="fp8_cache_torchao_")}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for settings, cache in RUNS:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": folders[settings]}
        run = {"settings": settings, "cache": cache}
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "aitk_inference.benchmarks.fp8_compile", "--child", settings],
                                  env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode == 0 and lines:
                run.update(json.loads(lines[-1][len("RESULT "):]))
            else:
                run["error"] = f"exit {done.returncode}: {done.stderr[-1500:]}"
        except subprocess.TimeoutExpired:
            run["error"] = f"not finished after {args.timeout} s (model build, quantize, compile and first forward)"
        run["process_s"] = round(time.perf_counter() - started, 1)
        print(run, flush=True)
        result["runs"].append(run)
    by_run = {(r["settings"], r["cache"]): r for r in result["runs"]}
    cold, warm, before = by_run[RUNS[0]], by_run[RUNS[1]], by_run[RUNS[2]]
    if cold.get("compile_first_call_s") and warm.get("compile_first_call_s"):
        result["ratio_cache_from_disk_vs_cold"] = round(warm["compile_first_call_s"] / cold["compile_first_call_s"], 3)
    if cold.get("compile_first_call_s") and before.get("compile_first_call_s"):
        result["ratio_ours_vs_torchao_settings_compile"] = round(
            cold["compile_first_call_s"] / before["compile_first_call_s"], 3)
        result["ratio_ours_vs_torchao_settings_forward"] = round(cold["forward_ms"] / before["forward_ms"], 3)
    write_result(args.out, "fp8_compile", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
