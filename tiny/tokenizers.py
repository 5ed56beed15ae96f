"""Tokenizers built in memory, so tiny pipelines need nothing from a hub.

Each is character-level (no merges), which keeps the vocabularies a few hundred ids long; the text encoders of the
tiny pipelines are sized to match. They save and reload with ``save_pretrained``/``from_pretrained`` like real ones.
"""

from __future__ import annotations

import string


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2-style byte-level BPE uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return [alphabet[b] for b in range(256)]


def clip_tokenizer(model_max_length: int = 77):
    """CLIP BPE tokenizer: 256 byte symbols, their end-of-word forms and the two specials (514 ids)."""
    from transformers import CLIPTokenizer

    symbols = _byte_level_alphabet()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512):
    """T5-style Unigram tokenizer over printable ASCII with the SentencePiece word marker."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(ch, -3.0), ("▁" + ch, -3.5)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


QWEN_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]

# Accepts plain-string content and Mistral/FLUX.2-style [{"type": "text", "text": ...}] lists.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """Qwen2-style byte-level tokenizer with the chat/vision special tokens and a small chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(_byte_level_alphabet())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def gemma_tokenizer():
    """Gemma-style tokenizer (SentencePiece word marker) with Gemma3's image specials."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    symbols = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    symbols += ["▁" + c for c in string.ascii_letters + string.digits]
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]})
    return tokenizer


GLM_PREFIX = ["[gMASK]", "<sop>"]


def glm_tokenizer():
    """GLM-4-style byte-level tokenizer: it starts every text with ``[gMASK]<sop>`` (so an empty prompt still has
    tokens, as the real one does) and pads on the left."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(GLM_PREFIX, special_tokens=True)
    tokenizer.padding_side = "left"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=" ".join([*GLM_PREFIX, "$A"]),
        special_tokens=[(token, tokenizer.convert_tokens_to_ids(token)) for token in GLM_PREFIX],
    )
    return tokenizer
