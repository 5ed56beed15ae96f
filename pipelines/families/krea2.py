"""Krea 2 (Raw, Turbo and the o_edit reference-image variants), sampled as ai-toolkit samples it.

ai-toolkit runs Krea 2 with its own model class and sampler (``extensions_built_in/diffusion_models/krea2``: its own
``SingleStreamDiT``, prompt encoder and Euler loop). We run diffusers' ``Krea2Transformer2DModel`` (the same network
under diffusers' module names, the published checkpoints' weights) inside :class:`Krea2AITKPipeline`, a subclass of
diffusers' ``Krea2Pipeline`` that keeps its components and VAE decode and replaces prompt encoding and sampling with
what ai-toolkit's previews do:

* **Schedule.** ``t = linspace(1, 0, N + 1)`` time-shifted by ``exp(mu) / (exp(mu) + 1/t - 1)``, with ``mu`` linear in
  the image token count (256 tokens -> 0.5, 6400 -> 1.15) for Raw AND Turbo: ai-toolkit's ``krea2:turbo`` preset sets
  no ``schedule_mu``, so its previews shift Turbo like Raw. A job that sets ``model_kwargs.schedule_mu`` pins ``mu``
  (our ``schedule_mu`` option). diffusers' distilled setting instead fixes ``mu = 1.15`` for Turbo (flow times up to
  0.06 apart at 1024x1024, 9 steps).
* **Guidance.** ai-toolkit passes ``max(0, g - 1)`` to its sampler, which combines ``c + g' (c - u)`` and skips the
  unconditional pass when ``g' = 0``: real CFG ``u + g (c - u)`` with the encoded negative prompt above guidance 1.
  (diffusers' ``guidance_scale`` already means ``g'``; passing ``g`` would run CFG at ``g + 1``.)
* **Prompts.** Each prompt is encoded alone at its natural length: the system prefix + prompt, truncated to 512 prompt
  tokens, then the assistant suffix tokenized separately and appended; the selected Qwen3-VL hidden states are stacked
  and the 34 prefix tokens dropped. A batch is right-padded to its longest prompt and masked. diffusers pads every
  prompt to a fixed 512 with the suffix inside that budget (507 prompt tokens).
* **Latents.** The initial noise is a float32 draw of ``(1, 16, H/8, W/8)`` per image from its seeded generator and the
  latents stay float32 through the Euler updates, whatever the model dtype; the transformer gets them in its dtype.
* **Edit (o_edit).** Up to 3 reference images feed the model twice. (1) The Qwen3-VL prompt: each image is downscaled
  (never up) to at most 384x384 pixels of area, bicubic with antialias, and placed before the prompt as ``Picture i:
  <|vision_start|><|image_pad|><|vision_end|>``; these prompts are not truncated. (2) Reference latents: each image
  is resized to at most 1 MP (``match_target_res``: to the target area, up or down) keeping its aspect ratio, rounded
  to multiples of 16, resized bilinear without antialias, VAE-encoded (a sample of the latent distribution, drawn
  with a generator seeded with the image's seed on the model's device: ai-toolkit's previews seed the device's
  global RNG with the sample seed just before) and normalized. Their tokens follow the image tokens at rotary index
  ``(i + 1, y, x)``, are modulated at ``t = 0`` and never predicted. The unconditional pass sees the same references
  (and encodes the negative prompt with the same VLM images). With ``kv_cache`` the reference tokens attend only to
  each other (what a LoRA trained with ai-toolkit's ``kv_cache`` expects), so their keys and values never change:
  as ai-toolkit does, the first transformer call computes them and every later call (both CFG passes) leaves the
  reference tokens out and attends to the cached ones (:class:`ReferenceKV`).

LoRAs: ai-toolkit saves ``diffusion_model.`` + original Krea module names (``blocks.N.attn.wq``, ``txtfusion...``) as
LoRA or LoKr; ``lora.convert.krea2_original_to_diffusers`` renames them. See ``docs/models/krea2.md``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import Krea2Pipeline
from diffusers.pipelines.krea2.pipeline_output import Krea2PipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import Qwen3VLProcessor

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..registry import Krea2Options
from ..runtime.rope import flux_rotation, rotary

#: prompt tokens ai-toolkit keeps (model_kwargs.max_text_length), not counting the assistant suffix
MAX_PROMPT_TOKENS = 512
#: ai-toolkit's mu endpoints: (image tokens, mu) at 256x256 and 1280x1280 pixels (16 pixels per token side)
MU_ENDPOINTS = ((256, 0.5), (6400, 1.15))
#: reference-latent pixel budget (model_kwargs.control_image_max_pixels) and the VLM copy's (vlm_max_pixels)
REFERENCE_MAX_PIXELS = 1024 * 1024
VLM_MAX_PIXELS = 384 * 384
VLM_MIN_SIDE = 28
#: what ai-toolkit's Krea2Model reads when a job's model_kwargs leaves these out: false (the o_edit UI presets, our
#: edit ids' defaults, write true for both into the job; a job without them ran with false)
AITK_EDIT_KWARG_DEFAULTS = {"kv_cache": False, "match_target_res": False}


def krea2_mu(image_seq_len: int) -> float:
    """ai-toolkit's time-shift ``mu``: linear in the image token count through :data:`MU_ENDPOINTS`."""
    (x1, y1), (x2, y2) = MU_ENDPOINTS
    slope = (y2 - y1) / (x2 - x1)
    return slope * image_seq_len + (y1 - slope * x1)


def krea2_schedule(num_steps: int, image_seq_len: int, mu: float | None = None) -> list[float]:
    """The ``num_steps + 1`` flow times ai-toolkit's Krea 2 sampler steps through, from 1 to 0 (float32 arithmetic,
    as its sampler computes them). ``mu`` pins the shift; None derives it from ``image_seq_len``."""
    mu = krea2_mu(image_seq_len) if mu is None else mu
    grid = torch.linspace(1, 0, num_steps + 1)
    return (math.exp(mu) / (math.exp(mu) + (1.0 / grid - 1.0))).tolist()


def reference_size(height: int, width: int, budget: int, match_area: bool, multiple: int) -> tuple[int, int]:
    """The (height, width) ai-toolkit encodes a reference image at: scaled to ``budget`` pixels of area when it is
    larger (or always, with ``match_area``), aspect kept, rounded to ``multiple`` (at least one)."""
    new_h, new_w = float(height), float(width)
    if match_area or height * width > budget:
        ratio = height / width
        new_h = math.sqrt(budget * ratio)
        new_w = new_h / ratio
    return max(multiple, int(round(new_h / multiple)) * multiple), max(multiple, int(round(new_w / multiple)) * multiple)


def reference_pixels(image: torch.Tensor, budget: int, match_area: bool, multiple: int, device, dtype) -> torch.Tensor:
    """A ``(3, H, W)`` 0..1 reference image as ``(1, 3, h, w)`` on ``device`` in ``dtype`` at its
    :func:`reference_size`, resized bilinearly without antialias (ai-toolkit's reference latents' input)."""
    size = reference_size(image.shape[1], image.shape[2], budget, match_area, multiple)
    pixels = image[None].to(device, dtype)
    return pixels if size == tuple(image.shape[1:]) else F.interpolate(pixels, size=size, mode="bilinear")


def vlm_size(height: int, width: int, budget: int = VLM_MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) of a reference image's Qwen3-VL copy: downscaled to ``budget`` pixels of area, never up."""
    scale = min(1.0, math.sqrt(budget / (height * width)))
    return max(round(height * scale), VLM_MIN_SIDE), max(round(width * scale), VLM_MIN_SIDE)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a float32 ``(3, H, W)`` tensor in 0..1 (torchvision's ``to_tensor`` arithmetic)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def vlm_image(image: torch.Tensor, budget: int = VLM_MAX_PIXELS) -> torch.Tensor:
    """A ``(3, H, W)`` 0..1 reference image resized for the Qwen3-VL prompt (bicubic, antialias, clamped)."""
    size = vlm_size(image.shape[1], image.shape[2], budget)
    if size == tuple(image.shape[1:]):
        return image.float()
    resized = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True)
    return resized[0].clamp(0, 1)


class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without its video processor, which needs torchvision; the edit ids pass no videos. Text
    and images are processed as by the full processor (the checkpoint's image processor and tokenizer)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Krea2AITKPipeline(Krea2Pipeline):
    """diffusers' ``Krea2Pipeline`` with ai-toolkit's prompt encoding, Euler loop and reference images.

    Same components as the stock pipeline, plus an optional ``processor`` (the Qwen3-VL processor) that the edit
    variants need to put reference images into the prompt.
    """

    _optional_components = ["processor"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, text_encoder_select_layers=None,
                 is_distilled: bool = False, patch_size: int = 2, processor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer, text_encoder_select_layers=text_encoder_select_layers,
                         is_distilled=is_distilled, patch_size=patch_size)
        self.register_modules(processor=processor)

    # ------------------------------------------------------------------------------------------------ prompts
    def encode_one(self, prompt: str, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``(L, num_text_layers, dim)`` features of one prompt at its natural length, prefix dropped."""
        device = self._execution_device
        prefix, start = self.prompt_template_encode_prefix, self.prompt_template_encode_start_idx
        suffix = self.tokenizer([self.prompt_template_encode_suffix], return_tensors="pt").to(device)
        extra = {}
        if images:
            if self.processor is None:
                raise ValueError("Reference images need the Qwen3-VL processor (`processor`), which this pipeline "
                                 "was loaded without.")
            placeholders = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>"
                                   for i in range(len(images)))
            inputs = self.processor(text=[prefix + placeholders + prompt], images=list(images), return_tensors="pt",
                                    do_rescale=False).to(device)
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            if "pixel_values" in extra:
                extra["pixel_values"] = extra["pixel_values"].to(self.text_encoder.dtype)
            if "mm_token_type_ids" in extra:
                types = extra["mm_token_type_ids"]
                extra["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(suffix.input_ids, dtype=types.dtype)], 1)
        else:
            inputs = self.tokenizer([prefix + prompt], truncation=True, max_length=MAX_PROMPT_TOKENS + start,
                                    return_tensors="pt").to(device)
        input_ids = torch.cat([inputs["input_ids"], suffix.input_ids], dim=1)
        mask = torch.cat([inputs["attention_mask"], suffix.attention_mask], dim=1).bool()
        states = self.text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra)
        stacked = torch.stack([states.hidden_states[i] for i in self.text_encoder_select_layers], dim=2)
        return stacked[0, start:]

    def encode_batch(self, prompts: list[str], images=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt encoded alone, right-padded to the longest: ``(features, mask)``."""
        features = [self.encode_one(p, images) for p in prompts]
        length = max(f.shape[0] for f in features)
        dtype = self.transformer.dtype
        batch = torch.zeros(len(features), length, *features[0].shape[1:], device=features[0].device, dtype=dtype)
        mask = torch.zeros(len(features), length, dtype=torch.bool, device=features[0].device)
        for i, f in enumerate(features):
            batch[i, : f.shape[0]] = f.to(dtype)
            mask[i, : f.shape[0]] = True
        return batch, mask

    # ------------------------------------------------------------------------------------------------ references
    def encode_references(self, images: list[torch.Tensor], target_pixels: int, match_target_res: bool,
                          generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Each ``(3, H, W)`` 0..1 image as a normalized ``(16, h, w)`` VAE latent (ai-toolkit's reference latents),
        the latent distribution sampled with ``generator``."""
        multiple = self.vae_scale_factor * self.patch_size
        budget = target_pixels if match_target_res else REFERENCE_MAX_PIXELS
        latents = []
        for image in images:
            pixels = reference_pixels(image, budget, match_target_res, multiple, self._execution_device, self.vae.dtype)
            latent = self.vae.encode((pixels * 2 - 1)[:, :, None]).latent_dist.sample(generator)
            mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latent)
            std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latent)
            latents.append(((latent - mean) / std)[0, :, 0])
        return latents

    def reference_tokens(self, latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed reference tokens ``(1, Lr, 64)`` and their rotary ids ``(Lr, 3)``: reference i at index i + 1."""
        tokens, ids = [], []
        for index, latent in enumerate(latents):
            channels, height, width = latent.shape
            tokens.append(self._pack_latents(latent[None], 1, channels, height, width))
            grid = self.prepare_position_ids(0, height // self.patch_size, width // self.patch_size, latent.device)
            grid[:, 0] = index + 1
            ids.append(grid)
        return torch.cat(tokens, dim=1), torch.cat(ids)

    # ------------------------------------------------------------------------------------------------ denoiser
    def velocity(self, latents, t, text, text_mask, position_ids, references=None, isolate_references=False,
                 cache: ReferenceKV | None = None):
        """The transformer's velocity for the packed noisy ``latents``; ``references`` are appended clean tokens (see
        :func:`reference_forward` for ``isolate_references`` and ``cache``)."""
        transformer = self.transformer
        dtype = transformer.dtype
        timestep = t.to(dtype)
        if text_mask.all():  # nothing to mask (one prompt, or prompts of one length): lets SDPA use its fastest kernels
            text_mask = None
        if references is None:
            return transformer(hidden_states=latents.to(dtype), encoder_hidden_states=text, timestep=timestep,
                               position_ids=position_ids, encoder_attention_mask=text_mask, return_dict=False)[0]
        return reference_forward(transformer, latents.to(dtype), references.to(dtype), text, timestep, position_ids,
                                 text_mask, isolate_references, cache)

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
        control_images: list[Image.Image] | None = None,
        reference_seeds: list[int] | None = None,
        schedule_mu: float | None = None,
        kv_cache: bool = False,
        match_target_res: bool = False,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Sample one image per prompt as ai-toolkit's previews do.

        Args:
            prompt, negative_prompt (list[str]): one per image; the negative is encoded when ``guidance_scale > 0``.
            width, height (int): multiples of 16.
            num_inference_steps (int): Euler steps.
            guidance_scale (float): ai-toolkit's zero-based scale ``g'``: ``c + g' (c - u)``, off at 0.
            generator: one per image; draws the float32 initial noise.
            control_images (list[PIL.Image], *optional*): up to 3 reference images (edit variants).
            reference_seeds (list[int], *optional*): per image, the seed of the generator (on the execution device)
                that samples its reference latents; ai-toolkit's previews draw them from the device's global RNG
                right after seeding it with the sample seed.
            schedule_mu (float, *optional*): pins the time shift; None derives it from the image size.
            kv_cache (bool): reference tokens attend only to each other; their keys and values are computed once.
            match_target_res (bool): reference latents take the target's area instead of the 1 MP cap.
        """
        device = self._execution_device
        batch_size = len(prompt)
        cfg = guidance_scale > 0
        tensors = [to_unit_tensor(image) for image in control_images or ()]
        vlm_images = [vlm_image(image) for image in tensors] or None

        text, text_mask = self.encode_batch(prompt, vlm_images)
        if cfg:
            negative, negative_mask = self.encode_batch(negative_prompt, vlm_images)

        multiple = self.vae_scale_factor * self.patch_size
        grid_h, grid_w = height // multiple, width // multiple
        channels = self.transformer.config.in_channels // self.patch_size**2
        noise = randn_tensor((batch_size, channels, 2 * grid_h, 2 * grid_w), generator=generator, device=device,
                             dtype=torch.float32)
        latents = self._pack_latents(noise, batch_size, channels, 2 * grid_h, 2 * grid_w)
        image_ids = self.prepare_position_ids(0, grid_h, grid_w, device)

        references = None
        if tensors:
            seeds = reference_seeds or [0] * batch_size
            per_image = []
            for seed in seeds:
                reference_generator = torch.Generator(device).manual_seed(seed)
                reference_latents = self.encode_references(tensors, height * width, match_target_res,
                                                           reference_generator)
                tokens, reference_ids = self.reference_tokens(reference_latents)
                per_image.append(tokens)
            references = torch.cat(per_image)
            image_ids = torch.cat([image_ids, reference_ids])

        def positions(text_len: int) -> torch.Tensor:
            return torch.cat([torch.zeros(text_len, 3, device=device), image_ids])

        cache = ReferenceKV() if kv_cache and references is not None else None
        schedule = krea2_schedule(num_inference_steps, grid_h * grid_w, schedule_mu)
        self._num_timesteps = num_inference_steps
        for i, (t_now, t_next) in enumerate(zip(schedule[:-1], schedule[1:])):
            t = torch.full((batch_size,), t_now, device=device)
            v = self.velocity(latents, t, text, text_mask, positions(text.shape[1]), references, kv_cache, cache)
            if cfg:
                v_uncond = self.velocity(latents, t, negative, negative_mask, positions(negative.shape[1]),
                                         references, kv_cache, cache)
                v = v + guidance_scale * (v - v_uncond)
            latents = latents + (t_next - t_now) * v.to(torch.float32)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t_now, {"latents": latents})

        if output_type == "latent":
            images = latents
        else:
            latents = self._unpack_latents(latents, height, width).to(self.vae.dtype)
            mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
            std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
            decoded = self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
            images = self.image_processor.postprocess(decoded.clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        return Krea2PipelineOutput(images=images) if return_dict else (images,)


class ReferenceKV:
    """The reference tokens' keys and values per block (after their norm and rotary embedding), kept through one
    sampling with ``kv_cache``: isolated references see only each other, at ``t = 0``, so these never change. The first
    forward fills it; later ones (every step, both CFG passes) leave the reference tokens out and attend to it."""

    def __init__(self):
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def reference_forward(transformer, latents, references, text, timestep, position_ids, text_mask, isolate_references,
                      cache: ReferenceKV | None = None):
    """``Krea2Transformer2DModel``'s forward with clean reference tokens after the noisy image tokens: the references
    are modulated at ``t = 0`` and left out of the output; with ``isolate_references`` they attend only to each other,
    and ``cache`` (isolated only) keeps their keys and values across calls. ``text_mask`` (``(B, L)``, True for real
    tokens) may be None when every text token is real. ``position_ids`` cover text, image and reference tokens."""
    if cache is not None and not isolate_references:
        raise ValueError("Cached reference keys and values hold only when the references attend to each other alone "
                         "(isolate_references).")
    reuse = cache is not None and cache.blocks is not None
    batch_size, image_len, _ = latents.shape
    text_len, reference_len = text.shape[1], references.shape[1]
    split = text_len + image_len
    dtype = latents.dtype

    def modulation(t):
        temb = transformer.time_embed(t, dtype=dtype)
        return temb, transformer.time_mod_proj(F.gelu(temb, approximate="tanh"))

    temb, mod = modulation(timestep)
    _, mod_reference = modulation(torch.zeros_like(timestep))

    key_mask, text_key_mask = None, None
    if text_mask is not None:
        visual_mask = text_mask.new_ones((batch_size, image_len + reference_len))
        key_mask = torch.cat([text_mask, visual_mask], dim=1)[:, None, None, :]
        text_key_mask = text_mask[:, None, None, :]
    if isolate_references and not reuse:
        is_reference = torch.zeros(split + reference_len, dtype=torch.bool, device=latents.device)
        is_reference[split:] = True
        isolation = ~is_reference[:, None] | is_reference[None, :]
        key_mask = isolation if key_mask is None else key_mask & isolation
    fused = transformer.text_fusion(text, attention_mask=text_key_mask)
    visual = latents if reuse else torch.cat([latents, references], dim=1)
    hidden = torch.cat([transformer.txt_in(fused), transformer.img_in(visual)], dim=1)
    frequencies = transformer.rotary_emb(position_ids[:split] if reuse else position_ids)
    captured = [] if cache is not None and not reuse else None

    for index, block in enumerate(transformer.transformer_blocks):
        # the six (prescale, preshift, pregate, postscale, postshift, postgate) rows, live and at t = 0
        live = (mod.unflatten(-1, (6, -1)) + block.scale_shift_table).unbind(-2)
        clean = (mod_reference.unflatten(-1, (6, -1)) + block.scale_shift_table).unbind(-2)
        attn_input = _modulate(block.norm1(hidden), split, live, clean, 0, 1)
        if cache is None:
            attn = block.attn(attn_input, attention_mask=key_mask, image_rotary_emb=frequencies)
        else:
            attn = _attention_with_references(block.attn, attn_input, frequencies, key_mask, split, captured,
                                              cache.blocks[index] if reuse else None)
        hidden = hidden + _gate(attn, split, live, clean, 2)
        ff = block.ff(_modulate(block.norm2(hidden), split, live, clean, 3, 4))
        hidden = hidden + _gate(ff, split, live, clean, 5)

    if captured is not None:
        cache.blocks = captured
    return transformer.final_layer(hidden[:, text_len:split], temb)


def _attention_with_references(attn, hidden, frequencies, mask, split, captured, cached):
    """``Krea2Attention`` (grouped-query, q/k norm, rotary, sigmoid gate) in plain SDPA that also records the keys and
    values of the tokens from ``split`` on into ``captured``, or attends to ``cached`` ones as extra keys."""
    query = attn.to_q(hidden).unflatten(-1, (attn.num_heads, attn.head_dim))
    key = attn.to_k(hidden).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    value = attn.to_v(hidden).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    gate = attn.to_gate(hidden)
    query = rotary(flux_rotation, attn.norm_q(query), *frequencies)
    key = rotary(flux_rotation, attn.norm_k(key), *frequencies)
    if captured is not None:
        captured.append((key[:, split:], value[:, split:]))
    if cached is not None:
        key, value = torch.cat([key, cached[0]], dim=1), torch.cat([value, cached[1]], dim=1)
    groups = attn.num_heads // attn.num_kv_heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask)
    return attn.to_out[0](out.transpose(1, 2).flatten(2) * torch.sigmoid(gate))


def _modulate(x, split, live, clean, scale, shift):
    """``(1 + scale) * x + shift``, with the ``live`` rows before token ``split`` and the ``clean`` rows after."""
    return torch.cat([(1 + live[scale]) * x[:, :split] + live[shift],
                      (1 + clean[scale]) * x[:, split:] + clean[shift]], dim=1)


def _gate(x, split, live, clean, index):
    return torch.cat([live[index] * x[:, :split], clean[index] * x[:, split:]], dim=1)


class Krea2FamilyPipeline(AITKPipeline):
    """``krea2``, ``krea2_turbo``, ``krea2_o_edit`` and ``krea2_o_edit_turbo``."""

    latent_layout = LatentLayout(tokens=True, patch=2)

    denoiser = "transformer"
    options_type = Krea2Options
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec):
        return Krea2AITKPipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        """The base loading; the edit ids add the Qwen3-VL processor (images and text only, see
        :class:`Qwen3VLImageProcessor`): the checkpoint's own ``processor`` folder, else ``spec.options.vision_processor``
        (Krea 2's repos ship the text encoder without a processor)."""
        import os

        if spec.options.edit and "processor" not in overrides:
            folder = os.path.join(source, "processor")
            overrides["processor"] = Qwen3VLImageProcessor.from_pretrained(
                folder if os.path.isdir(folder) else spec.options.vision_processor)
        return super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)

    def lora_name_mapper(self):
        from ..lora.convert import krea2_original_to_diffusers

        return krea2_original_to_diffusers

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        for name in ("kv_cache", "match_target_res"):
            if name in params.extra and not isinstance(params.extra[name], bool):
                raise ValueError(f"`{name}` must be true or false, got {params.extra[name]!r}.")
        mu = params.extra.get("schedule_mu")
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not -10 <= mu <= 10):
            raise ValueError(f"`schedule_mu` must be a number in -10..10 (ai-toolkit's model_kwargs.schedule_mu), got "
                             f"{mu!r}; leave it unset to derive it from the image size.")

    def job_options(self, model_config: dict) -> dict:
        """The job's ``model_kwargs`` among this id's options (``schedule_mu``; ``kv_cache``, ``match_target_res``)."""
        model_kwargs = model_config.get("model_kwargs") or {}
        if model_kwargs.get("edit") and not self.spec.options.edit:
            raise ValueError(f"This job trains Krea 2 with reference images (model_kwargs.edit), which {self.spec.model_id} "
                             "does not take: pass --model krea2_o_edit (or krea2_o_edit_turbo for a Turbo base).")
        options = {name: model_kwargs[name] for name in self.spec.options.generation_options if name in model_kwargs}
        return {**AITK_EDIT_KWARG_DEFAULTS, **options} if self.spec.options.edit else options

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        options = {**self.spec.options.defaults(), **params.extra}
        kwargs = self.prompt_call(params, guidance_scale=max(0.0, params.guidance - 1.0),
                                  schedule_mu=options.get("schedule_mu"))
        if self.spec.options.edit:
            kwargs.update(control_images=list(params.control_images), reference_seeds=params.seeds,
                          kv_cache=options["kv_cache"],
                          match_target_res=options["match_target_res"])
        return kwargs
