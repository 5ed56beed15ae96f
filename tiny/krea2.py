"""Tiny Krea 2 pipelines: real ``Krea2Transformer2DModel``, ``Qwen3VLModel`` (with a two-block vision tower, which the
edit ids feed their reference images through) and ``AutoencoderKLQwenImage``, random weights, built offline.

The transformer is the one ai-toolkit's ``SingleStreamDiT`` config ``features=32, heads=2, kvheads=1, multiplier=4,
txtdim=16, txtheads=2, txtkvheads=2, txtlayers=2`` converts to (its SwiGLU rounds both MLP widths up to 128)."""

from __future__ import annotations

from .qwen_image import qwen_image_components
from .tokenizers import qwen_tokenizer

#: hidden-state taps of the 2-layer tiny text encoder (the real pipeline taps 12 of Qwen3-VL-4B's 36 layers)
TINY_TEXT_LAYERS = (1, 2)


def krea2_transformer():
    import torch
    from diffusers import Krea2Transformer2DModel

    torch.manual_seed(0)
    transformer = Krea2Transformer2DModel(
        in_channels=64, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, timestep_embed_dim=256, text_hidden_dim=16, num_text_layers=len(TINY_TEXT_LAYERS),
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=128, axes_dims_rope=(4, 6, 6),
    )
    # the norms and modulation tables start at zero; random values make them count in the parity tests
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in sorted(transformer.named_parameters()):
            if not parameter.any():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return transformer


def qwen3_vl_text_encoder(tokenizer):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [1, 1, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
    )
    config.text_config.bos_token_id = config.text_config.eos_token_id = None
    torch.manual_seed(0)
    return Qwen3VLModel(config).eval()


def build_krea2(is_distilled: bool = False):
    from diffusers import Krea2Pipeline

    components = qwen_image_components()
    tokenizer = qwen_tokenizer()
    return Krea2Pipeline(
        scheduler=components["scheduler"], vae=components["vae"], text_encoder=qwen3_vl_text_encoder(tokenizer),
        tokenizer=tokenizer, transformer=krea2_transformer(), text_encoder_select_layers=TINY_TEXT_LAYERS,
        is_distilled=is_distilled,
    )


def build_krea2_turbo():
    return build_krea2(is_distilled=True)


def qwen3_vl_processor(tokenizer):
    """The image half of a Qwen3-VL processor (16-pixel patches, 2x2 merge) with a small pixel budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..pipelines.families.krea2 import Qwen3VLImageProcessor

    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                               size={"shortest_edge": 32 * 32, "longest_edge": 64 * 32 * 32})
    return Qwen3VLImageProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_krea2_edit(is_distilled: bool = False):
    from ..pipelines.families.krea2 import Krea2AITKPipeline

    stock = build_krea2(is_distilled)
    pipe = Krea2AITKPipeline(processor=qwen3_vl_processor(stock.tokenizer), is_distilled=is_distilled,
                             text_encoder_select_layers=TINY_TEXT_LAYERS, **stock.components)
    pipe.register_to_config(processor=("transformers", "Qwen3VLProcessor"))
    return pipe


def build_krea2_edit_turbo():
    return build_krea2_edit(is_distilled=True)


# ai-toolkit's Krea 2 LoRA: the Linears of the transformer blocks and of the text-fusion blocks, original Krea names
ORIGINAL_BLOCK_LISTS = {"transformer_blocks": "blocks", "text_fusion.layerwise_blocks": "txtfusion.layerwise_blocks",
                        "text_fusion.refiner_blocks": "txtfusion.refiner_blocks"}
ORIGINAL_BLOCK_NAMES = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv",
                        "attn.to_out.0": "attn.wo", "attn.to_gate": "attn.gate", "ff.gate": "mlp.gate",
                        "ff.up": "mlp.up", "ff.down": "mlp.down"}


def original_targets(transformer) -> list[tuple[str, object]]:
    """What ai-toolkit's Krea 2 LoRA targets, under the original Krea names: every Linear of the transformer blocks and
    of the text-fusion blocks (the embedders, projector and final layer are not targeted)."""
    import re

    import torch

    targets = []
    for name, module in transformer.named_modules():
        block = re.match(r"^(.*blocks)\.(\d+)\.(.+)$", name)
        if block and isinstance(module, torch.nn.Linear):
            lists, index, inner = block.groups()
            targets.append((f"{ORIGINAL_BLOCK_LISTS[lists]}.{index}.{ORIGINAL_BLOCK_NAMES[inner]}", module))
    return targets


def write_native_loras(pipe, out_dir: str, seed: int = 0) -> dict[str, str]:
    """The layouts ai-toolkit saves for Krea 2: ``diffusion_model.`` + original Krea names, as LoRA and as LoKr."""
    from .loras import write_original_name_loras

    return write_original_name_loras(original_targets(pipe.transformer), out_dir, "tiny_aitk_krea2", "Krea names", seed)
