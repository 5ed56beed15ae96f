"""Qwen-Image and Qwen-Image-2512: diffusers ``QwenImagePipeline`` as ai-toolkit samples them.

What ai-toolkit does here (``extensions_built_in/diffusion_models/qwen_image/qwen_image.py``), and so do we:

* the scheduler is FlowMatch Euler with Qwen-Image's dynamic exponential shift (base 0.5, max 0.9, 256..8192
  tokens) stretched to end at sigma 0.02, restated from the registry;
* ``guidance`` is passed as ``true_cfg_scale`` with the negative prompt (an empty negative is encoded, not
  dropped), so CFG runs whenever guidance > 1, with diffusers' norm rescale of the combined prediction;
* width and height are floored to a multiple of 32 (the reference implementation uses 16).
"""

from __future__ import annotations

from .base import AITKPipeline, GenerationParams


class QwenImageFamilyPipeline(AITKPipeline):
    """``qwen_image`` and ``qwen_image_2512``."""

    denoiser = "transformer"

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        # One prompt with num_images_per_prompt: the text is encoded once and repeated, as for a batch of one.
        return {
            "prompt": params.prompt,
            "negative_prompt": params.negative,
            "num_images_per_prompt": params.batch_size,
            "width": params.width,
            "height": params.height,
            "true_cfg_scale": params.guidance,
            "output_type": "np",
        }
