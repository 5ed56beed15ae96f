"""The Chroma Radiance denoiser: Chroma's double/single-stream trunk on 16x16 RGB patches, with a per-pixel "NeRF" head
instead of a VAE decoder. Our own implementation, written from the architecture; module and parameter names are the
published checkpoints' (original BFL names: ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``,
``nerf_blocks.N.param_generator``...), so such a state dict loads with ``load_state_dict`` unchanged and ai-toolkit's
LoRA keys (``diffusion_model.`` + these names) address its modules directly.

How a forward runs, for an image ``x`` ``[B, 3, H, W]`` in ``[-1, 1]`` at flow time ``t``:

1. **Patches.** ``img_in_patch`` (a ``p x p`` stride-``p`` convolution) turns each patch into one token; the T5 text
   features go through ``txt_in``. Positions: text tokens all ``(0, 0, 0)``, patch tokens ``(0, row, col)``; rotary
   embedding per axis (``axes_dim``), computed in float64 and applied to adjacent channel pairs.
2. **Modulation.** Chroma replaces FLUX's per-block modulation layers with one shared MLP, ``distilled_guidance_layer``:
   its input is, for every modulation vector index ``i``, ``[emb(t), emb(guidance), emb(i)]`` (sinusoidal embeddings
   of ``1000 t``, ``1000 guidance`` and ``1000 i``), and it returns every block's shift/scale/gate at once: 3 vectors
   per single block, then 6 per double block for the image stream, then 6 per double block for the text stream, then
   2 for the (unused) final layer.
3. **Trunk.** FLUX's double-stream blocks (joint attention of text and image tokens, separate weights), then its
   single-stream blocks (fused ``linear1``: q, k, v and the MLP input). The attention mask is the outer product of
   the token mask (text mask, image tokens always on): masked text tokens neither attend nor are attended to.
4. **NeRF head.** Each patch token's final hidden state generates the weights of a small gated MLP (``nerf_blocks``:
   ``param_generator`` -> gate, value and output matrices, each column L2-normalised) that runs on the patch's pixels,
   embedded by :class:`~.pixel_space.DctPatchEmbedder` (pixel values + DCT position code, one Linear, float32). The pixel features
   are RMS-normalised, put back on the image grid and projected to RGB by a 3x3 convolution
   (``nerf_final_layer_conv``).

The output is the flow velocity (ai-toolkit trains it on ``noise - image``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .pixel_space import DctPatchEmbedder, patchify_pixels, unpatchify_pixels

#: the sinusoidal embeddings' scale: time, guidance and modulation index are multiplied by it before embedding
EMBEDDING_TIME_FACTOR = 1000.0
#: modulation vectors per block: a single block (shift, scale, gate); a double block per stream (two of those)
SINGLE_MOD_VECTORS = 3
DOUBLE_MOD_VECTORS = 6
FINAL_MOD_VECTORS = 2
NORM_EPS = 1e-6
#: the rotary channels per position axis of the published checkpoints (128-wide heads); a state dict cannot tell them
PUBLISHED_AXES_DIM = (16, 56, 56)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[N]`` -> ``[N, dim]``: ``[cos, sin]`` of ``EMBEDDING_TIME_FACTOR * values`` at ``dim / 2`` geometric
    frequencies; float32, cast to the values' dtype when they are floating point."""
    scaled = EMBEDDING_TIME_FACTOR * values
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(values.device)
    angles = scaled[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return embedding.to(values) if torch.is_floating_point(values) else embedding


def rotary_angles(positions: torch.Tensor, axes_dim, theta: float) -> torch.Tensor:
    """``positions [B, L, n_axes]`` -> ``(cos, sin)`` float32 ``[B, 1, L, head_dim / 2]``, computed in float64."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[..., axis].double()[..., None] * omega)
    angles = torch.cat(angles, dim=-1).unsqueeze(1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent channel pairs ``(x[2i], x[2i+1])`` of ``x [B, H, L, D]`` by the angles; float32 math."""
    pairs = x.float().unflatten(-1, (-1, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([cos * first - sin * second, sin * first + cos * second], dim=-1)
    return rotated.flatten(-2).type_as(x)


def joint_attention(q, k, v, rope, mask) -> torch.Tensor:
    """Rotary attention over ``[B, H, L, D]`` heads; returns ``[B, L, H * D]``."""
    cos, sin = rope
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def split_heads(qkv: torch.Tensor, num_heads: int):
    """``[B, L, 3 * H * D]`` (q, k, v outermost, then heads) -> three ``[B, H, L, D]``."""
    batch, length, _ = qkv.shape
    return qkv.view(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * x + shift


class RMSNorm(nn.Module):
    """RMS norm with a learned ``scale`` (the checkpoints' parameter name), eps 1e-6."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.scale.shape, weight=self.scale, eps=NORM_EPS)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class StreamAttention(nn.Module):
    """One stream's fused q/k/v projection, q/k norms and output projection (``img_attn`` / ``txt_attn``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Text and image tokens with their own weights, attending jointly (text first)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_attn = StreamAttention(dim, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.img_mlp = feed_forward(dim, mlp_hidden)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_attn = StreamAttention(dim, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.txt_mlp = feed_forward(dim, mlp_hidden)

    def forward(self, img, txt, img_mod, txt_mod, rope, mask):
        """``img_mod`` / ``txt_mod``: six ``[B, 1, dim]`` vectors each (shift, scale, gate for attention, then MLP)."""
        img_q, img_k, img_v = self.img_attn.heads(modulate(self.img_norm1(img), img_mod[0], img_mod[1]))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(self.txt_norm1(txt), txt_mod[0], txt_mod[1]))
        attn = joint_attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                               torch.cat((txt_v, img_v), dim=2), rope, mask)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_mod[2] * self.img_attn.proj(img_attn)
        img = img + img_mod[5] * self.img_mlp(modulate(self.img_norm2(img), img_mod[3], img_mod[4]))
        txt = txt + txt_mod[2] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod[5] * self.txt_mlp(modulate(self.txt_norm2(txt), txt_mod[3], txt_mod[4]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One token stream; ``linear1`` = q, k, v and the MLP input, ``linear2`` = attention output and MLP output."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, dim * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.mlp_act = nn.GELU(approximate="tanh")

    def forward(self, x, mod, rope, mask):
        """``mod``: shift, scale, gate ``[B, 1, dim]``."""
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), mod[0], mod[1])).split(
            [x.shape[-1] * 3, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((joint_attention(q, k, v, rope, mask), self.mlp_act(mlp)), dim=2))
        return x + mod[2] * out


class MLPEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Approximator(nn.Module):
    """Chroma's modulation MLP (``distilled_guidance_layer``): pre-norm residual MLP layers between two projections."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, depth: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList([MLPEmbedder(hidden_dim) for _ in range(depth)])
        self.norms = nn.ModuleList([RMSNorm(hidden_dim) for _ in range(depth)])
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        x = self.in_proj(x.to(self.in_proj.weight.dtype))
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class NerfGLUBlock(nn.Module):
    """A gated MLP over a patch's pixel features whose three weight matrices are generated from the patch token."""

    def __init__(self, token_dim: int, pixel_dim: int, mlp_ratio: int):
        super().__init__()
        self.mlp_ratio = mlp_ratio
        self.param_generator = nn.Linear(token_dim, 3 * pixel_dim * pixel_dim * mlp_ratio)
        self.norm = RMSNorm(pixel_dim)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``pixels [B', p*p, pixel_dim]``, ``tokens [B', token_dim]`` (one patch per row)."""
        patches, _, dim = pixels.shape
        inner = dim * self.mlp_ratio
        gate, value, out = self.param_generator(tokens).chunk(3, dim=-1)
        gate = F.normalize(gate.view(patches, dim, inner), dim=-2)
        value = F.normalize(value.view(patches, dim, inner), dim=-2)
        out = F.normalize(out.view(patches, inner, dim), dim=-2)
        x = self.norm(pixels)
        return torch.bmm(F.silu(torch.bmm(x, gate)) * torch.bmm(x, value), out) + pixels


class NerfFinalLayerConv(nn.Module):
    """RMS norm of the pixel features, then a 3x3 convolution to RGB on the image grid."""

    def __init__(self, pixel_dim: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(pixel_dim)
        self.conv = nn.Conv2d(pixel_dim, out_channels, kernel_size=3, padding=1)


class ChromaRadianceTransformer2DModel(ModelMixin, ConfigMixin):
    r"""Chroma Radiance, a pixel-space Chroma (no VAE). Defaults are the published checkpoints' (Chroma1 sizes).

    Args:
        in_channels (int, defaults to 3): image channels (also the output's).
        context_in_dim (int, defaults to 4096): text feature width (T5-XXL).
        hidden_size (int, defaults to 3072): token width.
        mlp_ratio (float, defaults to 4.0): trunk MLP width / ``hidden_size``.
        num_heads (int, defaults to 24): attention heads; ``hidden_size / num_heads = sum(axes_dim)``.
        depth (int, defaults to 19): double-stream blocks.
        depth_single_blocks (int, defaults to 38): single-stream blocks.
        axes_dim (tuple, defaults to (16, 56, 56)): rotary channels per position axis.
        theta (int, defaults to 10000): rotary base.
        qkv_bias (bool, defaults to True): biases of the double blocks' q/k/v projections.
        approximator_in_dim (int, defaults to 64): modulation MLP input (a quarter time, a quarter guidance, half
            modulation index embedding).
        approximator_depth (int, defaults to 5): modulation MLP layers.
        approximator_hidden_size (int, defaults to 5120): modulation MLP width.
        patch_size (int, defaults to 16): pixels per patch side.
        nerf_hidden_size (int, defaults to 64): pixel feature width of the NeRF head.
        nerf_mlp_ratio (int, defaults to 4): NeRF MLP width / ``nerf_hidden_size``.
        nerf_depth (int, defaults to 4): NeRF blocks.
        nerf_max_freqs (int, defaults to 8): DCT frequencies per axis of the pixel position code.
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["DoubleStreamBlock", "SingleStreamBlock"]
    _repeated_blocks = ["DoubleStreamBlock", "SingleStreamBlock"]
    _keep_in_fp32_modules = ["nerf_image_embedder"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        context_in_dim: int = 4096,
        hidden_size: int = 3072,
        mlp_ratio: float = 4.0,
        num_heads: int = 24,
        depth: int = 19,
        depth_single_blocks: int = 38,
        axes_dim: tuple[int, ...] = PUBLISHED_AXES_DIM,
        theta: int = 10_000,
        qkv_bias: bool = True,
        approximator_in_dim: int = 64,
        approximator_depth: int = 5,
        approximator_hidden_size: int = 5120,
        patch_size: int = 16,
        nerf_hidden_size: int = 64,
        nerf_mlp_ratio: int = 4,
        nerf_depth: int = 4,
        nerf_max_freqs: int = 8,
    ):
        super().__init__()
        if hidden_size % num_heads or sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must be a whole head width equal to "
                             f"sum(axes_dim) = {sum(axes_dim)}.")
        if approximator_in_dim % 4:
            raise ValueError(f"approximator_in_dim must be a multiple of 4, got {approximator_in_dim}.")
        self.img_in_patch = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.distilled_guidance_layer = Approximator(approximator_in_dim, hidden_size, approximator_hidden_size,
                                                     approximator_depth)
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)])
        self.nerf_image_embedder = DctPatchEmbedder(in_channels, nerf_hidden_size, nerf_max_freqs)
        self.nerf_blocks = nn.ModuleList(
            [NerfGLUBlock(hidden_size, nerf_hidden_size, nerf_mlp_ratio) for _ in range(nerf_depth)])
        self.nerf_final_layer_conv = NerfFinalLayerConv(nerf_hidden_size, in_channels)

    @property
    def num_modulation_vectors(self) -> int:
        config = self.config
        return (SINGLE_MOD_VECTORS * config.depth_single_blocks + 2 * DOUBLE_MOD_VECTORS * config.depth
                + FINAL_MOD_VECTORS)

    def modulations(self, timestep: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Every block's modulation vectors ``[B, num_modulation_vectors, hidden_size]``."""
        quarter = self.config.approximator_in_dim // 4
        count = self.num_modulation_vectors
        conditions = torch.cat([sinusoidal_embedding(timestep, quarter), sinusoidal_embedding(guidance, quarter)], dim=1)
        index = sinusoidal_embedding(torch.arange(count, device=timestep.device), 2 * quarter)
        inputs = torch.cat([conditions.unsqueeze(1).expand(-1, count, -1),
                            index.unsqueeze(0).expand(timestep.shape[0], -1, -1)], dim=-1)
        return self.distilled_guidance_layer(inputs)

    def positions(self, batch: int, text_tokens: int, rows: int, cols: int, device) -> torch.Tensor:
        """``[B, text + rows*cols, 3]``: text at the origin, patches at ``(0, row, col)``."""
        grid = torch.zeros(rows, cols, 3, device=device)
        grid[..., 1] = torch.arange(rows, device=device)[:, None]
        grid[..., 2] = torch.arange(cols, device=device)[None, :]
        ids = torch.cat([torch.zeros(text_tokens, 3, device=device), grid.reshape(rows * cols, 3)])
        return ids.unsqueeze(0).expand(batch, -1, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """Predict the flow velocity.

        Args:
            hidden_states (torch.Tensor): noisy images ``[B, C, H, W]``, H and W multiples of ``patch_size``.
            encoder_hidden_states (torch.Tensor): text features ``[B, L, context_in_dim]``.
            timestep (torch.Tensor): flow time in ``[0, 1]`` per image ``[B]``.
            attention_mask (torch.Tensor, *optional*): ``[B, L]``, nonzero for the text tokens taking part in
                attention (Chroma: the prompt's tokens and the first padding token); None: all of them.
            guidance (torch.Tensor, *optional*): the modulation MLP's guidance input ``[B]``; defaults to 0, the value
                Chroma is sampled with.
            return_dict (bool, defaults to True): return a ``Transformer2DModelOutput`` instead of a tuple.
        """
        config = self.config
        batch, channels, height, width = hidden_states.shape
        patch = config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"Image size {width}x{height} must be a multiple of the patch size {patch}.")
        if guidance is None:
            guidance = torch.zeros(batch, device=hidden_states.device)
        rows, cols = height // patch, width // patch

        img = self.img_in_patch(hidden_states).flatten(2).transpose(1, 2)
        txt = self.txt_in(encoder_hidden_states)
        text_tokens = txt.shape[1]
        mods = self.modulations(timestep, guidance).unsqueeze(2).unbind(1)  # each [B, 1, hidden]
        single_mods = mods[: SINGLE_MOD_VECTORS * config.depth_single_blocks]
        img_mods = mods[len(single_mods): len(single_mods) + DOUBLE_MOD_VECTORS * config.depth]
        txt_mods = mods[len(single_mods) + len(img_mods): len(single_mods) + 2 * len(img_mods)]
        rope = rotary_angles(self.positions(batch, text_tokens, rows, cols, img.device), config.axes_dim, config.theta)
        mask = None
        if attention_mask is not None:
            tokens = torch.cat([attention_mask.bool(), torch.ones(batch, img.shape[1], dtype=torch.bool,
                                                                  device=img.device)], dim=1)
            mask = (tokens[:, :, None] & tokens[:, None, :]).unsqueeze(1)

        for i, block in enumerate(self.double_blocks):
            span = slice(DOUBLE_MOD_VECTORS * i, DOUBLE_MOD_VECTORS * (i + 1))
            img, txt = block(img, txt, img_mods[span], txt_mods[span], rope, mask)
        tokens = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            tokens = block(tokens, single_mods[SINGLE_MOD_VECTORS * i: SINGLE_MOD_VECTORS * (i + 1)], rope, mask)
        patch_tokens = tokens[:, text_tokens:].reshape(batch * rows * cols, config.hidden_size)

        # NeRF head: one row per patch, its p*p pixels as a sequence of channel vectors
        pixels = patchify_pixels(hidden_states, patch).reshape(batch * rows * cols, channels, patch * patch)
        features = self.nerf_image_embedder(pixels.transpose(1, 2))
        for block in self.nerf_blocks:
            features = block(features, patch_tokens)
        features = self.nerf_final_layer_conv.norm(features)
        features = features.transpose(1, 2).reshape(batch, rows * cols, -1)
        output = self.nerf_final_layer_conv.conv(unpatchify_pixels(features, height, width, patch))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def config_from_state_dict(state_dict: dict, axes_dim: tuple[int, ...] = PUBLISHED_AXES_DIM) -> dict:
    """The constructor arguments of a Radiance checkpoint in original names (block and layer counts, widths, patch
    size read from the tensors; ``axes_dim``, which no tensor holds, given); refuses the layouts ai-toolkit's
    ``chroma_radiance`` cannot load either."""
    keys = set(state_dict)
    markers = sorted(k for k in ("__x0__", "__sequential__") if k in keys)
    if markers or "nerf_final_layer.linear.weight" in keys:
        found = markers or ["nerf_final_layer.linear.*"]
        raise ValueError(
            f"This Chroma Radiance checkpoint has {found}: it is an x0-prediction / sequential-text-id / linear-head "
            "variant that ai-toolkit's `chroma_radiance` (velocity prediction, 3x3 conv head) does not load, so its "
            "previews were not made with it. Use a velocity-prediction Radiance checkpoint (nerf_final_layer_conv.*).")
    if "img_in_patch.weight" not in keys or "nerf_final_layer_conv.conv.weight" not in keys:
        raise ValueError("Not a Chroma Radiance checkpoint in original names: it lacks img_in_patch.weight or "
                         "nerf_final_layer_conv.conv.weight.")

    def count(prefix: str) -> int:
        depth = prefix.count(".") + 1
        return len({k.split(".")[depth] for k in keys if k.startswith(prefix + ".")})

    patch = state_dict["img_in_patch.weight"]
    hidden, in_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    head_dim = state_dict["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if sum(axes_dim) != head_dim:
        raise ValueError(f"The checkpoint's heads are {head_dim} wide but axes_dim {tuple(axes_dim)} adds up to "
                         f"{sum(axes_dim)}: pass the rotary split (axes_dim) of this checkpoint.")
    nerf_hidden = state_dict["nerf_image_embedder.embedder.0.weight"].shape[0]
    approximator = state_dict["distilled_guidance_layer.in_proj.weight"]
    return {
        "in_channels": in_channels,
        "context_in_dim": state_dict["txt_in.weight"].shape[1],
        "hidden_size": hidden,
        "mlp_ratio": state_dict["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        "num_heads": hidden // head_dim,
        "depth": count("double_blocks"),
        "depth_single_blocks": count("single_blocks"),
        "axes_dim": tuple(axes_dim),
        "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in keys,
        "approximator_in_dim": approximator.shape[1],
        "approximator_depth": count("distilled_guidance_layer.layers"),
        "approximator_hidden_size": approximator.shape[0],
        "patch_size": patch_size,
        "nerf_hidden_size": nerf_hidden,
        "nerf_mlp_ratio": state_dict["nerf_blocks.0.param_generator.weight"].shape[0] // (3 * nerf_hidden**2),
        "nerf_depth": count("nerf_blocks"),
        "nerf_max_freqs": math.isqrt(state_dict["nerf_image_embedder.embedder.0.weight"].shape[1] - in_channels),
    }
