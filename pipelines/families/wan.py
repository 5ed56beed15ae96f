"""Wan 2.1 (T2V 1.3B/14B, I2V 14B), Wan 2.2 A14B (two experts, T2V/I2V) and Wan 2.2 TI2V-5B: diffusers
``WanPipeline`` / ``WanImageToVideoPipeline`` as ai-toolkit samples them (``ai-toolkit.md`` §2.2, §1.6, §7).

What ai-toolkit does here, and so do we (where the reference implementation differs, ai-toolkit wins):

* FlowMatch Euler (``FlowMatchEulerDiscreteScheduler``) with a static shift, 3.0 for Wan 2.1 and 5.0 for Wan 2.2,
  not the checkpoints' (or the reference's) UniPC; ``set_timesteps(steps)`` with no custom sigmas;
* true CFG with the negative prompt; UMT5 prompts up to 512 tokens;
* width/height floored to 16 (TI2V-5B: 32), frames to 4k+1;
* Wan 2.2 A14B: the high-noise expert (``transformer``) runs while ``t >= 875`` and the low-noise expert
  (``transformer_2``) after, for BOTH T2V and I2V (the checkpoint's I2V boundary 0.9 is not what ai-toolkit samples
  with), and ``guidance_scale_2 = guidance_scale``;
* I2V: the control image is resized (LANCZOS) to the target size; TI2V-5B takes an optional control image, which
  becomes first-frame conditioning through diffusers' ``WanImageToVideoPipeline`` with ``expand_timesteps``;
* Wan 2.2 A14B I2V (``WanOptions.sample_first_frame``): ai-toolkit builds the first-frame condition itself
  (``wan_utils.add_first_frame_conditioning``) and takes a DRAW from the VAE posterior, with the global RNG right
  after the initial noise, where diffusers takes the posterior's mode. :class:`WanSampledFirstFramePipeline` does
  the same: on the CPU with the sample's generator after the noise (ai-toolkit's CPU draw exactly), on a GPU with a
  generator of that device seeded with the sample's seed (ai-toolkit's global CUDA generator after
  ``torch.cuda.manual_seed(seed)``).

LoRAs come in original Wan names and are renamed by ``lora.convert.wan_original_to_diffusers``; Wan 2.2 A14B LoRAs are
placed on their expert by ``lora.convert.route_wan_experts`` (side ``high``/``low``, inferred from ``*_high_noise`` /
``*_low_noise`` file names, or a combined file).

Progress: ``progress(step, total)`` after every denoising step, and once more (``step == total``) when the VAE decode
starts. While it runs, ``pipeline.stage`` says what is running: ``"denoise"``, or ``"high_noise"``/``"low_noise"``
for the two-expert models, then ``"decode"``, then ``"done"``.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import torch
from diffusers import WanImageToVideoPipeline
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from ..base import AITKPipeline, GenerationParams, GenerationResult
from ..component_files import UMT5_XXL, WAN21_VAE
from ..lora.convert import route_wan_experts, wan_original_to_diffusers
from ..registry import ModelSpec, WanOptions

UMT5_MAX_LENGTH = 512
NUM_TRAIN_TIMESTEPS = 1000


class WanSampledFirstFramePipeline(WanImageToVideoPipeline):
    """diffusers' image-to-video pipeline whose first-frame condition latent is a draw from the VAE posterior, as
    ai-toolkit's Wan 2.2 A14B I2V previews make it, instead of the posterior's mode. Everything else (the zero frames
    after the image, the normalisation, the mask channels) is diffusers' own."""

    def prepare_latents(self, image, batch_size, num_channels_latents=16, height=480, width=832, num_frames=81,
                        dtype=None, device=None, generator=None, latents=None, last_image=None):
        if last_image is not None or self.config.expand_timesteps:
            raise ValueError("The sampled first frame applies to first-frame conditioning only (no last image, no "
                             "expand_timesteps).")
        generators = generator if isinstance(generator, list) else [generator] * batch_size
        scale_t, scale_s = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        shape = (batch_size, num_channels_latents, (num_frames - 1) // scale_t + 1, height // scale_s, width // scale_s)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype)

        video = torch.cat([image.unsqueeze(2), image.new_zeros(image.shape[0], image.shape[1], num_frames - 1, height,
                                                                width)], dim=2)
        vae_device = get_module_execution_device(self.vae)
        posterior = self.vae.encode(video.to(device=vae_device, dtype=self.vae.dtype)).latent_dist
        condition = torch.cat([posterior.sample(generator=self.posterior_generator(g, vae_device)) for g in generators])
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(device, dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(device, dtype)
        condition = (condition.to(device=device, dtype=dtype) - mean) * inv_std

        # 1 on the image's frames, 0 on the rest; the first latent frame stands for scale_t video frames
        mask = torch.zeros(batch_size, 1, num_frames + scale_t - 1, shape[3], shape[4], device=device, dtype=dtype)
        mask[:, :, :scale_t] = 1
        mask = mask.view(batch_size, -1, scale_t, shape[3], shape[4]).transpose(1, 2)
        return latents, torch.cat([mask, condition], dim=1)

    @staticmethod
    def posterior_generator(generator, device):
        """The generator ai-toolkit's posterior draw uses: the sample's own on the CPU (continuing after the initial
        noise); on another device, that device's generator seeded with the sample's seed."""
        if generator is None or torch.device(device).type == "cpu":
            return generator
        return torch.Generator(device).manual_seed(generator.initial_seed())


class WanFamilyPipeline(AITKPipeline):
    """``wan21_1b``, ``wan21_14b``, ``wan21_i2v_14b``, ``wan21_i2v_14b480p``, ``wan22_14b_t2v``, ``wan22_14b_i2v``,
    ``wan22_5b``."""

    single_file_denoisers = True
    component_files = {"text_encoder": UMT5_XXL, "vae": WAN21_VAE}

    denoiser = "transformer"
    options_type = WanOptions
    batches_distinct_prompts = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = "idle"
        self._image_pipe = None
        self._running = self.pipe
        self._decode_seconds = 0.0
        self._progress = None

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        pipe = super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)
        if spec.experts is not None:
            if any(getattr(pipe, name, None) is None for name in spec.experts.components):
                raise ValueError(
                    f"{spec.model_id} needs both experts (transformer = high noise, transformer_2 = low noise), but "
                    f"{source!r} lacks one. Give a full Wan 2.2 A14B diffusers folder such as {spec.base}."
                )
            pipe.register_to_config(boundary_ratio=spec.experts.boundary_ratio)
        if spec.options is not None and spec.options.expand_timesteps:
            pipe.register_to_config(expand_timesteps=True)
        return pipe

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        if spec.options is not None and spec.options.sample_first_frame:
            return WanSampledFirstFramePipeline
        return super().diffusers_pipeline_class(spec)

    @property
    def is_moe(self) -> bool:
        return self.spec.experts is not None

    # ------------------------------------------------------------------------------------------------ LoRA hooks
    def denoisers(self) -> list:
        """Both experts of Wan 2.2 A14B (compile, attention kernel and FP8 apply to each)."""
        if self.is_moe:
            return [getattr(self.pipe, name) for name in self.spec.experts.components]
        return super().denoisers()

    def lora_name_mapper(self):
        transformer = self.pipe.transformer
        return partial(wan_original_to_diffusers, image_attention=transformer.config.added_kv_proj_dim is not None)

    def lora_route(self):
        return partial(route_wan_experts, experts=self.spec.experts) if self.is_moe else None

    def complete_lora_request(self, request):
        """On Wan 2.2 A14B a LoRA without ``side`` whose file name says ``high_noise``/``low_noise`` goes to that
        expert."""
        if self.is_moe and request.side is None and request.path:
            side = self.spec.experts.side_from_name(request.path)
            if side is not None:
                return dataclasses.replace(request, side=side)
        return request

    # ------------------------------------------------------------------------------------------------ generation
    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        # output_type latent: decoded in postprocess, so that decoding is a progress stage of its own
        kwargs = self.prompt_call(params, num_frames=params.num_frames, max_sequence_length=UMT5_MAX_LENGTH,
                                  output_type="latent")
        if self.is_moe:
            kwargs["guidance_scale_2"] = params.guidance
        if params.control_images:
            from PIL import Image

            kwargs["image"] = params.control_images[0].resize((params.width, params.height), Image.LANCZOS)
        return kwargs

    def call_pipeline(self, call: dict):
        self._running = self.pipe
        if "image" in call and self.spec.pipeline_class == "WanPipeline":
            self._running = self._first_frame_pipe()
        return self._running(**call)

    def _first_frame_pipe(self):
        """TI2V-5B with a control image: diffusers' image-to-video pipeline over the same modules, whose
        ``expand_timesteps`` path keeps the first latent frame at the encoded image."""
        if self._image_pipe is None:
            p = self.pipe
            self._image_pipe = WanImageToVideoPipeline(
                tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                transformer=p.transformer, expand_timesteps=True,
            )
            self._image_pipe.set_progress_bar_config(disable=True)
        return self._image_pipe

    def _staged_progress(self, progress):
        def report(step: int, total: int) -> None:
            if self.is_moe:
                t = self._running._current_timestep
                boundary = self._running.config.boundary_ratio * NUM_TRAIN_TIMESTEPS
                self.stage = "high_noise" if t is not None and t >= boundary else "low_noise"
            if progress is not None:
                progress(step, total)

        return report

    def generate(self, prompt: str, progress=None, **kwargs) -> GenerationResult:
        """As :meth:`AITKPipeline.generate`, with ``num_frames`` (4k+1) and ``fps``; ``images`` is
        ``[B, T, H, W, C]``. ``self.stage`` names the running stage (see the module docstring)."""
        with self.lock:
            self.stage = "denoise"
            self._progress = progress
            self._decode_seconds = 0.0
            try:
                result = super().generate(prompt, progress=self._staged_progress(progress), **kwargs)
            finally:
                self._progress = None
                self.stage = "done"
        result.timings["decode"] = round(self._decode_seconds, 4)
        return result

    def postprocess(self, output, params: GenerationParams) -> dict:
        import numpy as np

        self.stage = "decode"
        if self._progress is not None:
            self._progress(params.steps, params.steps)
        started = time.perf_counter()
        pipe = self._running
        vae = pipe.vae
        with torch.inference_mode():
            latents = output.frames.to(get_module_execution_device(vae), dtype=vae.dtype)
            shape = (1, vae.config.z_dim, 1, 1, 1)
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
            # the same arithmetic as the pipelines' own decode, so frames match theirs bit for bit
            video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
            frames = pipe.video_processor.postprocess_video(video, output_type="np")
        pipe.maybe_free_model_hooks()
        self._decode_seconds = time.perf_counter() - started
        return {"images": np.asarray(frames, dtype=np.float32)}
