"""FLUX's rotary embedding in one kernel when it runs eager on CUDA, with diffusers' rounding.

diffusers rotates each query and key of FLUX-style attention with about ten elementwise kernels (the pairs swapped and
negated, both tensors cast to float32, two products, their sum, the cast back), each reading and writing the whole
tensor. Compiled by Inductor with eager rounding (every intermediate rounded to its dtype, no fused multiply-add:
``accelerate.compile_with_eager_rounding``), the same function is one kernel that reads the input once. The first
call of each input shape compares its output with diffusers' eager one byte for byte; a shape where they differ, and
any run where it cannot compile, keeps diffusers' function. Inside ``torch.compile`` (the regional compile) diffusers'
function is traced as before, so compiled graphs do not change.

:func:`use_fused_rope` gives a denoiser's attention layers :class:`FluxAttnProcessorFusedRope` where they run
diffusers' ``FluxAttnProcessor`` (FLUX.1, Flex, Kontext, Chroma).
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

logger = logging.getLogger(__name__)

#: device type -> the compiled rotation (None: it cannot compile there); only CUDA compiles
_COMPILED: dict[str, object] = {}
#: (device, shape, strides, input dtype, cos dtype) -> whether the compiled rotation gave diffusers' bytes
_CHECKED: dict[tuple, bool] = {}


def _rotate(x, cos, sin):
    """diffusers' rotation of ``x`` (batch, tokens, heads, head dim) by the interleaved-pair frequencies
    ``(cos, sin)`` (tokens, head dim)."""
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1)


def _compiled(device_type: str):
    if device_type not in _COMPILED:
        from .accelerate import compile_with_eager_rounding

        _COMPILED[device_type] = compile_with_eager_rounding(_rotate) if device_type == "cuda" else None
    return _COMPILED[device_type]


def rotary(x, frequencies):
    """``x`` (batch, tokens, heads, head dim) rotated by ``frequencies`` = (cos, sin) as diffusers' FLUX attention
    rotates it (``apply_rotary_emb(x, frequencies, sequence_dim=1)``), bit for bit; one compiled kernel where
    checked."""
    cos, sin = frequencies
    compiled = None if torch.compiler.is_compiling() else _compiled(x.device.type)
    if compiled is None:
        return _rotate(x, cos, sin)
    key = (str(x.device), tuple(x.shape), x.stride(), x.dtype, cos.dtype)
    fused = _CHECKED.get(key)
    if fused is None:
        expected = _rotate(x, cos, sin)
        try:
            candidate = compiled(x, cos, sin)
        except Exception as error:  # a Triton or compiler problem: diffusers' function from now on
            logger.warning("The fused rotary embedding could not compile (%s); attention applies diffusers' "
                           "eager one.", error)
            _COMPILED[x.device.type] = None
            return expected
        fused = candidate.shape == expected.shape and candidate.dtype == expected.dtype and torch.equal(
            candidate.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))
        _CHECKED[key] = fused
        if not fused:
            logger.info("Rotary embeddings of shape %s on %s run diffusers' eager function: the fused kernel does not "
                        "give its output bit for bit there.", key[1], key[0])
        return expected
    return compiled(x, cos, sin) if fused else _rotate(x, cos, sin)


class FluxAttnProcessorFusedRope(FluxAttnProcessor):
    """diffusers' FLUX attention, the same operations in the same order, with the rotary embedding applied by
    :func:`rotary`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(projected):
            return projected.unflatten(-1, (-1, attn.head_dim))

        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(heads(text_query)), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(text_key)), key], dim=1)
            value = torch.cat([heads(text_value), value], dim=1)
        if image_rotary_emb is not None:
            query, key = rotary(query, image_rotary_emb), rotary(key, image_rotary_emb)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        text_out, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(text_out.contiguous())


def use_fused_rope(denoisers: list) -> int:
    """Give every attention layer of ``denoisers`` that runs diffusers' ``FluxAttnProcessor`` the fused-rotary one,
    keeping its attention backend and parallel settings; returns how many layers changed."""
    changed = 0
    for denoiser in denoisers:
        for module in denoiser.modules():
            processor = getattr(module, "processor", None)
            if type(processor) is not FluxAttnProcessor:
                continue
            fused = FluxAttnProcessorFusedRope()
            fused._attention_backend = processor._attention_backend
            fused._parallel_config = processor._parallel_config
            module.processor = fused
            changed += 1
    return changed
