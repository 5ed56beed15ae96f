"""Tiny HiDream-I1 / HiDream-E1 pipelines: real classes (HiDreamImageTransformer2DModel with MoE feed-forwards, two
CLIPTextModelWithProjection, T5EncoderModel, LlamaForCausalLM, FLUX.1's 16-channel VAE), random weights, offline.

The transformer's ``max_resolution`` is 8x8 latents (16 tokens), so I1's full-area rule samples 64x64; E1's is 8x16
because the control latent is appended along the width. The Llama tokenizer is a byte-level BPE (no merges) built
in memory with Llama-3's begin/end-of-text specials.

The end-to-end jobs (goldens/e2e/hidream and hidream_e1, their ``base.json``) sample variants built by these
builders' arguments. ai-toolkit's I1 pipeline renders every preview at the area ``(128 * vae_scale_factor) ** 2``
whatever the transformer's size, so I1's is ``max_resolution`` 128x128 in 4x4 patches (1024 tokens fill that area)
with a one-block VAE (scale factor 1: 128x128-pixel previews) without the self-attention over its 16384 latent
pixels; E1's is ``max_resolution`` 16x16 (the width-doubled latent of 96x64 and 64x80 too). Both round their weights
to bfloat16, as ai-toolkit loads every HiDream component in bfloat16 (lossless on the published weights).
"""

from __future__ import annotations

from .flux import flux_vae, t5_text_encoder
from .tokenizers import clip_tokenizer, t5_tokenizer

T5_DIM = 24
LLAMA_DIM = 40
LLAMA_LAYERS = 2


def llama_tokenizer():
    """Llama-3-style byte-level tokenizer: 256 byte symbols plus <|begin_of_text|>, <|end_of_text|>, <|eot_id|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    bos, eos, eot = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([bos, eos, eot])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eot, model_max_length=131072)


def long_clip_text_encoder(tokenizer, projection: int):
    """CLIPTextModelWithProjection with 248 positions, as HiDream's CLIP encoders (prompts are padded to 128)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, hidden_act="gelu", projection_dim=projection, max_position_embeddings=248,
    )
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(config).eval()


def llama_text_encoder(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLAMA_DIM, intermediate_size=48, num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def hidream_transformer(max_resolution=(8, 8), patch_size: int = 2):
    """1 double + 1 single block, 4 heads of 8, MoE with 2 routed experts (1 active), 16 latent channels."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(
        patch_size=patch_size, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[T5_DIM, LLAMA_DIM], text_emb_dim=32, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=tuple(max_resolution),
        llama_layers=list(range(LLAMA_LAYERS)),
    ).eval()


def hidream_components(max_resolution, patch_size: int = 2, vae_blocks: int = 4,
                       vae_mid_attention: bool = True) -> dict:
    from diffusers import UniPCMultistepScheduler

    from ..pipelines.registry import HIDREAM_UNIPC

    clip_l, clip_g, t5_tok, llama_tok = clip_tokenizer(248), clip_tokenizer(248), t5_tokenizer(), llama_tokenizer()
    return {
        "scheduler": UniPCMultistepScheduler.from_config(HIDREAM_UNIPC),
        "vae": flux_vae(blocks=vae_blocks, mid_attention=vae_mid_attention),
        "text_encoder": long_clip_text_encoder(clip_l, projection=16),
        "tokenizer": clip_l,
        "text_encoder_2": long_clip_text_encoder(clip_g, projection=16),
        "tokenizer_2": clip_g,
        "text_encoder_3": t5_text_encoder(t5_tok, d_model=T5_DIM),
        "tokenizer_3": t5_tok,
        "text_encoder_4": llama_text_encoder(llama_tok),
        "tokenizer_4": llama_tok,
        "transformer": hidream_transformer(max_resolution, patch_size),
    }


def round_weights_to_bfloat16(components: dict) -> dict:
    """Every model's parameters rounded to bfloat16 values (kept float32), as HiDream's published weights are:
    ai-toolkit loads each component with ``torch_dtype=bfloat16`` before casting it to the training dtype."""
    import torch

    with torch.no_grad():
        for component in components.values():
            if isinstance(component, torch.nn.Module):
                for parameter in component.parameters():
                    parameter.copy_(parameter.to(torch.bfloat16).float())
    return components


def build_hidream(max_resolution=(8, 8), patch_size: int = 2, vae_blocks: int = 4, vae_mid_attention: bool = True,
                  bfloat16_weights: bool = False):
    """The tiny HiDream-I1; the arguments make a variant (goldens/e2e/hidream: ai-toolkit's full-area previews)."""
    from diffusers import HiDreamImagePipeline

    components = hidream_components(tuple(max_resolution), patch_size, vae_blocks, vae_mid_attention)
    return HiDreamImagePipeline(**(round_weights_to_bfloat16(components) if bfloat16_weights else components))


def build_hidream_e1(max_resolution=(8, 16), **variant):
    """The tiny HiDream-E1: I1's components, with room for the control latent appended along the width."""
    return build_hidream(max_resolution, **variant)
