"""Lumina-Image 2.0: diffusers ``Lumina2Pipeline`` as ai-toolkit samples it (legacy ``StableDiffusion`` path).

What ai-toolkit does here, and so do we:

* the scheduler is FlowMatch Euler on the unshifted sigmas ``linspace(1, 1/N, N)``: ``toolkit/sampler.py``'s
  ``lumina2_config`` names a static shift of 6.0, but the scheduler ai-toolkit builds from it keeps a shift of 1.0
  (registry ``LUMINA2_FLOWMATCH`` says why);
* real CFG with the negative prompt (an empty negative is encoded), with diffusers' Lumina2 defaults for CFG
  normalization and truncation. ai-toolkit encodes the negative with the same ``encode_prompt`` call as the prompt, so
  the pipeline's system prompt is put in front of the negative too (the stock pipeline encodes negatives without it);
  we pass the negative with that prefix already applied;
* Gemma2 prompts are limited to 256 tokens;
* width and height must be multiples of 16 (the pipeline's own check); ai-toolkit floors to 8 only, so any size it
  can sample is a multiple of 16 and is reproduced here.
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams

GEMMA_MAX_LENGTH = 256


class Lumina2FamilyPipeline(AITKPipeline):
    """``lumina2``."""

    denoiser = "transformer"
    batches_distinct_prompts = True

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        call = self.prompt_call(params, max_sequence_length=GEMMA_MAX_LENGTH)
        # the prefix Lumina2Pipeline.encode_prompt gives prompts (and ai-toolkit's previews give negatives as well)
        prefix = f"{self.pipe.system_prompt} <Prompt Start> "
        call["negative_prompt"] = [prefix + negative for negative in call["negative_prompt"]]
        return call
