"""AuraFlow: diffusers ``AuraFlowPipeline`` as ai-toolkit's legacy ``StableDiffusion`` class samples it
(``toolkit/stable_diffusion_model.py`` generate_images, arch ``auraflow``).

What ai-toolkit does, and so do we:

* the scheduler is its ``flowmatch`` sampler, built as for SD3 (``sd_flow_config`` through
  ``CustomFlowMatchEulerDiscreteScheduler.from_config``): static, and the stated shift 3.0 never reaches the scheduler,
  so it samples with shift 1.0 (registry ``SD_FLOWMATCH``). AuraFlow's pipeline passes no sigmas at ai-toolkit's
  pinned diffusers nor at ours: the scheduler's linspace grid. Any other sampler (the ``ddpm`` default) gives
  AuraFlow's pipeline a scheduler it cannot step;
* the prompt and the negative are UMT5-encoded, padded to 256 tokens with the padding positions zeroed (ai-toolkit's
  ``encode_prompts_auraflow``, the same as the stock ``encode_prompt``); an empty negative is encoded;
* real CFG above guidance 1; latents from the seeded CPU generator.

Nothing differs from the stock pipeline but the scheduler, which the registry sets.
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams

UMT5_MAX_LENGTH = 256


class AuraFlowFamilyPipeline(AITKPipeline):
    """``auraflow``."""

    denoiser = "transformer"

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params, max_sequence_length=UMT5_MAX_LENGTH)
