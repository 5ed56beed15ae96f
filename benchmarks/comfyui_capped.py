"""One denoiser forward on a card whose memory is capped, ours against ComfyUI's own low-VRAM path, same process, same
card (issue 22 item 3: ComfyUI runs FLUX.1-dev and Wan 14B on 12-24 GiB cards; so must we, and not slower).

Both get the same full-size random weights (``models.build_transformer``), the benchmark's rank-16 LoRA and the same
cap: torch's per-process memory fraction bounds what the process may allocate, and ComfyUI, whose planner reads the
card's free memory, gets ``--reserve-vram`` set to the rest of the card, so that it plans for a card of the cap's size.

- Ours, as ``offload="auto"`` places a denoiser that does not fit: the LoRA fused, the blocks kept within
  ``accelerate.resident_block_budget`` (the image or video reserve left free) and the rest streamed
  (``offload_blocks_keeping_resident``); eager and with ``compile="regional"``; with ``--fp8`` also the FP8 fast mode
  (block Linears quantized on the host, values computed on the GPU, compiled).
- ComfyUI, as its sampler loads a model: its ``ModelPatcher`` with the LoRA added as its LoraLoader node does, then
  ``load_models_gpu`` with its memory estimate for the latent. What does not fit stays in host memory and is cast to
  the GPU layer by layer at each forward, the LoRA applied to each such layer as it is cast. Timed with its default
  (one stream) and with its ``--async-offload`` (two streams); with ``--fp8`` also its ``fp8_e4m3fn`` weights.

Every forward's output is compared with our fused forward on the whole card, timed first as the uncapped reference.
ComfyUI is never part of this project (``--comfyui DIR`` or ``COMFYUI_DIR``); without it only ours runs, and the
result says why. On a GPU:

    python3 -m aitk_inference.benchmarks.comfyui_capped --comfyui DIR --model flux --cap-gib 12 --fp8 --out DIR
    python3 -m aitk_inference.benchmarks.comfyui_capped --comfyui DIR --model wan21_14b_81f --cap-gib 24 --out DIR

``--size tiny --device cpu`` runs the same steps on a Wan that ComfyUI's detection reads (see ``REFERENCES``), where
the CPU stands for the card and ``--cap-gib`` for its memory (the tests: nothing is timed that matters there).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import traceback

#: the forward-only workloads with a ComfyUI reference (``comfyui_reference.REFERENCES``)
MODELS = ("flux", "wan21_14b", "wan21_14b_81f")


def main(argv=None) -> int:
    import torch

    from ..pipelines.lora.stack import LoraRequest, LoraStack
    from ..pipelines.runtime import accelerate, quantize
    from ..pipelines.runtime.accelerate import resolve_dtype
    from .comfyui_reference import REFERENCES, comfy_model_options, comfyui_missing, import_comfy
    from .harness import lora_state_dict, peak_memory_gib, relative_error, reset_peak, sync, timed, write_result
    from .memory_caps import streaming_layout
    from .models import WORKLOADS, build_transformer, forward_inputs

    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), metavar="DIR")
    parser.add_argument("--model", choices=MODELS, default="flux")
    parser.add_argument("--cap-gib", type=float, default=12.0)
    parser.add_argument("--fp8", action="store_true", help="add our FP8 fast mode and ComfyUI's fp8_e4m3fn weights")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)

    device, cuda = args.device, args.device.startswith("cuda")
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    cap = int(args.cap_gib * 2**30)
    missing = comfyui_missing(args.comfyui)
    if missing is None:  # ComfyUI reads its settings once, when its model management is first imported
        comfy, _ = import_comfy(args.comfyui, device, reserve_gib=(total - cap) / 2**30 if cuda else None)
    workload = WORKLOADS[args.size][args.model]
    architecture = workload.config_key(args.model)
    reference = REFERENCES[architecture]
    if args.size == "tiny" and not reference.tiny_config:
        parser.error(f"{args.model}: {reference.no_tiny_model}")
    reserve = accelerate.activation_reserve(None, workload.frames > 1, 0)  # auto's, for a denoiser without a VAE
    result = {"model": args.model, "size": args.size, "workload": workload.label,
              "device": torch.cuda.get_device_name(device) if cuda else device, "torch": torch.__version__,
              "cap_gib": args.cap_gib, "reserve_gib": reserve / 2**30, "runs": []}
    name_of_result = f"comfyui_capped_{args.model}_{args.cap_gib:g}gib"
    if missing:
        result["comfyui_skipped"] = missing
        print(f"[bench] {missing}", flush=True)

    def measure(name: str, forward, to_denoised, **notes) -> None:
        run = {"variant": name, **notes}
        try:
            reset_peak(device)
            started = time.perf_counter()
            with torch.inference_mode():
                output = forward()
            sync(device)
            run["first_forward_s"] = round(time.perf_counter() - started, 2)
            run["relative_error_vs_uncapped_fused"] = float(f"{relative_error(to_denoised(output), expected):.3g}")
            with torch.inference_mode():
                run["forward_ms"] = round(timed(forward, device, warmup=1, reps=args.reps) * 1000, 1)
            if cuda:
                run["peak_gib"] = round(peak_memory_gib(device), 2)
        except Exception as error:  # out of memory, or a path that fails under the cap: a result too
            run["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            run["error_at"] = [f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.name}"
                               for frame in traceback.extract_tb(error.__traceback__)[-6:]]
        result["runs"].append(run)
        print(run, flush=True)
        write_result(args.out, name_of_result, result)  # kept as it grows: a run cut short still leaves its rows

    dtype = resolve_dtype(args.dtype, device)
    model = build_transformer(architecture, "full", device, dtype,
                              config_changes=reference.tiny_config if args.size == "tiny" else None)
    inputs = forward_inputs(architecture, model, workload)
    lora = lora_state_dict(model, rank=16, seed=0, std=0.01 if args.size == "full" else 0.3)
    comfy_inputs, denoised = reference.inputs(inputs, workload)
    # ComfyUI builds its model from the weights without the LoRA, kept in host memory (copied: merging the LoRA below
    # edits the model's own tensors)
    weights = reference.weights({name: tensor.to("cpu", copy=True) for name, tensor in model.state_dict().items()})
    stack = LoraStack({"transformer": model}, "fused", "transformer", args.model)
    stack.set([LoraRequest(state_dict=lora, name="r16")])
    del stack  # the LoRA stays merged into the weights
    with torch.inference_mode():
        expected = denoised(model(**inputs)[0])

    def ours():
        return model(**inputs)[0]

    measure("ours_uncapped", ours, denoised)

    # the cap from here on; ours goes to the host and comes back as auto would place it
    if cuda:
        torch.cuda.set_per_process_memory_fraction(cap / total)
    modes = [("ours", "none", False), ("ours+compile", "none", True)] + ([("ours_fp8+compile", "fp8", True)]
                                                                         if args.fp8 else [])
    for name, quantized, compiled in modes:
        # each mode is placed as a fresh load would place it: the mode before goes back to the host first (its kept
        # blocks, still on the card, would otherwise count against this budget: the compiled mode kept 0 of 57)
        accelerate.remove_block_streaming(model)
        model.to("cpu")
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if quantized == "fp8":
            quantize.quantize_block_linears(model, quantize.fp8_config(), device=device)
        budget = accelerate.gpu_memory_budget(device)
        resident = accelerate.resident_block_budget({"transformer": model}, cap if budget is None else budget,
                                                    reserve)["transformer"]
        kept = accelerate.offload_blocks_keeping_resident(model, device, resident)
        if compiled:
            accelerate.compile_denoiser([model], backend=args.compile_backend)
        layout = streaming_layout(model)  # no list of the blocks here: it would keep them after the model is dropped
        measure(name, ours, denoised, blocks_kept=kept, blocks=kept + len(layout["streamed_blocks"]),
                streamed_gib_per_forward=layout["streamed_gib_per_forward"])
    accelerate.remove_block_streaming(model)
    model = None  # ComfyUI's copy needs the host memory
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    if missing is None:
        comfy_lora = reference.lora(lora)
        latent = list(comfy_inputs["x"].shape)
        for weight_dtype in ("default", "fp8_e4m3fn") if args.fp8 else ("default",):
            with torch.inference_mode():
                base = comfy.sd.load_diffusion_model_state_dict(dict(weights),
                                                                model_options=comfy_model_options(weight_dtype))
                patched, _ = comfy.sd.load_lora_for_models(base, None, comfy_lora, 1.0, 0)
                # as its sampler loads the model: room for a batch of two latents (cond and uncond), at least one
                needed = patched.model.memory_required([latent[0] * 2, *latent[1:]])
                comfy.model_management.load_models_gpu([patched], memory_required=needed,
                                                       minimum_memory_required=patched.model.memory_required(latent))
            loaded = {"loaded_gib": round(patched.loaded_size() / 2**30, 2),
                      "model_gib": round(patched.model_size() / 2**30, 2)}

            def theirs(patcher=patched):
                return patcher.model.apply_model(**comfy_inputs, transformer_options={"wrappers": patcher.wrappers})

            for streams in (1, 2):
                comfy.model_management.NUM_STREAMS = streams  # its --async-offload sets 2
                suffix = "" if weight_dtype == "default" else f"_{weight_dtype}"
                measure(f"comfyui{suffix}" + ("+async_offload" if streams == 2 else ""), theirs, lambda x: x,
                        **loaded)  # it returns the denoised latents
            comfy.model_management.unload_all_models()
            del base, patched
            comfy.model_management.soft_empty_cache()

    uncapped = result["runs"][0].get("forward_ms")
    for run in result["runs"]:
        if uncapped and run.get("forward_ms"):
            run["ratio_vs_ours_uncapped"] = round(run["forward_ms"] / uncapped, 3)
    write_result(args.out, name_of_result, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
