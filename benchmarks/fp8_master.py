"""FP8 fast mode on full-size FLUX.1-dev (random bf16 weights, rank-16 LoRA on every block Linear): strength change
and LoRA switch with the master weights on the host (pinned) vs on the GPU, each with the fused rebuild (one compiled
kernel per layer, ``runtime.quantize.fp8_rows_``) and with the previous rebuild (torchao's quantize per layer), in one
run; every layer's FP8 bytes are compared between the two rebuilds. GPU only:

    python3 -m aitk_inference.benchmarks.fp8_master [--places gpu host]

(writes ``fp8_master_bench.json`` to $OUT or /tmp)."""
import argparse, gc, json, os, time, torch

from diffusers import FluxTransformer2DModel
from aitk_inference.pipelines.lora.stack import LoraStack, LoraRequest
from aitk_inference.pipelines.runtime import eager_rounding, quantize
from aitk_inference.pipelines.runtime.quantize import quantize_denoiser_fp8, master_place, block_linear_names
from aitk_inference.benchmarks.harness import timed
from aitk_inference.pipelines.runtime.accelerate import use_persistent_compile_cache
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


def fp8_bytes(model, names):
    """Every layer's FP8 values and scales, copied to the host (two copies of 12 GB would not fit beside the model)."""
    return [(model.get_submodule(n).weight.qdata.view(torch.uint8).cpu(), model.get_submodule(n).weight.scale.cpu())
            for n in names]


def torchao_rebuild():
    """The previous rebuild: torchao's quantize of each merged layer (the fused kernel switched off)."""
    original = quantize._is_row_fp8
    quantize._is_row_fp8 = lambda weight: False
    return original


parser = argparse.ArgumentParser()
parser.add_argument("--places", nargs="+", default=["gpu", "host"], choices=["gpu", "host"])
args = parser.parse_args()
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
res["compile_cache"] = use_persistent_compile_cache()
fingerprints = {}
for place in args.places:
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
    # first apply: the fused kernel compiles (once per process) and each layer shape is checked against torchao
    t0 = time.perf_counter()
    stack.set([LoraRequest(state_dict=sd1, strength=1.0, name="a")])
    torch.cuda.synchronize()
    first_apply_s = time.perf_counter() - t0
    w = model.get_submodule(names[0]).weight
    first = w.qdata.clone()
    run = {"layers": count, "auto_place_would_be": auto, "quantize_s": round(quantize_s, 3),
           "first_apply_s": round(first_apply_s, 3),
           "fused_shapes_checked": {str(k[1]): v for k, v in quantize._FUSED_CHECKED.items()},
           "fused_compiled": eager_rounding.compiled(quantize.fp8_rows_, "cuda") is not None}
    for rebuild in ("fused", "torchao"):
        original = torchao_rebuild() if rebuild == "torchao" else None
        strengths = iter([0.5, 0.8, 0.3, 0.9, 0.6, 0.7] * 4)
        run[f"strength_change_s_{rebuild}"] = round(timed(
            lambda: stack.set([LoraRequest(state_dict=sd1, strength=next(strengths), name="a")]), "cuda", 1, 5), 4)
        toggle = iter([sd2, sd1] * 6)
        run[f"lora_switch_s_{rebuild}"] = round(timed(
            lambda: stack.set([LoraRequest(state_dict=next(toggle), strength=1.0, name="x")]), "cuda", 0, 4), 4)
        stack.set([LoraRequest(state_dict=sd1, strength=0.45, name="a")])
        run[f"bytes_{rebuild}"] = fp8_bytes(model, names)
        if original is not None:
            quantize._is_row_fp8 = original
    fused, previous = run.pop("bytes_fused"), run.pop("bytes_torchao")
    run["layers_differing_fused_vs_torchao"] = sum(not all(torch.equal(a, b) for a, b in zip(f, p))
                                                   for f, p in zip(fused, previous))
    del fused, previous
    run["ratio_strength_change_fused_vs_torchao"] = round(run["strength_change_s_fused"] / run["strength_change_s_torchao"], 3)
    stack.set([LoraRequest(state_dict=sd1, strength=1.0, name="a")])
    run["back_to_first_bitwise"] = bool(torch.equal(w.qdata, first))
    fingerprints[place] = [float(model.get_submodule(n).weight.qdata.float().sum()) for n in names[:3]]
    run["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    run["allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    res["variants"][place] = run
    print(place, run, flush=True)
    del model, stack, w, first
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
if len(fingerprints) == 2:
    res["same_fp8_weights_gpu_vs_host_master"] = fingerprints["gpu"] == fingerprints["host"]
    res["ratio_strength_change_gpu_vs_host"] = round(res["variants"]["gpu"]["strength_change_s_fused"] / res["variants"]["host"]["strength_change_s_fused"], 3)
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "fp8_master_bench.json"), "w"), indent=1)
