"""FlashAttention-3's FP8 forward as an attention kernel: ``attention="flash_attn_3_fp8"``, for the FP8 fast mode.

Query, key and value are each rounded to float8 e4m3 with one scale per (image, key/value head): that head's largest
magnitude maps to e4m3's largest, 448. The keys are centred first (each head's mean key over the tokens taken away,
as SageAttention does): that shifts every score of a query by the same amount, which the softmax ignores, so the
result is unchanged while the bits go to what tells the keys apart. FlashAttention-3 takes the scales into the
kernel, multiplies in FP8 on Hopper's tensor cores (the softmax probabilities rounded to e4m3 too) and returns bf16.
Three mantissa bits make this lossy, a few percent of relative L2 per attention call (BENCHMARKS.md measures it per
family): like FP8 weights, a speed option, never for parity with ai-toolkit's previews.
"""

from __future__ import annotations

import torch
from diffusers.models import attention_dispatch

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
#: the smallest scale kept, so that an all-zero head quantizes to zeros instead of dividing by zero
_SMALLEST_SCALE = 2.0 ** -100


def quantize_per_head(tensor: torch.Tensor, scale_heads: int, centre: bool = False):
    """``tensor`` (batch, tokens, heads, head dim) in e4m3, and the float32 (batch, ``scale_heads``) scales that give
    it back (value = e4m3 x scale); heads share a scale in groups of ``heads // scale_heads``, as FlashAttention-3
    takes one scale per key/value head for the query too. ``centre`` first takes each head's mean over the tokens
    away."""
    grouped = tensor.unflatten(2, (scale_heads, -1))
    if centre:  # in float32
        grouped = grouped - grouped.mean(dim=1, keepdim=True, dtype=torch.float32)
    # the largest magnitude in one pass, exact in any dtype; the division in float32 (type promotion), and no other
    # full-size copy where attention runs eager
    largest = torch.linalg.vector_norm(grouped, ord=float("inf"), dim=(1, 3, 4)).float()
    scale = (largest / E4M3_MAX).clamp(min=_SMALLEST_SCALE)
    quantized = (grouped / scale[:, None, :, None, None]).to(torch.float8_e4m3fn).flatten(2, 3)
    return quantized, scale


def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None):
    """Attention of (batch, tokens, heads, head dim) ``query``, ``key`` and ``value`` (bf16 or fp16) by
    FlashAttention-3's FP8 kernel, returned in bf16, same layout; ``scale`` multiplies the query-key products (default
    1/sqrt(head dim)). Needs FlashAttention-3 set up for diffusers (``accelerate.use_fa3_fwd_if_needed``)."""
    head_dim = query.shape[-1]
    padding = -head_dim % 16
    if padding:  # the FP8 kernel takes head dims in multiples of 16; zero columns change no score and no output
        scale = head_dim ** -0.5 if scale is None else scale
        query, key, value = (torch.nn.functional.pad(t, (0, padding)) for t in (query, key, value))
    scale_heads = key.shape[2]
    query, query_scale = quantize_per_head(query, scale_heads)
    key, key_scale = quantize_per_head(key, scale_heads, centre=True)
    value, value_scale = quantize_per_head(value, scale_heads)
    out = attention_dispatch.flash_attn_3_func(query, key, value, softmax_scale=scale, q_descale=query_scale,
                                               k_descale=key_scale, v_descale=value_scale)
    out = out[0] if isinstance(out, tuple) else out  # FlashAttention-3's beta releases also return the log-sum-exp
    return out[..., :head_dim] if padding else out
