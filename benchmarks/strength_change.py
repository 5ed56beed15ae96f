"""Fused strength change on full-size FLUX.1-dev (random bf16 weights, rank-16 LoRA on all 494 block Linears):
the previous merge (factors copied host->device each time, separate matmul + add) vs the current one
(factors kept on the device, one addmm), measured in the same run."""
import json, os, torch
from diffusers import FluxTransformer2DModel
from aitk_inference.benchmarks.harness import timed
from aitk_inference.pipelines.lora.stack import LoraStack, LoraRequest
from aitk_inference.tiny.loras import lora_targets, make_state_dict

torch.manual_seed(0)
with torch.device("meta"):
    model = FluxTransformer2DModel(guidance_embeds=True)
model = model.to_empty(device="cuda").to(torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
targets = lora_targets(model)
sd = make_state_dict("peft", targets, rank=16, std=0.01, seed=0)
check = [n for n, _ in targets[:2]] + [targets[-1][0]]
w0 = {n: model.get_submodule(n).weight.detach().clone() for n in check}
stack = LoraStack({"transformer": model}, "fused", "transformer", "flux")
stack.set([LoraRequest(state_dict=sd, strength=1.0, name="r16")])
torch.cuda.synchronize()

strengths = iter([0.5, 0.8, 0.3, 0.9, 0.6, 0.7] * 4)
new_s = timed(lambda: stack.set([LoraRequest(state_dict=sd, strength=next(strengths), name="r16")]), "cuda", 0, 5)
loaded = next(iter(stack.active.values())).loaded

@torch.no_grad()
def previous_merge(c):
    for (component, path), patch in loaded.patches.items():
        w = model.get_submodule(path).weight
        t = {k: v.to(device=w.device, dtype=torch.float32) for k, v in patch.tensors.items()}
        w.copy_((w.float() + c * (t["up"] @ t["down"])).to(w.dtype))

sign = iter([0.1, -0.1] * 10)
old_s = timed(lambda: previous_merge(next(sign)), "cuda", 0, 6)
# numerics: go to strength 0.5 via several in-place changes, compare with a fresh merge of W0 at 0.5
stack.set([LoraRequest(state_dict=sd, strength=0.5, name="r16")])
errs = {}
for n in check:
    p = loaded.patches[("transformer", n)]
    fresh = (w0[n].float() + 0.5 * (p.tensors["up"].cuda() @ p.tensors["down"].cuda())).to(torch.bfloat16)
    w = model.get_submodule(n).weight
    errs[n] = {"max_abs": float((w.float() - fresh.float()).abs().max()), "weight_absmax": float(fresh.abs().max())}
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "modules": len(loaded.patches),
       "strength_change_s_current": round(new_s, 4), "strength_change_s_previous": round(old_s, 4),
       "ratio_current_vs_previous": round(new_s / old_s, 3), "drift_after_changes_vs_fresh_merge": errs,
       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "strength_bench.json"), "w"), indent=1)
