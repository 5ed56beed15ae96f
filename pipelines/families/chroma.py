"""Chroma: diffusers ``ChromaPipeline`` as ai-toolkit samples it.

ai-toolkit samples Chroma with its own pipeline and BFL-layout model (``extensions_built_in/diffusion_models/chroma``)
and encodes the prompts itself. Where that differs from stock diffusers, we follow ai-toolkit, explicitly:

* **Prompt encoding.** T5 with ``max_length=512`` (padded) is run WITHOUT its attention mask (diffusers passes it);
  the transformer then masks the padding except for the first padding token (both do that part the same way). We
  encode here and pass ``prompt_embeds`` / ``prompt_attention_mask`` to the pipeline.
* **Negative prompt.** ai-toolkit's Chroma previews always use an EMPTY unconditional prompt. That is our default:
  ``negative`` is ignored (with a warning). Pass ``use_negative=True`` to ``generate`` to encode your negative prompt
  as the unconditional instead (a deliberate departure from the previews).
* **Guidance.** Real CFG ``u + g(c - u)`` when ``guidance > 1.00001`` (ai-toolkit's threshold), one forward otherwise;
  the transformer's guidance input is fixed at 0.
* **Scheduler.** FlowMatch Euler with dynamic shifting (base 0.5, max 1.15, 256..4096 tokens) on
  ``sigmas = linspace(1, 1/N, N)`` with ``mu`` from the packed sequence length: the pipeline's own recipe with
  ai-toolkit's scheduler config (``registry.FLUX_FLOWMATCH``).

Noise is the FLUX.1-style draw ``randn((B, 16, 2*(H//16), 2*(W//16)))`` from the seeded CPU generator, packed 2x2, as
in ai-toolkit. LoRAs use original BFL module names (``lora.convert.convert_bfl_to_diffusers_chroma``).
"""

from __future__ import annotations

import dataclasses

from ..base import AITKPipeline, GenerationParams

T5_MAX_LENGTH = 512
CFG_THRESHOLD = 1.00001  # ai-toolkit's ChromaPipeline: CFG only when guidance_scale > 1.00001
PADDING_TOKENS_ATTENDED = 1


class ChromaFamilyPipeline(AITKPipeline):
    """``chroma`` (Chroma1-Base)."""

    denoiser = "transformer"

    def lora_name_mapper(self):
        from ..lora.convert import convert_bfl_to_diffusers_chroma

        return convert_bfl_to_diffusers_chroma

    def resolve_params(self, prompt: str, use_negative: bool = False, **kwargs) -> GenerationParams:
        """The base rules plus ``use_negative`` (bool, defaults to False): encode ``negative`` as the unconditional
        prompt instead of ai-toolkit's empty one."""
        if not isinstance(use_negative, bool):
            raise ValueError(f"`use_negative` must be True or False, got {use_negative!r}.")
        if not use_negative:
            return super().resolve_params(prompt, **kwargs)
        negative = kwargs.pop("negative", None)
        negative = self.spec.negative if negative is None else negative
        if not isinstance(negative, str):
            raise ValueError(f"`negative` must be a string, got {type(negative).__name__}.")
        params = super().resolve_params(prompt, **kwargs)
        return dataclasses.replace(params, negative=negative, extra={**params.extra, "use_negative": True})

    def encode(self, prompts: list[str]):
        """ai-toolkit's Chroma prompt encoding: ``(embeds, mask)``, T5 run without a mask, mask = tokens + 1 pad."""
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
        mask = (positions < lengths + PADDING_TOKENS_ATTENDED).to(device=device, dtype=embeds.dtype)
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
            unconditional = params.negative if params.extra.get("use_negative") else ""
            negative_embeds, negative_mask = self.encode([unconditional] * batch)
            kwargs.update(negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask)
        return kwargs

    def check_inputs(self, params: GenerationParams) -> None:
        unknown = set(params.extra) - {"use_negative"}
        if unknown:
            raise ValueError(f"Unknown generation option(s) for {self.spec.model_id}: {sorted(unknown)}; "
                             "Chroma takes `use_negative`.")
