"""PRXPixel (Photoroom's pixel-space PRX text-to-image model), sampled as ai-toolkit's ``prx_pixel`` arch samples it.

ai-toolkit (``extensions_built_in/diffusion_models/prx_pixel_t2i``) vendors the PRX transformer and renders its
previews with a small loop of its own (``src/pipeline.py``), not with a diffusers pipeline. We run diffusers'
``PRXTransformer2DModel`` (same module names and forward as ai-toolkit's vendored copy, proven on the same weights in
``tests/test_prx_pixel.py``) inside :class:`PRXPixelAITKPipeline`, a subclass of diffusers' ``PRXPixelPipeline`` that
keeps its components and replaces ``__call__`` with that loop:

* **Pixel space.** There is no VAE: the transformer denoises RGB in ``[-1, 1]`` (3 channels, 16x16 patches), and the
  final latents are the image.
* **Initial noise.** ``randn(1, 3, H, W)`` in float32 from the seeded CPU generator, times ai-toolkit's noise scale 2.0,
  whatever the model dtype; the latents stay float32 between steps and go to the model dtype only as its input.
* **Schedule.** A FlowMatch Euler scheduler with static shift 3.0 (the registry's ``PRX_FLOWMATCH``); the transformer
  gets ``t / 1000``.
* **x0 prediction.** The transformer predicts the clean image. Guidance is applied to that prediction,
  ``x0 = x0_u + g (x0_c - x0_u)``, whenever ``guidance != 1`` (below 1 too) with the encoded negative prompt (an empty
  one is encoded); the result becomes a velocity ``(x_t - x0) / max(t, 0.05)`` for the Euler step.
* **Prompts.** The Qwen3-VL text model's last hidden state over the prompt padded to 256 tokens, with its mask.

Where the stock ``PRXPixelPipeline`` differs, we do what ai-toolkit does: it cleans prompts (ftfy, HTML unescape,
strip) before tokenizing, runs CFG only above guidance 1, draws the noise in the model dtype and keeps the latents
there, takes the noise scale from its config, and snaps sizes to aspect-ratio bins.

LoRAs: ai-toolkit saves ``diffusion_model.`` + the transformer's module names (its block Linears), PEFT ``lora_A`` /
``lora_B`` without alpha, or LoKr. See ``docs/models/prx_pixel.md``.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import PRXPixelPipeline
from diffusers.pipelines.prx.pipeline_output import PRXPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..base import AITKPipeline, GenerationParams
from ..registry import ModelSpec
from .pixel_space import velocity_from_x0

#: text tokens ai-toolkit pads and truncates every prompt to (``PROMPT_MAX_TOKENS``)
PROMPT_MAX_TOKENS = 256
#: ai-toolkit's initial-noise std (``NOISE_SCALE``); it does not read the checkpoint's
NOISE_SCALE = 2.0
#: smallest flow time in the x0 -> velocity conversion (``X_PRED_T_MIN``)
X0_MIN_TIME = 0.05


class PRXPixelAITKPipeline(PRXPixelPipeline):
    """diffusers' ``PRXPixelPipeline`` with ai-toolkit's preview loop (see the module docstring)."""

    def encode_prompts(self, prompts: list[str], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states ``[B, 256, D]`` (in ``dtype``) and the boolean token mask ``[B, 256]``; no text cleaning."""
        device = self._execution_device
        tokens = self.tokenizer(prompts, padding="max_length", max_length=PROMPT_MAX_TOKENS, truncation=True,
                                return_attention_mask=True, return_tensors="pt")
        input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden.to(dtype), mask.bool()

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str],
        negative_prompt: list[str],
        width: int,
        height: int,
        num_inference_steps: int = 28,
        guidance_scale: float = 5.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Sample one image per prompt.

        Args:
            prompt (list[str]): one prompt per image.
            negative_prompt (list[str]): the unconditional prompts, used when ``guidance_scale != 1``.
            width, height (int): the output size, multiples of the patch size (16).
            num_inference_steps (int, defaults to 28): Euler steps.
            guidance_scale (float, defaults to 5.0): guidance on the x0 prediction; 1 runs one pass per step.
            generator (torch.Generator or list, *optional*): draws the initial noise (one per image for a list).
            output_type (str, defaults to "np"): ``np``, ``pil``, ``pt`` or ``latent`` (the ``[-1, 1]`` pixels).
            callback_on_step_end (callable, *optional*): ``f(pipe, step, timestep, {"latents": latents})`` after
                every step.
        """
        device = self._execution_device
        dtype = self.transformer.dtype
        batch_size = len(prompt)
        cfg = guidance_scale != 1.0
        passes = 2 if cfg else 1
        # 1. Prompts; with guidance one batched pass of [negative, prompt] (ai-toolkit runs the two one after the other)
        embeds, mask = self.encode_prompts(prompt, dtype)
        if cfg:
            negative_embeds, negative_mask = self.encode_prompts(negative_prompt, dtype)
            embeds, mask = torch.cat([negative_embeds, embeds]), torch.cat([negative_mask, mask])

        # 2. Initial noise in float32, then the schedule
        shape = (batch_size, self.transformer.config.in_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * NOISE_SCALE
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        train_timesteps = self.scheduler.config.num_train_timesteps

        # 3. Denoise: x0 prediction, guidance on x0, x0 -> velocity, Euler step
        for i, t in enumerate(timesteps):
            flow_time = (t / train_timesteps).float().expand(batch_size * passes)
            x0 = self.transformer(
                hidden_states=latents.to(dtype).repeat(passes, 1, 1, 1), timestep=flow_time,
                encoder_hidden_states=embeds, attention_mask=mask, return_dict=False,
            )[0].float()
            if cfg:
                x0_uncond, x0_cond = x0.chunk(2)
                x0 = x0_uncond + guidance_scale * (x0_cond - x0_uncond)
            velocity = velocity_from_x0(latents, x0, flow_time[:batch_size], min_time=X0_MIN_TIME)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})

        # 4. The latents are the image in [-1, 1]
        images = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        return PRXPipelineOutput(images=images) if return_dict else (images,)


class PRXPixelFamilyPipeline(AITKPipeline):
    """``prx_pixel``."""

    denoiser = "transformer"
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        return PRXPixelAITKPipeline

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params)
