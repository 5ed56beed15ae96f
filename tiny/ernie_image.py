"""Tiny ERNIE-Image pipeline: real ``ErnieImageTransformer2DModel``, ``Mistral3Model`` and ``AutoencoderKLFlux2``.

The transformer's adaLN and output projections start at zero in diffusers (the output would be zero whatever the
input or LoRA), so every transformer parameter is redrawn, at a scale (0.2) where the prompt visibly moves the
prediction. The text encoder has 3 layers, 16 wide, so the prompt embedding (second-to-last hidden state) is 16 wide,
the transformer's ``text_in_dim``; its token embeddings are redrawn at unit scale for the same reason. The tokenizer is
the in-memory Qwen-style stand-in (ERNIE-Image's real one is a Mistral tokenizer from the hub).
"""

from __future__ import annotations

from .flux2 import flux2_vae
from .tokenizers import qwen_tokenizer

TEXT_HIDDEN = 16
TRANSFORMER_CONFIG = dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=128,
                          out_channels=128, text_in_dim=TEXT_HIDDEN, rope_axes_dim=(4, 6, 6))


def ernie_transformer(seed: int = 0):
    import torch
    from diffusers import ErnieImageTransformer2DModel

    transformer = ErnieImageTransformer2DModel(**TRANSFORMER_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(transformer.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return transformer


def ernie_text_encoder(tokenizer):
    import torch
    from transformers import Mistral3Config, Mistral3Model

    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=24,
                         max_position_embeddings=1024, num_attention_heads=2, num_hidden_layers=3,
                         num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=24, image_size=30, patch_size=6, num_channels=3),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image_pad|>"), image_seq_length=4, vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    text_encoder = Mistral3Model(config).eval()
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings.copy_(torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(5)))
    return text_encoder


def build_ernie_image():
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

    from ..pipelines.registry import ERNIE_IMAGE_FLOWMATCH

    tokenizer = qwen_tokenizer()
    return ErnieImagePipeline(
        transformer=ernie_transformer(), vae=flux2_vae(), text_encoder=ernie_text_encoder(tokenizer),
        tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(ERNIE_IMAGE_FLOWMATCH),
    )
