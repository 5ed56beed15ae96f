"""Opt-in FP8 weights for the denoiser (torchao): about half the transformer's GPU memory, at a cost in accuracy
measured in BENCHMARKS.md. Off by default because it changes the numbers ai-toolkit's previews were made with. Not a
speed mode without compile: eager, the per-activation quantization kernels made a FLUX forward 2.26x slower on an H100.

The Linear layers inside the denoiser's repeated transformer blocks get float8 weights with one scale per row, and
their inputs are quantized on the fly (torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow)``). Embedders,
norms and the output projection stay in the model dtype. LoRAs run next to the FP8 layers as live PEFT adapters in
the model dtype: merging a small LoRA delta into FP8 weights would round most of it away.
"""

from __future__ import annotations

import importlib.util
import sys

QUANTIZE_MODES = ("none", "fp8")
#: float8 matmuls need both dimensions of a weight to be multiples of 16
_FP8_ALIGNMENT = 16


def fp8_unavailable(device: str) -> str | None:
    """Why FP8 weights cannot be used on ``device``, or None when they can."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return f"FP8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell), not {device!r}"
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < (8, 9):
        name = torch.cuda.get_device_name(torch.device(device))
        return f"FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell); {name} has {capability[0]}.{capability[1]}"
    if importlib.util.find_spec("torchao") is None:
        return "FP8 needs torchao: pip install torchao (a build matching your torch version)"
    return None


def effective_lora_mode(quantize: str | None, lora_mode: str | None, default: str) -> str:
    """The LoRA mode a pipeline loads with: FP8 weights take LoRAs as live adapters, else the asked or default one."""
    return "dynamic" if quantize == "fp8" else lora_mode or default


def fp8_option_conflict(offload: str, lora_mode: str | None) -> str | None:
    """Why FP8 weights cannot go with these load options, or None."""
    if offload != "none":
        return (f"FP8 weights stay on the GPU, so quantize='fp8' cannot be combined with offload={offload!r}; "
                "use offload='none'")
    if lora_mode == "fused":
        return ("with FP8 weights LoRAs run as live adapters (merging a LoRA into FP8 weights would round most of it "
                "away), so quantize='fp8' cannot be combined with lora_mode='fused'; use lora_mode='dynamic'")
    return None


def block_linear_names(denoiser) -> list[str]:
    """Names of the Linear layers inside the denoiser's repeated blocks whose shapes float8 matmuls accept."""
    import torch

    block_classes = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if not block_classes:
        raise ValueError(f"{type(denoiser).__name__} declares no repeated transformer blocks, so quantize='fp8' has "
                         "nothing to quantize; use quantize='none'.")
    blocks = [name for name, module in denoiser.named_modules() if type(module).__name__ in block_classes]
    names = []
    for name, module in denoiser.named_modules():
        if (isinstance(module, torch.nn.Linear) and any(name.startswith(block + ".") for block in blocks)
                and module.in_features % _FP8_ALIGNMENT == 0 and module.out_features % _FP8_ALIGNMENT == 0):
            names.append(name)
    return names


def quantize_denoiser_fp8(denoiser) -> int:
    """Give the block Linears of ``denoiser`` float8 weights in place; returns how many layers were quantized."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    targets = set(block_linear_names(denoiser))
    quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in targets)
    return len(targets)


def is_quantized(weight) -> bool:
    """Whether ``weight`` is a torchao quantized tensor (whose values cannot be edited in place)."""
    torchao_utils = sys.modules.get("torchao.utils")
    base = getattr(torchao_utils, "TorchAOBaseTensor", None)
    return base is not None and isinstance(weight, base)
