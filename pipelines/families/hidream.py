"""HiDream-I1 (text to image) and HiDream-E1 (instruction editing), sampled as ai-toolkit samples them.

Both run diffusers' ``HiDreamImageTransformer2DModel`` (the published checkpoints' weight names) inside
:class:`HiDreamAITKPipeline`, a subclass of diffusers' ``HiDreamImagePipeline`` that keeps its components, prompt
encoding (CLIP-L + CLIP-G pooled, T5 and every Llama-3.1 hidden state, 128 tokens), latent preparation and VAE decode,
and replaces the sampling loop with the one ai-toolkit's previews run
(``extensions_built_in/diffusion_models/hidream``). diffusers has no E1 pipeline; the editing branch is ours.

What ai-toolkit does, and so do we:

* **Scheduler.** ai-toolkit builds ``FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=3.0,
  use_dynamic_shifting=False)``. Its step grid is ``linspace(s3(0.999), 0, N + 1)[:-1]`` (``s3`` = the shift-3 map
  ``3s / (1 + 2s)`` applied to the training sigmas, whose largest is 0.999), shifted once more when the timesteps are
  set. I1's pipeline sets them with ``shift = exp(mu)``, ``mu = calculate_shift(transformer.max_seq)`` (0.5..1.15 over
  256..4096 tokens: ``exp(1.15)`` for HiDream-I1's 4096); E1's pipeline ends up with the config's 3.0. We pass that
  grid as ``sigmas`` to diffusers' ``UniPCMultistepScheduler`` with flow sigmas (``flow_shift`` 3.0, or exponential
  dynamic shifting with that ``mu`` for I1, which is the same map): same sigmas, same integer timesteps, same
  UniPC-bh2 order-2 updates on ``x0 = x - sigma * v``.
* **Size (I1).** The pipeline rescales any requested size to the transformer's full token budget (1024x1024 area for
  HiDream-I1) keeping the aspect ratio, floored to whole patches (16 pixels; ai-toolkit writes ``2 *
  vae_scale_factor``): a 512x512 sample is generated at 1024x1024. The effective size is in the result's parameters.
* **Guidance.** True CFG ``u + g (c - u)`` with the encoded negative prompt (an empty one is encoded too) when
  ``guidance > 1``; the transformer's output is negated (HiDream predicts ``x0 - noise``).
* **E1.** The control image (required) is resized BILINEAR to the target size, VAE-encoded (distribution mode),
  shifted and scaled, and appended to the noisy latent along the width; the prediction for the left half is kept.
  With guidance, three passes: (prompt, no image), (negative, image), (prompt, image). Text guidance runs between the
  last two, its result is rescaled per position to at most the norm of the full prediction, then image guidance runs
  from the first: ``u + ig (clip(i + g (c - i)) - u)``. ai-toolkit's previews pass no ``image_guidance_scale``, so its
  editing pipeline's default 2.0 applies: that is our default (``image_guidance`` overrides it).

LoRAs: ai-toolkit saves ``diffusion_model.`` + diffusers module names; alpha is honoured when a file carries it (the
reference implementation ignores it). See ``docs/models/hidream.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Callable

import numpy as np
import torch
from diffusers import HiDreamImagePipeline
from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift
from diffusers.pipelines.hidream_image.pipeline_output import HiDreamImagePipelineOutput
from PIL import Image

from ..base import AITKPipeline, GenerationParams
from ..registry import HiDreamOptions, ModelSpec

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 128
#: the ``shift`` ai-toolkit's FlowUniPCMultistepScheduler is constructed with; it sets the top of the step grid
FLOW_UNIPC_SHIFT = 3.0
#: ai-toolkit's editing pipeline default, which its previews use (they pass no image guidance)
E1_IMAGE_GUIDANCE = 2.0
IMAGE_GUIDANCE_RANGE = (0.0, 100.0)


def flow_unipc_grid(num_inference_steps: int, shift: float = FLOW_UNIPC_SHIFT, num_train_timesteps: int = 1000):
    """The unshifted sigma grid of ai-toolkit's FlowUniPC: N points from the shifted largest training sigma to 0."""
    top = 1.0 - 1.0 / num_train_timesteps
    top = shift * top / (1.0 + (shift - 1.0) * top)
    return np.linspace(top, 0.0, num_inference_steps + 1)[:-1]


def full_area_size(width: int, height: int, area: int, divisor: int) -> tuple[int, int]:
    """HiDream-I1's pipeline rule: scale (width, height) to ``area`` keeping the aspect ratio, floor to ``divisor``."""
    scale = math.sqrt(area / (width * height))
    return int(width * scale // divisor * divisor), int(height * scale // divisor * divisor)


class HiDreamAITKPipeline(HiDreamImagePipeline):
    """diffusers' ``HiDreamImagePipeline`` with ai-toolkit's sampling loop for HiDream-I1 and HiDream-E1.

    Same components and checkpoints as the stock pipeline. ``__call__`` samples at exactly ``width`` x ``height``
    (the family applies I1's full-area rule first) and edits ``control_image`` when one is given.
    """

    def patch_pixels(self) -> int:
        """The side of one token's patch in pixels (16 for HiDream-I1: 2x2 latents of 8x8 pixels)."""
        return self.transformer.config.patch_size * self.vae_scale_factor

    def full_area(self) -> int:
        """The pixel area whose patches fill the transformer's ``max_seq`` tokens (1024*1024 for HiDream-I1)."""
        return self.transformer.max_seq * self.patch_pixels() ** 2

    def encode_control_image(self, image: Image.Image, batch_size: int, dtype) -> torch.Tensor:
        """VAE latent (distribution mode), shifted and scaled like the sampling latents, repeated to ``batch_size``."""
        pixels = self.image_processor.preprocess(image).to(self._execution_device, dtype=dtype)
        latent = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().to(dtype)
        latent = (latent - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return latent.repeat(batch_size, 1, 1, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str],
        negative_prompt: list[str],
        width: int,
        height: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        control_image: Image.Image | None = None,
        image_guidance_scale: float = E1_IMAGE_GUIDANCE,
        mu: float | None = None,
        generator: torch.Generator | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Sample one image per prompt.

        Args:
            prompt (list[str]): one prompt per image.
            negative_prompt (list[str]): the unconditional prompts (used when ``guidance_scale > 1``).
            width, height (int): the exact output size, multiples of 16.
            num_inference_steps (int, defaults to 50): UniPC steps on ai-toolkit's grid.
            guidance_scale (float, defaults to 5.0): text CFG scale; CFG runs when above 1.
            control_image (PIL.Image, *optional*): E1's source image; resized BILINEAR to the output size.
            image_guidance_scale (float, defaults to 2.0): E1's image guidance (ignored without a control image).
            mu (float, *optional*): exponential time shift for schedulers with dynamic shifting (I1).
            generator (torch.Generator, *optional*): draws the initial noise.
            max_sequence_length (int, defaults to 128): tokens per text encoder.
            output_type (str, defaults to "np"): ``np``, ``pil``, ``pt`` or ``latent``.
            callback_on_step_end (callable, *optional*): ``f(pipe, step, timestep, {"latents": latents})`` after
                every step.
        """
        device = self._execution_device
        batch_size = len(prompt)
        cfg = guidance_scale > 1.0
        # 1. Encode the prompts: (t5, neg t5, llama, neg llama, pooled, neg pooled); llama is [layers, B, L, D]
        t5, neg_t5, llama, neg_llama, pooled, neg_pooled = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg, device=device,
            max_sequence_length=max_sequence_length,
        )
        dtype = pooled.dtype
        # 2. Conditioning layout per pass. I1: [negative, prompt]. E1: [(prompt, no image), (negative, image),
        #    (prompt, image)], the control latent appended along the width.
        control = None
        passes = 1
        if control_image is not None:
            if control_image.size != (width, height):
                control_image = control_image.resize((width, height), Image.BILINEAR)
            control = self.encode_control_image(control_image, batch_size, dtype)
            if cfg:
                passes = 3
                control = torch.cat([torch.zeros_like(control), control, control])
                t5, llama, pooled = (torch.cat([t5, neg_t5, t5]), torch.cat([llama, neg_llama, llama], dim=1),
                                     torch.cat([pooled, neg_pooled, pooled]))
        elif cfg:
            passes = 2
            t5, llama, pooled = torch.cat([neg_t5, t5]), torch.cat([neg_llama, llama], dim=1), torch.cat([neg_pooled, pooled])

        # 3. Initial noise and ai-toolkit's step grid
        latents = self.prepare_latents(batch_size, self.transformer.config.in_channels, height, width, dtype, device,
                                       generator)
        sigmas = flow_unipc_grid(num_inference_steps, FLOW_UNIPC_SHIFT, self.scheduler.config.num_train_timesteps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 4. Denoise
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * passes) if passes > 1 else latents
            if control is not None:
                model_input = torch.cat([model_input, control], dim=-1)
            output = self.transformer(
                hidden_states=model_input, timesteps=t.expand(model_input.shape[0]), encoder_hidden_states_t5=t5,
                encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False,
            )[0]
            velocity = -output[..., : latents.shape[-1]]
            if passes == 2:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            elif passes == 3:
                no_image, no_text, full = velocity.chunk(3)
                text_guided = no_text + guidance_scale * (full - no_text)
                ratio = full.norm(dim=1, keepdim=True) / (text_guided.norm(dim=1, keepdim=True) + 1e-8)
                velocity = no_image + image_guidance_scale * (text_guided * ratio.clamp(0.0, 1.0) - no_image)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})

        # 5. Decode
        if output_type == "latent":
            images = latents
        else:
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return HiDreamImagePipelineOutput(images=images) if return_dict else (images,)


class HiDreamFamilyPipeline(AITKPipeline):
    """``hidream`` (HiDream-I1-Full) and ``hidream_e1`` (HiDream-E1-1, instruction editing)."""

    denoiser = "transformer"
    options_type = HiDreamOptions
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        return HiDreamAITKPipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        """A diffusers folder or hub repo; Llama-3.1 (tokenizer_4, text_encoder_4) comes from ``spec.options.llama``
        unless the folder has its own ``text_encoder_4``."""
        if os.path.isfile(source):
            raise ValueError(f"{spec.model_id}: single-file checkpoints are not supported ({source!r}); give a "
                             f"diffusers folder or hub repo of {spec.base}.")
        if os.path.exists(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
            raise FileNotFoundError(f"{source!r} is not a diffusers pipeline folder (no model_index.json). Give the "
                                    f"folder of a save_pretrained/hub snapshot of {spec.base}, or a hub repo id.")
        if not os.path.isdir(os.path.join(source, "text_encoder_4")) and "text_encoder_4" not in overrides:
            from transformers import AutoTokenizer, LlamaForCausalLM

            llama = spec.options.llama
            overrides["tokenizer_4"] = AutoTokenizer.from_pretrained(llama)
            overrides["text_encoder_4"] = LlamaForCausalLM.from_pretrained(
                llama, dtype=torch_dtype, device_map=overrides.get("device_map"))
        return HiDreamAITKPipeline.from_pretrained(source, dtype=torch_dtype, **overrides)

    @property
    def is_editing(self) -> bool:
        return self.spec.requires_control_image

    def resolve_params(self, prompt: str, **kwargs) -> GenerationParams:
        """The base rules, then I1's full-area size rule (the effective size is what the result reports)."""
        params = super().resolve_params(prompt, **kwargs)
        if self.is_editing:
            return params
        width, height = full_area_size(params.width, params.height, self.pipe.full_area(), self.pipe.patch_pixels())
        if (width, height) != (params.width, params.height):
            logger.warning("%s samples at the full %d-pixel area as ai-toolkit does: %dx%d becomes %dx%d.",
                           self.spec.model_id, self.pipe.full_area(), params.width, params.height, width, height)
        return dataclasses.replace(params, width=width, height=height)

    @property
    def generation_options(self) -> tuple[str, ...]:
        return ("image_guidance",) if self.is_editing else ()

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        value = params.extra.get("image_guidance", E1_IMAGE_GUIDANCE)
        low, high = IMAGE_GUIDANCE_RANGE
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"`image_guidance` must be a number in {low}..{high}, got {value!r}.")

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        kwargs = self.prompt_call(params, max_sequence_length=MAX_SEQUENCE_LENGTH)
        if self.is_editing:
            kwargs.update(control_image=params.control_images[0],
                          image_guidance_scale=float(params.extra.get("image_guidance", E1_IMAGE_GUIDANCE)))
        if self.pipe.scheduler.config.get("use_dynamic_shifting"):
            kwargs["mu"] = calculate_shift(self.pipe.transformer.max_seq)
        return kwargs
