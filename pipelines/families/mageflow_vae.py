"""MageVAE, Mage-Flow's 128-channel, 16x downsampling image codec, written for this project from its architecture.

Parameter names are those of ``vae/diffusion_pytorch_model.safetensors`` in the Mage-Flow repos: the encoder under
``student.dconv_encoder.``, the decoder under ``pipeline.``. That file also holds the training-time encoder of the
decoder's teacher (``pipeline.y_embedder.encoder.*``, ``pipeline.y_embedder.bottleneck.*``), which inference never
uses; :meth:`MageVAE.from_checkpoint` drops it. Latents are raw (no scaling or shift): ``[B, 128, H/16, W/16]`` for
pixels ``[B, 3, H, W]`` in ``[-1, 1]``.

Both halves are one-step diffusion networks run at ``t = 0`` from a zero start:

* **Encoder** (``DConvEncoder``): the image, cut into 16x16 patches (one strided conv) and refined by a few
  convolution blocks, conditions a stack of time-modulated convolution blocks ("DiCo" blocks: 1x1 conv, depthwise 3x3
  conv, GELU, channel attention, 1x1 conv, then a 1x1-conv MLP, each behind a LayerNorm and an adaLN modulation)
  that starts from zero latents; the output holds the posterior mean and log-variance (clamped to [-20, 10]).
* **Decoder** (``DConvDenoiser``): a small CNN (``y_embedder.decoder``: three ResNet blocks with GroupNorm(32) and
  two self-attention blocks over 32x32 windows of the latent grid) turns the latents into features; the patch
  pathway (DiCo blocks over those features, starting from a zero image) gives each 16x16 patch a state, and a
  per-pixel MLP (a DCT position code for each pixel of the patch, then adaLN residual MLP blocks conditioned on the
  patch state, RMSNorm and a Linear) paints the patch's pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import nn

ENCODER_PREFIX = "student.dconv_encoder."
DECODER_PREFIX = "pipeline."
#: checkpoint parts inference never uses (the decoder's training-time teacher encoder)
UNUSED_PREFIXES = ("pipeline.y_embedder.encoder.", "pipeline.y_embedder.bottleneck.")
LOGVAR_RANGE = (-20.0, 10.0)


def channel_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW map."""
    return norm(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2).contiguous()


class TimeEmbedding(nn.Module):
    """``t`` -> ``cos``/``sin`` code of width 256 (cos first) -> Linear, SiLU, Linear (``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, channels: int = 256):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        angles = t[:, None].float() * freqs[None]
        code = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(code.to(self.mlp[0].weight.dtype))


class ConvBlock(nn.Module):
    """A DiCo block: ``x + g1 * conv3(ca(gelu(conv2(conv1(mod(norm1(x))))))``, then
    ``+ g2 * conv5(gelu(conv4(mod(norm2(x)))))``. ``modulated`` blocks take (shift, scale, gate) x 2 from
    ``adaLN_modulation`` of the time embedding and have parameter-free norms; the others have affine norms and no
    modulation."""

    def __init__(self, hidden_size: int, mlp_ratio: float, modulated: bool):
        super().__init__()
        ffn = int(mlp_ratio * hidden_size)
        self.conv1 = nn.Conv2d(hidden_size, hidden_size, 1)
        self.conv2 = nn.Conv2d(hidden_size, hidden_size, 3, padding=1, groups=hidden_size)
        self.conv3 = nn.Conv2d(hidden_size, hidden_size, 1)
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden_size, hidden_size, 1), nn.Sigmoid())
        self.conv4 = nn.Conv2d(hidden_size, ffn, 1)
        self.conv5 = nn.Conv2d(ffn, hidden_size, 1)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=not modulated)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=not modulated)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor | None = None) -> torch.Tensor:
        def mod(h, shift, scale):
            return h * (1 + scale[..., None, None]) + shift[..., None, None]

        if self.modulated:
            shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=1)
        h = channel_layer_norm(x, self.norm1)
        if self.modulated:
            h = mod(h, shift1, scale1)
        h = F.gelu(self.conv2(self.conv1(h)))
        h = self.conv3(h * self.ca(h))
        x = x + (gate1[..., None, None] * h if self.modulated else h)
        h = channel_layer_norm(x, self.norm2)
        if self.modulated:
            h = mod(h, shift2, scale2)
        h = self.conv5(F.gelu(self.conv4(h)))
        return x + (gate2[..., None, None] * h if self.modulated else h)


def _float32_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    # the weights are read here, not through the Linear's forward, so an offloaded codec has them where it keeps them
    return F.linear(x, linear.weight.to(x.device, torch.float32), linear.bias.to(x.device, torch.float32))


def zero_time_modulations(blocks: nn.ModuleList, t_embedder: TimeEmbedding, batch: int, device) -> list[torch.Tensor]:
    """Each modulated block's adaLN output at ``t = 0``, shared by the batch. Computed in float32 and then cast to the
    blocks' dtype: ai-toolkit folds these constants once at load time, before casting the codec to its dtype."""
    mlp = t_embedder.mlp
    code = torch.cat([torch.ones(1, t_embedder.channels // 2), torch.zeros(1, t_embedder.channels // 2)], dim=-1)
    c = _float32_linear(F.silu(_float32_linear(code.to(device), mlp[0])), mlp[2])
    dtype = mlp[0].weight.dtype
    return [_float32_linear(F.silu(c), block.adaLN_modulation[1]).to(dtype).expand(batch, -1) for block in blocks]


class MageVAEEncoder(nn.Module):
    """``DConvEncoder``: pixels ``[B, 3, H, W]`` -> ``[B, 2 * latent_channels, H/p, W/p]`` (mean, log-variance)."""

    def __init__(self, latent_channels, hidden_size, patch_size, num_blocks, head_size, num_head_blocks, mlp_ratio):
        super().__init__()
        self.latent_channels = latent_channels
        self.patch_size = patch_size
        self.patch_cond_embed = nn.Conv2d(3, head_size, kernel_size=patch_size, stride=patch_size)
        self.head_blocks = nn.ModuleList([ConvBlock(head_size, mlp_ratio, False) for _ in range(num_head_blocks)])
        self.proj_down = nn.Conv2d(head_size, hidden_size, 1)
        self.z_proj = nn.Conv2d(latent_channels, hidden_size, 1)
        self.fuse_proj = nn.Conv2d(2 * hidden_size, hidden_size, 1)
        self.t_embedder = TimeEmbedding(hidden_size)
        self.blocks = nn.ModuleList([ConvBlock(hidden_size, mlp_ratio, True) for _ in range(num_blocks)])
        self.norm_out = nn.LayerNorm(hidden_size, eps=1e-6)
        self.proj_out = nn.Conv2d(hidden_size, 2 * latent_channels, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        cond = self.patch_cond_embed(pixels)
        for block in self.head_blocks:
            cond = block(cond)
        start = pixels.new_zeros(batch, self.latent_channels, height // self.patch_size, width // self.patch_size)
        state = self.fuse_proj(torch.cat([self.proj_down(cond), self.z_proj(start)], dim=1))
        for block, modulation in zip(self.blocks, zero_time_modulations(self.blocks, self.t_embedder, batch,
                                                                        pixels.device)):
            state = block(state, modulation)
        return self.proj_out(channel_layer_norm(state, self.norm_out))


class ResnetBlock(nn.Module):
    """GroupNorm(32), SiLU, 3x3 conv, twice, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class WindowAttentionBlock(nn.Module):
    """Single-head self-attention inside ``window`` x ``window`` tiles of the map (edges padded by replication, the
    padding cropped afterwards), GroupNorm(32) before, 1x1 projections, residual."""

    def __init__(self, channels: int, window: int):
        super().__init__()
        self.window = window
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        batch, channels, height, width = x.shape
        d = self.window
        pad_h, pad_w = -height % d, -width % d
        h = self.norm(x)

        def tiles(t):
            if pad_h or pad_w:
                t = F.pad(t, (0, pad_w, 0, pad_h), mode="replicate")
            rows, cols = t.shape[2] // d, t.shape[3] // d
            t = t.reshape(batch, channels, rows, d, cols, d).permute(0, 2, 4, 3, 5, 1)
            return t.reshape(batch * rows * cols, 1, d * d, channels)

        out = F.scaled_dot_product_attention(tiles(self.q(h)), tiles(self.k(h)), tiles(self.v(h)))
        rows, cols = (height + pad_h) // d, (width + pad_w) // d
        out = out.reshape(batch, rows, cols, d, d, channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(batch, channels, rows * d, cols * d)[:, :, :height, :width]
        return x + self.proj_out(out)


class LatentDecoder(nn.Module):
    """``y_embedder.decoder``: latents -> decoder features (conv, 3 ResNet blocks with 2 window attentions between,
    GroupNorm, SiLU, conv)."""

    def __init__(self, latent_channels: int, channels: int, window: int):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, padding=1)
        self.block = nn.Sequential(ResnetBlock(channels), WindowAttentionBlock(channels, window), ResnetBlock(channels),
                                   WindowAttentionBlock(channels, window), ResnetBlock(channels))
        self.norm_out = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.block(self.conv_in(z)))))


class PixelPositionEmbedder(nn.Module):
    """Each pixel of a ``p x p`` patch: its features plus ``cos(pi fx x) cos(pi fy y) / (1 + fx fy)`` for ``max_freqs``
    frequencies evenly spaced on ``[0, max_freqs]`` (both ends included), one Linear (``embedder.0``). Computed in the
    input's dtype."""

    def __init__(self, in_channels: int, hidden_size: int, max_freqs: int = 8):
        super().__init__()
        self.max_freqs = max_freqs
        self.embedder = nn.Sequential(nn.Linear(in_channels + max_freqs**2, hidden_size))

    def position_code(self, patch_size: int, device, dtype) -> torch.Tensor:
        axis = torch.linspace(0, 1, patch_size, device=device, dtype=dtype)
        grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
        freqs = torch.linspace(0, self.max_freqs, self.max_freqs, device=device, dtype=dtype)
        freqs_x, freqs_y = freqs[None, :, None], freqs[None, None, :]
        code_x = torch.cos(grid_x.reshape(-1, 1, 1) * freqs_x * torch.pi)
        code_y = torch.cos(grid_y.reshape(-1, 1, 1) * freqs_y * torch.pi)
        return (code_x * code_y * (1 + freqs_x * freqs_y) ** -1).view(1, -1, self.max_freqs**2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        count, pixels_per_patch, _ = pixels.shape
        code = self.position_code(math.isqrt(pixels_per_patch), pixels.device, pixels.dtype)
        return self.embedder(torch.cat([pixels, code.expand(count, -1, -1)], dim=-1))


class PixelResBlock(nn.Module):
    """``x + gate * mlp(LayerNorm(x) * (1 + scale) + shift)``, (shift, scale, gate) from the patch state."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, condition):
        shift, scale, gate = self.adaLN_modulation(condition).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class PixelHead(nn.Module):
    """``dec_net``: per-pixel residual MLP conditioned on its patch's state (``cond_embed`` gives each pixel of the
    patch its own condition)."""

    def __init__(self, channels: int, state_size: int, num_blocks: int, patch_size: int):
        super().__init__()
        self.cond_embed = nn.Linear(state_size, patch_size**2 * channels)
        self.input_proj = nn.Linear(channels, channels)
        self.res_blocks = nn.ModuleList([PixelResBlock(channels) for _ in range(num_blocks)])

    def forward(self, pixels, state):
        x = self.input_proj(pixels)
        condition = self.cond_embed(state).reshape(state.shape[0], pixels.shape[1], -1)
        for block in self.res_blocks:
            x = block(x, condition)
        return x


class FinalPixelLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)

    def forward(self, x):
        return self.linear(self.norm(x))


class BottleneckEmbed(nn.Module):
    """``s_embedder``: patches of the (zero) start image through ``proj1``, joined to the decoder features, ``proj2``."""

    def __init__(self, patch_size: int, latent_channels: int, hidden_size: int):
        super().__init__()
        self.proj1 = nn.Conv2d(3, latent_channels, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(latent_channels + hidden_size, hidden_size, 1)

    def forward(self, pixels, features):
        return self.proj2(torch.cat([self.proj1(pixels), features], dim=1))


class YEmbedder(nn.Module):
    def __init__(self, latent_channels: int, hidden_size: int, window: int):
        super().__init__()
        self.decoder = LatentDecoder(latent_channels, hidden_size, window)


class MageVAEDecoder(nn.Module):
    """``DConvDenoiser``: latents ``[B, C, h, w]`` -> pixels ``[B, 3, h p, w p]`` in one step from a zero image."""

    def __init__(self, latent_channels, hidden_size, patch_size, num_blocks, pixel_size, num_pixel_blocks, mlp_ratio,
                 window):
        super().__init__()
        self.patch_size = patch_size
        self.t_embedder = TimeEmbedding(hidden_size)
        self.y_embedder_x = nn.Conv2d(hidden_size, pixel_size * patch_size**2, 1)
        self.x_embedder = PixelPositionEmbedder(3 + pixel_size, pixel_size)
        self.s_embedder = BottleneckEmbed(patch_size, latent_channels, hidden_size)
        self.blocks = nn.ModuleList([ConvBlock(hidden_size, mlp_ratio, True) for _ in range(num_blocks)])
        self.dec_net = PixelHead(pixel_size, hidden_size, num_pixel_blocks, patch_size)
        self.final_layer = FinalPixelLayer(pixel_size, 3)
        self.y_embedder = YEmbedder(latent_channels, hidden_size, window)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch, _, rows, cols = latents.shape
        p = self.patch_size
        features = self.y_embedder.decoder(latents)
        start = latents.new_zeros(batch, 3, rows * p, cols * p)
        state = self.s_embedder(start, features)
        for block, modulation in zip(self.blocks, zero_time_modulations(self.blocks, self.t_embedder, batch,
                                                                        latents.device)):
            state = block(state, modulation)
        patches = rows * cols
        state = state.permute(0, 2, 3, 1).reshape(batch * patches, -1)
        # per pixel of each patch: the start image's 3 channels (zero), then the decoder features' pixel channels
        pixel_features = self.y_embedder_x(features).reshape(batch, -1, p * p, patches).permute(0, 3, 2, 1)
        pixels = torch.cat([pixel_features.new_zeros(*pixel_features.shape[:3], 3), pixel_features], dim=-1)
        x = self.final_layer(self.dec_net(self.x_embedder(pixels.flatten(0, 1)), state))
        x = x.reshape(batch, patches, p * p, 3).permute(0, 3, 2, 1).reshape(batch, 3 * p * p, patches)
        return F.fold(x, (rows * p, cols * p), kernel_size=p, stride=p)


class MageVAE(ModelMixin, ConfigMixin):
    """MageVAE: :meth:`encode` pixels in ``[-1, 1]`` (sides multiples of ``patch_size``) to raw latents, :meth:`decode`
    them back. Defaults are the released codec's sizes.

    Args:
        latent_channels (int, defaults to 128), hidden_size (int, defaults to 384), patch_size (int, defaults to 16).
        encoder_blocks (int, defaults to 21), encoder_head_size (int, defaults to 768), encoder_head_blocks (int,
            defaults to 2): the encoder's modulated blocks and its patch-conditioning head.
        decoder_blocks (int, defaults to 21), decoder_pixel_size (int, defaults to 32), decoder_pixel_blocks (int,
            defaults to 3): the decoder's modulated blocks and its per-pixel head.
        mlp_ratio (float, defaults to 4.0), attention_window (int, defaults to 32).
    """

    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(self, latent_channels: int = 128, hidden_size: int = 384, patch_size: int = 16,
                 encoder_blocks: int = 21, encoder_head_size: int = 768, encoder_head_blocks: int = 2,
                 decoder_blocks: int = 21, decoder_pixel_size: int = 32, decoder_pixel_blocks: int = 3,
                 mlp_ratio: float = 4.0, attention_window: int = 32):
        super().__init__()
        self.student = nn.ModuleDict({"dconv_encoder": MageVAEEncoder(
            latent_channels, hidden_size, patch_size, encoder_blocks, encoder_head_size, encoder_head_blocks,
            mlp_ratio)})
        self.pipeline = MageVAEDecoder(latent_channels, hidden_size, patch_size, decoder_blocks, decoder_pixel_size,
                                       decoder_pixel_blocks, mlp_ratio, attention_window)

    @classmethod
    def from_checkpoint(cls, path: str, dtype=None, **config) -> "MageVAE":
        """Load the Mage-Flow repos' ``vae/diffusion_pytorch_model.safetensors`` (no config: the released sizes, or
        ``config``); its unused teacher-encoder tensors are dropped, every tensor of ours must be there."""
        from safetensors.torch import load_file

        state = {k: v for k, v in load_file(path).items()
                 if k.startswith((ENCODER_PREFIX, DECODER_PREFIX)) and not k.startswith(UNUSED_PREFIXES)}
        with torch.device("meta"):
            vae = cls(**config)
        missing = sorted(set(vae.state_dict()) - set(state))
        if missing:
            raise ValueError(f"{path} is not a MageVAE checkpoint of this size: it lacks {len(missing)} tensors "
                             f"({missing[:3]}...).")
        extra = set(state) - set(vae.state_dict())
        vae.load_state_dict({k: v for k, v in state.items() if k not in extra}, assign=True)
        return vae.to(dtype) if dtype is not None else vae

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and (clamped) log-variance of ``pixels``."""
        p = self.config.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"MageVAE encodes images whose sides are multiples of {p}, got {tuple(pixels.shape[-2:])}.")
        out = self.student["dconv_encoder"](pixels)
        mean, logvar = out.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Latents of ``pixels``: a posterior sample drawn with ``generator`` (``sample``) or the mean."""
        from diffusers.utils.torch_utils import randn_tensor

        mean, logvar = self.moments(pixels)
        if not sample:
            return mean
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` (about ``[-1, 1]``, unclamped) of raw ``latents``."""
        return self.pipeline(latents)
