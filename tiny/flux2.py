"""Tiny FLUX.2-dev and FLUX.2-klein pipelines: real classes, random weights, built offline.

The text encoders have 3 layers, 16 wide: fewer than the hidden-state layers the real models read ((10, 20, 30) and
(9, 18, 27)), so the family reads their last three layers instead (``pipelines/families/flux2.py text_encoder_out_layers``);
``joint_attention_dim`` is 3 x 16 accordingly. Full-depth tiny encoders would cost seconds per prompt at FLUX.2's 512
tokens. FLUX.2-dev's real tokenizer is a Pixtral ``AutoProcessor`` (hub only); the Qwen-style stand-in
from :mod:`.tokenizers` has a chat template that accepts FLUX.2's list-of-parts messages, which is all text-only
encoding needs. Reference images go through the VAE only, so they work without the processor too.

:func:`bfl_lora_pair` writes the same LoRA twice: under ai-toolkit's original BFL module names (fused ``qkv``,
``linear1``) and under the diffusers module names of the loaded transformer, for the renaming tests.
"""

from __future__ import annotations

from .tokenizers import qwen_tokenizer

TEXT_HIDDEN = 16
TEXT_LAYERS = 3


def flux2_transformer(guidance_embeds: bool):
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,
    )


def flux2_vae():
    """An AutoencoderKLFlux2 with the real 8x geometry and 32 latent channels (128 after 2x2 patching)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16,) * 4, layers_per_block=1, latent_channels=32,
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False, sample_size=64,
    )
    with torch.no_grad():  # non-trivial latent statistics, so the batch-norm (de)normalisation is exercised
        vae.bn.running_mean.uniform_(-0.1, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    return vae


def flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines.registry import FLUX2_EULER

    return FlowMatchEulerDiscreteScheduler.from_config(FLUX2_EULER)


def build_flux2():
    """FLUX.2-dev: Mistral3 text encoder, guidance embedding."""
    import torch
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = qwen_tokenizer()
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=24,
                         max_position_embeddings=1024, num_attention_heads=2, num_hidden_layers=TEXT_LAYERS,
                         num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=24, image_size=30, patch_size=6, num_channels=3),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image_pad|>"), image_seq_length=4, vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(scheduler=flux2_scheduler(), vae=flux2_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=flux2_transformer(guidance_embeds=True))


def build_flux2_klein():
    """FLUX.2-klein (base, not step-distilled): Qwen3 text encoder, no guidance embedding, real CFG."""
    import torch
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=TEXT_HIDDEN, intermediate_size=24, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=None,
        eos_token_id=None,
    )).eval()
    return Flux2KleinPipeline(scheduler=flux2_scheduler(), vae=flux2_vae(), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=flux2_transformer(guidance_embeds=False),
                              is_distilled=False)


# ---------------------------------------------------------------------------------------------- BFL-named LoRAs
def bfl_lora_pair(transformer, rank: int = 4, seed: int = 0, std: float = 0.3) -> tuple[dict, dict]:
    """One random LoRA on every block Linear, as (BFL-named file tensors, diffusers-named equivalent).

    BFL side: ``diffusion_model.double_blocks.N.{img,txt}_attn.{qkv,proj}``, ``{img,txt}_mlp.{0,2}``,
    ``single_blocks.N.linear1/linear2`` with fused ``qkv`` factors. Diffusers side: the fused ``lora_B`` split by
    rows onto ``to_q``/``to_k``/``to_v`` (``add_*_proj`` for text) with the same ``lora_A``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    bfl, diffusers_named = {}, {}

    def factors(in_f, out_f):
        return torch.randn(rank, in_f, generator=g) * std, torch.randn(out_f, rank, generator=g) * std

    def put(sd, key, a, b):
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = a, b

    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        pairs = [("img_attn", ("to_q", "to_k", "to_v"), "to_out.0", "ff"),
                 ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context")]
        for side, qkv_names, proj_name, ff_name in pairs:
            q = attn.get_submodule(qkv_names[0])
            a, b = factors(q.in_features, 3 * q.out_features)
            put(bfl, f"diffusion_model.double_blocks.{i}.{side}.qkv", a, b)
            for name, rows in zip(qkv_names, b.chunk(3, dim=0)):
                put(diffusers_named, f"transformer.transformer_blocks.{i}.attn.{name}", a, rows)
            proj = attn.get_submodule(proj_name)
            a, b = factors(proj.in_features, proj.out_features)
            put(bfl, f"diffusion_model.double_blocks.{i}.{side}.proj", a, b)
            put(diffusers_named, f"transformer.transformer_blocks.{i}.attn.{proj_name}", a, b)
            mlp = "img_mlp" if side == "img_attn" else "txt_mlp"
            for index, layer in (("0", "linear_in"), ("2", "linear_out")):
                linear = block.get_submodule(f"{ff_name}.{layer}")
                a, b = factors(linear.in_features, linear.out_features)
                put(bfl, f"diffusion_model.double_blocks.{i}.{mlp}.{index}", a, b)
                put(diffusers_named, f"transformer.transformer_blocks.{i}.{ff_name}.{layer}", a, b)
    for i, block in enumerate(transformer.single_transformer_blocks):
        for bfl_name, module_name in (("linear1", "to_qkv_mlp_proj"), ("linear2", "to_out")):
            linear = block.attn.get_submodule(module_name)
            a, b = factors(linear.in_features, linear.out_features)
            put(bfl, f"diffusion_model.single_blocks.{i}.{bfl_name}", a, b)
            put(diffusers_named, f"transformer.single_transformer_blocks.{i}.attn.{module_name}", a, b)
    return bfl, diffusers_named


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layout ai-toolkit saves for this family: original BFL module names under ``diffusion_model.``."""
    from .loras import write_bfl_native_lora

    return write_bfl_native_lora(bfl_lora_pair(pipe.transformer, seed=seed)[0], out_dir)
