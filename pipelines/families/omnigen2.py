"""OmniGen2 (`omnigen2`): our own pipeline, scheduler and transformer, sampling as ai-toolkit samples it.

diffusers has no OmniGen2 pipeline, and ai-toolkit runs a vendored copy of the OmniGen2 repository
(``extensions_built_in/diffusion_models/omnigen2``). What its sample previews do, and so do we:

* **Prompts**: Qwen2.5-VL's chat template with OmniGen2's system message is applied *twice*: once by ai-toolkit's
  ``get_prompt_embeds`` and once more inside the pipeline's ``encode_prompt`` (that is also how ai-toolkit trains).
  The negative prompt (empty by default) goes through the same path. Text: the last hidden state of the MLLM's
  language model over the templated prompt, at most 256 tokens.
* **Guidance**: ``guidance`` is OmniGen2's ``text_guidance_scale``: above 1, ``u + g (c - u)`` where the
  unconditional pass uses the negative prompt *and no input images*. ``image_guidance_scale`` is fixed at 1.0.
* **Input images** (0 to 3 ``control_images``): resized to the target size (bilinear) as ai-toolkit does, then
  OmniGen2's own preprocessing (at most 1024 px a side and 1024x1024 pixels, floored to 16, Lanczos), VAE-encoded
  (a posterior sample), shifted and scaled; they become reference tokens. ``align_res`` is off: the output size is
  always the requested one.
* **Scheduler**: OmniGen2's Euler with ``dynamic_time_shift`` (see :class:`OmniFlowMatchEulerScheduler`).
* **Sizes**: above 1024x1024 pixels the image is generated at the 1024x1024-area size floored to 16 and resized
  (bilinear) to the requested size, as OmniGen2's pipeline does.

The VAE posterior sample of the input images comes from ``torch``'s global generator in ai-toolkit (not
reproducible); we draw it from a separate generator seeded with the call's seed, so results are deterministic and
the initial noise is still the first draw of the seeded generator, as in ai-toolkit.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from ..base import AITKPipeline, GenerationParams
from .omnigen2_transformer import OmniGen2Transformer2DModel

MAX_SEQUENCE_LENGTH = 256
MAX_PIXELS = 1024 * 1024
MAX_INPUT_SIDE = 1024
SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."

#: component name -> checkpoint subfolder (the layout of OmniGen2/OmniGen2)
SUBFOLDERS = {"transformer": "transformer", "vae": "vae", "mllm": "mllm", "processor": "processor"}


# ---------------------------------------------------------------------------------------------------- scheduler
class OmniFlowMatchEulerScheduler(SchedulerMixin, ConfigMixin):
    """OmniGen2's Euler sampler in its own time convention: ``t`` runs from 0 (noise) to 1 (data).

    ``set_timesteps(n, num_tokens=L)`` takes ``t_i = i / n`` for ``i < n`` and, with ``dynamic_time_shift``, maps
    them through ``t -> t / (m - m t + t)`` with ``m = sqrt(L) / 40`` (``L`` = latent height x width, so m = 3.2 at
    1024x1024). The grid ends at ``t = 1``. ``step`` is ``x + (t_next - t) * v`` computed in float32.

    In diffusers' terms (sigma = 1 - t) this is FlowMatch Euler with sigmas ``linspace(1, 1/n, n)`` and a static
    shift of ``m``, with the model output negated; the resolution-dependent ``m`` is why it is kept as its own class.

    Args:
        num_train_timesteps (int, defaults to 1000): kept for config compatibility; unused by sampling.
        dynamic_time_shift (bool, defaults to True): apply the resolution-dependent shift.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, dynamic_time_shift: bool = True):
        self.timesteps = torch.zeros(0)
        self.grid = torch.ones(1)
        self.step_index = 0

    @staticmethod
    def shift_for(num_tokens: int) -> float:
        return math.sqrt(num_tokens) / 40.0

    def set_timesteps(self, num_inference_steps: int, device=None, num_tokens: int | None = None) -> None:
        t = np.linspace(0, 1, num_inference_steps + 1, dtype=np.float32)[:-1]
        if self.config.dynamic_time_shift and num_tokens is not None:
            m = np.sqrt(num_tokens) / 40
            t = t / (m - m * t + t)
        self.timesteps = torch.from_numpy(np.asarray(t, dtype=np.float32)).to(device)
        self.grid = torch.cat([self.timesteps, torch.ones(1, device=self.timesteps.device)])
        self.step_index = 0

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        t, t_next = self.grid[self.step_index], self.grid[self.step_index + 1]
        self.step_index += 1
        return (sample.to(torch.float32) + (t_next - t) * model_output).to(model_output.dtype)


# ---------------------------------------------------------------------------------------------------- pipeline
def reference_size(width: int, height: int, max_pixels: int = MAX_PIXELS, max_side: int = MAX_INPUT_SIDE,
                   multiple: int = 16) -> tuple[int, int]:
    """OmniGen2's input-image size rule: never upscale, cap the long side and the area, floor to ``multiple``."""
    ratio = min(max_side / max(width, height), math.sqrt(max_pixels / (width * height)), 1.0)
    return int(width * ratio) // multiple * multiple, int(height * ratio) // multiple * multiple


def sampling_size(width: int, height: int, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The size OmniGen2 samples at: the requested one, shrunk to ``max_pixels`` area and floored to 16 if larger."""
    ratio = min(math.sqrt(max_pixels / (width * height)), 1.0)
    return int(width * ratio) // 16 * 16, int(height * ratio) // 16 * 16


class OmniGen2Pipeline(DiffusionPipeline):
    r"""Text (and optional input images) to image with OmniGen2.

    Args:
        transformer ([`OmniGen2Transformer2DModel`]): the denoiser.
        vae ([`AutoencoderKL`]): FLUX.1's 16-channel VAE.
        scheduler ([`OmniFlowMatchEulerScheduler`]): OmniGen2's Euler sampler.
        mllm ([`Qwen2_5_VLForConditionalGeneration`]): Qwen2.5-VL; only its language model encodes the prompt.
        processor ([`Qwen2TokenizerFast`]): the tokenizer of the checkpoint's ``processor/`` folder, with the chat
            template (input images go to the VAE, never to the MLLM, so the image processor is not needed).
    """

    model_cpu_offload_seq = "mllm->transformer->vae"

    def __init__(self, transformer, vae, scheduler, mllm, processor):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, mllm=mllm, processor=processor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2, resample="lanczos")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "OmniGen2Pipeline":
        """Load an OmniGen2 folder (or hub repo id) with our classes; the checkpoint's remote code is never run.

        Args:
            pretrained_model_name_or_path (str): a folder with ``transformer/``, ``vae/``, ``mllm/`` and
                ``processor/`` (the OmniGen2/OmniGen2 layout), or a hub repo id.
            dtype (torch.dtype, *optional*): dtype of the weighted components (``torch_dtype`` is accepted too).
            revision (str, *optional*): hub revision.
            device_map (str, *optional*): a device to read the weighted components onto directly.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        revision = kwargs.pop("revision", None)
        device_map = kwargs.pop("device_map", None)
        if kwargs:
            raise ValueError(f"OmniGen2Pipeline.from_pretrained got unsupported option(s) {sorted(kwargs)}.")
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            patterns = [f"{sub}/*" for sub in SUBFOLDERS.values()]
            folder = snapshot_download(folder, allow_patterns=patterns, revision=revision)
        missing = [sub for sub in SUBFOLDERS.values() if not os.path.isdir(os.path.join(folder, sub))]
        if missing:
            raise FileNotFoundError(f"{folder!r} is not an OmniGen2 folder: it lacks {missing} (expected the "
                                    "OmniGen2/OmniGen2 layout: transformer/, vae/, mllm/, processor/).")
        options = {key: value for key, value in (("dtype", dtype), ("device_map", device_map)) if value is not None}
        processor = AutoTokenizer.from_pretrained(os.path.join(folder, SUBFOLDERS["processor"]))
        if not processor.chat_template:
            raise ValueError(f"The tokenizer in {folder}/processor has no chat template; OmniGen2 prompts need "
                             "Qwen2.5-VL's chat template (tokenizer_config.json or chat_template.jinja).")
        return cls(
            transformer=OmniGen2Transformer2DModel.from_pretrained(folder, subfolder="transformer", **options),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **options),
            scheduler=OmniFlowMatchEulerScheduler(),
            mllm=Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(folder, "mllm"), **options).eval(),
            processor=processor,
        )

    # ------------------------------------------------------------------------------------------------ text
    def apply_chat_template(self, prompt: str) -> str:
        """OmniGen2's conversation: its system message and ``prompt`` as the user turn, no generation prompt."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode_prompt(self, prompts: list[str], device, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """Chat-template each prompt and return the MLLM's last hidden states and the attention mask."""
        texts = [self.apply_chat_template(p) for p in prompts]
        tokens = self.processor(texts, padding="longest", max_length=max_sequence_length, truncation=True,
                                return_tensors="pt").to(device)
        # through the top-level module (CPU-offload hooks sit there), as OmniGen2 does: the last hidden state
        hidden = self.mllm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           output_hidden_states=True).hidden_states[-1]
        return hidden.to(self.mllm.dtype), tokens.attention_mask

    # ------------------------------------------------------------------------------------------------ images
    def encode_references(self, images: list[Image.Image], batch_size: int, device, seeds: list[int]) -> list[torch.Tensor]:
        """Each input image as VAE latents ``[batch_size, C, h, w]`` (OmniGen2's size rule, posterior sample): one
        sample per seed (one seed for the whole batch, or one per batch item), each seed's generator drawing for the
        images in order."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latents = []
        for image in images:
            width, height = reference_size(*image.size)
            pixels = self.image_processor.preprocess(image, height=height, width=width).to(device, self.vae.dtype)
            posterior = self.vae.encode(pixels).latent_dist
            z = torch.cat([posterior.sample(generator=generator) for generator in generators])
            z = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
            latents.append(z.to(self.vae.dtype).expand(batch_size, -1, -1, -1))
        return latents

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        input_images: list[Image.Image] | None = None,
        width: int = 1024,
        height: int = 1024,
        num_inference_steps: int = 28,
        text_guidance_scale: float = 4.0,
        image_guidance_scale: float = 1.0,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
    ) -> ImagePipelineOutput:
        """Generate images.

        Args:
            prompt (str | list[str]): the prompt(s); the chat template is applied here (once).
            negative_prompt (str | list[str], defaults to ""): the unconditional prompt(s), templated the same way.
            input_images (list[PIL.Image], *optional*): up to 5 reference images (OmniGen2 uses up to 3).
            width, height (int, defaults to 1024): output size, multiples of 16.
            num_inference_steps (int, defaults to 28): Euler steps.
            text_guidance_scale (float, defaults to 4.0): CFG against the negative prompt without input images.
            image_guidance_scale (float, defaults to 1.0): above 1 (with input images and text guidance above 1), a
                third pass with the negative prompt and the images: ``u + gi (r - u) + gt (c - r)``.
            max_sequence_length (int, defaults to 256): prompt tokens kept.
            generator (torch.Generator | list[torch.Generator], *optional*): draws the initial noise (a list: one
                generator per batch item); its seed also seeds the input images' VAE posterior sample.
            output_type (str, defaults to "pil"): ``pil``, ``np`` or ``pt``.
            callback_on_step_end (callable, *optional*): ``f(pipe, step, timestep, callback_kwargs)`` after each step.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(negatives)} negative prompts; give one per prompt.")
        if width % 16 or height % 16:
            raise ValueError(f"width and height must be multiples of 16, got {width}x{height}.")
        device = self._execution_device
        batch = len(prompts)
        use_text_cfg = text_guidance_scale > 1.0
        images = list(input_images or [])
        use_image_cfg = use_text_cfg and bool(images) and image_guidance_scale > 1.0

        text, text_mask = self.encode_prompt(prompts, device, max_sequence_length)
        if use_text_cfg:
            neg_text, neg_mask = self.encode_prompt(negatives, device, max_sequence_length)
        if isinstance(generator, list):
            seeds = [g.initial_seed() for g in generator]
        else:
            seeds = [generator.initial_seed() if generator is not None else torch.initial_seed()]
        refs = self.encode_references(images, batch, device, seeds)

        sample_width, sample_height = sampling_size(width, height)
        shape = (batch, self.transformer.config.in_channels, sample_height // self.vae_scale_factor,
                 sample_width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=text.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device, num_tokens=shape[-2] * shape[-1])

        def velocity(t, context, mask, references):
            return self.transformer(latents, t.expand(batch).to(latents.dtype), context, mask, references)

        for i, t in enumerate(self.scheduler.timesteps):
            v = velocity(t, text, text_mask, refs)
            if use_image_cfg:
                with_refs = velocity(t, neg_text, neg_mask, refs)
                bare = velocity(t, neg_text, neg_mask, None)
                v = bare + image_guidance_scale * (with_refs - bare) + text_guidance_scale * (v - with_refs)
            elif use_text_cfg:
                bare = velocity(t, neg_text, neg_mask, None)
                v = bare + text_guidance_scale * (v - bare)
            latents = self.scheduler.step(v, latents).to(self.vae.dtype)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})

        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if (sample_width, sample_height) != (width, height):
            image = F.interpolate(image, size=(height, width), mode="bilinear")
        image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image)


# ---------------------------------------------------------------------------------------------------- family
class OmniGen2FamilyPipeline(AITKPipeline):
    """``omnigen2``: OmniGen2/OmniGen2 with 0 to 3 input images (``control_images``)."""

    denoiser = "transformer"

    @classmethod
    def diffusers_pipeline_class(cls, spec):
        return OmniGen2Pipeline

    @classmethod
    def make_scheduler(cls, spec):
        return OmniFlowMatchEulerScheduler(**spec.scheduler.config)

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        # ai-toolkit templates the prompt in get_prompt_embeds and the pipeline templates it again: both are kept.
        template = self.pipe.apply_chat_template
        images = [im if im.size == (params.width, params.height)
                  else im.resize((params.width, params.height), Image.BILINEAR) for im in params.control_images]
        return {
            "prompt": [template(params.prompt)] * params.batch_size,
            "negative_prompt": [template(params.negative)] * params.batch_size,
            "input_images": images,
            "width": params.width,
            "height": params.height,
            "text_guidance_scale": params.guidance,
            "image_guidance_scale": 1.0,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "output_type": "np",
        }
