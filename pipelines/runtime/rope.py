"""Rotary embeddings in one kernel when attention runs eager on CUDA, with diffusers' rounding.

diffusers rotates each query and key of FLUX's, FLUX.2's, Krea 2's, Wan's, HiDream's and LTX-2's attention with about
ten elementwise kernels (the pairs split and swapped, products in float32, their sums, the cast back), each reading and
writing the whole tensor. Compiled by Inductor with eager rounding (every intermediate rounded to its dtype, no fused
multiply-add that eager does not do: ``eager_rounding.compiled``), the same operations are one kernel that reads the
input once. The first call of each input shape compares its output with the eager one byte for byte; a shape where
they differ, and any run where it cannot compile, keeps the eager operations. Inside ``torch.compile`` (the regional
compile) the eager operations are traced as before, so compiled graphs do not change.

:func:`use_fused_rope` gives a denoiser's attention layers the processors below where they run diffusers'
``FluxAttnProcessor`` (FLUX.1, Flex, Kontext, Chroma), FLUX.2's two processors (FLUX.2, klein),
``Krea2AttnProcessor`` (Krea 2), ``WanAttnProcessor`` (Wan 2.1 and 2.2), ``HiDreamAttnProcessor`` (HiDream I1
and E1) or LTX-2's two processors (LTX-2, 2.3, 2.5). Their attention goes through :func:`attend`, which is also
where ``attention="flash_attn_3_fp8"`` runs FlashAttention-3 in FP8 (``runtime.fp8_attention``).
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import (transformer_flux, transformer_flux2, transformer_hidream_image,
                                           transformer_krea2, transformer_ltx2, transformer_wan)

from . import eager_rounding
from .fp8_attention import fp8_attention

logger = logging.getLogger(__name__)

#: (rotation, device, input shape, strides and dtype, each frequency tensor's) -> whether the compiled rotation gave
#: the eager bytes
_CHECKED: dict[tuple, bool] = {}


def flux_rotation(x, cos, sin):
    """diffusers' FLUX rotation of ``x`` (batch, tokens, heads, head dim) by interleaved-pair frequencies (tokens,
    head dim)."""
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1)


def wan_rotation(x, cos, sin):
    """Wan's rotation of ``x`` (batch, tokens, heads, head dim) as diffusers' ``WanAttnProcessor`` computes it: each
    pair (even, odd) rotated by the even entry of ``cos`` and the odd entry of ``sin`` (1, tokens, 1, head dim), in
    their dtype, and written back in ``x``'s."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def hidream_rotation(x, frequencies):
    """HiDream's rotation of ``x`` (batch, tokens, heads, head dim) as diffusers' ``apply_rope`` computes it: each pair
    of ``x`` in float32 times the 2x2 rotation of its frequency (batch, tokens, 1, head dim / 2, 2, 2), cast back to
    ``x``'s dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    rotated = frequencies[..., 0] * pairs[..., 0] + frequencies[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


def ltx2_split_rotation(x, cos, sin):
    """diffusers' LTX-2 "split" rotation of ``x`` (batch, tokens, heads x head dim): each head's first and second
    halves rotated as pairs by (batch, heads, tokens, head dim / 2) frequencies, in float32."""
    return transformer_ltx2.apply_split_rotary_emb(x, (cos, sin))


def ltx2_interleaved_rotation(x, cos, sin):
    """diffusers' LTX-2 "interleaved" rotation of ``x`` (batch, tokens, channels) by (batch, tokens, channels)
    frequencies, in float32."""
    return transformer_ltx2.apply_interleaved_rotary_emb(x, (cos, sin))


#: an LTX-2 attention layer's ``rope_type`` -> its rotation
LTX2_ROTATIONS = {"split": ltx2_split_rotation, "interleaved": ltx2_interleaved_rotation}


def rotary(rotation, x, *frequencies):
    """``rotation(x, *frequencies)`` (one of the rotations above), bit for bit; one compiled kernel where checked."""
    compiled = None if torch.compiler.is_compiling() else eager_rounding.compiled(rotation, x.device.type)
    if compiled is None:
        return rotation(x, *frequencies)
    key = (rotation, str(x.device), tuple(x.shape), x.stride(), x.dtype,
           *((tuple(f.shape), f.stride(), f.dtype) for f in frequencies))
    fused = _CHECKED.get(key)
    if fused is None:
        expected = rotation(x, *frequencies)
        try:
            candidate = compiled(x, *frequencies)
        except Exception as error:  # a Triton or compiler problem: the eager rotation from now on
            logger.warning("The fused rotary embedding could not compile (%s); attention applies the eager one.",
                           error)
            eager_rounding.stop_compiling(rotation, x.device.type)
            return expected
        fused = eager_rounding.same_bytes(candidate, expected)
        _CHECKED[key] = fused
        if not fused:
            logger.info("Rotary embeddings of shape %s on %s run eager: the fused kernel does not give the eager "
                        "output bit for bit there.", key[2], key[1])
        return expected
    return compiled(x, *frequencies) if fused else rotation(x, *frequencies)


class FusedRopeProcessor:
    """What the processors below share: ``fp8_attention``, set by ``accelerate.set_attention_kernel`` for
    ``attention="flash_attn_3_fp8"``."""

    fp8_attention = False


def attend(processor, query, key, value, attention_mask=None):
    """Attention of (batch, tokens, heads, head dim) ``query``, ``key`` and ``value`` by ``processor``'s kernel
    through diffusers' dispatcher (its backend and parallel settings). A layer given ``flash_attn_3_fp8`` runs
    FlashAttention-3 in FP8 instead, and its masked calls (padded text, which FlashAttention cannot mask) torch's
    SDPA."""
    if processor.fp8_attention and processor._parallel_config is None:
        if attention_mask is None:
            return fp8_attention(query, key, value)
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=AttentionBackendName.NATIVE)
    return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=processor._attention_backend,
                                 parallel_config=processor._parallel_config)


def _joint_attention(processor, attn, projections, text_tokens, attention_mask, image_rotary_emb):
    """The attention of FLUX's and FLUX.2's blocks, as diffusers' processors compute it, from the layer's query, key
    and value ``projections`` and its text stream's (None for a block without one): split into heads, normalised,
    text tokens first, rotated by :func:`rotary`, attended; returns (image tokens, text tokens or None)."""
    def heads(projected):
        return projected.unflatten(-1, (-1, attn.head_dim))

    query, key, value, text_query, text_key, text_value = projections
    query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
    if text_query is not None:
        query = torch.cat([attn.norm_added_q(heads(text_query)), query], dim=1)
        key = torch.cat([attn.norm_added_k(heads(text_key)), key], dim=1)
        value = torch.cat([heads(text_value), value], dim=1)
    if image_rotary_emb is not None:
        query, key = rotary(flux_rotation, query, *image_rotary_emb), rotary(flux_rotation, key, *image_rotary_emb)
    out = attend(processor, query, key, value, attention_mask)
    out = out.flatten(2, 3).to(query.dtype)
    if text_tokens is None:
        return out, None
    text_out, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
    return out, text_out


def _text_tokens(encoder_hidden_states):
    return None if encoder_hidden_states is None else encoder_hidden_states.shape[1]


class FluxAttnProcessorFusedRope(FusedRopeProcessor, transformer_flux.FluxAttnProcessor):
    """diffusers' FLUX attention, the same operations in the same order, with the rotary embedding applied by
    :func:`rotary`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        projections = transformer_flux._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        out, text_out = _joint_attention(self, attn, projections, _text_tokens(encoder_hidden_states),
                                         attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return out
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(text_out.contiguous())


class Flux2AttnProcessorFusedRope(FusedRopeProcessor, transformer_flux2.Flux2AttnProcessor):
    """diffusers' FLUX.2 double-stream attention with the rotary embedding applied by :func:`rotary`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        projections = transformer_flux2._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        out, text_out = _joint_attention(self, attn, projections, _text_tokens(encoder_hidden_states),
                                         attention_mask, image_rotary_emb)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, attn.to_add_out(text_out))


class Flux2ParallelSelfAttnProcessorFusedRope(FusedRopeProcessor, transformer_flux2.Flux2ParallelSelfAttnProcessor):
    """diffusers' FLUX.2 single-stream block (attention and MLP from one projection) with the rotary embedding
    applied by :func:`rotary`."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_width = 3 * attn.inner_dim
        mlp_width = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_width // (qkv_width + mlp_width)
        qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
        out, _ = _joint_attention(self, attn, (*qkv.chunk(3, dim=-1), None, None, None), None, attention_mask,
                                  image_rotary_emb)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Krea2AttnProcessorFusedRope(FusedRopeProcessor, transformer_krea2.Krea2AttnProcessor):
    """diffusers' Krea 2 attention (grouped-query, key and value heads repeated, sigmoid output gate) with the rotary
    embedding applied by :func:`rotary`."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        gate = attn.to_gate(hidden_states)
        if image_rotary_emb is not None:
            query, key = rotary(flux_rotation, query, *image_rotary_emb), rotary(flux_rotation, key, *image_rotary_emb)
        groups = attn.num_heads // attn.num_kv_heads
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        out = attend(self, query, key, value, attention_mask)
        return attn.to_out[0](out.flatten(2, 3) * torch.sigmoid(gate))


class WanAttnProcessorFusedRope(FusedRopeProcessor, transformer_wan.WanAttnProcessor):
    """diffusers' Wan attention with the self-attention's rotary embedding applied by :func:`rotary`; cross-attention
    (no rotary embedding) runs diffusers' processor as it is."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if rotary_emb is None or encoder_hidden_states is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = transformer_wan._get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query, key = rotary(wan_rotation, query, *rotary_emb), rotary(wan_rotation, key, *rotary_emb)
        out = attend(self, query, key, value, attention_mask)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class HiDreamAttnProcessorFusedRope(FusedRopeProcessor, transformer_hidream_image.HiDreamAttnProcessor):
    """diffusers' HiDream attention (image tokens first, then the text's in the double-stream blocks) with the rotary
    embedding applied by :func:`rotary`, and the attention itself through diffusers' dispatcher (diffusers' processor
    calls torch's SDPA directly), so that ``attention=`` can choose HiDream's kernel as it does other families'."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, hidden_states_masks=None, encoder_hidden_states=None,
                 image_rotary_emb=None):
        dtype = hidden_states.dtype
        batch = hidden_states.shape[0]

        def heads(projected):
            return projected.view(batch, -1, attn.heads, projected.shape[-1] // attn.heads)

        query = heads(attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype))
        key = heads(attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype))
        value = heads(attn.to_v(hidden_states))
        if hidden_states_masks is not None:
            key = key * hidden_states_masks.view(batch, -1, 1, 1)
        image_tokens = query.shape[1]
        if not attn.single:
            query = torch.cat([query, heads(attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype))], 1)
            key = torch.cat([key, heads(attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype))], 1)
            value = torch.cat([value, heads(attn.to_v_t(encoder_hidden_states))], dim=1)
        whole_head = query.shape[-1] == image_rotary_emb.shape[-3] * 2

        def rotate(projected):  # the whole head, or only its first half
            if whole_head:
                return rotary(hidream_rotation, projected, image_rotary_emb)
            rotated, rest = projected.chunk(2, dim=-1)
            return torch.cat([rotary(hidream_rotation, rotated, image_rotary_emb), rest], dim=-1)

        query, key = rotate(query), rotate(key)
        out = attend(self, query, key, value)
        out = out.flatten(2, 3).to(query.dtype)
        if attn.single:
            return attn.to_out(out)
        image_out, text_out = torch.split(out, [image_tokens, out.shape[1] - image_tokens], dim=1)
        return attn.to_out(image_out), attn.to_out_t(text_out)


def _ltx2_attention(processor, attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                    key_rotary_emb, perturbation_mask=None, all_perturbed=None):
    """The attention of LTX-2's layers as diffusers' processors compute it (the perturbed processor's; without a
    perturbation mask it is the plain one's), with the rotary embedding applied by :func:`rotary`."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, context_tokens = context.shape[:2]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context_tokens, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    gate_logits = None if attn.to_gate_logits is None else attn.to_gate_logits(hidden_states)
    value = attn.to_v(context)
    if all_perturbed is None:
        all_perturbed = perturbation_mask is not None and torch.all(perturbation_mask == 0)
    if all_perturbed:  # attention skipped: the value projection stands for its output
        out = value
    else:
        query, key = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(context))
        if query_rotary_emb is not None:
            rotation = LTX2_ROTATIONS[attn.rope_type]
            query = rotary(rotation, query, *query_rotary_emb)
            key = rotary(rotation, key, *(query_rotary_emb if key_rotary_emb is None else key_rotary_emb))
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        out = attend(processor, query, key, value, attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:
            out = torch.lerp(value.flatten(2, 3), out, perturbation_mask)
    if gate_logits is not None:  # per head, 2 x sigmoid: zero logits leave the output as it is
        out = (out.unflatten(2, (attn.heads, -1)) * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)).flatten(2, 3)
    return attn.to_out[1](attn.to_out[0](out))


class LTX2AudioVideoAttnProcessorFusedRope(FusedRopeProcessor, transformer_ltx2.LTX2AudioVideoAttnProcessor):
    """diffusers' LTX-2 attention (video, audio and their cross-attention) with the rotary embedding applied by
    :func:`rotary`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None):
        return _ltx2_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                               key_rotary_emb)


class LTX2PerturbedAttnProcessorFusedRope(FusedRopeProcessor, transformer_ltx2.LTX2PerturbedAttnProcessor):
    """diffusers' LTX-2.3 attention (perturbation mask, per-head gates) with the rotary embedding applied by
    :func:`rotary`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        return _ltx2_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                               key_rotary_emb, perturbation_mask, all_perturbed)


#: diffusers' processor class -> ours with the fused rotary embedding
FUSED_ROPE_PROCESSORS = {
    transformer_flux.FluxAttnProcessor: FluxAttnProcessorFusedRope,
    transformer_flux2.Flux2AttnProcessor: Flux2AttnProcessorFusedRope,
    transformer_flux2.Flux2ParallelSelfAttnProcessor: Flux2ParallelSelfAttnProcessorFusedRope,
    transformer_krea2.Krea2AttnProcessor: Krea2AttnProcessorFusedRope,
    transformer_wan.WanAttnProcessor: WanAttnProcessorFusedRope,
    transformer_hidream_image.HiDreamAttnProcessor: HiDreamAttnProcessorFusedRope,
    transformer_ltx2.LTX2AudioVideoAttnProcessor: LTX2AudioVideoAttnProcessorFusedRope,
    transformer_ltx2.LTX2PerturbedAttnProcessor: LTX2PerturbedAttnProcessorFusedRope,
}


def use_fused_rope(denoisers: list) -> int:
    """Give every attention layer of ``denoisers`` that runs one of diffusers' processors in
    :data:`FUSED_ROPE_PROCESSORS` ours, keeping its attention backend and parallel settings; returns how many layers
    changed."""
    changed = 0
    for denoiser in denoisers:
        for module in denoiser.modules():
            processor = getattr(module, "processor", None)
            fused_class = FUSED_ROPE_PROCESSORS.get(type(processor))
            if fused_class is None:
                continue
            fused = fused_class()
            for setting in ("_attention_backend", "_parallel_config"):  # diffusers' HiDream processor has neither
                if hasattr(processor, setting):
                    setattr(fused, setting, getattr(processor, setting))
            module.processor = fused
            changed += 1
    return changed
