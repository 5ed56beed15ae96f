"""Mage-Flow (``mageflow``, ``mageflow_edit``), sampled as ai-toolkit samples it.

diffusers has no Mage-Flow classes; ai-toolkit runs its own copy of Microsoft's model code
(``extensions_built_in/diffusion_models/mageflow``: the ``MageFlow`` transformer, ``MageVAE``, its Qwen3-VL prompt
encoder and a small Euler sampler). We run our own transformer and codec (``mageflow_transformer.py``,
``mageflow_vae.py``, the published checkpoints' parameter names) in :class:`MageFlowPipeline`, which does what
ai-toolkit's previews do:

* **Schedule.** Euler on ``sigmas = linspace(1, 1/N, N)`` shifted by ``6 s / (1 + 5 s)`` (static shift 6.0, the
  checkpoints' scheduler config; ``model_kwargs.static_shift`` changes it) plus a final 0, computed in float64 and
  kept as float32. The transformer gets the sigma itself as its time (1 = noise) and predicts ``noise - clean``.
* **Guidance.** Above guidance 1: ``u + g (c - u)`` with the encoded negative prompt (an empty one is encoded). With
  ``cfg_renormalization`` (ai-toolkit's ``model_kwargs.cfg_renormalization``, off by default) the guided velocity of
  every latent pixel is rescaled to the norm, over channels, of the conditional one.
* **Latents.** The initial noise is a float32 draw of ``(1, 128, H/16, W/16)`` per image from its seeded generator;
  latents stay float32 through the Euler updates; the transformer gets them, the sigma and the text in its dtype.
  Decoded pixels pass through the model's dtype and are clamped, as ai-toolkit's ``decode_latents`` returns them.
* **Prompts.** Qwen3-VL's last hidden state over the prompt in Mage-Flow's system template (the edit id has its own
  template), each prompt alone at its natural length (at most 2048 prompt tokens), with positions ``0..L-1`` on every
  rotary axis; the first 34 (edit: 64) tokens, the system prompt, are dropped.
* **Edit (mageflow_edit).** Up to 3 reference images feed the model twice. (1) The prompt: each image as a float
  tensor in the model's dtype, quantized to 8 bits, scaled down (never up) to a long edge of at most 384 pixels
  (bicubic), and placed before the instruction as ``Image i: <|vision_start|><|image_pad|><|vision_end|>``; the
  negative prompt is encoded with the same images. (2) Reference latents: each image resized to the target's pixel
  area keeping its aspect ratio, sides rounded to multiples of 16 (bicubic with antialias, skipped when the size
  already fits), VAE-encoded with a posterior sample (drawn from a generator seeded with the image's seed on the
  model's device: ai-toolkit's previews seed the device's global RNG with the sample seed just before; or the
  posterior mean with ai-toolkit's ``model_kwargs.vae_sample_posterior: false``, the option of that name) and appended
  clean after the noisy target tokens in both CFG passes, modulated with the same time; each image segment takes its
  index as the rotary frame coordinate. Only the target tokens are integrated.

LoRAs: ai-toolkit saves ``diffusion_model.`` + the transformer's own module names (Qwen-Image's block names), as
LoRA or LoKr. See ``docs/models/mageflow.md``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

from ..base import AITKPipeline, GenerationParams
from ..registry import MageFlowOptions
from .krea2 import Qwen3VLImageProcessor, to_unit_tensor
from .mageflow_transformer import MageFlowTransformer2DModel
from .mageflow_vae import MageVAE

#: Mage-Flow's prompt templates and the number of leading (system prompt) tokens dropped from the encoder output
PROMPT_TEMPLATES = {
    False: (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n",
        34,
    ),
    True: (
        "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
        "image that meets the user's requirements while maintaining consistency with the original input where "
        "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        64,
    ),
}
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
#: prompt tokens kept (ai-toolkit's model_kwargs.max_text_length), not counting the dropped system prompt
MAX_PROMPT_TOKENS = 2048
#: the long edge of a reference image's copy in the prompt (model_kwargs.vl_cond_long_edge)
VLM_LONG_EDGE = 384
#: what the transformer and the VAE are read from (the Mage-Flow repos' layout)
SUBFOLDERS = ("transformer", "vae", "text_encoder")


def mageflow_sigmas(num_steps: int, shift: float) -> list[float]:
    """The ``num_steps + 1`` sigmas ai-toolkit's Mage-Flow sampler steps through: ``linspace(1, 1/N, N)`` statically
    shifted, then 0 (float64 arithmetic, float32 values)."""
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = shift * base / (1 + (shift - 1) * base)
    return torch.cat([shifted, shifted.new_zeros(1)]).float().tolist()


def initial_noise(channels: int, height: int, width: int, generator, device) -> torch.Tensor:
    """ai-toolkit's starting latents for a ``height x width`` image: a float32 ``(1, channels, H/16, W/16)`` draw."""
    return randn_tensor((1, channels, height // 16, width // 16), generator=generator, device=device,
                        dtype=torch.float32)


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float, renormalize: bool) -> torch.Tensor:
    """``u + g (c - u)``; with ``renormalize`` rescaled per latent pixel to the conditional velocity's norm over the
    channels (dim 1)."""
    guided = uncond + scale * (cond - uncond)
    if renormalize:
        guided = guided * (torch.norm(cond, dim=1, keepdim=True) / (torch.norm(guided, dim=1, keepdim=True) + 1e-6))
    return guided


def reference_size(height: int, width: int, target_area: int, multiple: int = 16) -> tuple[int, int]:
    """A reference image's latent-encoding size: the target's pixel area, its own aspect ratio, rounded to
    ``multiple`` (at least one)."""
    ratio = height / width
    new_h = math.sqrt(target_area * ratio)
    new_w = new_h / ratio
    return max(multiple, round(new_h / multiple) * multiple), max(multiple, round(new_w / multiple) * multiple)


def vlm_image(image: torch.Tensor, dtype: torch.dtype, long_edge: int = VLM_LONG_EDGE) -> Image.Image:
    """A ``(3, H, W)`` 0..1 reference image as the prompt sees it: in ``dtype``, truncated to 8 bits, the long edge
    scaled down to ``long_edge`` (bicubic, never up)."""
    array = (image.to(dtype).float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array)
    width, height = picture.size
    if max(width, height) > long_edge:
        scale = long_edge / max(width, height)
        picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    return picture


class MageFlowPipeline(DiffusionPipeline):
    r"""Text (and, for the edit model, reference images) to image with Mage-Flow, as ai-toolkit's previews sample it.

    Args:
        transformer ([`MageFlowTransformer2DModel`]): the NR-MMDiT.
        vae ([`MageVAE`]): the 128-channel codec.
        text_encoder ([`Qwen3VLForConditionalGeneration`]): its language model encodes the prompts (and, for edits,
            its vision tower the reference images).
        tokenizer: the Qwen3-VL tokenizer.
        processor ([`Qwen3VLImageProcessor`], *optional*): tokenizer + image processor; needed for reference images.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["processor"]

    def __init__(self, transformer, vae, text_encoder, tokenizer, processor=None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              processor=processor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, edit: bool = False, **kwargs) -> "MageFlowPipeline":
        """Load a Mage-Flow repo (``transformer/``, ``vae/``, ``text_encoder/`` with its tokenizer and processor) or a
        folder this class saved; the hub id is downloaded. ``edit`` loads the processor too; without it the text
        encoder's vision tower is dropped.

        Args:
            dtype (torch.dtype, *optional*): dtype of the weighted components (``torch_dtype`` is accepted too).
            revision (str, *optional*), device_map (str, *optional*): as diffusers'.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        revision = kwargs.pop("revision", None)
        device_map = kwargs.pop("device_map", None)
        if kwargs:
            raise ValueError(f"MageFlowPipeline.from_pretrained got unsupported option(s) {sorted(kwargs)}.")
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder, revision=revision, allow_patterns=[
                "model_index.json", *(f"{sub}/*" for sub in (*SUBFOLDERS, "tokenizer", "processor"))])
        missing = [sub for sub in SUBFOLDERS if not os.path.isdir(os.path.join(folder, sub))]
        if missing:
            raise FileNotFoundError(f"{folder!r} is not a Mage-Flow folder: it lacks {missing} (expected the "
                                    "microsoft/Mage-Flow-Base layout: transformer/, vae/, text_encoder/).")
        options = {key: value for key, value in (("dtype", dtype), ("device_map", device_map)) if value is not None}

        def own_or_text_encoder(sub):
            return os.path.join(folder, sub) if os.path.isdir(os.path.join(folder, sub)) else os.path.join(folder, "text_encoder")

        text_encoder = Qwen3VLForConditionalGeneration.from_pretrained(os.path.join(folder, "text_encoder"),
                                                                       **options).eval()
        if not edit:  # text only: the vision tower is dead weight, dropped as ai-toolkit does
            text_encoder.model.visual = None
        return cls(
            transformer=MageFlowTransformer2DModel.from_pretrained(folder, subfolder="transformer", **options),
            vae=_load_vae(os.path.join(folder, "vae"), options),
            text_encoder=text_encoder,
            tokenizer=AutoTokenizer.from_pretrained(own_or_text_encoder("tokenizer")),
            processor=Qwen3VLImageProcessor.from_pretrained(own_or_text_encoder("processor")) if edit else None,
        )

    # ------------------------------------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: str, edit: bool, images: list[Image.Image] | None = None) -> torch.Tensor:
        """``(L, D)`` features of one prompt (optionally with reference images), system prompt dropped."""
        device = self._execution_device
        template, drop = PROMPT_TEMPLATES[edit]
        extra = {}
        if images:
            if self.processor is None:
                raise ValueError("Reference images need the Qwen3-VL processor (`processor`), which this pipeline was "
                                 "loaded without.")
            body = "".join(f"Image {i + 1}: {IMAGE_PLACEHOLDER}" for i in range(len(images))) + prompt
            inputs = self.processor(text=[template.format(body)], images=list(images), return_tensors="pt")
            input_ids = inputs["input_ids"].to(device)
            extra = {key: inputs[key].to(device) for key in ("pixel_values", "image_grid_thw") if key in inputs}
        else:
            input_ids = self.tokenizer(template.format(prompt), max_length=MAX_PROMPT_TOKENS + drop, truncation=True,
                                       return_tensors="pt").input_ids.to(device)
        positions = torch.arange(input_ids.shape[1], device=device)[None]
        # the language model's last hidden state, read through the top-level module (offload hooks sit there)
        captured = []
        hook = self.text_encoder.model.register_forward_hook(lambda m, a, out: captured.append(out.last_hidden_state))
        try:
            self.text_encoder(input_ids=input_ids, position_ids=positions, logits_to_keep=1, **extra)
        finally:
            hook.remove()
        return captured[0][0, drop:]

    # ------------------------------------------------------------------------------------------------ references
    def encode_references(self, images: list[torch.Tensor], height: int, width: int,
                          generator: torch.Generator | None, sample: bool = True) -> list[torch.Tensor]:
        """Each ``(3, H, W)`` 0..1 image as a ``(C, h, w)`` latent at the target's area (a posterior sample drawn with
        ``generator``, or with ``sample`` False the posterior mean)."""
        device = self._execution_device
        latents = []
        for image in images:
            size = reference_size(image.shape[1], image.shape[2], height * width)
            pixels = image[None].to(device, torch.float32)
            if size != tuple(image.shape[1:]):
                pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True).clamp(0, 1)
            latent = self.vae.encode((pixels * 2 - 1).to(self.vae.dtype), generator=generator, sample=sample)
            latents.append(latent[0].to(self.transformer.dtype))
        return latents

    # ------------------------------------------------------------------------------------------------ denoiser
    def velocity(self, latents: torch.Tensor, sigma: float, text: torch.Tensor,
                 references: list[torch.Tensor]) -> torch.Tensor:
        """The velocity ``(1, C, h, w)`` of one image's latents: the target tokens, then the clean reference tokens."""
        dtype = self.transformer.dtype
        _, channels, height, width = latents.shape
        segments = [latents[0].to(dtype), *references]
        tokens = torch.cat([s.reshape(channels, -1).T for s in segments])[None]
        shapes = [(1, s.shape[1], s.shape[2]) for s in segments]
        timestep = torch.full((1,), sigma, dtype=dtype, device=latents.device)
        out = self.transformer(tokens, text[None].to(dtype), timestep, shapes)
        return out[0, : height * width].T.reshape(1, channels, height, width)

    # ------------------------------------------------------------------------------------------------ sampling
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
        edit: bool = False,
        control_images: list[Image.Image] | None = None,
        reference_seeds: list[int] | None = None,
        sample_references: bool = True,
        cfg_renormalization: bool = False,
        shift: float = 6.0,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
    ) -> ImagePipelineOutput:
        """Sample one image per prompt.

        Args:
            prompt, negative_prompt (list[str]): one per image; the negative is encoded when ``guidance_scale > 1``.
            width, height (int): multiples of 16.
            num_inference_steps (int): Euler steps.
            guidance_scale (float): CFG ``u + g (c - u)`` above 1.
            generator: one per image (or one for a single image); draws the float32 initial noise.
            edit (bool): the edit model's prompt template (and reference images).
            control_images (list[PIL.Image], *optional*): up to 3 reference images (edit only).
            reference_seeds (list[int], *optional*): per image, the seed of the generator (on the execution device)
                that samples its reference latents.
            sample_references (bool): reference latents are a posterior sample (ai-toolkit's default) or, when
                False, the posterior mean (its ``model_kwargs.vae_sample_posterior: false``).
            cfg_renormalization (bool): rescale the guided velocity to the conditional one's norm.
            shift (float): the static sigma shift.
            output_type (str): ``np`` (float32 ``[B, H, W, 3]`` in 0..1) or ``latent``.
        """
        if width % 16 or height % 16:
            raise ValueError(f"width and height must be multiples of 16, got {width}x{height}.")
        if control_images and not edit:
            raise ValueError("Reference images are for the edit model (edit=True).")
        device = self._execution_device
        batch_size = len(prompt)
        generators = generator if isinstance(generator, list) else [generator] * batch_size
        cfg = guidance_scale > 1.0

        tensors = [to_unit_tensor(image) for image in control_images or ()]
        prompt_images = [vlm_image(t, self.text_encoder.dtype) for t in tensors] or None
        texts = [self.encode_prompt(p, edit, prompt_images) for p in prompt]
        negatives = [self.encode_prompt(n, edit, prompt_images) for n in negative_prompt] if cfg else None

        channels = self.transformer.config.in_channels
        latents = [initial_noise(channels, height, width, g, device) for g in generators]
        references = [[] for _ in range(batch_size)]
        if tensors:
            for i, seed in enumerate(reference_seeds or [0] * batch_size):
                references[i] = self.encode_references(tensors, height, width,
                                                       torch.Generator(device).manual_seed(seed), sample_references)

        sigmas = mageflow_sigmas(num_inference_steps, shift)
        self._num_timesteps = num_inference_steps
        for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            for i in range(batch_size):
                v = self.velocity(latents[i], sigma, texts[i], references[i])
                if cfg:
                    v = guided_velocity(v, self.velocity(latents[i], sigma, negatives[i], references[i]),
                                        guidance_scale, cfg_renormalization)
                latents[i] = latents[i] + (sigma_next - sigma) * v.to(torch.float32)
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, sigma, {})

        latents = torch.cat(latents)
        if output_type == "latent":
            return ImagePipelineOutput(images=latents)
        decoded = self.vae.decode(latents.to(self.vae.dtype)).to(self.transformer.dtype).float().clamp(-1, 1)
        # ai-toolkit saves round((x + 1) * 127.5); left unrounded here, rounded the same way when written as 8 bits
        pixels = (decoded + 1) * 127.5 / 255
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=pixels.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32))


def _load_vae(folder: str, options: dict) -> MageVAE:
    """Our saved MageVAE folder (config.json names it), else the repos' bare checkpoint at the released sizes."""
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            if json.load(f).get("_class_name") == MageVAE.__name__:
                return MageVAE.from_pretrained(folder, **options)
    return MageVAE.from_checkpoint(os.path.join(folder, "diffusion_pytorch_model.safetensors"), options.get("dtype"))


class MageFlowFamilyPipeline(AITKPipeline):
    """``mageflow`` and ``mageflow_edit``."""

    denoiser = "transformer"
    options_type = MageFlowOptions
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec):
        return MageFlowPipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        if os.path.isfile(source):
            raise ValueError(f"{spec.model_id} loads a Mage-Flow folder or hub repo ({spec.base}), not a single file.")
        return MageFlowPipeline.from_pretrained(source, edit=spec.options.edit, dtype=torch_dtype, **overrides)

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        renorm = params.extra.get("cfg_renormalization")
        if renorm is not None and not isinstance(renorm, bool):
            raise ValueError(f"`cfg_renormalization` must be true or false, got {renorm!r}.")
        sample_posterior = params.extra.get("vae_sample_posterior")
        if sample_posterior is not None and not isinstance(sample_posterior, bool):
            raise ValueError(f"`vae_sample_posterior` must be true or false, got {sample_posterior!r}.")
        shift = params.extra.get("static_shift")
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift <= 100):
            raise ValueError(f"`static_shift` must be a number in (0, 100] (ai-toolkit's model_kwargs.static_shift, "
                             f"default {self.spec.options.static_shift}), got {shift!r}.")

    def job_options(self, model_config: dict) -> dict:
        """The job's ``model_kwargs`` among this id's options (``cfg_renormalization``, ``static_shift``, the edit id's
        ``vae_sample_posterior``)."""
        model_kwargs = model_config.get("model_kwargs") or {}
        return {name: model_kwargs[name] for name in self.spec.options.generation_options if name in model_kwargs}

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        options = {**self.spec.options.defaults(), **params.extra}
        kwargs = self.prompt_call(params, edit=self.spec.options.edit, control_images=list(params.control_images),
                                  reference_seeds=params.seeds, cfg_renormalization=options["cfg_renormalization"],
                                  shift=float(options["static_shift"]))
        if self.spec.options.edit:
            kwargs["sample_references"] = options["vae_sample_posterior"]
        return kwargs
