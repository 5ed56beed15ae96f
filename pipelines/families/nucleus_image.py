"""Nucleus-Image: diffusers ``NucleusMoEImagePipeline`` as ai-toolkit samples it
(``extensions_built_in/diffusion_models/nucleus_image/nucleus_image_model.py``).

What ai-toolkit's previews do, and so do we:

* the scheduler is ai-toolkit's FlowMatch Euler with a static shift of 1.0 and no dynamic shifting (registry
  ``NUCLEUS_FLOWMATCH``); the pipeline's sigmas ``linspace(1, 1/N, N)`` therefore reach the transformer unshifted
  (its ``mu`` is computed and ignored);
* the prompt and the negative are each encoded by the pipeline's own recipe (the Qwen3-VL chat template with the
  pipeline's system prompt, padded to a multiple of 8, up to 1024 tokens, the hidden state 8 layers from the top);
  ai-toolkit runs that recipe itself (``get_prompt_embeds``) and hands the embeddings in, which gives the same
  tensors, and an empty negative is encoded, not zeroed;
* real CFG whenever the guidance is above 1, with the pipeline's rescale of the combined prediction to the norm of
  the conditional one (ai-toolkit calls the stock loop);
* the latents are the pipeline's own draw from the seeded CPU generator in the prompt-embedding dtype;
* width and height are floored to 32 (16 for the VAE, 2 for the patches), ai-toolkit's bucket divisor.

ai-toolkit samples one image per call; a batch here encodes the same prompt for every item, so each image equals
the single image of its seed.

LoRAs: diffusers has no LoRA loader for this pipeline. ai-toolkit saves ``diffusion_model.`` + diffusers module names
(its ``transformer.`` prefix renamed on save), which our converter reads as it reads every ``diffusion_model.`` file.
ai-toolkit's LoRA network adapts Linear layers only; the routed MoE experts (``SwiGLUExperts``) hold their weights as
packed 3-D parameters, not Linear layers, so no ai-toolkit LoRA or LoKr ever carries them, while the router
(``img_mlp.gate``, left out by ai-toolkit's UI preset) and the shared expert are ordinary Linear layers and load like
any other. A file with expert keys did not come from ai-toolkit and is refused by name (:func:`refuse_expert_keys`).
"""

from __future__ import annotations

import os

from transformers import Qwen3VLProcessor

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..lora.convert import ConvertedLora, LoraFormatError
from ..registry import ModelSpec

QWEN3VL_MAX_LENGTH = 1024

#: the routed experts' packed parameters (``...img_mlp.experts.gate_up_proj`` / ``.down_proj``)
ROUTED_EXPERTS = ".img_mlp.experts"


class Qwen3VLTextProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without its video processor.

    transformers 5 builds a ``Qwen3VLProcessor`` only together with a video processor, which needs torchvision; the
    Nucleus pipeline encodes text only. The checkpoint's ``processor`` folder (tokenizer, chat template and image
    processor config) loads into this class with or without torchvision, and text is processed as by the full one.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def refuse_expert_keys(converted: ConvertedLora) -> ConvertedLora:
    """Refuse patches on the routed experts with the reason: they are packed parameters, not Linear layers, and
    ai-toolkit's network never adapts them, so such a file was made by another tool for another layout."""
    experts = sorted(path for _, path in converted.patches if ROUTED_EXPERTS + "." in path + ".")
    if experts:
        raise LoraFormatError(
            f"{len(experts)} module(s) of the LoRA target Nucleus-Image's routed MoE experts (e.g. {experts[:2]}). "
            "Those are packed SwiGLUExperts parameters, which ai-toolkit's LoRA and LoKr networks never adapt (they "
            "train Linear layers only), so the file was not saved by ai-toolkit; export it without the experts."
        )
    return converted


class NucleusImageFamilyPipeline(AITKPipeline):
    """``nucleus_image``."""

    latent_layout = LatentLayout(tokens=True, patch=2)

    denoiser = "transformer"
    batches_distinct_prompts = True

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        if "processor" not in overrides and not os.path.isfile(source):
            overrides["processor"] = Qwen3VLTextProcessor.from_pretrained(source, subfolder="processor")
        return super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)

    def lora_name_mapper(self):
        return refuse_expert_keys

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params, max_sequence_length=QWEN3VL_MAX_LENGTH)
