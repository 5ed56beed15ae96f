"""The OmniGen2 diffusion transformer, written for this project from the published architecture.

Module and parameter names follow the OmniGen2/OmniGen2 ``transformer/`` checkpoint (a diffusers-style
``OmniGen2Transformer2DModel``), so ``from_pretrained`` on that folder loads its weights and ai-toolkit LoRAs
(``diffusion_model.layers.N.attn.to_q`` ...) find their modules. The checkpoint's config (ComfyUI's model detection
restates it): hidden 2520, 21 query / 7 key-value heads of 120, 32 joint layers, 2 refiner layers per stream, rope axes
(40, 40, 40) with lengths (1024, 1664, 1664), text features 2048 (Qwen2.5-VL-3B), timestep scale 1000.

One forward pass, for latents ``x`` (``[B, C, H, W]``), optional reference latents and a padded text sequence:

1. ``time_caption_embed``: sinusoidal embedding of ``t * timestep_scale`` (``t`` in 0..1, 0 = noise) through a
   two-layer MLP gives ``temb``; the text goes through RMSNorm + Linear.
2. Positions (3 rope axes): text token ``i`` sits at ``(i, i, i)``. Each reference image, then the target image, gets
   ``(offset, row, col)``, where ``offset`` starts after the text and grows by ``max(rows, cols)`` per reference image.
3. Three refiners run separately: ``context_refiner`` on the text (no modulation), ``ref_image_refiner`` on each
   reference image alone (its patch embedding plus ``image_index_embedding[j]`` for the j-th image), and
   ``noise_refiner`` on the noisy image tokens.
4. ``layers`` run on ``[text, reference images..., image]``; ``norm_out`` projects back to patches and the image
   tokens are unpatchified. The output is the flow velocity towards the data (``x_1 - x_0``, time running 0 -> 1).

Every block: pre-RMSNorm attention and SwiGLU feed-forward, each output RMS-normalised again before the residual
(``norm2`` / ``ffn_norm2``); modulated blocks scale the inputs by ``1 + scale`` and gate the residuals by
``tanh(gate)``. Attention has RMS-normalised queries and keys, grouped key-value heads and complex-pair rotary
embeddings on consecutive channel pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps, get_1d_rotary_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

#: the checkpoint keeps this many image-index embeddings (ai-toolkit and OmniGen2 use at most 3 input images)
MAX_REFERENCE_IMAGES = 5
ROPE_THETA = 10000


def modulation_width(hidden_size: int) -> int:
    """Width of the timestep embedding that drives every modulation: the hidden size, capped at 1024."""
    return min(hidden_size, 1024)


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]``, channels fastest inside a patch, patches row-major."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for a ``height x width`` latent."""
    b, _, features = tokens.shape
    c = features // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` (``[B, L, heads, D]``) by the complex ``freqs`` (``[B, L, D/2]``)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).to(x.dtype)


class OmniGen2Attention(nn.Module):
    """Self-attention with RMS-normalised q/k, grouped key-value heads and rotary positions (no biases)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float = 1e-5):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=eps)
        # index 1 is the (inactive) dropout of diffusers' Attention; kept so that `to_out.0` keeps its name
        self.to_out = nn.ModuleList([nn.Linear(heads * self.head_dim, dim, bias=False), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.norm_q(self.to_q(x).view(b, length, self.heads, self.head_dim))
        k = self.norm_k(self.to_k(x).view(b, length, self.kv_heads, self.head_dim))
        v = self.to_v(x).view(b, length, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.to_out[0](out.transpose(1, 2).reshape(b, length, -1))


class SwiGLUFeedForward(nn.Module):
    """``linear_2(silu(linear_1(x)) * linear_3(x))``; the inner width is 4x, rounded up to ``multiple_of``."""

    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: float | None):
        super().__init__()
        inner = 4 * dim
        if ffn_dim_multiplier is not None:
            inner = int(ffn_dim_multiplier * inner)
        inner = multiple_of * -(-inner // multiple_of)
        self.linear_1 = nn.Linear(dim, inner, bias=False)
        self.linear_2 = nn.Linear(inner, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.linear_1(x).float()).to(x.dtype)
        return self.linear_2(gate * self.linear_3(x))


class ModulatedRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + scale``; also returns the attention gate and the feed-forward scale and gate."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(modulation_width(dim), 4 * dim)
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        scale_attn, gate_attn, scale_ff, gate_ff = self.linear(F.silu(temb)).chunk(4, dim=1)
        return self.norm(x) * (1 + scale_attn[:, None]), gate_attn, scale_ff, gate_ff


class OmniGen2Block(nn.Module):
    """One transformer block; ``modulated`` blocks are conditioned on the timestep embedding."""

    def __init__(self, dim: int, heads: int, kv_heads: int, multiple_of: int, ffn_dim_multiplier, eps: float,
                 modulated: bool):
        super().__init__()
        self.modulated = modulated
        self.attn = OmniGen2Attention(dim, heads, kv_heads)
        self.feed_forward = SwiGLUFeedForward(dim, multiple_of, ffn_dim_multiplier)
        self.norm1 = ModulatedRMSNorm(dim, eps) if modulated else nn.RMSNorm(dim, eps=eps)
        self.norm2 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, freqs: torch.Tensor, temb: torch.Tensor | None = None):
        if not self.modulated:
            x = x + self.norm2(self.attn(self.norm1(x), mask, freqs))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        normed, gate_attn, scale_ff, gate_ff = self.norm1(x, temb)
        x = x + gate_attn[:, None].tanh() * self.norm2(self.attn(normed, mask, freqs))
        ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_ff[:, None]))
        return x + gate_ff[:, None].tanh() * self.ffn_norm2(ff)


class TimestepTextEmbedding(nn.Module):
    """``timestep_embedder`` (sinusoid -> Linear -> SiLU -> Linear) and ``caption_embedder`` (RMSNorm -> Linear)."""

    def __init__(self, hidden_size: int, text_feat_dim: int, eps: float, timestep_scale: float):
        super().__init__()
        width = modulation_width(hidden_size)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=timestep_scale)
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = nn.Linear(256, width)
        self.timestep_embedder.linear_2 = nn.Linear(width, width)
        self.caption_embedder = nn.Sequential(nn.RMSNorm(text_feat_dim, eps=eps), nn.Linear(text_feat_dim, hidden_size))

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, dtype: torch.dtype):
        proj = self.time_proj(timestep).to(dtype)
        temb = self.timestep_embedder.linear_2(F.silu(self.timestep_embedder.linear_1(proj)))
        return temb, self.caption_embedder(text)


class AdaLayerNormOut(nn.Module):
    """Final LayerNorm (no affine) scaled by ``1 + linear_1(silu(temb))``, then ``linear_2`` to patch features."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(modulation_width(dim), dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear_2 = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(x.dtype))
        return self.linear_2(self.norm(x) * (1 + scale)[:, None, :])


class OmniGen2Transformer2DModel(ModelMixin, ConfigMixin):
    """OmniGen2's denoiser (config keys and defaults as in the published ``transformer/config.json`` format).

    Args:
        patch_size (int, defaults to 2): latent patch side.
        in_channels (int, defaults to 16): latent channels (FLUX VAE).
        out_channels (int, *optional*): defaults to ``in_channels``.
        hidden_size (int, defaults to 2304): token width; ``hidden_size / num_attention_heads`` must equal
            ``sum(axes_dim_rope)``.
        num_layers (int, defaults to 26): joint blocks.
        num_refiner_layers (int, defaults to 2): blocks in each of the three refiners.
        num_attention_heads (int, defaults to 24), num_kv_heads (int, defaults to 8): query and key-value heads.
        multiple_of (int, defaults to 256), ffn_dim_multiplier (float, *optional*): feed-forward width rule.
        norm_eps (float, defaults to 1e-5): RMSNorm epsilon.
        axes_dim_rope (tuple, defaults to (32, 32, 32)): rotary channels per position axis.
        axes_lens (tuple, defaults to (300, 512, 512)): positions per axis in the rotary tables.
        text_feat_dim (int, defaults to 1024): width of the text encoder's hidden states.
        timestep_scale (float, defaults to 1.0): multiplies ``t`` before the sinusoidal embedding.
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["OmniGen2Block"]
    _repeated_blocks = ["OmniGen2Block"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 2304,
        num_layers: int = 26,
        num_refiner_layers: int = 2,
        num_attention_heads: int = 24,
        num_kv_heads: int = 8,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        axes_dim_rope: tuple = (32, 32, 32),
        axes_lens: tuple = (300, 512, 512),
        text_feat_dim: int = 1024,
        timestep_scale: float = 1.0,
    ):
        super().__init__()
        head_dim = hidden_size // num_attention_heads
        if head_dim != sum(axes_dim_rope):
            raise ValueError(f"hidden_size / num_attention_heads = {head_dim} must equal sum(axes_dim_rope) = "
                             f"{sum(axes_dim_rope)}; fix the transformer config.")
        patch_features = patch_size * patch_size * in_channels
        block = dict(dim=hidden_size, heads=num_attention_heads, kv_heads=num_kv_heads, multiple_of=multiple_of,
                     ffn_dim_multiplier=ffn_dim_multiplier, eps=norm_eps)
        self.x_embedder = nn.Linear(patch_features, hidden_size)
        self.ref_image_patch_embedder = nn.Linear(patch_features, hidden_size)
        self.time_caption_embed = TimestepTextEmbedding(hidden_size, text_feat_dim, norm_eps, timestep_scale)
        self.noise_refiner = nn.ModuleList(OmniGen2Block(**block, modulated=True) for _ in range(num_refiner_layers))
        self.ref_image_refiner = nn.ModuleList(OmniGen2Block(**block, modulated=True) for _ in range(num_refiner_layers))
        self.context_refiner = nn.ModuleList(OmniGen2Block(**block, modulated=False) for _ in range(num_refiner_layers))
        self.layers = nn.ModuleList(OmniGen2Block(**block, modulated=True) for _ in range(num_layers))
        self.norm_out = AdaLayerNormOut(hidden_size, patch_size * patch_size * (out_channels or in_channels))
        self.image_index_embedding = nn.Parameter(torch.zeros(MAX_REFERENCE_IMAGES, hidden_size))

    # ------------------------------------------------------------------------------------------------ positions
    def rotary_tables(self, device) -> list[torch.Tensor]:
        """Complex rotary tables, one per axis (``[axes_lens[i], axes_dim_rope[i] / 2]``), in float64 like the original."""
        return [get_1d_rotary_pos_embed(d, n, theta=ROPE_THETA, freqs_dtype=torch.float64).to(device)
                for d, n in zip(self.config.axes_dim_rope, self.config.axes_lens)]

    @staticmethod
    def lookup(tables: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """Rotary factors for integer ``positions`` (``[L, 3]``): ``[L, head_dim / 2]`` complex."""
        return torch.cat([table[positions[:, axis]] for axis, table in enumerate(tables)], dim=-1)

    @staticmethod
    def image_positions(offset: int, rows: int, cols: int, device) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device),
                                          indexing="ij"), dim=-1).reshape(-1, 2)
        return torch.cat([torch.full_like(grid[:, :1], offset), grid], dim=-1)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor,
        ref_image_hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the velocity for ``hidden_states``.

        Args:
            hidden_states (Tensor): noisy latents ``[B, C, H, W]``.
            timestep (Tensor): ``[B]`` flow time in 0..1 (0 = pure noise).
            text_hidden_states (Tensor): ``[B, T, text_feat_dim]`` text encoder states.
            text_attention_mask (Tensor): ``[B, T]``, 1 for real tokens (either padding side works).
            ref_image_hidden_states (list[Tensor], *optional*): reference latents, each ``[B, C, h, w]``, shared
                layout across the batch; at most 5.

        Returns:
            Tensor: ``[B, out_channels, H, W]``.
        """
        refs = list(ref_image_hidden_states or [])
        if len(refs) > MAX_REFERENCE_IMAGES:
            raise ValueError(f"OmniGen2 takes at most {MAX_REFERENCE_IMAGES} reference images, got {len(refs)}.")
        p = self.config.patch_size
        batch, _, height, width = hidden_states.shape
        device, dtype = hidden_states.device, hidden_states.dtype
        tables = self.rotary_tables(device)
        temb, text = self.time_caption_embed(timestep, text_hidden_states, dtype)

        # 1. Text: refined on its own with positions 0..n-1 over the real tokens
        text_mask = text_attention_mask.bool()
        text_positions = (text_mask.cumsum(dim=1) - 1).clamp(min=0)
        text_freqs = torch.stack([self.lookup(tables, pos[:, None].expand(-1, 3)) for pos in text_positions])
        for block in self.context_refiner:
            text = block(text, text_mask, text_freqs)

        # 2. Images: positions after the text; each reference image refined alone, then the noisy image
        lengths = text_mask.sum(dim=1).tolist()
        offsets = [int(n) for n in lengths]
        ref_tokens = []
        for index, ref in enumerate(refs):
            rows, cols = ref.shape[-2] // p, ref.shape[-1] // p
            tokens = self.ref_image_patch_embedder(patchify(ref.to(dtype), p)) + self.image_index_embedding[index]
            freqs = torch.stack([self.lookup(tables, self.image_positions(o, rows, cols, device)) for o in offsets])
            ones = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
            for block in self.ref_image_refiner:
                tokens = block(tokens, ones, freqs, temb)
            ref_tokens.append((tokens, freqs))
            offsets = [o + max(rows, cols) for o in offsets]
        rows, cols = height // p, width // p
        image = self.x_embedder(patchify(hidden_states, p))
        image_freqs = torch.stack([self.lookup(tables, self.image_positions(o, rows, cols, device)) for o in offsets])
        ones = torch.ones(image.shape[:2], dtype=torch.bool, device=device)
        for block in self.noise_refiner:
            image = block(image, ones, image_freqs, temb)

        # 3. Joint sequence [real text tokens, reference images, image], right-padded to the longest sample
        parts = [t for t, _ in ref_tokens] + [image]
        part_freqs = [f for _, f in ref_tokens] + [image_freqs]
        image_len = image.shape[1]
        total = max(lengths) + sum(t.shape[1] for t in parts)
        joint = image.new_zeros(batch, total, image.shape[-1])
        joint_freqs = image_freqs.new_zeros(batch, total, image_freqs.shape[-1])
        joint_mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
        ends = []
        for i, n in enumerate(lengths):
            seq = torch.cat([text[i][text_mask[i]]] + [t[i] for t in parts])
            joint[i, : seq.shape[0]] = seq
            joint_freqs[i, : seq.shape[0]] = torch.cat([text_freqs[i][text_mask[i]]] + [f[i] for f in part_freqs])
            joint_mask[i, : seq.shape[0]] = True
            ends.append(seq.shape[0])
        for block in self.layers:
            joint = block(joint, joint_mask, joint_freqs, temb)
        joint = self.norm_out(joint, temb)
        out = torch.stack([joint[i, end - image_len: end] for i, end in enumerate(ends)])
        return unpatchify(out, p, height, width)
