"""The load options of a pipeline, in one place: their choices, one type, one validation and one cache key.

The nodes, the CLI and the server read their choice lists from here, so this module imports no torch: resolving
``auto`` devices and dtypes happens in :meth:`LoadOptions.resolve`, which imports it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..component_files import FILE_COMPONENTS
from ..registry import LORA_MODES, ModelSpec, get_spec
from ..single_file import SINGLE_FILE_SUFFIXES, is_single_file_source
from .quantize import fp8_option_conflict, fp8_unavailable

DTYPES = ("auto", "fp32", "bf16", "fp16")
#: every dtype spelling accepted (case-insensitive) -> the torch dtype's name; ``auto`` is decided per device
TORCH_DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}
OFFLOAD_MODES = ("none", "model", "sequential", "group", "auto")
COMPILE_MODES = ("none", "regional", "full")
#: attention kernel choices -> diffusers attention backends (``ModelMixin.set_attention_backend``). ``sdpa`` is
#: diffusers' default (torch's scaled_dot_product_attention picks its kernel); the ``sdpa_*`` names force one of
#: torch's kernels; the rest need their own package (flash-attn, flash-attn 3, sageattention, xformers).
#: ``flash_attn_3_fp8`` is FlashAttention-3's FP8 kernel (``runtime.fp8_attention``) where our processors run the
#: attention (``runtime.rope``), and FlashAttention-3 in bf16 elsewhere in the model.
ATTENTION_KERNELS = {
    "sdpa": "native",
    "sdpa_cudnn": "_native_cudnn",
    "sdpa_flash": "_native_flash",
    "sdpa_efficient": "_native_efficient",
    "sdpa_math": "_native_math",
    "flash_attn": "flash",
    "flash_attn_3": "_flash_3",
    "flash_attn_3_fp8": "_flash_3",
    "sage": "sage",
    "xformers": "xformers",
}
#: the attention kernels that take no attention mask (diffusers raises for a masked call); the families that mask
#: padded text tokens (Chroma, LTX-2's text cross-attention, Ernie-Image, Nucleus-Image, PRX, Ideogram 4, ACE-Step)
#: cannot run them (``flash_attn_3_fp8`` runs masked calls with torch's SDPA where our processors make them)
MASKLESS_ATTENTION_KERNELS = ("sdpa_flash", "flash_attn", "flash_attn_3", "flash_attn_3_fp8", "sage")
#: the attention kernels that run on any device; every other one needs CUDA
PORTABLE_ATTENTION_KERNELS = ("sdpa", "sdpa_math")
QUANTIZE_MODES = ("none", "fp8")
#: the ways diffusers' context parallelism shards one generation's attention over processes: Ulysses (all-to-all of
#: the heads) and ring (key/value blocks passed around; needs a kernel that returns the softmax's log-sum-exp)
PARALLEL_KINDS = ("ulysses", "ring")
#: attention kernel -> the context-parallel kinds diffusers runs it with; kernels not listed cannot run sharded
CONTEXT_PARALLEL_ATTENTION = {
    "sdpa": ("ulysses",),
    "sdpa_cudnn": ("ulysses", "ring"),
    "sdpa_flash": ("ulysses", "ring"),
    "flash_attn": ("ulysses", "ring"),
    "sage": ("ulysses", "ring"),
}

#: option -> (what its error message calls it, its valid values)
CHOICES = {
    "dtype": ("dtype", DTYPES),
    "offload": ("offload mode", OFFLOAD_MODES),
    "lora_mode": ("LoRA mode", LORA_MODES),
    "compile": ("compile mode", COMPILE_MODES),
    "attention": ("attention kernel", tuple(ATTENTION_KERNELS)),
    "quantize": ("quantize mode", QUANTIZE_MODES),
}


class LoadOptionError(ValueError):
    """Load options that cannot be used together or on this device.

    Attributes:
        options (dict): the option(s) at fault -> their values (front ends name them by their own spelling).
        choices (tuple): the valid values when one option is outside its choices; empty otherwise.
    """

    def __init__(self, message: str, options: dict, choices: tuple = ()):
        super().__init__(message)
        self.options = options
        self.choices = choices


def unknown_option(option: str, value) -> LoadOptionError:
    """The error for ``value`` outside ``option``'s choices, naming the valid ones."""
    label, choices = CHOICES[option]
    return LoadOptionError(f"Unknown {label} {value!r}; use one of {', '.join(choices)}.", {option: value}, choices)


def parse_parallel(text: str) -> dict[str, int]:
    """``"ulysses=2"``, ``"ring=2"`` or ``"ulysses=2,ring=2"`` as kind -> degree (``PARALLEL_KINDS`` order, degrees
    above 1 only); ``"none"`` as an empty dict. Raises a :class:`LoadOptionError` for anything else."""
    if text == "none":
        return {}
    degrees = {}
    for part in str(text).split(","):
        kind, separator, degree = part.strip().partition("=")
        if not separator or kind not in PARALLEL_KINDS or kind in degrees or not degree.strip().isdigit():
            raise LoadOptionError(f"parallel={text!r} is not understood; write KIND=N with KIND one of "
                                  f"{', '.join(PARALLEL_KINDS)} (e.g. 'ulysses=2', 'ring=2' or 'ulysses=2,ring=2'), "
                                  "or 'none'.", {"parallel": text})
        degrees[kind] = int(degree)
    if any(degree < 1 for degree in degrees.values()) or all(degree == 1 for degree in degrees.values()):
        raise LoadOptionError(f"parallel={text!r} shards nothing: give a degree of 2 or more (the number of processes "
                              "torchrun starts), or 'none'.", {"parallel": text})
    return {kind: degrees[kind] for kind in PARALLEL_KINDS if degrees.get(kind, 1) > 1}


def parallel_world_size(degrees: dict[str, int]) -> int:
    """The number of processes ``degrees`` (from :func:`parse_parallel`) shard over: the product of the degrees."""
    return math.prod(degrees.values())


def attention_device_problem(kernel: str, device: str) -> str | None:
    """Why the attention ``kernel`` cannot run on ``device``, or None when it can."""
    if kernel not in PORTABLE_ATTENTION_KERNELS and not str(device).startswith("cuda"):
        return f"attention={kernel!r} is a CUDA kernel; on {device} use 'sdpa' or 'sdpa_math'"
    return None


def compile_offload_conflict(compile: str, offload: str) -> str | None:
    """Why ``compile`` cannot go with the CPU offloading ``offload`` (as chosen, not ``auto``), or None: a whole
    compiled denoiser would have to trace the hooks that move its weights during the forward."""
    if compile == "full" and offload not in ("none", "auto"):
        return (f"compile='full' cannot be combined with offload={offload!r} (its hooks move the weights during the "
                "forward, which one compiled graph cannot hold); use compile='regional', which compiles the blocks "
                "that stay on the GPU, or offload='none'")
    return None


def _is_dtype(dtype) -> bool:
    torch = sys.modules.get("torch")  # a torch.dtype can only come from a process that imported torch
    if torch is not None and isinstance(dtype, torch.dtype):
        return True
    return dtype in (None, "auto") or str(dtype).lower() in TORCH_DTYPE_NAMES


@dataclass(frozen=True)
class LoadOptions:
    """How a model id is loaded and run: everything that needs a new pipeline when it changes (LoRAs do not).

    An unset option (None or an empty string) takes its default; any other value outside its choices raises a
    :class:`LoadOptionError` (a ValueError) naming the valid ones, as do the combinations that cannot work, before
    any weights load.

    Args:
        base (str, *optional*): HF repo id, local diffusers folder or single ``.safetensors`` file; defaults to the
            model's base checkpoint.
        device (str, *optional*): ``cuda``, ``cuda:1``, ``cpu``, ``mps``; defaults to CUDA, else MPS, else CPU.
        dtype (str | torch.dtype, *optional*): one of ``DTYPES`` (or a ``TORCH_DTYPE_NAMES`` spelling); defaults to
            ``auto``: fp32 on CPU, bf16 on GPUs that support it, else fp16.
        offload (str, defaults to "none"): one of ``OFFLOAD_MODES``.
        lora_mode (str, *optional*): ``dynamic`` or ``fused``; defaults to the model's registry setting.
        compile (str, defaults to "none"): one of ``COMPILE_MODES``; ``full`` needs offload ``none`` (or ``auto``
            when it chooses ``none``); ``regional`` with offloading compiles the blocks that stay on the GPU.
        attention (str, defaults to "sdpa"): a key of ``ATTENTION_KERNELS``; all but ``sdpa`` and ``sdpa_math``
            need CUDA.
        quantize (str, defaults to "none"): one of ``QUANTIZE_MODES``; ``fp8`` needs an FP8 GPU and offload
            ``none`` or ``auto``.
        parallel (str, defaults to "none"): context parallelism of one generation over the processes ``torchrun``
            starts: ``ulysses=N``, ``ring=N`` or ``ulysses=N,ring=M`` (their product the world size). Each process
            holds the whole pipeline and runs the same call; the denoiser's attention is sharded along the sequence
            (diffusers' ``enable_parallelism``). Needs a model whose denoiser has a context-parallel plan
            (``ModelSpec.context_parallel``), offload ``none`` and a kernel of ``CONTEXT_PARALLEL_ATTENTION``.
        components (str, *optional*): when ``base`` is a single file, the diffusers folder or hub repo id the
            components it lacks come from; defaults to the model's base repo.
        text_encoder_file, text_encoder_2_file, vae_file (str, *optional*): that component from a single
            ``.safetensors`` file as ComfyUI keeps it in ``models/text_encoders`` (``clip``) or ``models/vae`` (see
            ``pipelines/component_files.py``: e.g. FLUX's ``clip_l`` and ``t5xxl``, SDXL's ``clip_l`` and
            ``clip_g``); the rest comes from ``base`` (or ``components``).
    """

    base: str | None = None
    device: str | None = None
    dtype: Any = None
    offload: str = "none"
    lora_mode: str | None = None
    compile: str = "none"
    attention: str = "sdpa"
    quantize: str = "none"
    parallel: str = "none"
    components: str | None = None
    text_encoder_file: str | None = None
    text_encoder_2_file: str | None = None
    vae_file: str | None = None

    def component_files(self) -> dict[str, str]:
        """The components given as files: component -> path (``FILE_COMPONENTS`` order)."""
        return {c: getattr(self, f"{c}_file") for c in FILE_COMPONENTS if getattr(self, f"{c}_file") is not None}

    def __post_init__(self):
        for option in dataclasses.fields(self):
            if getattr(self, option.name) in (None, ""):
                object.__setattr__(self, option.name, option.default)
        if not _is_dtype(self.dtype):
            raise unknown_option("dtype", self.dtype)
        for option in ("offload", "compile", "attention", "quantize"):
            if getattr(self, option) not in CHOICES[option][1]:
                raise unknown_option(option, getattr(self, option))
        if self.quantize == "fp8":
            conflict = fp8_option_conflict(self.offload)
            if conflict:
                raise LoadOptionError(conflict + ".", {"quantize": self.quantize, "offload": self.offload})
        conflict = compile_offload_conflict(self.compile, self.offload)
        if conflict:
            raise LoadOptionError(conflict + ".", {"compile": self.compile, "offload": self.offload})
        if self.lora_mode is not None and self.lora_mode not in LORA_MODES:
            raise unknown_option("lora_mode", self.lora_mode)
        degrees = parse_parallel(self.parallel)
        if degrees:
            object.__setattr__(self, "parallel", ",".join(f"{kind}={degree}" for kind, degree in degrees.items()))
            missing = [kind for kind in degrees if kind not in CONTEXT_PARALLEL_ATTENTION.get(self.attention, ())]
            if missing:
                kernels = [k for k, kinds in CONTEXT_PARALLEL_ATTENTION.items() if all(m in kinds for m in missing)]
                raise LoadOptionError(f"parallel={self.parallel!r}: attention={self.attention!r} cannot run "
                                      f"{' and '.join(missing)} context parallelism; use attention "
                                      f"{', '.join(kernels)}.", {"parallel": self.parallel, "attention": self.attention})
            if self.offload != "none":
                raise LoadOptionError(f"parallel={self.parallel!r} needs offload='none': every process holds the "
                                      "whole pipeline on its own GPU (context parallelism divides the activations, "
                                      "not the weights).", {"parallel": self.parallel, "offload": self.offload})

    def resolve(self, spec: ModelSpec) -> "LoadOptions":
        """These options with every default decided for ``spec``: the device, the torch dtype, the checkpoint
        source as ``base`` (the expanded path, or the model's base) and the LoRA mode.

        Raises a :class:`LoadOptionError` when the device cannot run them (a CUDA-only attention kernel elsewhere,
        FP8 weights without an FP8 GPU)."""
        from .accelerate import resolve_device, resolve_dtype  # accelerate imports this module

        device = resolve_device(self.device)
        if self.parallel != "none":
            from .parallel import process_device

            device = process_device(self.parallel, device, spec.model_id, spec.context_parallel)
        problem = attention_device_problem(self.attention, device)
        if problem:
            raise LoadOptionError(problem + ".", {"attention": self.attention, "device": device})
        problem = fp8_unavailable(device) if self.quantize == "fp8" else None
        if problem:
            raise LoadOptionError(problem + ".", {"quantize": self.quantize, "device": device})
        if self.components is not None and not (self.base and is_single_file_source(self.base)):
            raise LoadOptionError("components applies only to a single-file base (a .safetensors file); a diffusers "
                                  "folder or repo holds every component itself.",
                                  {"components": self.components, "base": self.base})
        components = os.path.expanduser(self.components) if self.components else None
        files = {f"{component}_file": os.path.abspath(os.path.expanduser(path))
                 for component, path in self.component_files().items()}
        for option, path in files.items():
            if not os.path.isfile(path) or not path.endswith(SINGLE_FILE_SUFFIXES):
                raise LoadOptionError(f"{option} {path!r} is not an existing .safetensors file.", {option: path})
        return dataclasses.replace(self, base=os.path.expanduser(self.base) if self.base else spec.base, device=device,
                                   components=components, **files,
                                   dtype=resolve_dtype(self.dtype, device), lora_mode=self.lora_mode or spec.lora_mode)

    def cache_key(self, model_id: str) -> tuple:
        """The key of the pipeline these options load for ``model_id``; equal for spellings that load the same
        pipeline (``dtype`` None or ``auto`` and the dtype it resolves to, a folder and a link to it, an unset LoRA
        mode and the model's)."""
        resolved = self.resolve(get_spec(model_id))
        source = os.path.realpath(resolved.base) if self.base and os.path.exists(resolved.base) else resolved.base
        key = (model_id, source, resolved.device, str(resolved.dtype), resolved.offload, resolved.lora_mode,
               resolved.compile, resolved.attention, resolved.quantize)
        if resolved.parallel != "none":
            key = (*key, ("parallel", resolved.parallel))
        if resolved.components is not None:
            components = resolved.components
            key = (*key, os.path.realpath(components) if os.path.exists(components) else components)
        # each component file by its identity: a file replaced under the same name reloads too
        return (*key, *((component, os.path.realpath(path), (stat := os.stat(path)).st_size, stat.st_mtime_ns)
                        for component, path in resolved.component_files().items()))
