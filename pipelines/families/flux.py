"""FLUX.1-dev, Flex.1-alpha and FLUX.1 Kontext: diffusers ``FluxPipeline`` / ``FluxKontextPipeline`` as ai-toolkit
samples them.

What ai-toolkit does here, and so do we:

* the scheduler is FlowMatch Euler with dynamic shifting (base 0.5, max 1.15, 256..4096 tokens), the FLUX.1-dev
  checkpoint's own config, restated from the registry so that a checkpoint with another config samples the same way;
* guidance is the distilled guidance embedding: one forward per step, the negative prompt has no effect;
* T5 runs with ``max_sequence_length=512`` (padding to max length);
* Kontext: the control image is resized (bilinear) to the target size and passed with ``max_area = width * height``
  and ``_auto_resize=False``.
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..component_files import CLIP_L, FLUX_VAE, T5_XXL

T5_MAX_LENGTH = 512


class FluxFamilyPipeline(AITKPipeline):
    """``flux``, ``flex1`` and ``flux_kontext``."""

    single_file_denoisers = True
    component_files = {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL, "vae": FLUX_VAE}

    latent_layout = LatentLayout(tokens=True, patch=2)

    denoiser = "transformer"
    batches_distinct_prompts = True

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        kwargs = self.prompt_call(params, negative=False, max_sequence_length=T5_MAX_LENGTH)
        if self.spec.pipeline_class == "FluxKontextPipeline":
            from PIL import Image

            control = params.control_images[0].resize((params.width, params.height), Image.BILINEAR)
            kwargs.update(image=control, max_area=params.width * params.height, _auto_resize=False)
        return kwargs
