"""Building blocks shared by the pixel-space families (no VAE: the denoiser works on RGB in ``[-1, 1]``).

* :func:`patchify_pixels` / :func:`unpatchify_pixels`: images ``[B, C, H, W]`` to patch tokens ``[B, N, C*p*p]`` and
  back, channels outermost inside a patch (the ``b c (h ph) (w pw) -> b (h w) (c ph pw)`` order BFL-style models use).
* :func:`patchify_pixels_channels_last` / :func:`unpatchify_pixels_channels_last`: the same with channels innermost
  (``b c (h ph) (w pw) -> b (h w) (ph pw c)``, the Z-Image-style order Zeta-Chroma uses).
* :class:`DctPatchEmbedder`: the per-pixel embedder of the "NeRF" pixel heads (Chroma Radiance, Zeta-Chroma): each
  pixel of a patch gets its channels plus a 2D cosine (DCT-like) code of its position inside the patch, projected by
  one Linear. Its parameter names (``embedder.0.weight``) are the published checkpoints'.
* :func:`dct_features`: the float32 input of that Linear (pixels and their position code).
* :func:`velocity_from_x0`: turns a clean-image (x0) prediction into the flow velocity an Euler step takes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patchify_pixels(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), C*p*p]``, patches in row-major order."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * patch_size * patch_size)


def unpatchify_pixels(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify_pixels` for an image of ``height`` x ``width`` pixels."""
    batch, _, features = tokens.shape
    rows, cols = height // patch_size, width // patch_size
    channels = features // (patch_size * patch_size)
    patches = tokens.reshape(batch, rows, cols, channels, patch_size, patch_size)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def patchify_pixels_channels_last(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]``, patches in row-major order, channels fastest inside a patch."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify_pixels_channels_last(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify_pixels_channels_last` for an image of ``height`` x ``width`` pixels."""
    batch, _, features = tokens.shape
    rows, cols = height // patch_size, width // patch_size
    channels = features // (patch_size * patch_size)
    patches = tokens.reshape(batch, rows, cols, patch_size, patch_size, channels)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def dct_position_code(patch_size: int, max_freqs: int, device=None) -> torch.Tensor:
    """``[1, p*p, max_freqs**2]`` float32: ``cos(pi fx x) cos(pi fy y) / (1 + fx fy)`` for x, y in ``[0, 1]`` on the
    patch's pixel grid (row-major) and frequencies ``0 .. max_freqs - 1``."""
    axis = torch.linspace(0, 1, patch_size, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    x, y = grid_x.reshape(-1, 1, 1), grid_y.reshape(-1, 1, 1)
    freqs = torch.linspace(0, max_freqs - 1, max_freqs, device=device, dtype=torch.float32)
    freqs_x, freqs_y = freqs.view(1, -1, 1), freqs.view(1, 1, -1)
    code = torch.cos(x * freqs_x * math.pi) * torch.cos(y * freqs_y * math.pi) * (1 + freqs_x * freqs_y) ** -1
    return code.reshape(1, patch_size * patch_size, max_freqs * max_freqs)


def dct_features(pixels: torch.Tensor, max_freqs: int) -> torch.Tensor:
    """What :class:`DctPatchEmbedder`'s Linear reads: ``[B', p*p, C]`` pixels in float32 followed by their
    :func:`dct_position_code`, ``[B', p*p, C + max_freqs**2]``."""
    batch, pixels_per_patch, _ = pixels.shape
    code = dct_position_code(math.isqrt(pixels_per_patch), max_freqs, pixels.device).expand(batch, -1, -1)
    return torch.cat([pixels.float(), code], dim=-1)


class DctPatchEmbedder(nn.Module):
    """Embeds the pixels of each patch, ``[B', p*p, C]`` -> ``[B', p*p, hidden]``, through its Linear module (so a
    LoRA on ``embedder.0`` applies) in that module's dtype, the result cast back to the input's dtype.

    ai-toolkit runs this embedder in float32 whatever the model's dtype: a model using it lists it in
    ``_keep_in_fp32_modules``."""

    def __init__(self, in_channels: int, hidden_size: int, max_freqs: int):
        super().__init__()
        self.max_freqs = max_freqs
        self.embedder = nn.Sequential(nn.Linear(in_channels + max_freqs**2, hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = dct_features(pixels, self.max_freqs)
        return self.embedder(features.to(self.embedder[0].weight.dtype)).to(pixels.dtype)


def velocity_from_x0(noisy: torch.Tensor, x0: torch.Tensor, flow_time: torch.Tensor, min_time: float = 0.0):
    """The velocity ``(x_t - x0) / t`` of the flow ``x_t = (1 - t) x0 + t noise``; ``flow_time`` per sample ``[B]``,
    clamped below at ``min_time`` (models divide by a floor to keep the last steps finite)."""
    time = flow_time.clamp(min=min_time) if min_time > 0 else flow_time
    return (noisy - x0) / time.view(-1, *([1] * (noisy.dim() - 1)))
