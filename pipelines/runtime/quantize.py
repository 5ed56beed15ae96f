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
  otherwise it is copied to pinned host memory, and each change streams it back over PCIe. Each layer is rebuilt by
  one fused kernel (:func:`fp8_rows_`, compiled on CUDA), which gives torchao's quantize's bytes; the first rebuild of
  each layer shape in a process checks that against torchao, and a shape where they differ keeps torchao's quantize.
* ``lora_mode="dynamic"`` (the lean mode): LoRAs run next to the FP8 layers as live PEFT adapters in the model dtype,
  with no host copy. Merging a small delta into weights that are already FP8 would round most of it away, so LoKr
  and full-layer patches, which must be merged, are refused in this mode.

With ``offload="auto"``, weights that do not fit the GPU in the model dtype are quantized on the host first (each
layer computed on the GPU), and auto plans with their FP8 bytes: placed whole when they fit, else as many blocks kept
on the GPU as fit and the rest streamed block by block, their FP8 values and scales copied as they are
(``streaming``).

Eager, torchao's per-activation quantization kernels are slow (a FLUX forward with adapters was 2.26x slower than
bf16 on an H100); use ``compile="regional"`` with FP8.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

from . import eager_rounding

logger = logging.getLogger(__name__)

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
        return (f"quantize='fp8' cannot be combined with offload={offload!r}; use offload='none', or 'auto', which "
                "quantizes on the host when the bf16 weights do not fit the GPU, then places the FP8 weights whole "
                "when they fit, else keeps as many FP8 blocks on the GPU as fit and streams the rest")
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
    """torchao's FP8 recipe used here: float8 weights with one scale per row, activations quantized per row.

    Without torchao's process-wide settings (``set_inductor_config``), which every quantize (each LoRA change's too)
    would apply again: TF32 for every float32 matmul in the process (other pipelines' and the LoRA merges' included),
    and Inductor's coordinate-descent tuning over every kernel of every later compile, which made the first compile
    of the FP8 blocks take minutes."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def quantize_denoiser_fp8(denoiser, keep_master: bool = False, master: str = "auto", device=None) -> int:
    """Give the block Linears of ``denoiser`` float8 weights in place; returns how many layers were quantized.

    ``keep_master`` keeps each layer's current weight (see :func:`master_weight`), which fused LoRA mode re-quantizes
    from; ``master`` says where: ``gpu`` (the weight itself, no copy), ``host`` (pinned memory) or ``auto`` (see
    :func:`master_place`). ``device``: see :func:`quantize_block_linears`."""
    return quantize_block_linears(denoiser, fp8_config(), keep_master, master, device)


def quantize_block_linears(denoiser, config, keep_master: bool = False, master: str = "auto", device=None) -> int:
    """Quantize the block Linears of ``denoiser`` with the torchao ``config``, one layer at a time (so host masters
    never need a second full copy of the model).

    ``device`` is where the quantized values are computed, now and at every LoRA change (:func:`rebuild_device`); a
    weight still on the host (a model quantized before it is offloaded) goes there for its quantization and its
    quantized tensor comes back, so that its bytes are those a weight on ``device`` gets. Default: where each
    weight is."""
    import torch
    from torchao.quantization import quantize_

    names = block_linear_names(denoiser)
    if keep_master:
        master = master_place(denoiser, names) if master == "auto" else master
        if master not in ("gpu", "host"):
            raise ValueError(f"Unknown master place {master!r}; use one of {', '.join(MASTER_PLACES)}.")
    pin = torch.cuda.is_available()
    for name in names:
        module = denoiser.get_submodule(name)
        weight = module.weight.detach()
        if keep_master and master == "gpu":
            setattr(module, _MASTER, weight)
        elif keep_master:
            setattr(module, _MASTER, _host_copy(weight, pin))
            pin = pin and getattr(module, _MASTER).is_pinned()  # once the system refuses, stop asking
        target = weight.device if device is None else torch.device(device)
        from_host = weight.device.type == "cpu" and target.type != "cpu"
        if from_host:
            module.weight = torch.nn.Parameter(weight.to(target), requires_grad=False)
        quantize_(module, config)
        if from_host:
            module.weight = torch.nn.Parameter(module.weight.to(weight.device), requires_grad=False)
        if _is_row_fp8(module.weight):
            module.forward = types.MethodType(fp8_linear_forward, module)
        setattr(module, _CONFIG, config)
        setattr(module, _DEVICE, target)
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the per-layer scratch: offload="auto" measures what this process holds after it
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


#: attributes a quantized Linear carries: its master weight (fused LoRA mode), the torchao config it was made with and
#: the device its quantized values are computed on
_MASTER, _CONFIG, _DEVICE = "aitk_master_weight", "aitk_quantize_config", "aitk_quantize_device"


def master_weight(module):
    """The copy of a quantized layer's original weight kept for re-quantizing (on the GPU or the host), or None."""
    return getattr(module, _MASTER, None)


def rebuild_device(module):
    """The device a quantized layer's values are (re)computed on: the one it was quantized on, which for a layer
    whose weight is offloaded to the host is the GPU it runs on."""
    return getattr(module, _DEVICE, None) or module.weight.device


def _host_copy(weight, pin: bool):
    """``weight`` in host memory, pinned when ``pin`` (the re-quantizing copies then run at full PCIe speed) and the
    system allows it; a weight already on the host is not copied again unless it must be pinned."""
    from .host_memory import host_tensor

    if weight.device.type == "cpu" and not pin:
        return weight
    copy = host_tensor(weight.shape, weight.dtype, pin, "the remaining FP8 master weights stay in plain memory, and "
                                                         "LoRA changes in the FP8 fast mode copy them back more slowly")
    if copy.is_pinned() or weight.device.type != "cpu":
        copy.copy_(weight)
        return copy
    return weight


def requantize_(module, merged, dtype) -> None:
    """Set the values of ``module``'s quantized weight to the quantization of ``merged`` (float32, same shape) rounded
    to ``dtype`` (the model dtype), in place: the quantized tensors keep their storage, so compiled graphs that read
    them stay valid. Per-row FP8 weights are rebuilt by :func:`fp8_rows_` (one fused kernel on CUDA), the rest through
    torchao's own quantize with the layer's config."""
    weight = module.weight
    if _is_row_fp8(weight) and _fused_rebuild_(module, merged, dtype):
        return
    _copy_quantized_(weight, _torchao_quantized(module, merged.to(dtype)))


def _torchao_quantized(module, weight):
    """The quantized tensor torchao makes of ``weight`` with ``module``'s config (on a scratch layer)."""
    import torch
    from torchao.quantization import quantize_

    scratch = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    scratch.weight = torch.nn.Parameter(weight, requires_grad=False)
    quantize_(scratch, getattr(module, _CONFIG))
    return scratch.weight


# ---------------------------------------------------------------------------------------------------------------- fused FP8 rebuild
def fp8_rows_(merged, dtype, qdata, scale) -> None:
    """Write the per-row float8 quantization of ``merged`` rounded to ``dtype`` into ``qdata`` (float8, same shape)
    and ``scale`` (float32, one a row), in place.

    The same operations, in the same dtypes, as torchao's per-row ``Float8Tensor.from_hp`` (:func:`_per_row_fp8`).
    Eager, it runs those operations as they are; compiled on CUDA (``eager_rounding.compiled``) it is one fused pass
    over the weight."""
    rows, row_scale = _per_row_fp8(merged.to(dtype), qdata.dtype)
    qdata.copy_(rows)
    scale.copy_(row_scale)


def _per_row_fp8(values, float8_dtype, lower=None, upper=None) -> tuple:
    """torchao's per-row float8 quantization of the 2-D ``values`` (its plain-torch kernel): each row's largest
    magnitude (clamped to ``lower``/``upper`` where given) divided by the float8 maximum, in ``values``' dtype, then
    float32, is the row's scale; the values in float32 divided by it and clamped to the float8 range are cast to
    float8. Returns (float8 values, float32 scales, one a row)."""
    import torch

    quant_max = torch.finfo(float8_dtype).max
    largest = values.abs().amax(dim=1, keepdim=True)
    if lower is not None or upper is not None:
        largest = largest.clamp(min=lower, max=upper)
    scale = (largest / quant_max).to(torch.float32)
    return (values.to(torch.float32) / scale).clamp(min=-quant_max, max=quant_max).to(float8_dtype), scale


#: (device type, shape, float8 dtype, model dtype) -> whether the fused rebuild gave torchao's bytes on first use
_FUSED_CHECKED: dict[tuple, bool] = {}


def _is_row_fp8(weight) -> bool:
    import torch

    quantized = getattr(weight, "qdata", None)
    scale = getattr(weight, "scale", None)
    return (type(weight).__name__ == "Float8Tensor" and quantized is not None and quantized.dim() == 2
            and scale is not None and scale.dtype == torch.float32 and tuple(scale.shape) == (quantized.shape[0], 1)
            and list(getattr(weight, "block_size", None) or ()) == [1, quantized.shape[1]])


def _fused_rebuild_(module, merged, dtype) -> bool:
    """Rebuild a per-row FP8 weight with :func:`fp8_rows_` (compiled on CUDA); False where it is not used. The first
    time a layer shape is seen in this process the result is compared, byte for byte, with torchao's quantize of the
    same weight; a shape where they differ (another torchao kernel, another rounding) keeps torchao's path."""
    weight = module.weight
    rebuild = eager_rounding.compiled(fp8_rows_, merged.device.type) or fp8_rows_
    key = (merged.device.type, tuple(merged.shape), weight.qdata.dtype, dtype)
    if key not in _FUSED_CHECKED:
        reference = _torchao_quantized(module, merged.to(dtype))
        qdata, scale = _scratch_like(weight, merged.device)
        try:
            rebuild(merged, dtype, qdata, scale)
        except Exception as error:  # a compile that fails here (a Triton or compiler problem) leaves it eager
            logger.warning("FP8 rebuild: compiling the fused kernel failed (%s); it runs eager.", error)
            eager_rounding.stop_compiling(fp8_rows_, merged.device.type)
            rebuild = fp8_rows_
            rebuild(merged, dtype, qdata, scale)
        same = (eager_rounding.same_bytes(qdata, reference.qdata)
                and eager_rounding.same_bytes(scale, reference.scale.reshape(scale.shape)))
        _FUSED_CHECKED[key] = same
        if not same:
            logger.warning("FP8 rebuild: the fused kernel does not give torchao's bytes for %s weights of shape %s on "
                           "%s; that shape uses torchao's quantize (slower strength changes).", dtype,
                           tuple(merged.shape), merged.device.type)
        _copy_quantized_(weight, reference)
        return True
    if not _FUSED_CHECKED[key]:
        return False
    if weight.qdata.device == merged.device:
        rebuild(merged, dtype, weight.qdata, weight.scale)
    else:  # a streamed layer between forwards: its values are in host memory, the rebuild runs where merged is
        qdata, scale = _scratch_like(weight, merged.device)
        rebuild(merged, dtype, qdata, scale)
        weight.qdata.copy_(qdata)
        weight.scale.copy_(scale)
    return True


# ---------------------------------------------------------------------------------------------------------------- eager FP8 layers
#: (device type, input features, output features, float8 dtype, input dtype, bias) -> how
#: :func:`fp8_linear_forward` runs that layer shape, decided on first use: "fused" (the direct path with the input's
#: quantization compiled as one kernel), "eager" (the direct path, eager quantization) or False (torchao's dispatch)
_DIRECT_CHECKED: dict[tuple, object] = {}


def fp8_linear_forward(layer, x):
    """The forward of a per-row FP8 Linear. Outside ``torch.compile`` it runs the operations torchao runs for it (the
    input's per-row scale and float8 cast, then ``torch._scaled_mm``) directly: torchao's tensor-subclass dispatch
    around them made each call wait on the host (about 325 us a call on an H100 against 105 us for the bf16 layer).
    On CUDA the input's quantization is one compiled kernel (:func:`_per_row_fp8` with eager rounding) instead of one
    kernel per operation. Compiled graphs, and weights no longer per-row FP8, go through torchao (``F.linear``). The
    first call of each layer shape compares the direct output with torchao's bit for bit: with the compiled
    quantization, else the eager one, else that shape keeps torchao's path (another torchao kernel)."""
    import torch
    import torch.nn.functional as F

    weight, bias = layer.weight, layer.bias
    if torch.compiler.is_compiling() or not _is_row_fp8(weight):
        return F.linear(x, weight, bias)
    key = (x.device.type, weight.qdata.shape[1], weight.qdata.shape[0], weight.qdata.dtype, x.dtype, bias is not None)
    mode = _DIRECT_CHECKED.get(key)
    if mode is None:
        reference = F.linear(x, weight, bias)
        mode = _DIRECT_CHECKED[key] = _direct_mode(x, weight, bias, reference)
        if not mode:
            logger.info("FP8 layers of shape %s on %s run through torchao's dispatch: the direct path does not give "
                        "its output bit for bit there.", key[1:3], key[0])
        return reference
    return _fp8_linear_direct(x, weight, bias, mode == "fused") if mode else F.linear(x, weight, bias)


def _direct_mode(x, weight, bias, reference):
    """The first :data:`_DIRECT_CHECKED` mode, "fused" then "eager", whose output is ``reference`` bit for bit;
    False where neither is."""
    for mode in ("fused", "eager"):
        if mode == "fused" and not _activation_rows_compile(x, weight.act_quant_kwargs):
            continue
        try:
            candidate = _fp8_linear_direct(x, weight, bias, mode == "fused")
        except RuntimeError:  # a shape or layout torch._scaled_mm refuses where torchao's own path pads or converts
            return False
        if eager_rounding.same_bytes(candidate, reference):
            return mode
    return False


def _activation_rows_compile(x, settings) -> bool:
    """Whether the compiled input quantization runs for ``x`` (the first call compiles it); where it cannot (a Triton
    or compiler problem), eager quantization from then on, with a warning."""
    compiled = eager_rounding.compiled(_per_row_fp8, x.device.type)
    if compiled is None:
        return False
    try:
        compiled(x.reshape(-1, x.shape[-1]), settings.float8_dtype, settings.hp_value_lb, settings.hp_value_ub)
    except Exception as error:
        logger.warning("FP8 layers: compiling the input's quantization failed (%s); it runs eager.", error)
        eager_rounding.stop_compiling(_per_row_fp8, x.device.type)
        for key in [key for key, mode in _DIRECT_CHECKED.items() if mode == "fused" and key[0] == x.device.type]:
            del _DIRECT_CHECKED[key]  # checked again, with the eager quantization
        return False
    return True


def _fp8_linear_direct(x, weight, bias, fused_quantization: bool = False):
    """torchao's per-row FP8 linear (its plain-torch kernel), the same operations in the same dtypes, without its
    tensor subclass: the input's rows quantized as torchao quantizes them (:func:`_per_row_fp8`, compiled where
    ``fused_quantization``), multiplied by the weight's float8 rows with both scales."""
    import torch

    settings = weight.act_quant_kwargs
    quantize_rows = eager_rounding.compiled(_per_row_fp8, x.device.type) if fused_quantization else _per_row_fp8
    quantized, scale = quantize_rows(x.reshape(-1, x.shape[-1]), settings.float8_dtype, settings.hp_value_lb,
                                     settings.hp_value_ub)
    fp32_with_bias = x.dtype == torch.float32 and bias is not None  # _scaled_mm takes no bias with a float32 output
    out = torch._scaled_mm(quantized, weight.qdata.t(), scale_a=scale, scale_b=weight.scale.t(),
                           bias=None if fp32_with_bias else bias, out_dtype=x.dtype,
                           use_fast_accum=weight.mm_config.use_fast_accum)
    if fp32_with_bias:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _scratch_like(weight, device) -> tuple:
    """Empty float8 values and scales shaped as a per-row FP8 ``weight``'s, on ``device``."""
    import torch

    return torch.empty_like(weight.qdata, device=device), torch.empty_like(weight.scale, device=device)


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
