"""The Boogu-Image diffusion transformer, written for this project from the published architecture.

Boogu-Image extends OmniGen2's Lumina2-style network (``omnigen2_transformer.py``, whose blocks, embedders and rotary
helpers are reused here) with a double-stream stage. Module and parameter names follow the ``transformer/`` folder of
Boogu/Boogu-Image-0.1-Base and -Edit and ai-toolkit's LoRA keys (``diffusion_model.double_stream_layers.N...``,
``diffusion_model.single_stream_layers.N.attn.to_q`` ...), so ``from_pretrained`` loads the checkpoints and LoRAs
find their modules.

One forward pass, for latents ``x`` (``[B, C, H, W]``), optional reference latents and right-padded instruction
features (Qwen3-VL's last hidden state):

1. ``time_caption_embed``: sinusoidal embedding of ``t * timestep_scale`` (``t`` in 0..1, 0 = noise) through a
   two-layer MLP gives ``temb``; the instruction features go through RMSNorm + Linear.
2. Positions (3 rope axes) as in OmniGen2: instruction token ``i`` at ``(i, i, i)``; each reference image, then the
   target image, at ``(offset, row, col)`` with ``offset`` starting after the instruction and growing by
   ``max(rows, cols)`` per reference image.
3. Refiners as in OmniGen2: ``context_refiner`` (no modulation) on the instruction, ``ref_image_refiner`` on each
   reference image alone (plus ``image_index_embedding[j]``), ``noise_refiner`` on the noisy image.
4. ``double_stream_layers``: the image stream is ``[reference images..., image]``, the instruction stream stays apart.
   Each block runs (a) a joint attention over ``[instruction, image stream]`` whose queries, keys and values come
   from per-stream projections (``img_instruct_attn.processor.img_to_q`` / ``instruct_to_q`` ...), with shared q/k
   norms, whose output goes through a per-stream projection (``img_out`` / ``instruct_out``) then the shared
   ``to_out``; (b) a self-attention of the image stream alone (``img_self_attn``); (c) per-stream SwiGLU
   feed-forwards whose input is shifted as well as scaled (``img_norm2`` / ``instruct_norm2`` give the shift). Every
   residual is gated by ``tanh(gate)`` and RMS-normalised first.
5. ``single_stream_layers`` (OmniGen2 blocks) on ``[instruction, image stream]``; ``norm_out`` projects back to
   patches and the image tokens are unpatchified: the velocity towards the data (``x_1 - x_0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .omnigen2_transformer import (
    MAX_REFERENCE_IMAGES,
    AdaLayerNormOut,
    ModulatedRMSNorm,
    OmniGen2Attention,
    OmniGen2Block,
    OmniGen2Transformer2DModel,
    SwiGLUFeedForward,
    TimestepTextEmbedding,
    apply_rotary,
    patchify,
    unpatchify,
)

REDUCE_TYPES = ("mean", "concat")


def instruction_width(instruction_feature_configs: dict) -> int:
    """Width of the instruction features the caption embedder takes: the text encoder's width, times the number of
    layers when several layers are concatenated (``reduce_type`` "concat"), once when they are averaged ("mean")."""
    layers = max(instruction_feature_configs.get("num_instruction_feat_layers", 1), 1)
    width = instruction_feature_configs.get("instruction_feat_dim", 4096)
    reduce_type = instruction_feature_configs.get("reduce_type", "concat").lower()
    if "cat" in reduce_type:
        return layers * width
    if "mean" in reduce_type:
        return width
    raise ValueError(f"instruction_feature_configs.reduce_type must be one of {REDUCE_TYPES}, got {reduce_type!r}.")


class StreamProjections(nn.Module):
    """The per-stream projections of the joint attention (the checkpoint keeps them under ``...processor.``)."""

    def __init__(self, dim: int, kv_dim: int):
        super().__init__()
        for stream in ("img", "instruct"):
            setattr(self, f"{stream}_to_q", nn.Linear(dim, dim, bias=False))
            setattr(self, f"{stream}_to_k", nn.Linear(dim, kv_dim, bias=False))
            setattr(self, f"{stream}_to_v", nn.Linear(dim, kv_dim, bias=False))
        self.instruct_out = nn.Linear(dim, dim, bias=False)
        self.img_out = nn.Linear(dim, dim, bias=False)


class JointAttention(nn.Module):
    """Attention over ``[instruction, image]`` with separate projections per stream and shared q/k norms."""

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float = 1e-5):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.processor = StreamProjections(dim, kv_heads * self.head_dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False), nn.Dropout(0.0)])

    def forward(self, image, text, text_mask, image_freqs, text_freqs):
        """``image`` ``[B, M, D]`` (all real), ``text`` ``[B, T, D]`` with ``text_mask`` ``[B, T]``; returns the attention
        outputs of both streams (the text's zero at padding)."""
        p = self.processor
        batch, image_len, _ = image.shape
        lengths = text_mask.sum(dim=1).tolist()
        total = max(lengths) + image_len

        def joint(text_part, image_part, width):
            out = image_part.new_zeros(batch, total, width)
            for i, n in enumerate(lengths):
                out[i, :n] = text_part[i][text_mask[i]]
                out[i, n: n + image_len] = image_part[i]
            return out

        kv_width = self.kv_heads * self.head_dim
        q = joint(p.instruct_to_q(text), p.img_to_q(image), image.shape[-1]).view(batch, total, self.heads, -1)
        k = joint(p.instruct_to_k(text), p.img_to_k(image), kv_width).view(batch, total, self.kv_heads, -1)
        v = joint(p.instruct_to_v(text), p.img_to_v(image), kv_width).view(batch, total, self.kv_heads, -1)
        freqs = joint(text_freqs, image_freqs, text_freqs.shape[-1])
        mask = torch.zeros(batch, total, dtype=torch.bool, device=image.device)
        for i, n in enumerate(lengths):
            mask[i, : n + image_len] = True
        q, k = apply_rotary(self.norm_q(q), freqs), apply_rotary(self.norm_k(k), freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2).flatten(2)

        text_out = text.new_zeros(text.shape)
        image_out = torch.stack([out[i, n: n + image_len] for i, n in enumerate(lengths)])
        for i, n in enumerate(lengths):
            text_out[i, text_mask[i]] = out[i, :n]
        return self.to_out[0](p.instruct_out(text_out)), self.to_out[0](p.img_out(image_out))


class DoubleStreamBlock(nn.Module):
    """One double-stream block (always modulated): joint attention, image self-attention, per-stream feed-forwards."""

    def __init__(self, dim: int, heads: int, kv_heads: int, multiple_of: int, ffn_dim_multiplier, eps: float):
        super().__init__()
        self.img_instruct_attn = JointAttention(dim, heads, kv_heads)
        self.img_self_attn = OmniGen2Attention(dim, heads, kv_heads)
        self.img_feed_forward = SwiGLUFeedForward(dim, multiple_of, ffn_dim_multiplier)
        self.instruct_feed_forward = SwiGLUFeedForward(dim, multiple_of, ffn_dim_multiplier)
        for name in ("img_norm1", "img_norm2", "img_norm3", "instruct_norm1", "instruct_norm2"):
            setattr(self, name, ModulatedRMSNorm(dim, eps))
        for name in ("img_ffn_norm1", "img_attn_norm", "img_self_attn_norm", "img_ffn_norm2", "instruct_ffn_norm1",
                     "instruct_attn_norm", "instruct_ffn_norm2"):
            setattr(self, name, nn.RMSNorm(dim, eps=eps))

    def forward(self, image, text, text_mask, image_freqs, text_freqs, temb):
        image_attn_in, image_gate_attn, image_scale_ff, image_gate_ff = self.img_norm1(image, temb)
        image_ff_in, image_shift_ff, _, _ = self.img_norm2(image, temb)
        image_self_in, image_gate_self, _, _ = self.img_norm3(image, temb)
        text_attn_in, text_gate_attn, text_scale_ff, text_gate_ff = self.instruct_norm1(text, temb)
        text_ff_in, text_shift_ff, _, _ = self.instruct_norm2(text, temb)

        text_attn, image_attn = self.img_instruct_attn(image_attn_in, text_attn_in, text_mask, image_freqs, text_freqs)
        everywhere = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        image_self = self.img_self_attn(image_self_in, everywhere, image_freqs)

        def gated(gate, x):
            return gate[:, None].tanh() * x

        image = image + gated(image_gate_attn, self.img_attn_norm(image_attn))
        image = image + gated(image_gate_self, self.img_self_attn_norm(image_self))
        ff_in = (1 + image_scale_ff[:, None]) * image_ff_in + image_shift_ff[:, None]
        image = image + gated(image_gate_ff, self.img_ffn_norm2(self.img_feed_forward(self.img_ffn_norm1(ff_in))))

        text = text + gated(text_gate_attn, self.instruct_attn_norm(text_attn))
        ff_in = (1 + text_scale_ff[:, None]) * text_ff_in + text_shift_ff[:, None]
        text = text + gated(text_gate_ff, self.instruct_ffn_norm2(self.instruct_feed_forward(self.instruct_ffn_norm1(ff_in))))
        return image, text


class BooguImageTransformer2DModel(ModelMixin, ConfigMixin):
    """Boogu-Image's denoiser (config keys and defaults as in the published ``transformer/config.json`` format).

    Args:
        patch_size (int, defaults to 2): latent patch side.
        in_channels (int, defaults to 16): latent channels (FLUX VAE).
        out_channels (int, *optional*): defaults to ``in_channels``.
        hidden_size (int, defaults to 3360): token width; ``hidden_size / num_attention_heads`` must equal
            ``sum(axes_dim_rope)``.
        num_layers (int, defaults to 40): double-stream plus single-stream blocks.
        num_double_stream_layers (int, defaults to 8): the first blocks, double-stream.
        num_refiner_layers (int, defaults to 2): blocks in each of the three refiners.
        num_attention_heads (int, defaults to 28), num_kv_heads (int, defaults to 7): query and key-value heads.
        multiple_of (int, defaults to 256), ffn_dim_multiplier (float, *optional*): feed-forward width rule.
        norm_eps (float, defaults to 1e-5): RMSNorm epsilon.
        axes_dim_rope (tuple, defaults to (40, 40, 40)): rotary channels per position axis.
        axes_lens (tuple, defaults to (2048, 1664, 1664)): positions per axis in the rotary tables.
        instruction_feature_configs (dict): ``instruction_feat_dim`` (text encoder width), ``reduce_type`` and
            ``num_instruction_feat_layers``; they give the caption embedder's input width.
        prompt_tuning_configs (dict): kept for config compatibility; prompt tuning is not part of the released
            models (ai-toolkit drops it as well).
        timestep_scale (float, defaults to 1000.0): multiplies ``t`` before the sinusoidal embedding.
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["OmniGen2Block", "DoubleStreamBlock"]
    _repeated_blocks = ["OmniGen2Block", "DoubleStreamBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 3360,
        num_layers: int = 40,
        num_double_stream_layers: int = 8,
        num_refiner_layers: int = 2,
        num_attention_heads: int = 28,
        num_kv_heads: int = 7,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        axes_dim_rope: tuple = (40, 40, 40),
        axes_lens: tuple = (2048, 1664, 1664),
        instruction_feature_configs: dict | None = None,
        prompt_tuning_configs: dict | None = None,
        timestep_scale: float = 1000.0,
    ):
        super().__init__()
        head_dim = hidden_size // num_attention_heads
        if head_dim != sum(axes_dim_rope):
            raise ValueError(f"hidden_size / num_attention_heads = {head_dim} must equal sum(axes_dim_rope) = "
                             f"{sum(axes_dim_rope)}; fix the transformer config.")
        if num_double_stream_layers > num_layers:
            raise ValueError(f"num_double_stream_layers ({num_double_stream_layers}) cannot exceed num_layers "
                             f"({num_layers}); fix the transformer config.")
        text_width = instruction_width(instruction_feature_configs or {})
        patch_features = patch_size * patch_size * in_channels
        block = dict(dim=hidden_size, heads=num_attention_heads, kv_heads=num_kv_heads, multiple_of=multiple_of,
                     ffn_dim_multiplier=ffn_dim_multiplier, eps=norm_eps)
        self.x_embedder = nn.Linear(patch_features, hidden_size)
        self.ref_image_patch_embedder = nn.Linear(patch_features, hidden_size)
        self.time_caption_embed = TimestepTextEmbedding(hidden_size, text_width, norm_eps, timestep_scale)
        self.noise_refiner = nn.ModuleList(OmniGen2Block(**block, modulated=True) for _ in range(num_refiner_layers))
        self.ref_image_refiner = nn.ModuleList(OmniGen2Block(**block, modulated=True) for _ in range(num_refiner_layers))
        self.context_refiner = nn.ModuleList(OmniGen2Block(**block, modulated=False) for _ in range(num_refiner_layers))
        self.double_stream_layers = nn.ModuleList(DoubleStreamBlock(**block) for _ in range(num_double_stream_layers))
        self.single_stream_layers = nn.ModuleList(OmniGen2Block(**block, modulated=True)
                                                  for _ in range(num_layers - num_double_stream_layers))
        self.norm_out = AdaLayerNormOut(hidden_size, patch_size * patch_size * (out_channels or in_channels))
        self.image_index_embedding = nn.Parameter(torch.zeros(MAX_REFERENCE_IMAGES, hidden_size))

    rotary_tables = OmniGen2Transformer2DModel.rotary_tables
    lookup = staticmethod(OmniGen2Transformer2DModel.lookup)
    image_positions = staticmethod(OmniGen2Transformer2DModel.image_positions)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        instruction_hidden_states: torch.Tensor,
        instruction_attention_mask: torch.Tensor,
        ref_image_hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the velocity for ``hidden_states``.

        Args:
            hidden_states (Tensor): noisy latents ``[B, C, H, W]``.
            timestep (Tensor): ``[B]`` flow time in 0..1 (0 = pure noise).
            instruction_hidden_states (Tensor): ``[B, T, width]`` instruction features.
            instruction_attention_mask (Tensor): ``[B, T]``, 1 for real tokens.
            ref_image_hidden_states (list[Tensor], *optional*): reference latents, each ``[B, C, h, w]``, the same
                for every batch item; at most 5.

        Returns:
            Tensor: ``[B, out_channels, H, W]``.
        """
        refs = list(ref_image_hidden_states or [])
        if len(refs) > MAX_REFERENCE_IMAGES:
            raise ValueError(f"Boogu-Image takes at most {MAX_REFERENCE_IMAGES} reference images, got {len(refs)}.")
        text_width = self.time_caption_embed.caption_embedder[0].normalized_shape[0]
        if instruction_hidden_states.shape[-1] != text_width:
            raise ValueError(f"The instruction features are {instruction_hidden_states.shape[-1]} wide but the "
                             f"transformer's caption embedder takes {text_width}; use the checkpoint's own text "
                             "encoder.")
        p = self.config.patch_size
        _, _, height, width = hidden_states.shape
        device, dtype = hidden_states.device, hidden_states.dtype
        tables = self.rotary_tables(device)
        temb, text = self.time_caption_embed(timestep, instruction_hidden_states, dtype)

        # 1. Instruction: refined on its own, positions 0..n-1 over the real tokens
        text_mask = instruction_attention_mask.bool()
        text_positions = (text_mask.cumsum(dim=1) - 1).clamp(min=0)
        text_freqs = torch.stack([self.lookup(tables, pos[:, None].expand(-1, 3)) for pos in text_positions])
        for block in self.context_refiner:
            text = block(text, text_mask, text_freqs)

        # 2. Image stream [reference images..., image], each part refined alone, positions after the instruction
        offsets = [int(n) for n in text_mask.sum(dim=1).tolist()]
        parts, part_freqs = [], []
        for index, ref in enumerate(refs):
            rows, cols = ref.shape[-2] // p, ref.shape[-1] // p
            tokens = self.ref_image_patch_embedder(patchify(ref.to(dtype), p)) + self.image_index_embedding[index]
            freqs = torch.stack([self.lookup(tables, self.image_positions(o, rows, cols, device)) for o in offsets])
            everywhere = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
            for block in self.ref_image_refiner:
                tokens = block(tokens, everywhere, freqs, temb)
            parts.append(tokens)
            part_freqs.append(freqs)
            offsets = [o + max(rows, cols) for o in offsets]
        rows, cols = height // p, width // p
        image = self.x_embedder(patchify(hidden_states, p))
        image_freqs = torch.stack([self.lookup(tables, self.image_positions(o, rows, cols, device)) for o in offsets])
        everywhere = torch.ones(image.shape[:2], dtype=torch.bool, device=device)
        for block in self.noise_refiner:
            image = block(image, everywhere, image_freqs, temb)
        stream = torch.cat(parts + [image], dim=1)
        stream_freqs = torch.cat(part_freqs + [image_freqs], dim=1)

        # 3. Double-stream blocks
        for block in self.double_stream_layers:
            stream, text = block(stream, text, text_mask, stream_freqs, text_freqs, temb)

        # 4. Single-stream blocks on [real instruction tokens, image stream], right-padded to the longest sample
        lengths = text_mask.sum(dim=1).tolist()
        stream_len = stream.shape[1]
        total = max(lengths) + stream_len
        joint = stream.new_zeros(stream.shape[0], total, stream.shape[-1])
        joint_freqs = stream_freqs.new_zeros(stream.shape[0], total, stream_freqs.shape[-1])
        joint_mask = torch.zeros(stream.shape[0], total, dtype=torch.bool, device=device)
        for i, n in enumerate(lengths):
            joint[i, :n], joint[i, n: n + stream_len] = text[i][text_mask[i]], stream[i]
            joint_freqs[i, :n], joint_freqs[i, n: n + stream_len] = text_freqs[i][text_mask[i]], stream_freqs[i]
            joint_mask[i, : n + stream_len] = True
        for block in self.single_stream_layers:
            joint = block(joint, joint_mask, joint_freqs, temb)
        joint = self.norm_out(joint, temb)
        image_len = rows * cols
        out = torch.stack([joint[i, n + stream_len - image_len: n + stream_len] for i, n in enumerate(lengths)])
        return unpatchify(out, p, height, width)
