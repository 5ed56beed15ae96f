"""Tiny Anima pipeline: the real ``CosmosTransformer3DModel``, ``AnimaTextConditioner``, Qwen3 text encoder and Qwen-Image
VAE with random weights, assembled as the family's modular pipeline (``pipelines/families/anima.py``).

Anima is published as a modular pipeline (``modular_model_index.json``, no ``model_index.json``); ``save_pretrained``
writes the same layout.
"""

from __future__ import annotations

from .tokenizers import qwen_tokenizer, t5_tokenizer

LATENT_CHANNELS = 16


def anima_transformer(seed: int = 0):
    """The Cosmos-Predict2 layout Anima uses (padding-mask channel, no extra positional embedding), tiny."""
    import torch
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(seed)
    return CosmosTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None,
    )


def anima_text_conditioner(target_vocab_size: int, seed: int = 0):
    """The LLM adapter: T5 token embeddings cross-attending to the Qwen3 states; ``target_dim`` is the transformer's
    ``text_embed_dim``."""
    import torch
    from diffusers import AnimaTextConditioner

    torch.manual_seed(seed)
    return AnimaTextConditioner(
        source_dim=16, target_dim=16, model_dim=16, num_layers=2, num_attention_heads=2,
        target_vocab_size=target_vocab_size, min_sequence_length=32,
    )


def anima_components() -> dict:
    import torch
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    t5 = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
    )).eval()  # no pad_token_id, as Qwen3's config: the pad token's embedding is a trained (here random) row
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )
    return {
        "transformer": anima_transformer(), "text_conditioner": anima_text_conditioner(len(t5)),
        "text_encoder": text_encoder, "tokenizer": tokenizer, "t5_tokenizer": t5, "vae": vae,
    }


def build_anima():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines.families.anima import AnimaAitkBlocks
    from ..pipelines.registry import ANIMA_FLOWMATCH

    pipe = AnimaAitkBlocks().init_pipeline()
    pipe.update_components(**anima_components(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(ANIMA_FLOWMATCH))
    return pipe


def cosmos_named_state_dict(pipe, seed: int = 0, rank: int = 4, std: float = 0.3) -> dict:
    """Random PEFT LoRA tensors under the names ai-toolkit saves for Anima (``train_text_conditioner`` on): every Linear
    of the transformer blocks as ``diffusion_model.blocks.N.<Cosmos name>`` and of the LLM adapter as
    ``diffusion_model.llm_adapter.<name>``."""
    import torch

    from ..pipelines.families.anima import COSMOS_BLOCK_NAMES

    to_cosmos = {diffusers_name: cosmos for cosmos, diffusers_name in COSMOS_BLOCK_NAMES.items()}
    targets = []
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
            _, block, inner = name.split(".", 2)
            targets.append((f"blocks.{block}.{to_cosmos[inner]}", module))
    targets += [(f"llm_adapter.{name}", module) for name, module in pipe.text_conditioner.named_modules()
                if isinstance(module, torch.nn.Linear)]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, module in targets:
        out_f, in_f = module.weight.shape
        sd[f"diffusion_model.{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
        sd[f"diffusion_model.{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    return sd


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layout ai-toolkit saves for Anima: ComfyUI / original Cosmos names, LLM adapter included."""
    import os

    from .loras import save_lora

    path = os.path.join(out_dir, "tiny_aitk_anima.safetensors")
    return {"ai-toolkit (Cosmos names + LLM adapter)": save_lora(path, cosmos_named_state_dict(pipe, seed))}
