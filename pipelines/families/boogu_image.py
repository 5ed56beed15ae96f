"""Boogu-Image (`boogu_image`) and Boogu-Image Edit (`boogu_image_edit`): our own pipeline and transformer, sampling
as ai-toolkit samples them.

diffusers has no Boogu-Image classes; ai-toolkit runs its own (``extensions_built_in/diffusion_models/boogu_image``:
a vendored transformer, prompt encoding and a small Euler sampler). We run our :class:`BooguImageTransformer2DModel`
(``boogu_image_transformer.py``, the checkpoints' module names) in :class:`BooguImagePipeline`, which does what
ai-toolkit's previews do:

* **Time.** Boogu's flow time runs from 0 (noise) to 1 (data) and the transformer predicts ``data - noise``. The
  grid is ``t_i = i / N`` (float32), shifted by ``t -> 1 - e^mu / (e^mu + 1 / (1 - t) - 1)`` with ``mu`` linear in
  the patch-token count (256 tokens -> 0.5, 4096 -> 1.15), and ends at 1. Euler: ``x += (t_next - t) v`` in float32.
  No diffusers scheduler is involved.
* **Guidance.** Real CFG ``u + g (c - u)`` with the encoded negative prompt (an empty one is encoded too) when
  ``g > 1``; one pass otherwise.
* **Prompts.** Each prompt is encoded alone at its natural length by Qwen3-VL (its last hidden state): Boogu's system
  prompt and the prompt as chat messages, the processor's chat template without a generation prompt, at most 1024
  tokens. A batch is right-padded to its longest prompt and masked.
* **Latents.** The initial noise is a float32 draw of ``(1, 16, H/8, W/8)`` per image from its seeded generator; the
  latents stay float32 and reach the transformer in its dtype. Decoding undoes FLUX's VAE shift and scale.
* **Edit.** The reference images (1 to 3) feed the model twice. (1) The Qwen3-VL prompt (the edit system prompt, one
  image item per reference before the text, no truncation): each image scaled down (never up) to fit 384x384 pixels
  of area and 768 pixels a side, floored to multiples of 16, bicubic with antialias, clamped. (2) Reference latents:
  each image resized to at most 1 MP of area (``match_target_res``: to the target's area, up or down) keeping its
  aspect ratio, rounded to multiples of 16, bilinear without antialias, VAE-encoded (a sample of the latent
  distribution) and shifted and scaled. The unconditional pass sees the same references, in the prompt and as latents.
  ai-toolkit samples the latent distribution from the device's global generator right after seeding it with the
  sample's seed (its noise comes from the CPU generator); we use a generator on the execution device seeded with the
  image's seed, which is the same draw.

Sizes are floored to 16 (VAE 8 x patch 2), ai-toolkit's bucket divisor.

LoRAs: ai-toolkit saves ``diffusion_model.`` + our module names (its ``transformer.`` prefix renamed on save), which
the common converter reads; LoKr the same way. See ``docs/models/boogu_image.md``.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import Qwen3VLModel

from ..base import AITKPipeline, GenerationParams
from ..registry import BooguImageOptions
from .boogu_image_transformer import BooguImageTransformer2DModel
from .krea2 import Qwen3VLImageProcessor, reference_pixels, to_unit_tensor

MAX_TEXT_TOKENS = 1024
#: (patch tokens, mu) at both ends of ai-toolkit's linear time-shift rule
MU_ENDPOINTS = ((256, 0.5), (4096, 1.15))
#: reference-latent pixel budget (model_kwargs.control_image_max_pixels)
REFERENCE_MAX_PIXELS = 1024 * 1024
#: the Qwen3-VL copy of a reference: area and side caps (model_kwargs.vlm_max_pixels / vlm_max_side_length), multiple
VLM_MAX_PIXELS = 384 * 384
VLM_MAX_SIDE = 768
VLM_MULTIPLE = 16
#: the checkpoints' subfolders, by pipeline component
SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "mllm": "mllm", "processor": "processor"}

SYSTEM_PROMPT_T2I = ("You are a helpful assistant that generates high-quality images based on user instructions. "
                     "The instructions are as follows.")
SYSTEM_PROMPT_EDIT = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
                      "then explain how the user's text instruction should alter or modify the image. Generate a new "
                      "image that meets the user's requirements while maintaining consistency with the original input "
                      "where appropriate.")


def boogu_mu(num_patch_tokens: int) -> float:
    """ai-toolkit's time-shift ``mu``: linear in the patch-token count through :data:`MU_ENDPOINTS`."""
    (x1, y1), (x2, y2) = MU_ENDPOINTS
    slope = (y2 - y1) / (x2 - x1)
    return slope * max(1, int(num_patch_tokens)) + (y1 - slope * x1)


def boogu_schedule(num_steps: int, num_patch_tokens: int) -> torch.Tensor:
    """The ``num_steps + 1`` flow times (0 = noise ... 1 = data) ai-toolkit's Boogu sampler steps through, in float32
    arithmetic as it computes them."""
    grid = np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float32)[:-1]
    remaining = np.clip(1.0 - grid, 1e-8, 1.0 - 1e-8)
    shift = math.exp(boogu_mu(num_patch_tokens))
    shifted = (1.0 - shift / (shift + (1.0 / remaining - 1.0))).astype(np.float32)
    return torch.from_numpy(np.concatenate([shifted, np.ones(1, dtype=np.float32)]))


def vlm_size(height: int, width: int, max_pixels: int = VLM_MAX_PIXELS, max_side: int = VLM_MAX_SIDE,
             multiple: int = VLM_MULTIPLE) -> tuple[int, int]:
    """The (height, width) of a reference image's Qwen3-VL copy: scaled down (never up) to fit both caps, each side
    floored to ``multiple`` (at least one)."""
    ratio = min(math.sqrt(max_pixels / (height * width)), max_side / max(height, width), 1.0)
    return max(multiple, int(height * ratio) // multiple * multiple), max(multiple, int(width * ratio) // multiple * multiple)


def vlm_image(image: torch.Tensor, max_pixels: int = VLM_MAX_PIXELS, max_side: int = VLM_MAX_SIDE) -> torch.Tensor:
    """A ``(3, H, W)`` 0..1 reference image resized for the Qwen3-VL prompt (bicubic, antialias, clamped).

    ai-toolkit resizes at the model dtype; we resize in float32 (antialiased bicubic has no bfloat16 kernel on CPU, and
    GPU kernels accumulate in float32 too) and round the result to ``image``'s dtype, so the values are the ones
    ai-toolkit holds. They are returned as float32, which every image processor takes."""
    size = vlm_size(image.shape[1], image.shape[2], max_pixels, max_side)
    if size == tuple(image.shape[1:]):
        return image.float()
    resized = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True)[0]
    return resized.clamp(0, 1).to(image.dtype).float()


class BooguImagePipeline(DiffusionPipeline):
    r"""Text (and, for the edit model, reference images) to image with Boogu-Image, sampled as ai-toolkit samples it.

    Args:
        transformer ([`BooguImageTransformer2DModel`]): the denoiser.
        vae ([`AutoencoderKL`]): FLUX.1's 16-channel VAE.
        mllm ([`Qwen3VLModel`]): the Qwen3-VL instruction encoder (its last hidden state).
        processor ([`Qwen3VLProcessor`]): its processor, with the chat template.
    """

    model_cpu_offload_seq = "mllm->transformer->vae"

    def __init__(self, transformer, vae, mllm, processor):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, mllm=mllm, processor=processor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "BooguImagePipeline":
        """Load a Boogu-Image folder (or hub repo id) with our classes, as ai-toolkit loads it.

        Args:
            pretrained_model_name_or_path (str): a folder with ``transformer/``, ``vae/``, ``mllm/`` and
                ``processor/`` (the Boogu/Boogu-Image-0.1-Base layout), or a hub repo id.
            dtype (torch.dtype, *optional*): dtype of the weighted components (``torch_dtype`` is accepted too).
            revision (str, *optional*): hub revision.
            device_map (str, *optional*): a device to read the weighted components onto directly.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        revision = kwargs.pop("revision", None)
        device_map = kwargs.pop("device_map", None)
        if kwargs:
            raise ValueError(f"BooguImagePipeline.from_pretrained got unsupported option(s) {sorted(kwargs)}.")
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder, allow_patterns=[f"{sub}/*" for sub in SUBFOLDERS.values()],
                                       revision=revision)
        missing = [sub for sub in SUBFOLDERS.values() if not os.path.isdir(os.path.join(folder, sub))]
        if missing:
            raise FileNotFoundError(f"{folder!r} is not a Boogu-Image folder: it lacks {missing} (expected the "
                                    "Boogu/Boogu-Image-0.1-Base layout: transformer/, vae/, mllm/, processor/). The "
                                    "'-fp8' repos ship torchao weights, which are not supported: use the bf16 repos.")
        options = {key: value for key, value in (("dtype", dtype), ("device_map", device_map)) if value is not None}
        return cls(
            transformer=BooguImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", **options),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **options),
            mllm=Qwen3VLModel.from_pretrained(os.path.join(folder, "mllm"), **options).eval(),
            processor=Qwen3VLImageProcessor.from_pretrained(os.path.join(folder, "processor")),
        )

    # ------------------------------------------------------------------------------------------------ prompts
    def encode_one(self, prompt: str, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``(L, width)`` instruction features of one prompt at its natural length; with ``images`` (0..1 tensors,
        already resized by :func:`vlm_image`) the edit model's prompt with the images in it."""
        device = self._execution_device
        if images:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
            messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT_EDIT}]},
                        {"role": "user", "content": content}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            inputs = self.processor(text=[text], images=list(images), return_tensors="pt", do_rescale=False)
        else:
            messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT_T2I}]},
                        {"role": "user", "content": [{"type": "text", "text": prompt}]}]
            inputs = self.processor.apply_chat_template([messages], tokenize=True, return_dict=True,
                                                        return_tensors="pt", add_generation_prompt=False,
                                                        truncation=True, max_length=MAX_TEXT_TOKENS)
        inputs = {key: value.to(device, self.mllm.dtype) if value.is_floating_point() else value.to(device)
                  for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        return self.mllm(**inputs).last_hidden_state[0]

    def encode_batch(self, prompts: list[str], images=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt encoded alone, right-padded to the longest: ``(features, mask)``."""
        features = [self.encode_one(p, images) for p in prompts]
        length = max(f.shape[0] for f in features)
        dtype = self.transformer.dtype
        batch = torch.zeros(len(features), length, features[0].shape[-1], device=features[0].device, dtype=dtype)
        mask = torch.zeros(len(features), length, dtype=torch.long, device=features[0].device)
        for i, f in enumerate(features):
            batch[i, : f.shape[0]] = f.to(dtype)
            mask[i, : f.shape[0]] = 1
        return batch, mask

    # ------------------------------------------------------------------------------------------------ references
    def encode_references(self, images: list[torch.Tensor], target_pixels: int, match_target_res: bool,
                          generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Each ``(3, H, W)`` 0..1 image as a ``(16, h, w)`` VAE latent (ai-toolkit's reference latents), the latent
        distribution sampled with ``generator``."""
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        budget = target_pixels if match_target_res else REFERENCE_MAX_PIXELS
        latents = []
        for image in images:
            pixels = reference_pixels(image, budget, match_target_res, multiple, self._execution_device,
                                      self.transformer.dtype)
            latent = self.vae.encode((pixels * 2 - 1).to(self.vae.dtype)).latent_dist.sample(generator)
            latent = (latent - (self.vae.config.shift_factor or 0)) * self.vae.config.scaling_factor
            latents.append(latent[0].to(self.transformer.dtype))
        return latents

    # ------------------------------------------------------------------------------------------------ sampling
    def velocity(self, latents, t, features, mask, references=None):
        """The transformer's prediction (``data - noise``) for float32 ``latents`` at flow time ``t`` (a scalar)."""
        return self.transformer(latents.to(self.transformer.dtype), t.expand(latents.shape[0]), features, mask,
                                references)

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str],
        negative_prompt: list[str],
        width: int,
        height: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
        control_images: list | None = None,
        reference_seeds: list[int] | None = None,
        match_target_res: bool = False,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
    ) -> ImagePipelineOutput:
        """Sample one image per prompt as ai-toolkit's previews do.

        Args:
            prompt, negative_prompt (list[str]): one per image; the negative is encoded when ``guidance_scale > 1``.
            width, height (int): multiples of 16.
            num_inference_steps (int): Euler steps.
            guidance_scale (float): CFG ``u + g (c - u)`` above 1.
            generator: one per image; draws the float32 initial noise.
            control_images (list[PIL.Image], *optional*): the edit model's reference images (up to 5).
            reference_seeds (list[int], *optional*): per image, the seed of the generator (on the execution device)
                that samples its reference latents (ai-toolkit: the device's global generator, seeded with the
                sample's seed).
            match_target_res (bool): reference latents take the target's area instead of the 1 MP cap.
            output_type (str): ``np`` (float 0..1, ``[B, H, W, 3]``) or ``latent``.
        """
        if width % 16 or height % 16:
            raise ValueError(f"width and height must be multiples of 16, got {width}x{height}.")
        device = self._execution_device
        batch_size = len(prompt)
        cfg = guidance_scale > 1.0
        tensors = [to_unit_tensor(image).to(device, self.mllm.dtype) for image in control_images or ()]
        vlm_images = [vlm_image(image) for image in tensors] or None

        text, text_mask = self.encode_batch(prompt, vlm_images)
        if cfg:
            negative, negative_mask = self.encode_batch(negative_prompt, vlm_images)

        references = None
        if tensors:
            per_image = [self.encode_references(tensors, width * height, match_target_res,
                                                torch.Generator(device).manual_seed(seed))
                         for seed in reference_seeds or [0] * batch_size]
            references = [torch.stack(latents) for latents in zip(*per_image)]

        shape = (batch_size, self.transformer.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        patch = self.transformer.config.patch_size
        times = boogu_schedule(num_inference_steps, (shape[2] // patch) * (shape[3] // patch)).to(device)
        self._num_timesteps = num_inference_steps
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            v = self.velocity(latents, t, text, text_mask, references)
            if cfg:
                v_uncond = self.velocity(latents, t, negative, negative_mask, references)
                v = v_uncond + guidance_scale * (v - v_uncond)
            latents = latents + v.to(torch.float32) * (t_next - t)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})

        if output_type == "latent":
            images = latents
        else:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0)
            decoded = self.vae.decode(latents, return_dict=False)[0]
            images = ((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images)


class BooguImageFamilyPipeline(AITKPipeline):
    """``boogu_image`` and ``boogu_image_edit``."""

    denoiser = "transformer"
    options_type = BooguImageOptions
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec):
        return BooguImagePipeline

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        if "match_target_res" in params.extra and not isinstance(params.extra["match_target_res"], bool):
            raise ValueError(f"`match_target_res` must be true or false, got {params.extra['match_target_res']!r}.")

    def job_options(self, model_config: dict) -> dict:
        """The job's ``model_kwargs`` among this id's options (``match_target_res`` for the edit id)."""
        model_kwargs = model_config.get("model_kwargs") or {}
        return {name: model_kwargs[name] for name in self.spec.options.generation_options if name in model_kwargs}

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        kwargs = self.prompt_call(params)
        if self.spec.options.edit:
            options = {**self.spec.options.defaults(), **params.extra}
            kwargs.update(control_images=list(params.control_images), reference_seeds=params.seeds,
                          match_target_res=options["match_target_res"])
        return kwargs
