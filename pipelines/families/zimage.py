"""Z-Image, Z-Image-Turbo and Z-Image-De-Turbo: diffusers ``ZImagePipeline`` as ai-toolkit samples them.

What ai-toolkit does here (``extensions_built_in/diffusion_models/z_image/z_image.py``), and so do we:

* the scheduler is FlowMatch Euler with a static shift of 3.0 (no dynamic shifting), whatever the checkpoint says;
* ``guidance`` is standard CFG (``u + g(c - u)``), while diffusers' Z-Image CFG is ``c + g'(c - u)``: ai-toolkit passes
  ``g' = max(0, g - 1)``, so guidance 4 reaches diffusers as 3 and guidance 1 as 0 (no CFG, one forward per step);
* width and height are floored to a multiple of 16;
* De-Turbo is assembled from two sources: the text encoder, tokenizer and VAE of Z-Image-Turbo and the transformer of
  ``ostris/Z-Image-De-Turbo``.
"""

from __future__ import annotations

import os

from ..base import AITKPipeline, GenerationParams
from ..registry import ModelSpec, ZImageOptions

#: a local base folder may carry the separately trained transformer here (the tiny kit's De-Turbo layout)
DETURBO_SUBFOLDER = "de_turbo_transformer"


def diffusers_guidance(guidance: float) -> float:
    """ai-toolkit's mapping of a standard CFG scale onto ZImagePipeline's ``guidance_scale``."""
    return max(0.0, guidance - 1.0)


class ZImageFamilyPipeline(AITKPipeline):
    """``zimage``, ``zimage_turbo`` and ``zimage_deturbo``."""

    denoiser = "transformer"
    options_type = ZImageOptions
    batches_distinct_prompts = True

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        transformer_source = spec.options.transformer if spec.options else None
        if transformer_source is None:
            return super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)
        from diffusers import ZImageTransformer2DModel

        local = os.path.join(source, DETURBO_SUBFOLDER)
        if os.path.isfile(os.path.join(local, "config.json")):
            transformer_source = local
        transformer = ZImageTransformer2DModel.from_pretrained(transformer_source, dtype=torch_dtype,
                                                               device_map=overrides.get("device_map"))
        return super().load_diffusers_pipeline(spec, source, torch_dtype, transformer=transformer, **overrides)

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params, guidance_scale=diffusers_guidance(params.guidance))
