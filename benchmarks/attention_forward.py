"""The denoiser forward per attention kernel (``sdpa``: torch picks cuDNN; ``flash_attn_3``: FlashAttention-3, e.g.
the ``fa3-fwd`` wheel, through diffusers' backend), eager and regionally compiled, full-size random weights, same
weights and inputs in one process. GPU only: ``python3 -m aitk_inference.benchmarks.attention_forward [flux]
[wan21_14b_81f]`` (writes ``attn_forward.json`` to $OUT or /tmp)."""
import gc, json, os, sys, time, torch

from aitk_inference.benchmarks.models import WORKLOADS, build_transformer, forward_inputs
from aitk_inference.pipelines.runtime.accelerate import compile_denoiser, set_attention_kernel

models = sys.argv[1:] or ["flux", "wan21_14b_81f"]
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}


def timed(fn, reps):
    fn(); torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        torch.cuda.synchronize(); s = time.perf_counter(); fn(); torch.cuda.synchronize(); t.append(time.perf_counter() - s)
    return sorted(t)[len(t) // 2] * 1000


for name in models:
    wl = WORKLOADS["full"][name]
    model = build_transformer(wl.config_key(name), "full", "cuda", torch.bfloat16)
    inputs = forward_inputs(wl.config_key(name), model, wl)
    reps = 5 if "wan" in name else 10
    out = {}
    with torch.no_grad():
        outs = {}
        for kernel in ("sdpa", "flash_attn_3"):
            set_attention_kernel([model], kernel, "cuda", name)
            outs[kernel] = model(**inputs)[0].float()
            out[f"eager_{kernel}_ms"] = round(timed(lambda: model(**inputs), reps), 2)
            print(name, kernel, out[f"eager_{kernel}_ms"], flush=True)
        out["rel_l2_fa3_vs_sdpa"] = float((outs["flash_attn_3"] - outs["sdpa"]).norm() / outs["sdpa"].norm())
        del outs
        compile_denoiser([model], "regional")
        for kernel in ("flash_attn_3", "sdpa"):
            set_attention_kernel([model], kernel, "cuda", name)
            t0 = time.perf_counter(); model(**inputs); torch.cuda.synchronize()
            out[f"compile_first_call_{kernel}_s"] = round(time.perf_counter() - t0, 1)
            out[f"compiled_{kernel}_ms"] = round(timed(lambda: model(**inputs), reps), 2)
            print(name, "compiled", kernel, out[f"compiled_{kernel}_ms"], flush=True)
    out["eager_ratio_fa3_vs_sdpa"] = round(out["eager_flash_attn_3_ms"] / out["eager_sdpa_ms"], 3)
    out["compiled_ratio_fa3_vs_sdpa"] = round(out["compiled_flash_attn_3_ms"] / out["compiled_sdpa_ms"], 3)
    res["models"][name] = out
    print(name, out, flush=True)
    del model, inputs
    gc.collect(); torch.cuda.empty_cache()
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "attn_forward.json"), "w"), indent=1)
