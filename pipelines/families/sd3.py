"""Stable Diffusion 3 / 3.5: diffusers ``StableDiffusion3Pipeline`` as ai-toolkit's legacy ``StableDiffusion`` class
samples it (``toolkit/stable_diffusion_model.py`` generate_images, arch ``sd3``).

What ai-toolkit does, and so do we:

* the scheduler is its ``flowmatch`` sampler: ``get_sampler`` hands SD3 the ``sd_flow_config`` (static shift 3.0) but
  builds it with ``from_config`` on ``CustomFlowMatchEulerDiscreteScheduler``, whose ``__init__`` takes only
  ``*args/**kwargs``; no value reaches ``FlowMatchEulerDiscreteScheduler.__init__``, so the shift it samples with is
  the default 1.0 (registry ``SD_FLOWMATCH``; the same effect as ai-toolkit's Lumina2). The pipeline passes no sigmas:
  the scheduler's own linspace grid, unshifted;
* the prompt and the negative are encoded with the pipeline's own CLIP-L / CLIP-G / T5 helpers (T5 up to 256 tokens),
  exactly what the stock ``encode_prompt`` does; an empty negative is encoded, and real CFG runs above guidance 1;
* the latents are the pipeline's draw from the seeded CPU generator.

So nothing differs from the stock pipeline but the scheduler, which the registry sets. ai-toolkit's default
``ddpm`` sampler would hand this flow model a DDPM schedule; its SD 3.5 example sets ``flowmatch``, which we follow.
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams


class SD3FamilyPipeline(AITKPipeline):
    """``sd3``."""

    denoiser = "transformer"

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params)
