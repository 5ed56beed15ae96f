"""PixArt-alpha and PixArt-Sigma: diffusers ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` as ai-toolkit's legacy
``StableDiffusion`` class samples them (``toolkit/stable_diffusion_model.py`` generate_images, arch ``pixart``).

What ai-toolkit does, and so do we:

* the scheduler is its ``ddpm`` sampler for PixArt: ``DDPMScheduler.from_config(pixart_config)`` (registry
  ``PIXART_DDPM``): linear betas 1e-4..0.02, ``linspace`` spacing, and the DDPM defaults the DPM-Solver config does not
  name (``clip_sample`` on, no variance type); stochastic, each step draws from the seeded CPU generator;
* the prompt and the negative are T5-encoded by ai-toolkit's ``encode_prompts_pixart``: padded to 120 tokens (alpha)
  or 300 (Sigma), with the attention mask, and NOT lowercased or cleaned. The stock pipelines lowercase every prompt
  even with ``clean_caption=False``, so we encode here and pass the embeddings and masks;
* the pipeline's aspect-ratio binning (on by default, ai-toolkit leaves it on): the image is sampled at the nearest
  bin of the transformer's size and resized back to the requested size; real CFG above guidance 1; the learned-sigma
  half of the output is dropped.

Where we differ: ai-toolkit samples alpha through ``PixArtSigmaPipeline`` too, which passes no resolution / aspect-ratio
micro-conditions; PixArt-XL-2-1024-MS takes them, so its previews fail there. We run alpha through
``PixArtAlphaPipeline``, which feeds them (tests/test_legacy.py shows ai-toolkit's failure on a tiny model). Its
``flowmatch`` sampler falls back to FLUX.1's dynamic-shift config, which neither pipeline can run (they pass no mu).
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams

#: T5 prompt length ai-toolkit encodes to, by pipeline (its encode_prompt: 300 for Sigma, else 120)
T5_MAX_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


class PixArtFamilyPipeline(AITKPipeline):
    """``pixart`` and ``pixart_sigma``."""

    denoiser = "transformer"

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        call = self.prompt_call(params, negative=False, prompt=None, negative_prompt=None)
        embeds, mask = self.encode_t5([params.prompt] * params.batch_size)
        negative_embeds, negative_mask = self.encode_t5([params.negative] * params.batch_size)
        return {**call, "prompt_embeds": embeds, "prompt_attention_mask": mask,
                "negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask}

    def encode_t5(self, texts: list[str]):
        """T5 last hidden states and attention mask of ``texts`` as ai-toolkit encodes them: padded to the pipeline's
        length, truncated, special tokens added, the text unchanged."""
        import torch

        max_length = T5_MAX_LENGTH[self.spec.pipeline_class]
        tokens = self.pipe.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                     add_special_tokens=True, return_tensors="pt")
        device = self.pipe._execution_device
        mask = tokens.attention_mask.to(device)
        with torch.inference_mode():
            embeds = self.pipe.text_encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        return embeds.to(self.pipe.transformer.dtype), mask
