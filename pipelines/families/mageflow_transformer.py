"""The Mage-Flow diffusion transformer (NR-MMDiT), written for this project from the published architecture.

Module and parameter names are those of the ``transformer/diffusion_pytorch_model.safetensors`` of
microsoft/Mage-Flow-Base and microsoft/Mage-Flow-Edit-Base, so the checkpoints load as they are and ai-toolkit's LoRA
keys (``diffusion_model.transformer_blocks.N.attn.to_q`` ...) find their modules. The constructor takes the keys of
the checkpoint's ``transformer/config.json`` (``hidden_size``, ``num_heads``, ``depth``, ``axes_dim``,
``context_in_dim``...); its other keys are ignored. The released model: hidden 3072, 12 blocks, 128 latent channels,
Qwen3-VL features of width 2560, patch size 1 (one token per latent pixel).

The network is Qwen-Image's dual-stream block stack (diffusers' ``QwenImageTransformerBlock``, reused here) with
three differences, all in this file:

1. **Rotary embeddings on image tokens only.** Text tokens are not rotated (:class:`MageFlowAttnProcessor`). Image
   tokens get Qwen-Image's centred 2D rotary code (diffusers' ``QwenEmbedRope``, ``scale_rope``); each image segment
   of the sequence (the target, then every reference image of an edit) takes its index as the frame coordinate.
2. **Timestep code.** ``t`` (the flow sigma, 1 = noise) times 1000 in a 256-wide sinusoidal code (cos first) whose
   frequency table is first rounded to the model's dtype, as the model was trained (diffusers keeps it in float32);
   identical in float32.
3. **No packing.** The reference implementation packs several samples into one variable-length sequence; attention
   keeps them apart, so one sample per forward (what ai-toolkit's previews run) is the same computation.

Input: image tokens ``[1, L_img, C]`` (target tokens first, then reference tokens, each row-major), text features
``[1, L_txt, context_in_dim]``, ``timestep`` ``[1]``, ``img_shapes`` the ``(1, h, w)`` of each image segment. Output:
the velocity ``noise - clean`` for every image token.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, RMSNorm
from diffusers.models.transformers.transformer_qwenimage import (
    QwenEmbedRope,
    QwenImageTransformerBlock,
    apply_rotary_emb_qwen,
)
from torch import nn

TIMESTEP_CHANNELS = 256
TIMESTEP_SCALE = 1000.0
ROPE_THETA = 10000


def timestep_code(timestep: torch.Tensor, channels: int = TIMESTEP_CHANNELS, scale: float = TIMESTEP_SCALE) -> torch.Tensor:
    """``[N] -> [N, channels]`` float32: ``cos(scale t f_k)`` then ``sin(scale t f_k)`` with ``f_k = 10000^(-k/half)``,
    the frequencies rounded to ``timestep``'s dtype first."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = scale * (timestep[:, None].float() * freqs.to(timestep.dtype)[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MageFlowTimestepEmbedding(nn.Module):
    """:func:`timestep_code` through a two-layer MLP (``timestep_embedder.linear_1/linear_2``)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(in_channels=TIMESTEP_CHANNELS, time_embed_dim=embedding_dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_code(timestep).to(dtype))


class MageFlowAttnProcessor:
    """Joint attention over ``[text, image]`` for diffusers' ``Attention`` of a ``QwenImageTransformerBlock``: queries
    and keys RMS-normalised per stream, the rotary code applied to the image tokens only (``image_rotary_emb`` is the
    image tokens' complex frequencies ``[L_img, head_dim / 2]``). One sample per call, so no mask."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or image_rotary_emb is None:
            raise ValueError("MageFlowAttnProcessor needs the text stream and the image tokens' rotary frequencies.")
        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.unflatten(-1, (-1, head_dim))

        img_query = apply_rotary_emb_qwen(attn.norm_q(heads(attn.to_q(hidden_states))), image_rotary_emb, use_real=False)
        img_key = apply_rotary_emb_qwen(attn.norm_k(heads(attn.to_k(hidden_states))), image_rotary_emb, use_real=False)
        img_value = heads(attn.to_v(hidden_states))
        txt_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        txt_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        txt_value = heads(attn.add_v_proj(encoder_hidden_states))

        joint = dispatch_attention_fn(
            torch.cat([txt_query, img_query], dim=1), torch.cat([txt_key, img_key], dim=1),
            torch.cat([txt_value, img_value], dim=1), dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        ).flatten(2, 3).to(txt_query.dtype)
        text_len = encoder_hidden_states.shape[1]
        img_out = attn.to_out[1](attn.to_out[0](joint[:, text_len:].contiguous()))
        txt_out = attn.to_add_out(joint[:, :text_len].contiguous())
        return img_out, txt_out


class MageFlowTransformer2DModel(ModelMixin, ConfigMixin):
    """Mage-Flow's NR-MMDiT. Arguments are the checkpoint config's keys.

    Args:
        in_channels (int, defaults to 128): latent channels in.
        out_channels (int, defaults to 128): velocity channels out.
        context_in_dim (int, defaults to 2560): width of the Qwen3-VL text features.
        hidden_size (int, defaults to 3072): model width (``num_heads`` x head dim).
        num_heads (int, defaults to 24): attention heads.
        depth (int, defaults to 12): dual-stream blocks.
        axes_dim (tuple, defaults to (16, 56, 56)): rotary channels per axis (frame, row, column); they sum to the
            head dim.
        patch_size (int, defaults to 1): latent pixels per token side (the released model: 1).
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["QwenImageTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["QwenImageTransformerBlock"]

    @register_to_config
    def __init__(self, in_channels: int = 128, out_channels: int = 128, context_in_dim: int = 2560,
                 hidden_size: int = 3072, num_heads: int = 24, depth: int = 12, axes_dim: tuple = (16, 56, 56),
                 patch_size: int = 1):
        super().__init__()
        head_dim = hidden_size // num_heads
        if head_dim * num_heads != hidden_size or sum(axes_dim) != head_dim:
            raise ValueError(f"MageFlow: hidden_size {hidden_size} / num_heads {num_heads} must be a whole head dim "
                             f"equal to sum(axes_dim) = {sum(axes_dim)}.")
        self.pos_embed = QwenEmbedRope(theta=ROPE_THETA, axes_dim=list(axes_dim), scale_rope=True)
        self.img_in = nn.Linear(in_channels, hidden_size)
        self.txt_norm = RMSNorm(context_in_dim, eps=1e-6)
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.time_text_embed = MageFlowTimestepEmbedding(hidden_size)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageTransformerBlock(dim=hidden_size, num_attention_heads=num_heads, attention_head_dim=head_dim)
             for _ in range(depth)]
        )
        for block in self.transformer_blocks:
            block.attn.set_processor(MageFlowAttnProcessor())
        self.norm_out = AdaLayerNormContinuous(hidden_size, hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_shapes: list[tuple[int, int, int]], attention_kwargs: dict | None = None) -> torch.Tensor:
        """The velocity ``[1, L_img, out_channels]`` of the image tokens ``hidden_states`` ``[1, L_img, in_channels]``
        (segments as in ``img_shapes``) at flow time ``timestep`` ``[1]``, given the text features."""
        if hidden_states.shape[0] != 1 or encoder_hidden_states.shape[0] != 1:
            raise ValueError("MageFlowTransformer2DModel runs one sample per forward (batch size 1).")
        if sum(f * h * w for f, h, w in img_shapes) != hidden_states.shape[1]:
            raise ValueError(f"img_shapes {img_shapes} do not cover the {hidden_states.shape[1]} image tokens.")
        image_freqs, _ = self.pos_embed([list(img_shapes)], device=hidden_states.device, max_txt_seq_len=0)
        hidden_states = self.img_in(hidden_states)
        temb = self.time_text_embed(timestep.to(hidden_states.dtype), hidden_states.dtype)
        text = self.txt_in(self.txt_norm(encoder_hidden_states))
        for block in self.transformer_blocks:
            text, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=text,
                                        encoder_hidden_states_mask=None, temb=temb, image_rotary_emb=image_freqs,
                                        joint_attention_kwargs=attention_kwargs)
        return self.proj_out(self.norm_out(hidden_states, temb))
