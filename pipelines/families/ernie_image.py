"""ERNIE-Image: diffusers ``ErnieImagePipeline`` as ai-toolkit samples it
(``extensions_built_in/diffusion_models/ernie_image/ernie_image.py``).

What ai-toolkit's previews do, and so do we:

* the scheduler is FlowMatch Euler with a static shift of 3.0 (registry ``ERNIE_IMAGE_FLOWMATCH``); the pipeline passes
  the sigmas ``linspace(1, 0, N + 1)[:-1]``, which the scheduler shifts;
* each prompt is tokenized alone (special tokens, no padding; an empty prompt becomes the BOS token, or id 0) and
  encoded by the Mistral-3 text encoder; its second-to-last hidden state is the prompt embedding. ai-toolkit's
  ``get_prompt_embeds`` and the pipeline's ``encode_prompt`` are the same recipe, so we let the pipeline encode;
* real CFG ``u + g(c - u)`` with the encoded negative prompt (an empty one is encoded too) when the guidance is above 1,
  one transformer pass otherwise;
* the initial latents are the pipeline's seeded CPU draw in the transformer's dtype, 128 channels at 1/16 of the size;
* width and height are floored to a multiple of 32 (``get_bucket_divisibility``).

Where the stock pipeline differs: it loads the optional prompt enhancer (``pe``, a Ministral-3 chat model) when the
checkpoint has one and then rewrites every prompt with it (``use_pe=True`` by default). ai-toolkit never loads it, so
we leave it out and switch the rewrite off.

ai-toolkit samples with its own copy of the transformer (batch-first instead of sequence-first, otherwise the same
module names and maths); ``tests/test_ernie_image.py`` shows diffusers' class gives its outputs on the same weights.
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams, LatentLayout


class ErnieImageFamilyPipeline(AITKPipeline):
    """``ernie_image``."""

    latent_layout = LatentLayout(patch=2)

    denoiser = "transformer"
    batches_distinct_prompts = True

    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        overrides.setdefault("pe", None)
        overrides.setdefault("pe_tokenizer", None)
        return super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params, use_pe=False)
