"""The Zeta-Chroma pixel-space transformer, written for this project from the published architecture.

Zeta-Chroma (lodestones) is a Z-Image-style single-stream DiT that works on RGB pixels: each 32x32 patch of the image
(3072 values, channels fastest inside a patch) is one token, and a small per-token MLP head (the "DCT decoder") turns
the transformer's output back into the patch's pixels. Module and parameter names follow the published checkpoint
(``lodestones/Zeta-Chroma`` ``zeta-chroma-base-x0-pixel-dino-distance.safetensors``, ai-toolkit's ``ZImageDCT``), so
that file loads as it is and ai-toolkit LoRAs (``diffusion_model.layers.N.attention.to_q`` ...) find their modules.
The defaults of :class:`ZetaChromaTransformer2DModel` are that checkpoint's architecture.

One forward pass, for patch tokens ``img`` ``[B, N, in_channels]`` at flow time ``t`` (1 = noise, 0 = data) and a
padded text sequence ``txt`` ``[B, L, cap_feat_dim]`` with its mask:

1. ``t_embedder``: sinusoidal embedding (256 channels, cosines first) of ``(1 - t) * t_scale`` through a two-layer
   MLP (hidden 1024) gives the modulation input; ``x_embedder`` projects the tokens, ``cap_embedder`` (RMSNorm +
   Linear) the text.
2. Positions (3 rope axes, complex-pair rotary embedding on consecutive channel pairs): text token ``i`` of a prompt
   of ``n`` real tokens sits at ``(min(i + 1, n), 0, 0)``; image patch ``(row, col)`` at ``(offset, row, col)``, where
   ``offset`` is given by the caller (the longest real prompt of the call).
3. ``noise_refiner`` (modulated) runs on the image tokens, ``context_refiner`` (not modulated) on the text, then
   ``layers`` (modulated) on ``[text, image]``. A boolean text mask masks the padded text tokens out as keys; a
   floating-point one is added to the attention logits as it is (the image tokens adding 1), as ai-toolkit's code
   treats the two kinds.
4. ``dec_net`` (the DCT decoder): each patch's input values, with its DCT position code (one position per token at
   this patch size), are embedded, then ``decoder_num_res_blocks`` adaLN residual MLP blocks conditioned on the
   token's transformer output, then a final LayerNorm + Linear. Its negation is the clean-image (x0) prediction.
5. With ``use_x0`` (the published checkpoint marks it with an empty ``__x0__`` buffer) the output is the flow
   velocity ``(img - x0) / t``; without it the x0 prediction itself.

Blocks: pre-RMSNorm attention and SwiGLU feed-forward (hidden ``dim * 8 / 3``), each output RMS-normalised again
before the residual; modulated blocks scale the inputs by ``1 + scale`` and gate the residuals by ``tanh(gate)``.
Attention has RMS-normalised queries and keys. The two pad-token parameters are part of the checkpoint but unused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .pixel_space import DctPatchEmbedder, velocity_from_x0

#: channels of the sinusoidal timestep embedding and width of the timestep MLP's hidden layer (fixed by the model)
TIME_FREQUENCY_CHANNELS = 256
TIME_HIDDEN = 1024
#: the name of the empty buffer that marks an x0-predicting checkpoint
X0_MARKER = "__x0__"


class RMSNorm(nn.Module):
    """RMS normalisation in the input's dtype (no float32 upcast), times a learned per-channel weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def sinusoidal_embedding(times: torch.Tensor, channels: int = TIME_FREQUENCY_CHANNELS, max_period: float = 10000.0):
    """``[B]`` -> ``[B, channels]`` float32: ``cos`` then ``sin`` of ``t * max_period ** (-k / (channels / 2))``."""
    half = channels // 2
    exponents = torch.arange(half, dtype=torch.float32, device=times.device) / half
    angles = times[:, None].float() * torch.exp(-math.log(max_period) * exponents)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_features: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCY_CHANNELS, TIME_HIDDEN), nn.SiLU(),
                                 nn.Linear(TIME_HIDDEN, out_features))

    def forward(self, times: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(times).to(self.mlp[0].weight.dtype))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``[B, S, heads, head_dim]``: consecutive channel pairs as complex numbers, times
    ``rotation`` (``[B, S, head_dim / 2]`` complex64), computed in float32 and cast back."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation.unsqueeze(2)).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        head_dim = dim // n_heads
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.to_q = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(n_heads * head_dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        query = self.to_q(x).unflatten(-1, (self.n_heads, -1))
        key = self.to_k(x).unflatten(-1, (self.n_kv_heads, -1))
        value = self.to_v(x).unflatten(-1, (self.n_kv_heads, -1))
        if self.norm_q is not None:
            query, key = self.norm_q(query), self.norm_k(key)
        query, key = rotate_pairs(query, rotation), rotate_pairs(key, rotation)
        if key_mask.dtype == torch.bool:
            bias = torch.zeros(key_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~key_mask, -math.inf)
        else:
            bias = key_mask.to(query.dtype)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=bias[:, None, None, :])
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Attention and feed-forward with sandwich RMSNorms; modulated by the timestep embedding when ``modulated``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, norm_eps: float, qk_norm: bool, modulation_dim: int | None):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads, qk_norm, norm_eps)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.attention_norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        if modulation_dim is not None:
            self.adaLN_modulation = nn.ModuleList([nn.Linear(modulation_dim, 4 * dim)])

    def forward(self, x, key_mask, rotation, time_embedding=None):
        if time_embedding is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), key_mask, rotation))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.adaLN_modulation[0](time_embedding)[:, None].chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_attn), key_mask, rotation)
        x = x + gate_attn.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_ffn))
        return x + gate_ffn.tanh() * self.ffn_norm2(ffn)


class AdaLNResBlock(nn.Module):
    """``x + gate * mlp(LayerNorm(x) * (1 + scale) + shift)``, shift/scale/gate from the condition."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(condition).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class DctDecoder(nn.Module):
    """The per-token pixel head: embeds each token's ``pixels_per_token`` input values with their DCT position code,
    then residual MLP blocks conditioned on the token's transformer output (``cond_embed``, one condition per pixel
    position), then the final layer. ``[T, pixels_per_token, C]`` + ``[T, dim]`` -> ``[T, pixels_per_token, C]``."""

    def __init__(self, in_channels: int, hidden: int, condition_dim: int, num_res_blocks: int, pixels_per_token: int,
                 max_freqs: int):
        super().__init__()
        self.pixels_per_token = pixels_per_token
        self.cond_embed = nn.Linear(condition_dim, pixels_per_token * hidden)
        self.input_embedder = DctPatchEmbedder(in_channels, hidden, max_freqs)
        self.res_blocks = nn.ModuleList([AdaLNResBlock(hidden) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(hidden, in_channels)

    def forward(self, pixels: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = self.input_embedder(pixels)  # in float32: the model keeps it there (_keep_in_fp32_modules)
        condition = self.cond_embed(condition).reshape(condition.shape[0], self.pixels_per_token, -1)
        for block in self.res_blocks:
            x = block(x, condition)
        return self.final_layer(x)


def rope_tables(axes_dims, axes_lens, theta: float) -> list[torch.Tensor]:
    """Per axis, ``[length, dim / 2]`` complex64 rotations ``exp(i * position * theta ** (-2k / dim))`` (frequencies
    in float64, angles rounded to float32)."""
    tables = []
    for dim, length in zip(axes_dims, axes_lens):
        inverse_freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float64), inverse_freqs).float()
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return tables


class ZetaChromaTransformer2DModel(ModelMixin, ConfigMixin):
    """Zeta-Chroma's DiT with its DCT pixel head (see the module docstring); defaults are the published checkpoint's.

    Args:
        in_channels (int, defaults to 3072): values per token (a 32x32 RGB patch).
        patch_size (int, defaults to 1): tokens per side merged into one transformer token (1: one patch per token).
        dim, n_layers, n_refiner_layers, n_heads, n_kv_heads, norm_eps, qk_norm: the transformer.
        cap_feat_dim (int, defaults to 2560): width of the text features (Qwen3-4B's hidden size).
        rope_theta, axes_dims, axes_lens: the 3-axis rotary embedding (``sum(axes_dims)`` is the head size).
        t_scale (float, defaults to 1000): the timestep embedding sees ``(1 - t) * t_scale``.
        adaln_embed_dim (int, defaults to 256): width of the timestep embedding, capped at ``dim``.
        use_x0 (bool, defaults to True): the model predicts the clean image and returns ``(img - x0) / t``.
        decoder_hidden_size, decoder_num_res_blocks, decoder_max_freqs: the DCT pixel head.
    """

    _supports_gradient_checkpointing = False
    _keep_in_fp32_modules = ["input_embedder"]
    _no_split_modules = ["TransformerBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3072,
        patch_size: int = 1,
        dim: int = 3840,
        n_layers: int = 30,
        n_refiner_layers: int = 2,
        n_heads: int = 30,
        n_kv_heads: int = 30,
        norm_eps: float = 1e-5,
        qk_norm: bool = True,
        cap_feat_dim: int = 2560,
        rope_theta: float = 256.0,
        t_scale: float = 1000.0,
        axes_dims: tuple[int, ...] = (32, 48, 48),
        axes_lens: tuple[int, ...] = (1536, 512, 512),
        adaln_embed_dim: int = 256,
        use_x0: bool = True,
        decoder_hidden_size: int = 3840,
        decoder_num_res_blocks: int = 4,
        decoder_max_freqs: int = 8,
    ):
        super().__init__()
        if dim // n_heads != sum(axes_dims):
            raise ValueError(f"The head size dim / n_heads = {dim // n_heads} must equal sum(axes_dims) = "
                             f"{sum(axes_dims)}.")
        modulation_dim = min(dim, adaln_embed_dim)

        def blocks(count, modulated):
            return nn.ModuleList([TransformerBlock(dim, n_heads, n_kv_heads, norm_eps, qk_norm,
                                                   modulation_dim if modulated else None) for _ in range(count)])

        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.noise_refiner = blocks(n_refiner_layers, modulated=True)
        self.context_refiner = blocks(n_refiner_layers, modulated=False)
        self.t_embedder = TimestepEmbedder(modulation_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim, norm_eps), nn.Linear(cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = blocks(n_layers, modulated=True)
        self.dec_net = DctDecoder(in_channels, decoder_hidden_size, dim, decoder_num_res_blocks,
                                  patch_size * patch_size, decoder_max_freqs)
        if use_x0:
            self.register_buffer(X0_MARKER, torch.tensor([]))
        self._rope: list[torch.Tensor] | None = None

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """``[B, S, 3]`` integer positions -> ``[B, S, head_dim / 2]`` complex64 rotations."""
        if self._rope is None or self._rope[0].device != positions.device:
            tables = rope_tables(self.config.axes_dims, self.config.axes_lens, self.config.rope_theta)
            self._rope = [table.to(positions.device) for table in tables]
        return torch.cat([table[positions[..., axis]] for axis, table in enumerate(self._rope)], dim=-1)

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        txt_mask: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The velocity (``use_x0``) or x0 prediction for ``img`` ``[B, N, in_channels * patch_size**2]``.

        Args:
            img (torch.Tensor): the noisy tokens.
            img_ids (torch.Tensor): ``[B, N, 3]`` integer rope positions of the image tokens.
            txt (torch.Tensor): ``[B, L, cap_feat_dim]`` text features, padded.
            txt_ids (torch.Tensor): ``[B, L, 3]`` integer rope positions of the text tokens.
            txt_mask (torch.Tensor): ``[B, L]``: bool (False at padding: masked out as keys) or floating point (added
                to the attention logits, the image tokens adding 1; see :class:`~.zeta_chroma.ZetaChromaPipeline`).
            timesteps (torch.Tensor): ``[B]`` flow times, 1 = noise.
        """
        batch, tokens, _ = img.shape
        image_mask = torch.ones(batch, tokens, dtype=torch.bool, device=img.device)
        time_embedding = self.t_embedder((1 - timesteps) * self.config.t_scale)
        image, text = self.x_embedder(img), self.cap_embedder(txt)
        image_rotation, text_rotation = self.rotations(img_ids), self.rotations(txt_ids)
        for block in self.noise_refiner:
            image = block(image, image_mask, image_rotation, time_embedding)
        for block in self.context_refiner:
            text = block(text, txt_mask, text_rotation)
        mixed = torch.cat([text, image], dim=1)
        mixed_mask = torch.cat([txt_mask, image_mask.to(txt_mask.dtype)], dim=1)
        mixed_rotation = torch.cat([text_rotation, image_rotation], dim=1)
        for block in self.layers:
            mixed = block(mixed, mixed_mask, mixed_rotation, time_embedding)
        condition = mixed[:, txt.shape[1]:].reshape(batch * tokens, -1)
        pixels_per_token = self.config.patch_size**2
        pixels = img.reshape(batch * tokens, pixels_per_token, self.config.in_channels)
        x0 = -self.dec_net(pixels, condition).reshape(batch, tokens, -1)
        if self.config.use_x0:
            return velocity_from_x0(img, x0, timesteps)
        return x0
