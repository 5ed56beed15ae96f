"""Quantized weights held as plain tensors, so that offloading can stream them.

torchao's FP8 weights are tensor subclasses wrapping their float8 values and float32 scales. diffusers' group
offloading moved them between the host and an H100 and failed (``_apply(): Couldn't swap Linear.weight``; in the tiny
model ``Attempted to set the storage of a tensor on device "cuda:0" to a storage on different device "cpu"``). A layer
whose weights stream therefore holds the wrapped tensors themselves as plain parameters, which offloading moves like
any bf16 weight, and its ``weight`` is the quantized tensor rebuilt around them at each access (a torch
parametrization; the subclass's own ``__tensor_unflatten__``, no copy). The stored values are the same storage either
way, so an in-place rebuild after a LoRA change (``quantize.requantize_``) writes through. Layers that stay on the GPU
go back to holding the quantized tensor itself, which is what ``torch.compile`` traces.

Imported only when a quantized model is offloaded (it imports torch).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from .quantize import is_quantized


class QuantizedFromPlain(torch.nn.Module):
    """The parametrization: the wrapped tensors of one quantized weight in, that quantized weight out."""

    def __init__(self, weight):
        super().__init__()
        self.names, self.attributes = weight.__tensor_flatten__()
        self.subclass, self.size, self.stride = type(weight), weight.size(), weight.stride()

    def right_inverse(self, weight):
        return tuple(getattr(weight, name) for name in self.names)

    def forward(self, *tensors):
        return self.subclass.__tensor_unflatten__(dict(zip(self.names, tensors)), self.attributes, self.size,
                                                  self.stride)


def _holds_plain(layer) -> bool:
    return parametrize.is_parametrized(layer, "weight") and isinstance(layer.parametrizations.weight[0],
                                                                        QuantizedFromPlain)


def hold_as_plain_tensors(module) -> int:
    """Make every Linear in ``module`` whose weight is a torchao quantized tensor hold that tensor's wrapped tensors as
    plain parameters instead (see the module docstring). Returns how many layers changed."""
    layers = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear) and not _holds_plain(layer)
              and is_quantized(layer.weight)]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", QuantizedFromPlain(layer.weight), unsafe=True)
    return len(layers)


def hold_as_quantized_tensors(module) -> int:
    """Undo :func:`hold_as_plain_tensors` in ``module``: each such layer holds its quantized tensor (rebuilt around
    its plain tensors where they now are) as its ``weight`` parameter again. Returns how many layers changed."""
    layers = [layer for layer in module.modules() if _holds_plain(layer)]
    for layer in layers:
        weight = layer.weight
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return len(layers)
