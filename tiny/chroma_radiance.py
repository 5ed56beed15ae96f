"""Tiny Chroma Radiance pipeline: our ``ChromaRadianceTransformer2DModel`` (pixel space, 16x16 patches, two double and
two single blocks, a two-block NeRF head) and the tiny T5 of ``tiny/flux.py``; random weights, no VAE.

The weights are those of the parity goldens' checkpoint (``tests/goldens/chroma_radiance``): the same sizes, every
parameter ``randn * 0.1`` from a generator seeded 1234 in parameter order, then the modulation MLP's output weight
times 10, so that the blocks' gates (and with them the trunk) visibly change the output.
"""

from __future__ import annotations

from .flux import t5_text_encoder
from .tokenizers import t5_tokenizer

#: the Radiance layout at toy widths (heads 16 wide = 4 + 6 + 6)
TRANSFORMER_CONFIG = dict(in_channels=3, context_in_dim=32, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
                          depth_single_blocks=2, axes_dim=(4, 6, 6), theta=10_000, qkv_bias=True,
                          approximator_in_dim=16, approximator_depth=2, approximator_hidden_size=32, patch_size=16,
                          nerf_hidden_size=4, nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=4)
WEIGHT_SEED = 1234
WEIGHT_STD = 0.1
GATE_GAIN = 10.0


def chroma_radiance_transformer():
    import torch

    from ..pipelines.families.chroma_radiance_transformer import ChromaRadianceTransformer2DModel

    torch.manual_seed(0)
    model = ChromaRadianceTransformer2DModel(**TRANSFORMER_CONFIG)
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * WEIGHT_STD)
        model.distilled_guidance_layer.out_proj.weight.mul_(GATE_GAIN)
    return model.eval()


def build_chroma_radiance():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines.families.chroma_radiance import ChromaRadiancePipeline
    from ..pipelines.registry import FLUX_FLOWMATCH

    tokenizer = t5_tokenizer()
    return ChromaRadiancePipeline(transformer=chroma_radiance_transformer(), text_encoder=t5_text_encoder(tokenizer),
                                  tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOWMATCH))
