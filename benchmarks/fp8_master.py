"""FP8 fast mode on full-size FLUX.1-dev (random bf16 weights, rank-16 LoRA on every block Linear): strength change
and LoRA switch with the master weights on the host (pinned, the previous behaviour) vs on the GPU, in one run.
GPU only: ``python3 -m aitk_inference.benchmarks.fp8_master`` (writes ``fp8_master_bench.json`` to $OUT or /tmp)."""
import gc, json, os, time, torch

from diffusers import FluxTransformer2DModel
from aitk_inference.pipelines.lora.stack import LoraStack, LoraRequest
from aitk_inference.pipelines.runtime.quantize import quantize_denoiser_fp8, master_place, block_linear_names
from aitk_inference.benchmarks.harness import timed
from aitk_inference.tiny.loras import lora_targets, make_state_dict


def build():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model


res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
fingerprints = {}
for place in ("host", "gpu"):
    model = build()
    targets = lora_targets(model)
    sd1 = make_state_dict("peft", targets, rank=16, std=0.01, seed=0)
    sd2 = make_state_dict("peft", targets, rank=16, std=0.01, seed=1)
    names = block_linear_names(model)
    auto = master_place(model, names)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    count = quantize_denoiser_fp8(model, keep_master=True, master=place)
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t0
    stack = LoraStack({"transformer": model}, "fused", "transformer", "flux")
    t0 = time.perf_counter()
    stack.set([LoraRequest(state_dict=sd1, strength=1.0, name="a")])
    torch.cuda.synchronize()
    first_apply_s = time.perf_counter() - t0
    w = model.get_submodule(names[0]).weight
    first = w.qdata.clone() if hasattr(w, "qdata") else None
    strengths = iter([0.5, 0.8, 0.3, 0.9, 0.6, 0.7] * 4)
    change_s = timed(lambda: stack.set([LoraRequest(state_dict=sd1, strength=next(strengths), name="a")]), "cuda", 0, 5)
    toggle = iter([sd2, sd1] * 6)
    switch_s = timed(lambda: stack.set([LoraRequest(state_dict=next(toggle), strength=1.0, name="x")]), "cuda", 0, 4)
    stack.set([LoraRequest(state_dict=sd1, strength=1.0, name="a")])
    same = bool(torch.equal(w.qdata, first)) if first is not None else None
    fingerprints[place] = [float(model.get_submodule(n).weight.qdata.float().sum()) for n in names[:3]]
    res["variants"][place] = {
        "layers": count, "auto_place_would_be": auto, "quantize_s": round(quantize_s, 3),
        "first_apply_s": round(first_apply_s, 3), "strength_change_s": round(change_s, 4), "lora_switch_s": round(switch_s, 4),
        "back_to_first_bitwise": same, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}
    print(place, res["variants"][place], flush=True)
    del model, stack, w, first
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
res["same_fp8_weights_gpu_vs_host_master"] = fingerprints["gpu"] == fingerprints["host"]
res["ratio_strength_change_gpu_vs_host"] = round(res["variants"]["gpu"]["strength_change_s"] / res["variants"]["host"]["strength_change_s"], 3)
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "fp8_master_bench.json"), "w"), indent=1)
