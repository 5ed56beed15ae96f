"""Flex.2-preview (ostris): our own diffusers pipeline for it, sampling as ai-toolkit samples it.

Flex.2 is a FLUX.1-architecture ``FluxTransformer2DModel`` whose input projection takes, per packed 2x2 token, the
noisy latent plus three conditioning blocks (``extensions_built_in/flex2/`` in ostris/ai-toolkit):

====================  =======================  ===================================================
channels (unpacked)   block                    with no input
====================  =======================  ===================================================
``C``                 noisy latent             -
``C``                 inpaint latent           zeros
``1``                 inpaint mask (1 = paint)  ones ("inpaint everything")
``C``                 control latent           zeros
====================  =======================  ===================================================

``C`` is the VAE's 16 latent channels, so ``in_channels = 4 * (3C + 1) = 196`` and ``out_channels = 64``. The blocks
are concatenated per channel before the 2x2 packing, which is the same as concatenating the packed blocks.

The control image (line, depth, pose...) is resized to the target size, VAE-encoded (a *sample* of the latent
distribution drawn from the call's ``generator``, before the initial noise is drawn), shifted and scaled like the
latents. An inpaint image is encoded the same way and zeroed where the mask says "paint". Sampling is FlowMatch Euler
with ``sigmas = linspace(1, 1/N, N)`` and dynamic shifting, ``mu`` from the packed sequence length; guidance is the
distilled guidance embedding (no true CFG, the negative prompt has no effect).

We never run the checkpoint's hub remote code: :meth:`Flex2Pipeline.from_pretrained` loads each component from its
subfolder with the known diffusers/transformers classes. ``docs/models/flex2.md`` lists the sources of each fact.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..base import AITKPipeline, GenerationParams, LatentLayout

T5_MAX_LENGTH = 512
CONTROL_STRENGTH_RANGE = (0.0, 10.0)

#: component name -> the class it is loaded with (the layout of ostris/Flex.2-preview)
COMPONENT_CLASSES = {
    "scheduler": FlowMatchEulerDiscreteScheduler,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "tokenizer": CLIPTokenizer,
    "text_encoder_2": T5EncoderModel,
    "tokenizer_2": T5TokenizerFast,
    "transformer": FluxTransformer2DModel,
}
WEIGHTED_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "transformer")


def flex2_in_channels(latent_channels: int) -> int:
    """Packed input width of a Flex.2 transformer: noisy latent + inpaint latent + mask + control latent, x4."""
    return 4 * (3 * latent_channels + 1)


def mask_to_tensor(mask) -> torch.Tensor:
    """A mask (PIL image, ``[H, W]`` array or tensor in 0..1) as a float32 ``[1, 1, H, W]`` tensor."""
    if isinstance(mask, Image.Image):
        mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    elif torch.is_tensor(mask):
        mask = mask.detach().float().cpu()
    else:
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))
    if mask.ndim != 2:
        raise ValueError(f"`inpaint_mask` must be a single-channel H x W mask, got shape {tuple(mask.shape)}.")
    return mask[None, None]


class Flex2Pipeline(FluxControlPipeline):
    r"""Text-to-image with Flex.2's built-in control and inpainting inputs.

    Components are FluxControlPipeline's (FLUX.1's), with a transformer of Flex.2's input width.

    Args:
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): FlowMatch Euler with dynamic shifting.
        vae ([`AutoencoderKL`]): the FLUX.1 16-channel VAE; encodes control/inpaint images and decodes the result.
        text_encoder ([`CLIPTextModel`]): CLIP-L, gives the pooled prompt embedding.
        tokenizer ([`CLIPTokenizer`]): CLIP-L's tokenizer.
        text_encoder_2 ([`T5EncoderModel`]): T5-XXL, gives the prompt sequence.
        tokenizer_2 ([`T5TokenizerFast`]): T5's tokenizer.
        transformer ([`FluxTransformer2DModel`]): Flex.2's transformer, ``in_channels = 4 * (3 * 16 + 1) = 196``.
    """

    # ---------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "Flex2Pipeline":
        """Load a Flex.2 checkpoint folder (or hub repo id) without running its remote code.

        ostris/Flex.2-preview ships a ``pipeline.py`` that its ``model_index.json`` points to; diffusers' generic
        loader would import and run it. We read the same folders with the known classes instead.

        Args:
            pretrained_model_name_or_path (str): a local diffusers-layout folder, or a hub repo id (only the
                component subfolders and ``model_index.json`` are fetched, never the ``.py`` or single-file weights).
            dtype (torch.dtype, *optional*): dtype of the weighted components (``torch_dtype`` is accepted too).
            revision (str, *optional*): hub revision.
            device_map (str, *optional*): a device to read the weighted components onto directly.
            scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer (*optional*):
                an already loaded component to use instead of the folder's.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        revision = kwargs.pop("revision", None)
        device_map = kwargs.pop("device_map", None)
        components = {name: kwargs.pop(name) for name in COMPONENT_CLASSES if name in kwargs}
        if kwargs:
            raise ValueError(f"Flex2Pipeline.from_pretrained got unsupported option(s) {sorted(kwargs)}.")
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            patterns = ["model_index.json"] + [f"{name}/*" for name in COMPONENT_CLASSES]
            folder = snapshot_download(folder, allow_patterns=patterns, revision=revision)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{folder!r} has no model_index.json; give a Flex.2 diffusers folder or repo id.")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        missing = [name for name in COMPONENT_CLASSES if name not in index and name not in components]
        if missing:
            raise ValueError(f"{folder!r} is not a FLUX.1-layout pipeline: model_index.json lacks {missing}.")
        # check the channel layout from the configs before loading any weights
        vae_config = components["vae"].config if "vae" in components else AutoencoderKL.load_config(folder, subfolder="vae")
        transformer_config = (components["transformer"].config if "transformer" in components
                              else FluxTransformer2DModel.load_config(folder, subfolder="transformer"))
        expected = flex2_in_channels(vae_config["latent_channels"])
        got = transformer_config["in_channels"]
        if got != expected:
            raise ValueError(
                f"{folder!r} holds a transformer with in_channels={got}, not a Flex.2 transformer "
                f"(in_channels={expected}: noisy latent + inpaint latent + mask + control latent, packed 2x2). "
                "Use the model id that matches this checkpoint (e.g. `flux` or `flex1` for in_channels=64)."
            )
        for name, component_cls in COMPONENT_CLASSES.items():
            if name not in components:
                options = {}
                if name in WEIGHTED_COMPONENTS:
                    options = {key: value for key, value in (("dtype", dtype), ("device_map", device_map))
                               if value is not None}
                components[name] = component_cls.from_pretrained(folder, subfolder=name, **options)
        return cls(**components)

    @classmethod
    def from_single_file(cls, *args, **kwargs):
        raise ValueError(
            "Flex.2 cannot be loaded from a single .safetensors file (diffusers has no Flex.2 single-file config); "
            "give the diffusers folder of ostris/Flex.2-preview or its repo id."
        )

    # ---------------------------------------------------------------------------------------------------- inputs
    def check_flex2_inputs(self, control_strength, control_stop, inpaint_image, inpaint_mask) -> None:
        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        low, high = CONTROL_STRENGTH_RANGE
        if not (is_number(control_strength) and low <= control_strength <= high):
            raise ValueError(f"`control_strength` must be a number in {low}..{high}, got {control_strength!r}.")
        if not (is_number(control_stop) and 0.0 <= control_stop <= 1.0):
            raise ValueError(f"`control_stop` must be a fraction of the steps in 0..1, got {control_stop!r}.")
        if inpaint_mask is not None and inpaint_image is None:
            raise ValueError("`inpaint_mask` was given without `inpaint_image`; pass the image to inpaint too.")
        if inpaint_image is not None:
            if not isinstance(inpaint_image, Image.Image):
                raise ValueError(f"`inpaint_image` must be a PIL image, got {type(inpaint_image).__name__}.")
            if inpaint_mask is None and inpaint_image.mode != "RGBA":
                raise ValueError(
                    "`inpaint_image` needs a mask: give an RGBA image whose transparent pixels are the area to "
                    f"paint (ai-toolkit's `.inpaint.` images), or pass `inpaint_mask`; got a {inpaint_image.mode} image."
                )
        expected = flex2_in_channels(self.vae.config.latent_channels)
        if self.transformer.config.in_channels != expected:
            raise ValueError(
                f"The transformer has in_channels={self.transformer.config.in_channels}; Flex.2 needs {expected}."
            )

    def encode_image(self, image, width, height, batch_size, device, generator) -> torch.Tensor:
        """VAE latents of ``image`` resized to ``width x height``: a sample of the posterior, shifted and scaled."""
        pixels = self.prepare_image(image=image, width=width, height=height, batch_size=batch_size,
                                    num_images_per_prompt=1, device=device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def prepare_conditions(self, control_image, control_strength, inpaint_image, inpaint_mask, width, height,
                           batch_size, dtype, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed conditioning tokens, with the control latent and with it zeroed (after ``control_stop``)."""
        channels = self.vae.config.latent_channels
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        blank = torch.zeros(batch_size, channels, latent_h, latent_w, device=device, dtype=dtype)

        # The control image is encoded first, then the inpaint image: both draw from `generator` before the noise.
        control = blank
        if control_image is not None:
            control = self.encode_image(control_image, width, height, batch_size, device, generator).to(dtype)
            control = control * control_strength

        inpaint, paint_mask = blank, torch.ones(batch_size, 1, latent_h, latent_w, device=device, dtype=dtype)
        if inpaint_image is not None:
            if inpaint_mask is None:
                # ai-toolkit's RGBA convention: alpha 255 keeps a pixel, alpha 0 marks it for painting.
                paint_mask = 1.0 - mask_to_tensor(inpaint_image.getchannel("A"))
            else:
                paint_mask = mask_to_tensor(inpaint_mask)
            paint_mask = F.interpolate(paint_mask.to(device), size=(latent_h, latent_w), mode="bilinear",
                                       align_corners=False).to(dtype).expand(batch_size, -1, -1, -1)
            encoded = self.encode_image(inpaint_image.convert("RGB"), width, height, batch_size, device, generator)
            inpaint = encoded.to(dtype) * (1.0 - paint_mask)

        def pack(control_block):
            block = torch.cat([inpaint, paint_mask, control_block], dim=1)
            return self._pack_latents(block, batch_size, block.shape[1], latent_h, latent_w)

        return pack(control), pack(blank)

    # ---------------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        control_image=None,
        control_strength: float = 1.0,
        control_stop: float = 1.0,
        inpaint_image: Image.Image | None = None,
        inpaint_mask=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = T5_MAX_LENGTH,
    ):
        r"""Generate images.

        Args:
            prompt (str or list[str], *optional*): the prompt(s); or pass ``prompt_embeds``.
            prompt_2 (str or list[str], *optional*): prompt for T5; defaults to ``prompt``.
            control_image (PipelineImageInput, *optional*): a line/depth/pose image; resized to ``width x height``.
            control_strength (float, defaults to 1.0): multiplies the control latent (0 = no control signal).
            control_stop (float, defaults to 1.0): the control latent is used for the first
                ``int(steps * control_stop)`` steps, then replaced by zeros.
            inpaint_image (PIL.Image.Image, *optional*): image to inpaint; RGBA (transparent = paint) or RGB with
                ``inpaint_mask``.
            inpaint_mask (PIL image, array or tensor, *optional*): H x W, white/1 = paint, black/0 = keep.
            height, width (int, defaults to 1024): output size, multiples of 16.
            num_inference_steps (int, defaults to 25): denoising steps.
            sigmas (list[float], *optional*): defaults to ``linspace(1, 1/N, N)`` as ai-toolkit samples.
            guidance_scale (float, defaults to 4.0): the distilled guidance embedding's value.
            num_images_per_prompt (int, defaults to 1): images per prompt.
            generator (torch.Generator, *optional*): draws the control/inpaint VAE samples, then the noise.
            latents (torch.Tensor, *optional*): packed initial noise.
            prompt_embeds, pooled_prompt_embeds (torch.Tensor, *optional*): precomputed text embeddings.
            output_type (str, defaults to "pil"): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (bool, defaults to True): return a ``FluxPipelineOutput`` instead of a tuple.
            joint_attention_kwargs (dict, *optional*): passed to the attention processors.
            callback_on_step_end (Callable, *optional*): ``callback(pipe, step, timestep, callback_kwargs)``.
            callback_on_step_end_tensor_inputs (list[str], defaults to ["latents"]): tensors given to the callback.
            max_sequence_length (int, defaults to 512): T5 sequence length.

        Returns:
            FluxPipelineOutput or tuple: the images.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(prompt, prompt_2, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        self.check_flex2_inputs(control_strength, control_stop, inpaint_image, inpaint_mask)
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters
        if isinstance(prompt, str):
            batch_size = 1
        elif isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        total = batch_size * num_images_per_prompt
        device = self._execution_device

        # 3. Encode the prompt
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )

        # 4. Encode the control and inpaint inputs (before the noise, as ai-toolkit does)
        with_control, without_control = self.prepare_conditions(
            control_image, control_strength, inpaint_image, inpaint_mask, width, height, total,
            prompt_embeds.dtype, device, generator,
        )

        # 5. Prepare latent variables
        latents, latent_image_ids = self.prepare_latents(total, self.vae.config.latent_channels, height, width,
                                                         prompt_embeds.dtype, device, generator, latents)

        # 6. Prepare timesteps
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        mu = calculate_shift(
            latents.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            sigmas=sigmas, mu=mu)
        self._num_timesteps = len(timesteps)
        control_steps = int(len(timesteps) * control_stop)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([total], guidance_scale, device=device, dtype=torch.float32)

        # 7. Denoising loop
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                conditions = with_control if i < control_steps else without_control
                noise_pred = self.transformer(
                    hidden_states=torch.cat([latents, conditions], dim=2),
                    timestep=t.expand(total).to(latents.dtype) / 1000,
                    guidance=guidance,
                    pooled_projections=pooled_prompt_embeds,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=latent_image_ids,
                    joint_attention_kwargs=self.joint_attention_kwargs,
                    return_dict=False,
                )[0]
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()

        # 8. Decode
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)


# ---------------------------------------------------------------------------------------------------- family
def load_inpaint_image(value) -> Image.Image:
    """A path, PIL image or ``H x W x 3|4`` array (uint8, or float 0..1) as PIL, keeping an alpha channel."""
    if isinstance(value, (str, os.PathLike)):
        with Image.open(value) as im:
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            return im.convert("RGBA" if has_alpha else "RGB")
    if isinstance(value, Image.Image):
        return value.convert("RGBA") if value.mode in ("RGBA", "LA", "PA") else value.convert("RGB")
    array = value.detach().cpu().float().numpy() if torch.is_tensor(value) else np.asarray(value)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"`inpaint_image` must be H x W x 3 (or 4 with alpha), got shape {tuple(array.shape)}.")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, "RGBA" if array.shape[-1] == 4 else "RGB")


class Flex2FamilyPipeline(AITKPipeline):
    """``flex2``: Flex.2-preview with its optional control image and inpainting inputs.

    ``control_images=[image]`` fills the control block (ai-toolkit's ``--ctrl_idx 1``). Extra ``generate`` options:
    ``inpaint_image`` (RGBA, transparent = paint, like ai-toolkit's ``.inpaint.`` images; or RGB with
    ``inpaint_mask``), ``inpaint_mask`` (white = paint), ``control_strength`` (default 1.0) and ``control_stop``
    (default 1.0). ai-toolkit's sample previews use the defaults.
    """

    latent_layout = LatentLayout(tokens=True, patch=2)

    denoiser = "transformer"
    generation_options = ("control_strength", "control_stop", "inpaint_image", "inpaint_mask")
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec):
        return Flex2Pipeline

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        inpaint_image = params.extra.get("inpaint_image")
        self.pipe.check_flex2_inputs(
            params.extra.get("control_strength", 1.0), params.extra.get("control_stop", 1.0),
            None if inpaint_image is None else load_inpaint_image(inpaint_image), params.extra.get("inpaint_mask"),
        )


    def control_inputs(self, images) -> dict:
        """ai-toolkit routes a ``*.inpaint.*`` file (RGBA, alpha 0 = paint) to Flex.2's inpaint slot (its ctrl_idx 0);
        any other image is the control image."""
        from PIL import Image

        inpaint = [p for p in images if ".inpaint." in os.path.basename(str(p))]
        kwargs = {"control_images": [p for p in images if p not in inpaint]}
        if inpaint:
            with Image.open(inpaint[0]) as image:
                kwargs["inpaint_image"] = image.copy()
        return kwargs

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        kwargs = self.prompt_call(params, negative=False, max_sequence_length=T5_MAX_LENGTH,
                                  control_strength=params.extra.get("control_strength", 1.0),
                                  control_stop=params.extra.get("control_stop", 1.0))
        if params.control_images:
            kwargs["control_image"] = params.control_images[0]
        if params.extra.get("inpaint_image") is not None:
            kwargs["inpaint_image"] = load_inpaint_image(params.extra["inpaint_image"])
            kwargs["inpaint_mask"] = params.extra.get("inpaint_mask")
        return kwargs
