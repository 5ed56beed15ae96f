"""Opt-in FP8 weights for the denoiser (torchao): about half the transformer's GPU memory, at a cost in accuracy
measured in BENCHMARKS.md. Off by default because it changes the numbers ai-toolkit's previews were made with.

The Linear layers inside the denoiser's repeated transformer blocks get float8 weights with one scale per row, and
their inputs are quantized on the fly (torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow)``). Embedders,
norms and the output projection stay in the model dtype. LoRAs go with FP8 weights in one of two ways:

* ``lora_mode="fused"`` (the fast mode): every LoRA is merged into the model-dtype weights first, exactly as in bf16
  fused mode, and the merged weight is then quantized; each quantized layer's original weights (its *master*)
  are kept so that a strength change or a LoRA switch re-quantizes ``master + sum(strength * delta)`` into the same
  FP8 tensors in place (no recompile). The master stays on the GPU where it is (no copy) when the card keeps
  ``GPU_MASTER_FREE_FRACTION`` of its memory free beside it, which makes a strength change a GPU-only rebuild;
  otherwise it is copied to pinned host memory, and each change streams it back over PCIe.
* ``lora_mode="dynamic"`` (the lean mode): LoRAs run next to the FP8 layers as live PEFT adapters in the model dtype,
  with no host copy. Merging a small delta into weights that are already FP8 would round most of it away, so LoKr
  and full-layer patches, which must be merged, are refused in this mode.

Eager, torchao's per-activation quantization kernels are slow (a FLUX forward with adapters was 2.26x slower than
bf16 on an H100); use ``compile="regional"`` with FP8.
"""

from __future__ import annotations

import importlib.util
import sys

#: float8 matmuls need both dimensions of a weight to be multiples of 16
_FP8_ALIGNMENT = 16
#: the share of the card's memory that must stay free, beside the FP8 weights and the master, for activations, the
#: VAE decode and the other components, before fused mode keeps its master weights on the GPU
GPU_MASTER_FREE_FRACTION = 0.25
MASTER_PLACES = ("auto", "gpu", "host")


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


def fp8_option_conflict(offload: str) -> str | None:
    """Why FP8 weights cannot go with these load options, or None."""
    if offload not in ("none", "auto"):
        return (f"FP8 weights stay on the GPU, so quantize='fp8' cannot be combined with offload={offload!r}; "
                "use offload='none' (or 'auto', which then keeps everything on the GPU)")
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


def fp8_config():
    """torchao's FP8 recipe used here: float8 weights with one scale per row, activations quantized per row."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_denoiser_fp8(denoiser, keep_master: bool = False, master: str = "auto") -> int:
    """Give the block Linears of ``denoiser`` float8 weights in place; returns how many layers were quantized.

    ``keep_master`` keeps each layer's current weight (see :func:`master_weight`), which fused LoRA mode re-quantizes
    from; ``master`` says where: ``gpu`` (the weight itself, no copy), ``host`` (pinned memory) or ``auto`` (see
    :func:`master_place`)."""
    return quantize_block_linears(denoiser, fp8_config(), keep_master, master)


def quantize_block_linears(denoiser, config, keep_master: bool = False, master: str = "auto") -> int:
    """Quantize the block Linears of ``denoiser`` with the torchao ``config``, one layer at a time (so host masters
    never need a second full copy of the model)."""
    from torchao.quantization import quantize_

    names = block_linear_names(denoiser)
    if keep_master:
        master = master_place(denoiser, names) if master == "auto" else master
        if master not in ("gpu", "host"):
            raise ValueError(f"Unknown master place {master!r}; use one of {', '.join(MASTER_PLACES)}.")
    for name in names:
        module = denoiser.get_submodule(name)
        if keep_master:
            weight = module.weight.detach()
            setattr(module, _MASTER, weight if master == "gpu" else _host_copy(weight))
        quantize_(module, config)
        setattr(module, _CONFIG, config)
    return len(names)


def master_place(denoiser, names: list[str]) -> str:
    """``gpu`` when the card keeps ``GPU_MASTER_FREE_FRACTION`` of its memory free after the FP8 copies of the
    ``names`` layers are made beside their kept weights, else ``host``."""
    import torch

    weights = [denoiser.get_submodule(name).weight for name in names]
    device = weights[0].device if weights else torch.device("cpu")
    if device.type != "cuda":
        return "host"
    free, total = torch.cuda.mem_get_info(device)
    fp8_bytes = sum(w.numel() + 4 * w.shape[0] for w in weights)  # one byte a value, one float32 scale a row
    return "gpu" if free - fp8_bytes >= GPU_MASTER_FREE_FRACTION * total else "host"


#: attributes a quantized Linear carries: its master weight (fused LoRA mode) and the torchao config it was made with
_MASTER, _CONFIG = "aitk_master_weight", "aitk_quantize_config"


def master_weight(module):
    """The copy of a quantized layer's original weight kept for re-quantizing (on the GPU or the host), or None."""
    return getattr(module, _MASTER, None)


def _host_copy(weight):
    import torch

    pin = weight.device.type == "cuda"  # pinned memory: the re-quantizing copies back run at full PCIe speed
    copy = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=pin)
    copy.copy_(weight)
    return copy


def requantize_(module, weight) -> None:
    """Set the values of ``module``'s quantized weight to the quantization of ``weight`` (model dtype, same shape),
    in place: the quantized tensors keep their storage, so compiled graphs that read them stay valid."""
    import torch
    from torchao.quantization import quantize_

    scratch = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    scratch.weight = torch.nn.Parameter(weight, requires_grad=False)
    quantize_(scratch, getattr(module, _CONFIG))
    _copy_quantized_(module.weight, scratch.weight)


def _copy_quantized_(target, source) -> None:
    names, _ = target.__tensor_flatten__()
    for name in names:
        inner, new = getattr(target, name), getattr(source, name)
        if inner is None:
            continue
        if hasattr(inner, "__tensor_flatten__"):
            _copy_quantized_(inner, new)
        else:
            inner.copy_(new)


def is_quantized(weight) -> bool:
    """Whether ``weight`` is a torchao quantized tensor (whose values cannot be edited in place)."""
    torchao_utils = sys.modules.get("torchao.utils")
    base = getattr(torchao_utils, "TorchAOBaseTensor", None)
    return base is not None and isinstance(weight, base)
