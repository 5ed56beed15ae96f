"""ComfyUI's own FLUX.1-dev and Wan 2.1 14B paths as references, timed in the same run and on the same card as ours.

The transformer is the one :func:`.models.build_transformer` draws (same seed, so the same random weights), handed to
ComfyUI as a state dict in a layout its model detection recognises (FLUX: diffusers' own, which it converts itself;
Wan: the original Wan names, which it does not convert, so they are renamed here with our LoRA converter's Wan table).
It builds its own classes and wraps them in a ``ModelPatcher``, as its UNETLoader node does for a file. The LoRA is the
benchmark's rank-16 one, in names ComfyUI's LoRA loader maps (FLUX: PEFT names; Wan: ``diffusion_model.<original
module>``), patched into the weights as its LoraLoader node does. One forward is ``BaseModel.apply_model`` (what its
sampler calls per step); a check against our fused forward proves both ran the same model and LoRA. Timed: eager, with
its TorchCompileModel node's compile, with its ``fp8_e4m3fn`` and ``fp8_e4m3fn_fast`` weight dtypes, and the cost of a
strength change (re-patching).

ComfyUI is never part of this project: point ``--comfyui`` (or ``COMFYUI_DIR``) at a checkout; without one the
reference is skipped with that message.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: ComfyUI's UNETLoader weight dtypes timed here -> its model_options
WEIGHT_DTYPES = {"default": {}, "fp8_e4m3fn": {"dtype": "float8_e4m3fn"},
                 "fp8_e4m3fn_fast": {"dtype": "float8_e4m3fn", "fp8_optimizations": True}}


def comfy_model_options(weight_dtype: str) -> dict:
    """The model_options ComfyUI's UNETLoader passes for ``weight_dtype`` (a key of :data:`WEIGHT_DTYPES`)."""
    import torch

    return {k: getattr(torch, v) if k == "dtype" else v for k, v in WEIGHT_DTYPES[weight_dtype].items()}


#: what ComfyUI logs (and only logs) about weights it did not take -> how a record's notes count them
UNLOADED_WARNINGS = {"lora key not loaded": "LoRA keys not loaded", "unet missing": "model weights missing",
                     "unet unexpected": "model weights unexpected"}


# ------------------------------------------------------------------------------------------------------------ FLUX
def flux_inputs(inputs: dict, workload):
    """``apply_model``'s arguments from our forward's, and our velocity -> the denoised latents ComfyUI returns."""
    from ..pipelines.families.pixel_space import unpatchify_pixels

    def unpack(tokens):
        return unpatchify_pixels(tokens, workload.height, workload.width, 2)

    latents, sigma = unpack(inputs["hidden_states"]), inputs["timestep"]
    comfy_inputs = dict(x=latents, t=sigma, c_crossattn=inputs["encoder_hidden_states"],
                        y=inputs["pooled_projections"], guidance=inputs["guidance"])
    return comfy_inputs, lambda velocity: latents.float() - sigma.float() * unpack(velocity).float()


# ------------------------------------------------------------------------------------------------------------- Wan
# What our LoRA converter's Wan table (original -> diffusers names of the Linear modules) leaves out, because no LoRA
# targets them: the q/k norms, the cross-attention norm (diffusers' norm2 is Wan's norm3) and the modulation tables.
WAN_BLOCK_PARAMETERS = {"attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
                        "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k", "norm2": "norm3",
                        "scale_shift_table": "modulation"}
WAN_TOP_PARAMETERS = {"scale_shift_table": "head.modulation"}
WAN_BLOCK = re.compile(r"^(blocks\.\d+\.)(.+)$")
# ComfyUI's flow sampling turns sigma into Wan's timestep with its default multiplier
WAN_TIMESTEP_MULTIPLIER = 1000.0


@functools.cache
def _original_wan_names(in_block: bool) -> dict[str, str]:
    """diffusers -> original Wan names, inside the blocks or outside them."""
    from ..pipelines.lora.convert import WAN_BLOCK_RENAMES, WAN_TOP_RENAMES

    renames = {diffusers: original for original, diffusers in
               (WAN_BLOCK_RENAMES if in_block else WAN_TOP_RENAMES).items()}
    return {**renames, **(WAN_BLOCK_PARAMETERS if in_block else WAN_TOP_PARAMETERS)}


def original_wan_key(key: str) -> str:
    """``blocks.3.attn1.to_q.weight`` -> ``blocks.3.self_attn.q.weight``: a diffusers Wan module or parameter path in
    the original Wan names (our LoRA converter's table, inverted, plus the parameters it has no need for)."""
    block = WAN_BLOCK.match(key)
    prefix, rest = (block.group(1), block.group(2)) if block else ("", key)
    renames = _original_wan_names(block is not None)
    if rest in renames:
        return prefix + renames[rest]
    module, _, leaf = rest.rpartition(".")
    return f"{prefix}{renames.get(module, module)}.{leaf}" if module else prefix + rest


def wan_original_weights(state_dict: dict) -> dict:
    """Our Wan transformer's state dict in the layout ComfyUI's model detection recognises (it converts no other)."""
    return {original_wan_key(key): tensor for key, tensor in state_dict.items()}


def wan_original_lora(lora: dict) -> dict:
    """``transformer.<diffusers module>.lora_A.weight`` -> ``diffusion_model.<original module>.lora_A.weight``."""
    renamed = {}
    for key, tensor in lora.items():
        module, _, suffix = key.removeprefix("transformer.").partition(".lora_")
        renamed[f"diffusion_model.{original_wan_key(module)}.lora_{suffix}"] = tensor
    return renamed


def wan_inputs(inputs: dict, workload):
    """``apply_model``'s arguments from our forward's (the latents are already ComfyUI's video layout)."""
    latents, sigma = inputs["hidden_states"], inputs["timestep"] / WAN_TIMESTEP_MULTIPLIER
    comfy_inputs = dict(x=latents, t=sigma, c_crossattn=inputs["encoder_hidden_states"])
    return comfy_inputs, lambda velocity: latents.float() - sigma.float() * velocity.float()


# --------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class ComfyReference:
    """How one architecture is handed to ComfyUI, and how its output is compared with ours."""

    label: str
    weights: Callable[[dict], dict]  # our state dict -> a layout ComfyUI's model detection recognises
    lora: Callable[[dict], dict]  # the benchmark's PEFT LoRA -> keys ComfyUI's LoRA loader maps
    inputs: Callable  # (our forward's inputs, workload) -> (apply_model's arguments, velocity -> denoised)
    # FULL_CONFIGS changes giving a tiny model that ComfyUI's detection reads back (empty: none can be, and
    # no_tiny_model says why)
    tiny_config: dict = field(default_factory=dict)
    no_tiny_model: str = ""


#: FULL_CONFIGS key -> its ComfyUI reference
REFERENCES = {
    "flux": ComfyReference(
        "FLUX", weights=dict, lora=dict, inputs=flux_inputs,
        no_tiny_model="ComfyUI's FLUX detection takes FLUX.1's 3072-wide, 24-head blocks as given, so no tiny FLUX "
        "loads (full size only)"),
    # its Wan detection reads width, depth and FFN width from the weights but takes 128-wide heads and 4096-wide text
    # embeddings as given: one head, two blocks
    "wan21_14b": ComfyReference(
        "Wan 2.1 14B", weights=wan_original_weights, lora=wan_original_lora, inputs=wan_inputs,
        tiny_config=dict(num_attention_heads=1, num_layers=2, ffn_dim=32)),
}


def has_comfyui_reference(model_id: str) -> bool:
    """Whether the forward-only benchmark ``model_id`` has a ComfyUI reference."""
    from .models import WORKLOADS

    return WORKLOADS["full"][model_id].config_key(model_id) in REFERENCES


def comfyui_missing(comfy_dir: str | None) -> str | None:
    """Why ComfyUI cannot be used from ``comfy_dir`` (None when it can)."""
    if not comfy_dir:
        return "no ComfyUI checkout given (--comfyui DIR or COMFYUI_DIR): the ComfyUI reference is skipped"
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_patcher.py")):
        return f"{comfy_dir} is not a ComfyUI checkout (no comfy/model_patcher.py): the ComfyUI reference is skipped"
    return None


@contextlib.contextmanager
def collect_unloaded_warnings():
    """The warnings of :data:`UNLOADED_WARNINGS` that ComfyUI logs meanwhile, per kind."""
    found: dict[str, list[str]] = {prefix: [] for prefix in UNLOADED_WARNINGS}

    class Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            for prefix, messages in found.items():
                if message.startswith(prefix):
                    messages.append(message)

    handler = Handler(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield found
    finally:
        logging.getLogger().removeHandler(handler)


def import_comfy(comfy_dir: str, device: str, reserve_gib: float | None = None):
    """ComfyUI's modules, configured to keep everything on ``device`` (its ``--gpu-only``, or ``--cpu``), or with
    ``reserve_gib``, to plan its GPU memory as it does by default, keeping that much of the card free (its
    ``--reserve-vram``). Its settings are read once, at the first import in a process."""
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.gpu_only = device.startswith("cuda") and reserve_gib is None
    comfy.cli_args.args.cpu = not device.startswith("cuda")
    comfy.cli_args.args.reserve_vram = reserve_gib
    import comfy.model_management
    import comfy.sd
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    return comfy, set_torch_compile_wrapper


def skip(rec, why: str) -> None:
    print(f"[bench] {why}", flush=True)
    rec.meta.setdefault("skipped", []).append(why)
    rec.write()


def bench_comfyui(model_id: str, opts, rec, comfy_dir: str | None) -> None:
    """ComfyUI's forward of ``model_id``'s architecture at its workload, next to our records of the same run."""
    from .models import WORKLOADS

    workload = WORKLOADS[opts.size][model_id]
    architecture = workload.config_key(model_id)
    reference = REFERENCES[architecture]
    why = comfyui_missing(comfy_dir)
    if why is None and opts.size == "tiny" and not reference.tiny_config:
        why = f"{model_id}: {reference.no_tiny_model}: the ComfyUI reference is skipped"
    if why:
        skip(rec, why)
        return
    import torch

    from ..pipelines.lora.stack import LoraRequest, LoraStack
    from ..pipelines.runtime.accelerate import resolve_dtype
    from .harness import (
        lora_state_dict,
        peak_memory_gib,
        relative_error,
        reset_peak,
        sync,
        timed,
    )
    from .models import build_transformer, forward_inputs

    comfy, set_torch_compile_wrapper = import_comfy(comfy_dir, opts.device)
    dtype = resolve_dtype(opts.dtype, opts.device)
    # our compiled variants' graphs still hold the weights of our model: a 14B model and ComfyUI's two copies of it
    # (patched and unpatched) do not fit an 80 GB card beside them
    torch._dynamo.reset()
    gc.collect()
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    model = build_transformer(architecture, "full", opts.device, dtype,
                              config_changes=reference.tiny_config if opts.size == "tiny" else None)
    inputs = forward_inputs(architecture, model, workload)
    lora = lora_state_dict(model, opts.rank, 0, 0.01 if opts.size == "full" else 0.3)
    comfy_inputs, denoised = reference.inputs(inputs, workload)

    # our fused forward, the check's reference: ComfyUI returns the denoised latents x - sigma * v
    stack = LoraStack({"transformer": model}, "fused", "transformer", model_id)
    stack.set([LoraRequest(state_dict=lora, name=f"r{opts.rank}")])
    with torch.inference_mode():
        expected = denoised(model(**inputs)[0])
    stack.set([])
    # kept in host memory: ComfyUI builds each of its models from them while ours is gone from the card
    weights = reference.weights({name: tensor.to("cpu") for name, tensor in model.state_dict().items()})
    comfy_lora = reference.lora(lora)
    del model, stack
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    note = (f"ComfyUI's {reference.label} via its model detection; {workload.label}; "
            f"LoRA rank {opts.rank} patched into the weights")

    def ours(metric: str) -> float | None:
        """Our record to compare with; at tiny size ours timed the tiny kit's model, not this one: none."""
        return rec.reference(model_id, metric) if opts.size == "full" else None

    for weight_dtype in WEIGHT_DTYPES:
        if opts.time_left() < 120:
            print(f"[bench] comfyui {weight_dtype}: skipped, too little time left", flush=True)
            break
        with torch.inference_mode(), collect_unloaded_warnings() as unloaded:  # ComfyUI runs its nodes so
            base = comfy.sd.load_diffusion_model_state_dict(dict(weights),
                                                            model_options=comfy_model_options(weight_dtype))
            patched, _ = comfy.sd.load_lora_for_models(base, None, comfy_lora, 1.0, 0)
            patches = len(patched.patches)
            comfy.model_management.load_models_gpu([patched], force_full_load=True)
        variant = "comfyui" if weight_dtype == "default" else f"comfyui_{weight_dtype}"

        def forward(patcher=patched):
            with torch.inference_mode():
                return patcher.model.apply_model(**comfy_inputs, transformer_options={"wrappers": patcher.wrappers})

        error = relative_error(forward(), expected)
        counts = ", ".join(f"{len(unloaded[prefix])} {what}" for prefix, what in UNLOADED_WARNINGS.items())
        rec.add(model_id, "comfyui_relative_error", variant, error, "rel L2",
                notes=f"one forward vs ours (fused LoRA, same weights and inputs); {patches} weights patched from "
                f"{len(lora) // 2} LoRA modules, {counts}")
        reset_peak(opts.device)
        seconds = timed(forward, opts.device, opts.warmup, opts.reps)
        rec.add(model_id, "forward_ms", variant, seconds * 1000, "ms", ours("forward_ms"), note)
        peak = peak_memory_gib(opts.device)
        if peak is not None:
            rec.add(model_id, "peak_memory", variant, peak, "GiB", ours("peak_memory"))

        # a strength change: ComfyUI clones the model with the new strength and re-patches the weights
        sync(opts.device)
        started = time.perf_counter()
        with torch.inference_mode():
            rescaled, _ = comfy.sd.load_lora_for_models(base, None, comfy_lora, 0.5, 0)
            comfy.model_management.load_models_gpu([rescaled], force_full_load=True)
            forward(rescaled)
        sync(opts.device)
        rec.add(model_id, "strength_change_s", variant, time.perf_counter() - started, "s",
                notes="new strength -> weights re-patched -> first forward done")

        if weight_dtype != "fp8_e4m3fn" and opts.time_left() > 150:
            compiled = rescaled.clone()
            set_torch_compile_wrapper(model=compiled, backend=opts.compile_backend)
            sync(opts.device)
            started = time.perf_counter()
            forward(compiled)
            sync(opts.device)
            rec.add(model_id, "compile_first_call", f"{variant}+compile", time.perf_counter() - started, "s",
                    notes="its TorchCompileModel node (whole diffusion model) + first forward")
            seconds = timed(lambda: forward(compiled), opts.device, opts.warmup, opts.reps)
            rec.add(model_id, "forward_ms", f"{variant}+compile", seconds * 1000, "ms", ours("forward_ms"),
                    note + "; compiled")
            del compiled
        comfy.model_management.unload_all_models()
        del base, patched, rescaled
        comfy.model_management.soft_empty_cache()
    del weights
