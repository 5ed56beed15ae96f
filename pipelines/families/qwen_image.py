"""Qwen-Image, Qwen-Image-2512 and the Qwen-Image-Edit models, as ai-toolkit samples them.

What ai-toolkit does for Qwen-Image (``extensions_built_in/diffusion_models/qwen_image/qwen_image.py``), and so do we:

* the scheduler is FlowMatch Euler with Qwen-Image's dynamic exponential shift (base 0.5, max 0.9, 256..8192
  tokens) stretched to end at sigma 0.02, restated from the registry;
* ``guidance`` is passed as ``true_cfg_scale`` with the negative prompt (an empty negative is encoded, not
  dropped), so CFG runs whenever guidance > 1, with diffusers' norm rescale of the combined prediction;
* width and height are floored to a multiple of 32 (the reference implementation uses 16).

The Edit models (``qwen_image_edit.py``, ``qwen_image_edit_plus.py`` there) add control images, and ai-toolkit
encodes the prompt and the negative itself, with the images, before it calls the pipeline:

* each control image becomes a 0..1 float tensor, is resized bilinear (Edit: to about 1 MP; Edit-Plus: to about
  384x384 with the aspect ratio inverted, as ai-toolkit computes it) and goes with the text through
  ``pipeline.encode_prompt``. Qwen2-VL's image processor rescales its input by 1/255 once more, so the vision tower
  sees a nearly uniform image of the right size: that is what ai-toolkit trains and samples with, so we keep it;
* Edit: the image given to ``QwenImageEditPipeline`` (for the VAE) is the control image resized bilinear to the
  output size; CFG is the stock one (with the norm rescale);
* Edit-Plus (2509/2511): the 1..3 images go to ``QwenImageEditPlusPipeline`` as they are; CFG is ``u + g(c - u)``
  WITHOUT the norm rescale that diffusers applies (ai-toolkit's ``do_cfg_norm: false``), see
  :func:`true_cfg_without_norm`.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Qwen2VLProcessor

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..component_files import QWEN25_VL_7B, QWEN_IMAGE_VAE
from ..registry import ModelSpec


class QwenImageFamilyPipeline(AITKPipeline):
    """``qwen_image`` and ``qwen_image_2512``."""

    single_file_denoisers = True
    component_files = {"text_encoder": QWEN25_VL_7B, "vae": QWEN_IMAGE_VAE}

    latent_layout = LatentLayout(tokens=True, patch=2)

    denoiser = "transformer"
    batches_distinct_prompts = True

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        # One prompt with num_images_per_prompt: the text is encoded once and repeated, as for a batch of one.
        # Distinct prompts are encoded together, padded to the longest and masked.
        texts = ({"prompt": params.prompts, "negative_prompt": params.negatives, "num_images_per_prompt": 1}
                 if params.distinct_texts else
                 {"prompt": params.prompt, "negative_prompt": params.negative, "num_images_per_prompt": params.batch_size})
        return {
            **texts,
            "width": params.width,
            "height": params.height,
            "true_cfg_scale": params.guidance,
            "output_type": "np",
        }


class QwenVLImageProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor.

    transformers 5 builds a ``Qwen2VLProcessor`` only together with a video processor, and that needs torchvision.
    The edit pipelines never pass videos, so the checkpoint's own ``processor`` folder (tokenizer and image-processor
    config) is loaded into this class, with or without torchvision: text and images are processed exactly as by the
    full processor (the image processor is the checkpoint's, torchvision-backed when torchvision is installed).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


@contextmanager
def true_cfg_without_norm(transformer, negative_embeds, negative_mask, scale: float):
    """Turn every ``transformer`` call into the true-CFG prediction ``u + scale * (c - u)``, without a norm rescale.

    Diffusers' ``QwenImageEditPlusPipeline`` rescales the combined prediction to the norm of the conditional one;
    ai-toolkit (``do_cfg_norm: false``, its default) does not. Inside this context the pipeline is called without a
    negative (one prediction per step) and a forward hook on the transformer adds the unconditional forward with
    ``negative_embeds``/``negative_mask`` and returns the combination, which the pipeline then uses as it is.

    Args:
        transformer (torch.nn.Module): the pipeline's denoiser.
        negative_embeds (torch.Tensor): the encoded negative, one row per image of the batch.
        negative_mask (torch.Tensor, *optional*): its attention mask (None when no token is padding).
        scale (float): the guidance scale ``g``.
    """

    def combine(module, args, kwargs, output):
        uncond_kwargs = {**kwargs, "encoder_hidden_states": negative_embeds, "encoder_hidden_states_mask": negative_mask}
        cond, uncond = output[0], module.forward(*args, **uncond_kwargs)[0]
        return (uncond + scale * (cond - uncond), *output[1:])

    handle = transformer.register_forward_hook(combine, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _unit_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``[1, 3, H, W]`` float32 in 0..1 (torchvision's ``to_tensor``)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


class QwenImageEditFamilyPipeline(QwenImageFamilyPipeline):
    """``qwen_image_edit``: ``QwenImageEditPipeline`` with one required control image."""

    #: pixel area of the control image the text encoder sees (ai-toolkit qwen_image_edit.py get_prompt_embeds)
    condition_area = 1024 * 1024
    # not batched: the prompt is encoded once together with the control image (``encoded_prompts``)
    batches_distinct_prompts = False

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        # The checkpoint's processor folder (tokenizer + image processor) is loaded without its video processor,
        # which these pipelines never use and which cannot be built without torchvision.
        if "processor" not in overrides and not os.path.isfile(source):
            overrides["processor"] = QwenVLImageProcessor.from_pretrained(source, subfolder="processor")
        return super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of a control image for the text encoder: ``condition_area`` at its aspect ratio, /32."""
        ratio = height / width
        new_height = math.sqrt(self.condition_area * ratio)
        return round(new_height / 32) * 32, round(new_height / ratio / 32) * 32

    def condition_images(self, images) -> list[torch.Tensor]:
        """The control images as ai-toolkit encodes them: 0..1 tensors resized bilinear to ``condition_size``, clamped
        to 0..1 (the resize can round a white pixel just above 1.0, which the Qwen2.5-VL processor refuses)."""
        tensors = []
        for image in images:
            tensor = _unit_tensor(image)
            resized = F.interpolate(tensor, size=self.condition_size(*tensor.shape[2:]), mode="bilinear")
            tensors.append(resized.clamp_(0.0, 1.0))
        return tensors

    def encode(self, text: str, images) -> tuple[torch.Tensor, torch.Tensor]:
        """``pipeline.encode_prompt`` of one text with the control images, as ai-toolkit calls it."""
        with torch.inference_mode():
            embeds, mask = self.pipe.encode_prompt(text, image=images, device=self.pipe._execution_device)
        # diffusers returns no mask when nothing is padding; ai-toolkit passes an all-ones one
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask

    def encoded_prompts(self, params: GenerationParams, images) -> dict:
        """Prompt (and, when CFG runs, negative) embeddings; the pipeline repeats them for the batch."""
        embeds, mask = self.encode(params.prompt, images)
        out = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if params.guidance > 1.0:
            negative, negative_mask = self.encode(params.negative, images)
            out.update(negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask)
        return out

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        control = params.control_images[0]
        size = (params.width, params.height)
        return {
            **self.encoded_prompts(params, self.condition_images([control])[0]),
            "image": control if control.size == size else control.resize(size, Image.BILINEAR),
            "num_images_per_prompt": params.batch_size,
            "width": params.width,
            "height": params.height,
            "true_cfg_scale": params.guidance,
            "output_type": "np",
        }


class QwenImageEditPlusFamilyPipeline(QwenImageEditFamilyPipeline):
    """``qwen_image_edit_plus`` (2509) and ``qwen_image_edit_plus_2511``: ``QwenImageEditPlusPipeline``, 1..3
    control images, true CFG without the norm rescale."""

    #: diffusers' CONDITION_IMAGE_SIZE, which ai-toolkit (qwen_image_edit_plus.py get_prompt_embeds) uses
    condition_area = 384 * 384

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        # ai-toolkit computes the width from the height/width ratio here, so the encoded image has the control
        # image's aspect ratio inverted (square images are unaffected); LoRAs were trained on the same.
        ratio = height / width
        new_width = math.sqrt(self.condition_area * ratio)
        return round(new_width / ratio / 32) * 32, round(new_width / 32) * 32

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return {
            **self.encoded_prompts(params, self.condition_images(params.control_images)),
            "image": list(params.control_images),
            "num_images_per_prompt": params.batch_size,
            "width": params.width,
            "height": params.height,
            "true_cfg_scale": params.guidance,
            "output_type": "np",
        }

    def call_pipeline(self, call: dict):
        if "negative_prompt_embeds" not in call:
            return self.pipe(**call)
        batch = call["num_images_per_prompt"]
        negative = call.pop("negative_prompt_embeds").repeat(batch, 1, 1)
        mask = call.pop("negative_prompt_embeds_mask")
        mask = None if mask.all() else mask.repeat(batch, 1)  # as the pipeline's encode_prompt treats masks
        scale, call["true_cfg_scale"] = call["true_cfg_scale"], 1.0  # the pipeline itself runs no CFG
        with true_cfg_without_norm(self.pipe.transformer, negative, mask, scale):
            return self.pipe(**call)
