"""SD 1.5 and SDXL: diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` as ai-toolkit samples them.

What ai-toolkit does here (``toolkit/stable_diffusion_model.py`` generate_images), and so do we:

* the scheduler is its ``ddpm`` sampler: ``DDPMScheduler`` with the SD betas, ``leading`` spacing and
  ``steps_offset 0`` (the registry's ``SD_DDPM``), not the checkpoint's own scheduler. DDPM is stochastic: every step
  draws noise from the generator, which is the seeded CPU generator the base class passes, as ai-toolkit's
  ``torch.manual_seed(seed)`` global generator;
* real classifier-free guidance with the negative prompt, which is ENCODED even when empty. SDXL's stock pipeline
  would use zero embeddings for an empty negative when ``force_zeros_for_empty_prompt`` is set (the SDXL base
  checkpoint sets it); we switch that off. Both SDXL text encoders get the same negative;
* SDXL: ``guidance_rescale`` 0, no invisible watermark; SD 1.5: no safety checker.

LoRAs are kohya files (``lora_unet_*``, ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*``, ``.alpha``); the generic
converter resolves their flattened names against the UNet's and text encoders' module names.
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams
from ..registry import ModelSpec

SDXL_GUIDANCE_RESCALE = 0.0  # ai-toolkit's sample.guidance_rescale default


class StableDiffusionFamilyPipeline(AITKPipeline):
    """``sd15`` and ``sdxl``."""

    denoiser = "unet"

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        if spec.pipeline_class == "StableDiffusionXLPipeline":
            pipe = super().load_diffusers_pipeline(spec, source, torch_dtype, add_watermarker=False, **overrides)
            pipe.register_to_config(force_zeros_for_empty_prompt=False)
            return pipe
        return super().load_diffusers_pipeline(
            spec, source, torch_dtype, safety_checker=None, requires_safety_checker=False, **overrides
        )

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        kwargs = self.prompt_call(params)
        if self.spec.pipeline_class == "StableDiffusionXLPipeline":
            kwargs["guidance_rescale"] = SDXL_GUIDANCE_RESCALE
        return kwargs
