"""Chroma: diffusers ``ChromaPipeline`` as ai-toolkit samples it.

ai-toolkit samples Chroma with its own pipeline and BFL-layout model (``extensions_built_in/diffusion_models/chroma``)
and encodes the prompts itself. Where that differs from stock diffusers, we follow ai-toolkit, explicitly:

* **Prompt encoding.** T5 with ``max_length=512`` (padded) is run WITHOUT its attention mask (diffusers passes it);
  the transformer then masks the padding except for the first padding token (both do that part the same way). We
  encode here and pass ``prompt_embeds`` / ``prompt_attention_mask`` to the pipeline. The mask is boolean, as
  ai-toolkit's transformer builds it: diffusers' Chroma attention hands a float 0/1 mask to SDPA as an additive bias,
  which masks nothing (the end-to-end job's previews differed by up to 26 levels with one).
* **Negative prompt.** The unconditional pass encodes the sample's negative prompt (empty by default), as ai-toolkit's
  ``generate_images`` and its trainer's sample-prompt cache do (ai-toolkit's Chroma Radiance runs the same
  ``generate_single_image``, and its golden run shows the negative's tokens in the unconditional pass).
* **Guidance.** Real CFG ``u + g(c - u)`` when ``guidance > 1.00001`` (ai-toolkit's threshold), one forward otherwise;
  the transformer's guidance input is fixed at 0.
* **Scheduler.** FlowMatch Euler with dynamic shifting (base 0.5, max 1.15, 256..4096 tokens) on
  ``sigmas = linspace(1, 1/N, N)`` with ``mu`` from the packed sequence length: the pipeline's own recipe with
  ai-toolkit's scheduler config (``registry.FLUX_FLOWMATCH``).

Noise is the FLUX.1-style draw ``randn((B, 16, 2*(H//16), 2*(W//16)))`` from the seeded CPU generator, packed 2x2, as
in ai-toolkit. LoRAs use original BFL module names (``lora.convert.convert_bfl_to_diffusers_chroma``).
"""

from __future__ import annotations

from ..base import AITKPipeline, GenerationParams, LatentLayout

T5_MAX_LENGTH = 512
CFG_THRESHOLD = 1.00001  # ai-toolkit's ChromaPipeline: CFG only when guidance_scale > 1.00001
PADDING_TOKENS_ATTENDED = 1


class ChromaFamilyPipeline(AITKPipeline):
    """``chroma`` (Chroma1-Base)."""

    latent_layout = LatentLayout(tokens=True, patch=2)

    denoiser = "transformer"

    def lora_name_mapper(self):
        from ..lora.convert import convert_bfl_to_diffusers_chroma

        return convert_bfl_to_diffusers_chroma

    def encode(self, prompts: list[str]):
        """ai-toolkit's Chroma prompt encoding: ``(embeds, mask)``, T5 run without a mask, boolean mask = tokens + 1 pad."""
        import torch

        pipe = self.pipe
        device = pipe._execution_device
        tokens = pipe.tokenizer(prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                return_tensors="pt")
        with torch.inference_mode():
            embeds = pipe.text_encoder(tokens.input_ids.to(device), output_hidden_states=False)[0]
        embeds = embeds.to(dtype=pipe.text_encoder.dtype, device=device)
        lengths = tokens.attention_mask.sum(dim=1, keepdim=True)
        positions = torch.arange(tokens.attention_mask.shape[1]).unsqueeze(0)
        mask = (positions < lengths + PADDING_TOKENS_ATTENDED).to(device=device)
        return embeds, mask

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        batch = params.batch_size
        embeds, mask = self.encode([params.prompt] * batch)
        cfg = params.guidance > CFG_THRESHOLD
        kwargs = {
            "prompt_embeds": embeds,
            "prompt_attention_mask": mask,
            "width": params.width,
            "height": params.height,
            "guidance_scale": params.guidance if cfg else 1.0,
            "max_sequence_length": T5_MAX_LENGTH,
            "output_type": "np",
        }
        if cfg:
            negative_embeds, negative_mask = self.encode([params.negative] * batch)
            kwargs.update(negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask)
        return kwargs
