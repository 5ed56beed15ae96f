"""F-Lite (Freepik and fal's 10B text-to-image DiT), sampled as ai-toolkit's ``f-lite`` arch samples it.

F-Lite has no diffusers classes: its checkpoint (``Freepik/F-Lite``) is a diffusers-style folder whose ``dit_model/``
holds fal's own ``DiT`` next to a T5-XXL encoder, its tokenizer and FLUX.1-schnell's ``AutoencoderKL``. ai-toolkit
(``extensions_built_in/diffusion_models/f_light/``) vendors fal's DiT and pipeline and renders its previews with that
pipeline's own loop. :class:`FLiteDiT` is our implementation of the architecture (the checkpoint's config keys and
parameter names) and :class:`FLitePipeline` our implementation of that loop; ``tests/test_f_lite.py`` proves both equal
to ai-toolkit's code on the same weights.

The DiT: 2x2 latent patches (a conv) prefixed by 16 learned register tokens; per block, adaLN-modulated (9 chunks)
self-attention with QK RMS-norm and 2D rotary embedding (registers get the identity rotation), optionally a "residual
value" mix with the first block's values, and a dynamic softmax temperature on the keys; cross-attention to the T5
states (no mask); a GELU MLP; then the register tokens are dropped and a modulated RMS-norm and a linear layer give
the velocity. The time embedding is sinusoidal (cosine half first) of ``1000 t``.

What ai-toolkit's previews do, and so do we:

* **Prompts**: T5's hidden state 8 from the end (layer 17 of 24 for T5-XXL) through the encoder's final layer norm,
  the text padded and truncated to 512 tokens, no attention mask anywhere; the negative prompt is encoded the same way
  (an empty one too).
* **Noise**: ``randn(B, 16, H/8, W/8)`` in the model dtype from the seeded generator.
* **Schedule**: not a scheduler's. ``t_i = i / N`` for ``i = N .. 1``, each warped by
  ``t' = a t / (1 + (a - 1) t)`` with ``a = 2 sqrt((H/8)(W/8) / 4096)``; the model gets ``t'`` (in the model dtype) and
  the Euler step is ``x += (t'_i - t'_{i-1}) v``, accumulated in the model dtype. ai-toolkit's ``FLiteModel`` builds a
  FlowMatch scheduler with dynamic shifting, but it is its training scheduler: the preview loop never calls it.
* **Guidance**: ``u + g (c - u)`` in one batched pass of ``[negative, prompt]`` whenever ``g >= 1`` (at exactly 1 too,
  which equals the conditional output up to rounding); below 1 only the conditional pass runs.
* **Decode**: ``latents / scaling_factor + shift_factor`` through the VAE (in channels-last memory format, as
  F-Lite's pipeline puts it), ``(x / 2 + 0.5)`` clamped to ``[0, 1]``.
* **Size**: floored to a multiple of 16 (``get_bucket_divisibility``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..base import AITKPipeline, GenerationParams
from ..registry import ModelSpec

#: learned tokens in front of the image tokens (the checkpoint's ``register_tokens``)
REGISTER_TOKENS = 16
#: the T5 hidden state the prompt embedding is taken from, counted from the end
T5_HIDDEN_STATE = -8
#: tokens every prompt is padded and truncated to
PROMPT_TOKENS = 512
#: latent channels and the VAE's downsampling
LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 8
#: the rotary table's side in patches (the checkpoint stores it as the buffers ``rope.freqs_hw_cos/sin``)
ROPE_GRID = 512
#: token count at which the schedule warp ``a`` is 2 (it grows with the square root of the latent area)
WARP_REFERENCE_TOKENS = 64 * 64
#: token count at which the dynamic softmax temperature is 1
TEMPERATURE_REFERENCE_TOKENS = 1024 + REGISTER_TOKENS


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(v f), sin(v f)]`` for ``dim / 2`` frequencies ``f = max_period^(-k / (dim/2))``, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(values.device)
    angles = values[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rms_normalize(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm computed in float32 (times ``weight`` there when given), cast back to ``x``'s dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed if weight is None else normed * weight).to(x.dtype)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``[B, H, L, D]`` pairing channel ``j`` with ``j + D/2``, computed in float32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return torch.cat([first * cos + second * sin, second * cos - first * sin], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm, with a learned scale when ``learned`` (the checkpoint's ``normN.weight``)."""

    def __init__(self, dim: int, learned: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if learned else None

    def forward(self, x):
        return rms_normalize(x, self.weight)


class FLiteAttention(nn.Module):
    """Self-attention (fused ``qkv``) or cross-attention (``q`` from the image, ``context_kv`` from the text), QK
    RMS-norm without scale, ``proj`` out."""

    def __init__(self, dim: int, num_heads: int, bias: bool, context_dim: int | None = None,
                 residual_v: bool = False, dynamic_temperature: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.is_self_attention = context_dim is None
        self.dynamic_temperature = dynamic_temperature
        if self.is_self_attention:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.context_kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=False)
        if residual_v:
            self.lambda_param = nn.Parameter(torch.full((1,), 0.5))

    def heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """``[B, L, parts * H * D]`` -> ``parts`` tensors ``[B, H, L, D]``."""
        batch, length, _ = x.shape
        return x.view(batch, length, parts, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, context=None, first_values=None, rope=None):
        if self.is_self_attention:
            q, k, v = self.heads(self.qkv(x), 3)
            if first_values is not None and hasattr(self, "lambda_param"):
                v = self.lambda_param * v + (1 - self.lambda_param) * first_values
            if rope is not None:
                q, k = rotate_halves(q, *rope), rotate_halves(k, *rope)
                if self.dynamic_temperature:
                    k = k * math.sqrt(math.log(q.shape[2]) / math.log(TEMPERATURE_REFERENCE_TOKENS))
        else:
            (q,) = self.heads(self.q(x), 1)
            k, v = self.heads(self.context_kv(context), 2)
        q, k = rms_normalize(q), rms_normalize(k)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        batch, _, length, _ = out.shape
        out = self.proj(out.transpose(1, 2).reshape(batch, length, -1))
        return out, (v if self.is_self_attention else None)


class FLiteBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention and GELU MLP, each gated; modulation chunks are (shift, scale,
    gate) for the three in that order."""

    def __init__(self, dim: int, context_dim: int | None, num_heads: int, mlp_ratio: float, learned: bool,
                 residual_v: bool, dynamic_temperature: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim, learned)
        self.self_attn = FLiteAttention(dim, num_heads, learned, residual_v=residual_v,
                                        dynamic_temperature=dynamic_temperature)
        if context_dim is not None:
            self.norm2 = RMSNorm(dim, learned)
            self.cross_attn = FLiteAttention(dim, num_heads, learned, context_dim=context_dim)
        else:
            self.norm2 = self.cross_attn = None
        self.norm3 = RMSNorm(dim, learned)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(self, x, context, conditioning, first_values=None, rope=None):
        mods = [m[:, None, :] for m in self.adaLN_modulation(conditioning).chunk(9, dim=1)]
        (shift_sa, scale_sa, gate_sa), (shift_ca, scale_ca, gate_ca), (shift_mlp, scale_mlp, gate_mlp) = (
            mods[0:3], mods[3:6], mods[6:9])
        attended, values = self.self_attn(self.norm1(x) * (1 + scale_sa) + shift_sa, first_values=first_values,
                                          rope=rope)
        x = x + attended * gate_sa
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x) * (1 + scale_ca) + shift_ca, context)[0] * gate_ca
        x = x + self.mlp(self.norm3(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp
        return x, values


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.patch_proj(x).flatten(2).transpose(1, 2)


class Rotary2D(nn.Module):
    """Cos/sin tables over a ``ROPE_GRID`` x ``ROPE_GRID`` patch grid: for ``dim`` rotary channels, half of them rotate
    with the row and half with the column (frequencies ``base^(-2k/dim)``)."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        inv_freq = torch.tensor([1.0 / (base ** (i / dim)) for i in range(0, dim, 2)], dtype=torch.float32)
        positions = torch.arange(ROPE_GRID, dtype=torch.float32)
        per_axis = torch.outer(positions, inv_freq)
        rows = per_axis[:, None, :].expand(ROPE_GRID, ROPE_GRID, -1)
        cols = per_axis[None, :, :].expand(ROPE_GRID, ROPE_GRID, -1)
        angles = torch.cat([rows, cols], dim=-1)
        self.register_buffer("freqs_hw_cos", angles.cos())
        self.register_buffer("freqs_hw_sin", angles.sin())

    def forward(self, rows: int, cols: int, leading: int):
        """``(cos, sin)`` of shape ``[1, 1, leading + rows * cols, dim]``; the ``leading`` tokens are not rotated."""
        cos = self.freqs_hw_cos[:rows, :cols].reshape(rows * cols, -1)
        sin = self.freqs_hw_sin[:rows, :cols].reshape(rows * cols, -1)
        cos = torch.cat([torch.ones(leading, cos.shape[1], device=cos.device, dtype=cos.dtype), cos])
        sin = torch.cat([torch.zeros(leading, sin.shape[1], device=sin.device, dtype=sin.dtype), sin])
        return cos[None, None], sin[None, None]


class FLiteDiT(ModelMixin, ConfigMixin):
    """F-Lite's DiT (see the module docstring). The configuration keys are the checkpoint's ``dit_model/config.json``
    ones; ``gradient_checkpoint`` is kept for that file's sake and unused."""

    @register_to_config
    def __init__(self, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                 cross_attn_input_size=128, residual_v=False, train_bias_and_rms=True, use_rope=True,
                 gradient_checkpoint=False, dynamic_softmax_temperature=False, rope_base=10000):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        if use_rope:
            self.rope = Rotary2D(hidden_size // (2 * num_heads), rope_base)
        else:
            self.positional_embedding = nn.Parameter(torch.zeros(1, 2048, hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, REGISTER_TOKENS, hidden_size))
        self.time_embed = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(),
                                        nn.Linear(4 * hidden_size, hidden_size))
        self.blocks = nn.ModuleList([
            FLiteBlock(hidden_size, cross_attn_input_size, num_heads, mlp_ratio, train_bias_and_rms, residual_v,
                       dynamic_softmax_temperature)
            for _ in range(depth)
        ])
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_norm = RMSNorm(hidden_size, train_bias_and_rms)
        self.final_proj = nn.Linear(hidden_size, patch_size * patch_size * in_channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x``: latents ``[B, C, H, W]``; ``context``: T5 states ``[B, L, D]``; ``timesteps``: ``[B]`` in ``[0, 1]``
        (1 = noise). Returns the velocity ``[B, C, H, W]``."""
        batch, channels, height, width = x.shape
        patch = self.config.patch_size
        rows, cols = height // patch, width // patch
        tokens = torch.cat([self.register_tokens.expand(batch, -1, -1), self.patch_embed(x)], dim=1)
        if self.config.use_rope:
            rope = self.rope(rows, cols, REGISTER_TOKENS)
        else:
            tokens = tokens + self.positional_embedding[:, : tokens.shape[1]]
            rope = None
        conditioning = sinusoidal_embedding(timesteps * 1000, self.config.hidden_size).to(x.device, x.dtype)
        conditioning = self.time_embed(conditioning)
        first_values = None
        for block in self.blocks:
            tokens, values = block(tokens, context, conditioning, first_values, rope)
            if first_values is None:
                first_values = values
        shift, scale = self.final_modulation(conditioning).chunk(2, dim=1)
        tokens = self.final_norm(tokens[:, REGISTER_TOKENS:]) * (1 + scale[:, None]) + shift[:, None]
        patches = self.final_proj(tokens).view(batch, rows, cols, patch, patch, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def warped_time(t: float, warp: float) -> float:
    """The schedule warp of F-Lite's sampler, ``a t / (1 + (a - 1) t)``."""
    return t * warp / (1 + (warp - 1) * t)


def schedule_warp(latent_height: int, latent_width: int) -> float:
    return 2 * math.sqrt(latent_height * latent_width / WARP_REFERENCE_TOKENS)


@dataclass
class FLitePipelineOutput(BaseOutput):
    images: object


class FLitePipeline(DiffusionPipeline):
    """F-Lite's components (``dit_model``, ``vae``, ``text_encoder``, ``tokenizer``: the checkpoint's folder names) and
    ai-toolkit's preview loop (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->dit_model->vae"

    def __init__(self, dit_model: FLiteDiT, vae: AutoencoderKL, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(dit_model=dit_model, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        # as F-Lite's own pipeline does: its convolutions round differently in this layout (one 8-bit level)
        self.vae.to(memory_format=torch.channels_last)
        self.image_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR)

    def encode_prompt(self, prompts: list[str], dtype) -> torch.Tensor:
        """T5's hidden state ``T5_HIDDEN_STATE`` through its final layer norm, ``[B, 512, D]`` in ``dtype``."""
        device = self._execution_device
        ids = self.tokenizer(prompts, padding="max_length", max_length=PROMPT_TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[T5_HIDDEN_STATE]
        return self.text_encoder.encoder.final_layer_norm(hidden).to(dtype)

    @torch.no_grad()
    def __call__(self, prompt: list[str], negative_prompt: list[str], width: int, height: int,
                 num_inference_steps: int = 30, guidance_scale: float = 6.0, generator=None, output_type: str = "np",
                 callback_on_step_end=None, return_dict: bool = True):
        """Sample one image per prompt.

        Args:
            prompt (list[str]): one prompt per image.
            negative_prompt (list[str]): the unconditional prompts, used when ``guidance_scale >= 1``.
            width, height (int): the output size, multiples of 16.
            num_inference_steps (int, defaults to 30): Euler steps.
            guidance_scale (float, defaults to 6.0): CFG scale; below 1 only the conditional pass runs.
            generator (torch.Generator or list, *optional*): draws the initial noise (one per image for a list).
            output_type (str, defaults to "np"): ``np``, ``pil``, ``pt`` or ``latent``.
            callback_on_step_end (callable, *optional*): ``f(pipe, step, t, {"latents": latents})`` after every step.
        """
        device = self._execution_device
        dtype = self.dit_model.dtype
        batch_size = len(prompt)
        cfg = guidance_scale >= 1.0
        embeds = self.encode_prompt(prompt, dtype)
        if cfg:
            embeds = torch.cat([self.encode_prompt(negative_prompt, dtype), embeds])

        latent_height, latent_width = height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR
        latents = randn_tensor((batch_size, LATENT_CHANNELS, latent_height, latent_width), generator=generator,
                               device=device, dtype=dtype)
        warp = schedule_warp(latent_height, latent_width)
        self._num_timesteps = num_inference_steps
        for step, i in enumerate(range(num_inference_steps, 0, -1)):
            t = warped_time(i / num_inference_steps, warp)
            t_next = warped_time((i - 1) / num_inference_steps, warp)
            times = torch.full((batch_size * (2 if cfg else 1),), t, device=device, dtype=dtype)
            model_input = torch.cat([latents, latents]) if cfg else latents
            velocity = self.dit_model(model_input, embeds, times)
            if cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = latents + (t - t_next) * velocity
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, t, {"latents": latents})

        if output_type == "latent":
            images = latents
        else:
            scaled = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(scaled.to(self.vae.dtype)).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return FLitePipelineOutput(images=images) if return_dict else (images,)


class FLiteFamilyPipeline(AITKPipeline):
    """``f_lite``."""

    denoiser = "dit_model"
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        return FLitePipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        """The checkpoint's folder (or hub repo): ``dit_model/``, ``vae/``, ``text_encoder/``, ``tokenizer/``. Its
        ``model_index.json`` names fal's own package, so the components are loaded one by one with our classes."""
        from transformers import T5EncoderModel, T5TokenizerFast

        if os.path.exists(source) and not os.path.isdir(os.path.join(source, "dit_model")):
            raise FileNotFoundError(f"{source!r} has no dit_model/ folder; give a snapshot of {spec.base} (dit_model/, "
                                    "vae/, text_encoder/, tokenizer/) or the hub repo id.")
        options = {"dtype": torch_dtype, "device_map": overrides.get("device_map")}
        return FLitePipeline(
            dit_model=FLiteDiT.from_pretrained(source, subfolder="dit_model", **options),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **options),
            text_encoder=T5EncoderModel.from_pretrained(source, subfolder="text_encoder", **options).eval(),
            tokenizer=T5TokenizerFast.from_pretrained(source, subfolder="tokenizer"),
        )

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params)
