"""Tiny HiDream-O1 pipeline: our ``HiDreamO1Transformer`` (transformers' ``Qwen3VLModel`` with the pixel-generation
modules) at toy widths, the in-memory Qwen tokenizer with HiDream-O1's added tokens; random weights, no VAE."""

from __future__ import annotations

from .tokenizers import qwen_tokenizer

#: the tokens HiDream-O1's tokenizer adds to Qwen3-VL's (ai-toolkit's add_special_tokens)
O1_TOKENS = ["<|boi_token|>", "<|bor_token|>", "<|eor_token|>", "<|bot_token|>", "<|tms_token|>"]
#: the published text model's layout (interleaved 3-D rope, grouped key-value heads) at toy widths; the parity
#: goldens (tests/goldens/hidream_o1) use the same sizes
TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, rope_theta=5000000.0,
                   rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True})
VISION_CONFIG = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                     deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=16)


def hidream_o1_tokenizer():
    tokenizer = qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": O1_TOKENS}, replace_extra_special_tokens=False)
    return tokenizer


def hidream_o1_config(tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|tms_token|>")}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), **TEXT_CONFIG), vision_config=VISION_CONFIG,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.tms_token_id = ids["<|tms_token|>"]
    return config


def hidream_o1_transformer(tokenizer):
    """Every parameter but the norms' drawn from N(0, 0.05) (the stock init zeroes the pixel head, which would predict
    0); the norms keep their unit weights."""
    import torch

    from ..pipelines.families.hidream_o1 import HiDreamO1Transformer

    torch.manual_seed(0)
    model = HiDreamO1Transformer(hidream_o1_config(tokenizer))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.05)
    return model.eval()


def build_hidream_o1():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines.families.hidream_o1 import HiDreamO1Pipeline
    from ..pipelines.registry import HIDREAM_O1_FLOWMATCH

    tokenizer = hidream_o1_tokenizer()
    return HiDreamO1Pipeline(transformer=hidream_o1_transformer(tokenizer), tokenizer=tokenizer,
                             scheduler=FlowMatchEulerDiscreteScheduler.from_config(HIDREAM_O1_FLOWMATCH))
