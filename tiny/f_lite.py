"""Tiny F-Lite pipeline: our ``FLiteDiT`` (residual values, dynamic temperature and rotary on, as the released model's
technical report describes), a T5 encoder deep enough for hidden state -8, FLUX's tiny VAE; random weights.

Saved, it has the released checkpoint's folder layout (``dit_model/``, ``vae/``, ``text_encoder/``, ``tokenizer/``),
which is also what ai-toolkit's loader reads; the goldens (tests/goldens/f_lite) were made on this model."""

from __future__ import annotations

from .flux import flux_vae
from .tokenizers import t5_tokenizer

DIT_CONFIG = dict(in_channels=16, patch_size=2, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
                  cross_attn_input_size=16, residual_v=True, train_bias_and_rms=True, use_rope=True,
                  dynamic_softmax_temperature=True, rope_base=10000)
#: hidden state -8 needs at least 7 layers
T5_LAYERS = 8


def f_lite_dit(seed: int = 0):
    import torch

    from ..pipelines.families.f_lite import FLiteDiT

    torch.manual_seed(seed)
    dit = FLiteDiT(**DIT_CONFIG)
    # every parameter redrawn: the stock init zeroes the modulations and the output layer (the model would output 0)
    with torch.no_grad():
        for name, parameter in dit.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            else:
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return dit


def f_lite_text_encoder(tokenizer):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=24, num_layers=T5_LAYERS, num_heads=2,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def build_f_lite():
    from ..pipelines.families.f_lite import FLitePipeline

    tokenizer = t5_tokenizer()
    return FLitePipeline(dit_model=f_lite_dit(), vae=flux_vae(), text_encoder=f_lite_text_encoder(tokenizer),
                         tokenizer=tokenizer)
