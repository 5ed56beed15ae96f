"""Small functions compiled by Inductor so that they round exactly as they do eager, for the eager paths that replace
a chain of elementwise kernels with one (the fused rotary embedding, the FP8 rebuild and input quantization). Each
user compares the compiled result with the eager one, byte for byte (:func:`same_bytes`), before relying on it."""

from __future__ import annotations

import importlib.util

#: Inductor settings that keep eager PyTorch's rounding (each intermediate rounded to its dtype, IEEE division, no
#: fused multiply-add that eager does not do); the names present in the running torch are used
_EAGER_NUMERICS = ("emulate_precision_casts", "eager_numerics.division_rounding", "emulate_divison_rounding")

#: (function, device type) -> the function compiled for that device; None where it does not compile (off CUDA, no
#: Triton, or a compile that failed: :func:`stop_compiling`)
_COMPILED: dict[tuple, object] = {}


def compiled(function, device_type: str):
    """``function`` compiled once per process for ``device_type`` with eager rounding (dynamic shapes: one graph for
    every shape, kept in the on-disk compile cache); None off CUDA and where it cannot compile (no Triton). The first
    call of the result compiles."""
    key = (function, device_type)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(function) if device_type == "cuda" else None
    return _COMPILED[key]


def stop_compiling(function, device_type: str) -> None:
    """After a compile of ``function`` failed (a Triton or compiler problem): eager from now on in this process."""
    _COMPILED[(function, device_type)] = None


def same_bytes(candidate, reference) -> bool:
    """Whether two tensors hold the same values bit for bit (shape, dtype and bytes; NaNs compare too): the check
    that lets a kernel compiled with eager rounding stand in for the eager operations."""
    import torch

    return (candidate.shape == reference.shape and candidate.dtype == reference.dtype
            and torch.equal(candidate.contiguous().view(torch.uint8), reference.contiguous().view(torch.uint8)))


def _compile(function):
    if importlib.util.find_spec("triton") is None:
        return None
    import torch
    from torch._inductor import config

    from .accelerate import use_persistent_compile_cache

    use_persistent_compile_cache()
    known = config.get_config_copy()
    options = {name: True for name in _EAGER_NUMERICS if name in known}
    return torch.compile(function, dynamic=True, fullgraph=True, options=options)
