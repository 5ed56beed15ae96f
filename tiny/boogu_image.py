"""Tiny Boogu-Image pipelines: our ``BooguImageTransformer2DModel`` (one double-stream and one single-stream block,
every refiner), the real ``Qwen3VLModel`` class with a two-block vision tower (the edit id feeds its reference images
through it) and its processor, a FLUX-geometry VAE; random weights, built offline."""

from __future__ import annotations

from .flux import flux_vae
from .krea2 import qwen3_vl_processor, qwen3_vl_text_encoder
from .tokenizers import qwen_tokenizer

LATENT_CHANNELS = 16
#: the tiny Qwen3-VL's width (the instruction features' width)
TEXT_WIDTH = 16
#: Qwen3-VL's chat template reduced to what Boogu's prompts use: text items and image items (the vision placeholders)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def boogu_transformer():
    import torch

    from ..pipelines.families.boogu_image_transformer import BooguImageTransformer2DModel

    torch.manual_seed(0)
    model = BooguImageTransformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS, hidden_size=32, num_layers=2, num_double_stream_layers=1,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 4, 4),
        axes_lens=(512, 512, 512),
        instruction_feature_configs={"instruction_feat_dim": TEXT_WIDTH, "reduce_type": "mean",
                                     "num_instruction_feat_layers": 1},
    )
    # the real checkpoint's zero-initialised output layers are trained; random values keep the tiny model non-trivial
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim and not param.any():
                param.normal_(0.0, 0.2)
    return model.eval()


def build_boogu_image():
    from ..pipelines.families.boogu_image import BooguImagePipeline

    tokenizer = qwen_tokenizer()
    processor = qwen3_vl_processor(tokenizer)
    processor.chat_template = CHAT_TEMPLATE
    return BooguImagePipeline(transformer=boogu_transformer(), vae=flux_vae(),
                              mllm=qwen3_vl_text_encoder(tokenizer), processor=processor)


def build_boogu_image_edit():
    return build_boogu_image()
