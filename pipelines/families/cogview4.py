"""CogView4: diffusers ``CogView4Pipeline`` as ai-toolkit samples it (built-in ``toolkit/models/cogview4.py``).

ai-toolkit registers this arch for config files only (it is not in its UI, and its source says the model is not
finished). What its previews do, and so do we:

* the scheduler is ai-toolkit's FlowMatch Euler with dynamic shifting and the linear time shift (registry
  ``COGVIEW4_FLOWMATCH``); the stock pipeline computes ``mu = 0.25 + 0.75 * sqrt(image tokens / 256)`` and passes
  sigmas together with the unshifted integer timesteps, which the transformer then receives;
* the prompt and the negative are each encoded by the pipeline's own ``encode_prompt`` (GLM-4 second-to-last hidden
  state, up to 1024 tokens, left-padded to a multiple of 16); an empty negative is encoded, not zeroed;
* real CFG (two transformer passes) whenever the guidance is above 1;
* the latents are a float32 draw from the seeded CPU generator, whatever the model dtype (the pipeline's own draw);
* width and height must be multiples of 16 (the pipeline's check); ai-toolkit floors to 8 only, so every size it can
  sample is a multiple of 16 and is reproduced here.

Nothing differs from diffusers' defaults except the scheduler, which the registry sets.
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams

GLM_MAX_LENGTH = 1024


class CogView4FamilyPipeline(AITKPipeline):
    """``cogview4``."""

    denoiser = "transformer"
    # not batched: GLM's prompts are padded to the longest of the batch without an attention mask, so a
    # shorter prompt's image changes (measured 0.08 on the tiny model, BENCHMARKS.md "Previews in bulk")
    batches_distinct_prompts = False

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params, max_sequence_length=GLM_MAX_LENGTH)
