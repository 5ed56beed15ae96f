"""ComfyUI's own FLUX.1-dev path as a reference, timed in the same run and on the same card as ours.

The transformer is the one :func:`.models.build_transformer` draws (same seed, so the same random weights), handed to
ComfyUI as a state dict: its model detection recognises the diffusers layout, converts it to its own FLUX classes and
wraps them in a ``ModelPatcher``, as its UNETLoader node does for a file. The LoRA is the benchmark's rank-16 file
(PEFT names, which ComfyUI's LoRA loader maps), patched into the weights as its LoraLoader node does. One forward is
``BaseModel.apply_model`` (what its sampler calls per step); a check against our fused forward proves both ran the
same model and LoRA. Timed: eager, with its TorchCompileModel node's compile, with its ``fp8_e4m3fn`` and
``fp8_e4m3fn_fast`` weight dtypes, and the cost of a strength change (re-patching).

ComfyUI is never part of this project: point ``--comfyui`` (or ``COMFYUI_DIR``) at a checkout; without one the
reference is skipped with that message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

#: ComfyUI's UNETLoader weight dtypes timed here -> its model_options
WEIGHT_DTYPES = {"default": {}, "fp8_e4m3fn": {"dtype": "float8_e4m3fn"},
                 "fp8_e4m3fn_fast": {"dtype": "float8_e4m3fn", "fp8_optimizations": True}}


def comfyui_missing(comfy_dir: str | None) -> str | None:
    """Why ComfyUI cannot be used from ``comfy_dir`` (None when it can)."""
    if not comfy_dir:
        return "no ComfyUI checkout given (--comfyui DIR or COMFYUI_DIR): the ComfyUI reference is skipped"
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_patcher.py")):
        return f"{comfy_dir} is not a ComfyUI checkout (no comfy/model_patcher.py): the ComfyUI reference is skipped"
    return None


@contextlib.contextmanager
def count_unloaded_lora_keys():
    """Collects the LoRA keys ComfyUI's loader reports it did not load (it only logs them)."""
    unloaded: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("lora key not loaded"):
                unloaded.append(message)

    handler = Handler(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield unloaded
    finally:
        logging.getLogger().removeHandler(handler)


def import_comfy(comfy_dir: str, device: str):
    """ComfyUI's modules, configured to keep everything on ``device`` (its ``--gpu-only``, or ``--cpu``)."""
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.gpu_only = device.startswith("cuda")
    comfy.cli_args.args.cpu = not device.startswith("cuda")
    import comfy.model_management
    import comfy.sd
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    return comfy, set_torch_compile_wrapper


def bench_comfyui_flux(opts, rec, comfy_dir: str | None) -> None:
    """ComfyUI's FLUX forward at the benchmark's workload, next to our records of the same run."""
    why = comfyui_missing(comfy_dir)
    if why:
        print(f"[bench] {why}", flush=True)
        rec.meta.setdefault("skipped", []).append(why)
        rec.write()
        return
    import torch

    from ..pipelines.families.pixel_space import unpatchify_pixels
    from ..pipelines.runtime.accelerate import resolve_dtype
    from .harness import lora_state_dict, peak_memory_gib, relative_error, reset_peak, sync, timed
    from .models import WORKLOADS, build_transformer, forward_inputs

    comfy, set_torch_compile_wrapper = import_comfy(comfy_dir, opts.device)
    dtype = resolve_dtype(opts.dtype, opts.device)
    workload = WORKLOADS[opts.size]["flux"]
    model = build_transformer("flux", opts.size, opts.device, dtype)
    inputs = forward_inputs("flux", model, workload)
    lora = lora_state_dict(model, opts.rank, 0, 0.01 if opts.size == "full" else 0.3)
    height, width = workload.height, workload.width

    # our fused forward, the check's reference: ComfyUI returns the denoised latents x - sigma * v
    from ..pipelines.lora.stack import LoraRequest, LoraStack

    stack = LoraStack({"transformer": model}, "fused", "transformer", "flux")
    stack.set([LoraRequest(state_dict=lora, name=f"r{opts.rank}")])
    with torch.inference_mode():
        velocity = model(**inputs)[0]
    latents = unpatchify_pixels(inputs["hidden_states"], height, width, 2)
    sigma = inputs["timestep"]
    expected = (latents.float() - sigma.float() * unpatchify_pixels(velocity, height, width, 2).float())
    stack.set([])
    # kept in host memory: ComfyUI builds each of its models from them while ours is gone from the card
    weights = {name: tensor.to("cpu") for name, tensor in model.state_dict().items()}
    del model, stack, velocity
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    comfy_inputs = dict(x=latents, t=sigma, c_crossattn=inputs["encoder_hidden_states"], y=inputs["pooled_projections"],
                        guidance=inputs["guidance"])
    note = f"ComfyUI's FLUX via its model detection; {workload.label}; LoRA rank {opts.rank} patched into the weights"

    for weight_dtype, options in WEIGHT_DTYPES.items():
        if opts.time_left() < 120:
            print(f"[bench] comfyui {weight_dtype}: skipped, too little time left", flush=True)
            break
        model_options = {k: getattr(torch, v) if k == "dtype" else v for k, v in options.items()}
        with torch.inference_mode(), count_unloaded_lora_keys() as unloaded:  # ComfyUI runs its nodes so
            base = comfy.sd.load_diffusion_model_state_dict(dict(weights), model_options=model_options)
            patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
            patches = len(patched.patches)
            comfy.model_management.load_models_gpu([patched], force_full_load=True)
        variant = "comfyui" if weight_dtype == "default" else f"comfyui_{weight_dtype}"

        def forward(patcher=patched):
            with torch.inference_mode():
                return patcher.model.apply_model(**comfy_inputs, transformer_options={"wrappers": patcher.wrappers})

        error = relative_error(forward(), expected)
        rec.add("flux", "comfyui_relative_error", variant, error, "rel L2",
                notes=f"one forward vs ours (fused LoRA, same weights and inputs); {patches} weights patched from "
                f"{len(lora) // 2} LoRA modules, {len(unloaded)} LoRA keys not loaded")
        reset_peak(opts.device)
        seconds = timed(forward, opts.device, opts.warmup, opts.reps)
        rec.add("flux", "forward_ms", variant, seconds * 1000, "ms", rec.reference("flux", "forward_ms"), note)
        peak = peak_memory_gib(opts.device)
        if peak is not None:
            rec.add("flux", "peak_memory", variant, peak, "GiB", rec.reference("flux", "peak_memory"))

        # a strength change: ComfyUI clones the model with the new strength and re-patches the weights
        sync(opts.device)
        started = time.perf_counter()
        with torch.inference_mode():
            rescaled, _ = comfy.sd.load_lora_for_models(base, None, lora, 0.5, 0)
            comfy.model_management.load_models_gpu([rescaled], force_full_load=True)
            forward(rescaled)
        sync(opts.device)
        rec.add("flux", "strength_change_s", variant, time.perf_counter() - started, "s",
                notes="new strength -> weights re-patched -> first forward done")

        if weight_dtype != "fp8_e4m3fn" and opts.time_left() > 150:
            compiled = rescaled.clone()
            set_torch_compile_wrapper(model=compiled, backend=opts.compile_backend)
            sync(opts.device)
            started = time.perf_counter()
            forward(compiled)
            sync(opts.device)
            rec.add("flux", "compile_first_call", f"{variant}+compile", time.perf_counter() - started, "s",
                    notes="its TorchCompileModel node (whole diffusion model) + first forward")
            seconds = timed(lambda: forward(compiled), opts.device, opts.warmup, opts.reps)
            rec.add("flux", "forward_ms", f"{variant}+compile", seconds * 1000, "ms", rec.reference("flux", "forward_ms"),
                    note + "; compiled")
            del compiled
        comfy.model_management.unload_all_models()
        del base, patched, rescaled
        comfy.model_management.soft_empty_cache()
    del weights
