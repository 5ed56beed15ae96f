"""Tiny Ideogram 4 pipeline: real ``Ideogram4Transformer2DModel``, ``Qwen3VLModel`` and ``AutoencoderKLFlux2``.

The text encoder has 36 layers (Ideogram 4 taps 13 of them, up to layer 35), 16 wide, so the transformer's
``llm_features_dim`` is 16 x 13. The transformer's parameters are redrawn at a scale (0.2) where the prompt visibly
moves the prediction; its head dimension is 16, so the MRoPE sections (t, h, w) are (4, 2, 2) of its 8 frequencies.
The VAE has the published checkpoint's layout (quant convs, 32-group norms, 32 latent channels) at 32 channels
wide. The checkpoint has no unconditional transformer here: ai-toolkit samples both CFG passes with the one
transformer. The tokenizer is the in-memory Qwen-style stand-in.
"""

from __future__ import annotations

from .tokenizers import qwen_tokenizer

TEXT_HIDDEN = 16
TEXT_LAYERS = 36
TRANSFORMER_CONFIG = dict(in_channels=128, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                          intermediate_size=48, adaln_dim=16, llm_features_dim=TEXT_HIDDEN * 13,
                          mrope_section=(4, 2, 2))


def ideogram4_transformer(seed: int = 0):
    import torch
    from diffusers import Ideogram4Transformer2DModel

    transformer = Ideogram4Transformer2DModel(**TRANSFORMER_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(transformer.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return transformer.eval()


def ideogram4_text_encoder(tokenizer):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=TEXT_HIDDEN, intermediate_size=24, num_hidden_layers=TEXT_LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer),
                         rope_theta=5e6,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    text_encoder = Qwen3VLModel(config).eval()
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():  # unit-scale token embeddings, so that the prompt moves the prediction clearly
        embeddings.copy_(torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(5)))
    return text_encoder


def ideogram4_vae():
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
        latent_channels=32, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True, sample_size=64,
    )
    with torch.no_grad():  # batch-norm statistics unlike ai-toolkit's latent normalisation, so a mix-up shows
        vae.bn.running_mean.uniform_(-0.1, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    return vae.eval()


def build_ideogram4():
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline

    tokenizer = qwen_tokenizer()
    return Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=ideogram4_vae(),
        text_encoder=ideogram4_text_encoder(tokenizer), tokenizer=tokenizer, transformer=ideogram4_transformer(),
        unconditional_transformer=None,
    )


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layouts ai-toolkit saves for Ideogram 4, under ``diffusion_model.`` + Ideogram's module names: a LoRA on
    the block Linears (``attention.qkv`` fused, ``attention.o``, ``feed_forward.w1/w2/w3``, ``adaln_modulation``),
    and an unconditional LoRA on every Linear of the transformer (for ``side="uncond"``)."""
    import os

    import torch

    from .loras import save_lora

    transformer = pipe.transformer
    generator = torch.Generator().manual_seed(seed)
    renamed = {"attention.to_q": "attention.qkv", "attention.to_out.0": "attention.o"}
    skipped = ("attention.to_k", "attention.to_v")

    def lora(blocks_only: bool) -> dict:
        tensors = {}
        for name, module in transformer.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.endswith(skipped):
                continue
            if blocks_only and not name.startswith("layers."):
                continue
            rows = module.out_features
            for ours, theirs in renamed.items():
                if name.endswith(ours):
                    name = name[: -len(ours)] + theirs
                    rows = 3 * module.out_features if theirs.endswith("qkv") else rows
            key = f"diffusion_model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=generator) * 0.3
        return tensors

    return {
        "ai-toolkit (Ideogram names)": save_lora(os.path.join(out_dir, "tiny_aitk_ideogram.safetensors"), lora(True)),
        "ai-toolkit unconditional LoRA (side uncond)": save_lora(
            os.path.join(out_dir, "tiny_aitk_ideogram_uncond.safetensors"), lora(False)),
    }
