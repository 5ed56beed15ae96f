"""Tiny Chroma pipeline: real classes (ChromaTransformer2DModel, T5, FLUX.1's 16-channel VAE), random weights.

:func:`bfl_lora_pair` writes one LoRA under ai-toolkit's original BFL names (fused ``qkv``, ``single_blocks.N.linear1``
= q, k, v and MLP input) and under the diffusers names of the same modules, for the renaming tests.
"""

from __future__ import annotations

from .flux import flux_vae, t5_text_encoder
from .tokenizers import t5_tokenizer


def chroma_transformer():
    import torch
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 6, 6], approximator_hidden_dim=32, approximator_layers=1,
        approximator_num_channels=16,
    )


def build_chroma():
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    from ..pipelines.registry import FLUX_FLOWMATCH

    tokenizer = t5_tokenizer()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOWMATCH), vae=flux_vae(),
                          text_encoder=t5_text_encoder(tokenizer), tokenizer=tokenizer, transformer=chroma_transformer())


def bfl_lora_pair(transformer, rank: int = 4, seed: int = 0, std: float = 0.3) -> tuple[dict, dict]:
    """One random LoRA on every block Linear, as (BFL-named file tensors, diffusers-named equivalent)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    bfl, diffusers_named = {}, {}

    def factors(in_f, out_f):
        return torch.randn(rank, in_f, generator=g) * std, torch.randn(out_f, rank, generator=g) * std

    def put(sd, key, a, b):
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = a, b

    def fused(bfl_key, parent, names):
        modules = [parent.get_submodule(n) for n in names]
        a, b = factors(modules[0].in_features, sum(m.out_features for m in modules))
        put(bfl, bfl_key, a, b)
        return a, b.split([m.out_features for m in modules], dim=0)

    for i, block in enumerate(transformer.transformer_blocks):
        prefix = f"transformer.transformer_blocks.{i}"
        for side, qkv in (("img_attn", ("to_q", "to_k", "to_v")), ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            a, parts = fused(f"diffusion_model.double_blocks.{i}.{side}.qkv", block.attn, qkv)
            for name, rows in zip(qkv, parts):
                put(diffusers_named, f"{prefix}.attn.{name}", a, rows)
        singles = [("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                   ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                   ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")]
        for bfl_name, name in singles:
            linear = block.get_submodule(name)
            a, b = factors(linear.in_features, linear.out_features)
            put(bfl, f"diffusion_model.double_blocks.{i}.{bfl_name}", a, b)
            put(diffusers_named, f"{prefix}.{name}", a, b)
    for i, block in enumerate(transformer.single_transformer_blocks):
        prefix = f"transformer.single_transformer_blocks.{i}"
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        a, parts = fused(f"diffusion_model.single_blocks.{i}.linear1", block, names)
        for name, rows in zip(names, parts):
            put(diffusers_named, f"{prefix}.{name}", a, rows)
        a, b = factors(block.proj_out.in_features, block.proj_out.out_features)
        put(bfl, f"diffusion_model.single_blocks.{i}.linear2", a, b)
        put(diffusers_named, f"{prefix}.proj_out", a, b)
    return bfl, diffusers_named


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layout ai-toolkit saves for this family: original BFL module names under ``diffusion_model.``."""
    from .loras import write_bfl_native_lora

    return write_bfl_native_lora(bfl_lora_pair(pipe.transformer, seed=seed)[0], out_dir)
