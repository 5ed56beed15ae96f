"""LTX-2, LTX-2.3 and LTX-2.5 (video with audio): diffusers ``LTX2Pipeline`` / ``LTX2ImageToVideoPipeline`` as
ai-toolkit samples them (``ai-toolkit.md`` §2.2, ai-toolkit's ``extensions_built_in/diffusion_models/ltx2/ltx2.py``).

What ai-toolkit does here, and so do we:

* FlowMatch Euler with LTX-2's dynamic shift (mu from 1024..4096 video tokens, 0.95..2.05, exponential), stretched
  to end at 0.1 (``shift_terminal``); the pipeline's own sigmas ``linspace(1, 1/N, N)``;
* true CFG with the negative prompt; Gemma prompts padded to 1024 tokens (the connectors need that length);
* width/height floored to 32, frames to 8k+1;
* an optional control image, resized (LANCZOS) to the target size, switches to ``LTX2ImageToVideoPipeline`` over the
  same modules (first-frame conditioning);
* LTX-2.3 gets ai-toolkit's guidance extras (STG, modality isolation, guidance rescale, separate audio scales,
  cross-modality timesteps). LTX-2.0 gets none: ai-toolkit passes nothing, which in the diffusers it was written
  against meant plain CFG. Diffusers 0.42 changed the call defaults to LTX-2.3's, so the plain values are passed
  explicitly (``LTX2Options.guidance`` in the registry);
* LTX-2.5 is sampled exactly as LTX-2.3 (ai-toolkit shares the code path); its transformer lacks the video
  feed-forward biases and its text encoder is Gemma-4 (``Gemma4TextModel``). Proven against ai-toolkit's own sample
  path (``tests/goldens/ltx25``), which showed two things of ai-toolkit's pinned diffusers that 0.42 changed: ``mu`` is
  always 2.05 (computed at 4096 tokens whatever the size; the registry gets it with ``base_shift = max_shift``) and the
  control image is not re-compressed (``LTX2Options.image_crf = 0``). Both hold for ai-toolkit's 2.0/2.3 previews as
  well (the same code path and pinned diffusers), so every LTX-2 id samples that way. Its base repo holds ComfyUI single files only (int8 ConvRot
  transformer and text encoder): ``ltx2_comfy`` loads them, dequantized.

Frame rate: the pipeline's ``frame_rate`` (the rate the model is conditioned on; it also sets the audio's length) is
the ``frame_rate`` generation option, by default the requested ``fps``, so that audio and video last as long.
ai-toolkit passes none, so its previews are conditioned on the pipeline's default 24 whatever the job's ``fps`` (which
only sets the MP4's rate): ``job_options`` gives ``reproduce`` that rate (``LTX2Options.preview_frame_rate``). At
24 fps the two are the same.

Audio is kept: ``GenerationResult.audio`` is ``[B, channels, samples]`` float32 at ``GenerationResult.sample_rate``
(the vocoder's output rate).

STG perturbs the transformer blocks listed in ``spatio_temporal_guidance_blocks`` (``[28]`` for the 48-block LTX-2.3).
A model of another depth (the tiny test models) gets the block at the same relative depth,
``index * depth // stg_reference_depth``, so STG never silently points past the last block.

LoRAs in original LTX names (``diffusion_model.patchify_proj``, ``adaln_single``...) are renamed by
``lora.convert.ltx2_original_to_diffusers``; diffusers-named files load as they are.

Progress: ``progress(step, total)`` after every denoising step, and once more (``step == total``) when decoding
(video VAE, audio VAE, vocoder) starts. ``pipeline.stage`` is ``"denoise"``, then ``"decode"``, then ``"done"``.

High resolution (``resolution="high"``, ids whose options have ``high``: LTX-2.3), the reference implementation's
(runcomfy ai-toolkit-inference) ``resolution="High"`` mode, proven against its own code (``tests/goldens/ltx23_high``):

1. stage 1 at half the requested width and height (the reference takes the stage-1 size and doubles it; here width and
   height are the output's, so multiples of 64), with the user's LoRAs, true CFG without the guidance extras (the
   reference passes none, which meant plain CFG in the diffusers it pins), latents out;
2. the video latents upscaled 2x by diffusers' ``LTX2LatentUpsamplePipeline`` with the upsampler model from
   ``high.upsampler``; the audio is stage 1's, decoded;
3. a refine at the requested size: the upscaled latents and stage 1's audio latents re-noised at the first refine
   sigma, then FlowMatch Euler on ``high.refine_sigmas`` (no dynamic or terminal shift) at guidance 1, with the
   distilled LoRA (``high.distilled_lora``, at ``high.distilled_lora_strength``) on beside the user's LoRAs, decoded
   in VAE tiles. Its video is the result (its audio is dropped, as in the reference).

The refine noise continues each image's seeded generator (the reference draws it from torch's global generator,
unseeded). The distilled LoRA sits in the LoRA stack on the ``refine`` pass side (``LTX2_REFINE_LORA_SIDE``), switched
on in the refine stage only, so it is loaded once and never merged; a user LoRA given that side acts there too.
Progress counts stage 1's steps; the upscale and the refine happen in the ``"decode"`` stage.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Sequence

from ..base import AITKPipeline, GenerationParams, GenerationResult, LatentLayout
from ..lora.convert import ConvertedLora, ltx2_original_to_diffusers
from ..registry import LTX2_REFINE_LORA_SIDE, LTX2_RESOLUTION_MODES, LTX2Options
from .ltx2_comfy import is_comfy_source, load_comfy_pipeline

GEMMA_MAX_LENGTH = 1024
HIGH = "high"
#: the high resolution mode's latent upscale factor (the upsampler's): stage 1 runs at 1/UPSCALE of the output size
UPSCALE = 2


def route_refine(converted: ConvertedLora, side: str | None) -> ConvertedLora:
    """A LoRA acts in every stage (no side) or in the high resolution mode's refine stage only (``"refine"``)."""
    if side not in (None, LTX2_REFINE_LORA_SIDE):
        raise ValueError(f"LTX-2.3 has one transformer: a LoRA's side is empty (every stage) or "
                         f"{LTX2_REFINE_LORA_SIDE!r} (the high resolution mode's refine stage only), not {side!r}.")
    return converted


def single_safetensors(folder: str, source: str) -> str:
    """The one ``.safetensors`` file of ``folder`` (a LoRA repo's snapshot or a local folder)."""
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if len(files) != 1:
        raise ValueError(f"{source!r} must hold exactly one .safetensors LoRA file, it holds {files or 'none'}; give "
                         "the file itself.")
    return os.path.join(folder, files[0])


def resolve_lora_source(source: str) -> str:
    """A LoRA file from a ``.safetensors`` path, a folder holding one, or a hub repo holding one (downloaded)."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        return single_safetensors(source, source)
    from huggingface_hub import snapshot_download

    return single_safetensors(snapshot_download(source, allow_patterns=["*.safetensors"]), source)


class LTX2FamilyPipeline(AITKPipeline):
    """``ltx2``, ``ltx2.3`` and ``ltx2.5``."""

    latent_layout = LatentLayout(tokens=True, temporal_ratio="vae_temporal_compression_ratio")

    denoiser = "transformer"
    options_type = LTX2Options
    batches_distinct_prompts = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = "idle"
        self._image_pipe = None
        self._decode_started = None
        self._upsample_pipe = None
        self._user_loras: list = []
        self._refine_loras: list = []

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load_diffusers_pipeline(cls, spec, source: str, torch_dtype, **overrides):
        """LTX-2.5's base repo holds ComfyUI single files only: load those natively (``ltx2_comfy``); a diffusers
        folder or repo loads as usual."""
        files = spec.options.comfy_files
        if files and is_comfy_source(source, spec.base):
            return load_comfy_pipeline(source, files, torch_dtype)
        return super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)

    # ------------------------------------------------------------------------------------------------ LoRA hooks
    def lora_name_mapper(self):
        return ltx2_original_to_diffusers

    def lora_route(self):
        return route_refine if LTX2_REFINE_LORA_SIDE in self.spec.lora_pass_sides else None

    def set_loras(self, loras: Sequence) -> list[dict]:
        """As :meth:`AITKPipeline.set_loras`; once the high resolution mode has run, its distilled LoRA stays in the
        stack (refine pass side) beside the given ones. Returns the given LoRAs' summaries."""
        self._user_loras = list(loras)
        return super().set_loras(self._user_loras + self._refine_loras)[:len(self._user_loras)]

    # ------------------------------------------------------------------------------------------------ generation
    def guidance_kwargs(self) -> dict:
        """The spec's extra guidance arguments, with the STG blocks mapped onto this transformer's depth."""
        extras = dict(self.spec.options.guidance)
        blocks = extras.get("spatio_temporal_guidance_blocks")
        if blocks:
            depth = self.pipe.transformer.config.num_layers
            reference = self.spec.options.stg_reference_depth
            extras["spatio_temporal_guidance_blocks"] = sorted({b * depth // reference for b in blocks})
        return extras

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        rate = params.extra.get("frame_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 1 <= rate <= 120):
            raise ValueError(f"`frame_rate` must be a number in 1..120 (frames per second), got {rate!r}; leave it "
                             "unset to condition on the requested fps.")
        resolution = self.resolution(params)
        if resolution not in LTX2_RESOLUTION_MODES:
            raise ValueError(f"`resolution` must be one of {', '.join(LTX2_RESOLUTION_MODES)}, got {resolution!r}.")
        if resolution != HIGH:
            return
        if self.spec.options.high is None:
            raise ValueError(f"{self.spec.model_id} has no high resolution mode (it needs a latent upsampler and a "
                             "distilled LoRA made for the model; LTX-2.3 has them): use model ltx2.3, or "
                             "resolution='default'.")
        step = UPSCALE * self.spec.divisor
        if params.width % step or params.height % step:
            raise ValueError(f"resolution='high' renders stage 1 at half the size, which must be a multiple of "
                             f"{self.spec.divisor}: give width and height as multiples of {step} (got "
                             f"{params.width}x{params.height}).")

    def resolution(self, params: GenerationParams) -> str:
        """The ``resolution`` option of this call, else the id's default."""
        return params.extra.get("resolution", self.spec.options.resolution)

    def is_high_resolution(self, params: GenerationParams) -> bool:
        return self.resolution(params) == HIGH

    def job_options(self, model_config: dict) -> dict:
        """ai-toolkit's previews are conditioned on ``preview_frame_rate`` whatever the job's ``fps``."""
        return {"frame_rate": self.spec.options.preview_frame_rate}

    def conditioning_frame_rate(self, params: GenerationParams) -> float:
        """The rate the model is conditioned on: the ``frame_rate`` option, else the requested fps."""
        rate = params.extra.get("frame_rate", self.spec.options.frame_rate)
        return float(params.fps if rate is None else rate)

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        """The one-stage call, or with ``resolution="high"`` stage 1's: half the size, the high mode's guidance,
        latents out (which :meth:`call_pipeline` reads as the high mode's mark). The high mode's upsampler and
        distilled LoRA load here on first use (outside inference mode: the LoRA joins the stack)."""
        if self.is_high_resolution(params):
            self._prepare_high_resolution()
            width, height = params.width // UPSCALE, params.height // UPSCALE
            kwargs = self.prompt_call(params, width=width, height=height, output_type="latent",
                                      **self._stage_kwargs(params), **self.spec.options.high.guidance)
        else:
            width, height = params.width, params.height
            kwargs = self.prompt_call(params, **self._stage_kwargs(params), **self.guidance_kwargs())
        if params.control_images:
            from PIL import Image

            kwargs["image"] = params.control_images[0].resize((width, height), Image.LANCZOS)
            if self.spec.options.image_crf is not None:
                kwargs["image_crf"] = self.spec.options.image_crf
        return kwargs

    def _stage_kwargs(self, params: GenerationParams) -> dict:
        return {"num_frames": params.num_frames, "frame_rate": self.conditioning_frame_rate(params),
                "max_sequence_length": GEMMA_MAX_LENGTH}

    def call_pipeline(self, call: dict):
        if call["output_type"] == "latent":
            return self._high_resolution(call)
        return self._call_stage(call)

    def _call_stage(self, call: dict):
        if "image" not in call:
            return self.pipe(**call)
        if isinstance(call["generator"], list):
            call = {**call, **self._image_per_item(call, len(call["generator"]))}
        return self._image_to_video_pipe()(**call)

    # ------------------------------------------------------------------------------------------------ high resolution
    def _high_resolution(self, call: dict):
        """Stages 2 and 3 of the high resolution mode after stage 1 (``call``); see the module docstring."""
        from diffusers.pipelines.ltx2.pipeline_output import LTX2PipelineOutput

        high = self.spec.options.high
        stage1 = self._call_stage(call)
        upscaled = self._latent_upsample_pipe()(latents=stage1.frames, output_type="latent", return_dict=False)[0]
        audio_vae = self.pipe.audio_vae
        audio = self.pipe.vocoder(audio_vae.decode(stage1.audio.to(audio_vae.dtype), return_dict=False)[0])
        sigmas = list(high.refine_sigmas)
        refine = {
            "prompt": call["prompt"], "negative_prompt": call["negative_prompt"], "width": call["width"] * UPSCALE,
            "height": call["height"] * UPSCALE, "num_frames": call["num_frames"], "frame_rate": call["frame_rate"],
            "max_sequence_length": call["max_sequence_length"], **high.guidance, "latents": upscaled,
            "audio_latents": stage1.audio, "noise_scale": sigmas[0], "sigmas": sigmas,
            "num_inference_steps": len(sigmas), "guidance_scale": 1.0, "generator": call["generator"],
            "output_type": "np",
        }
        with self._refine_scheduler(), self._vae_tiling(True), self.loras.pass_side(LTX2_REFINE_LORA_SIDE):
            refined = self.pipe(**refine)
        return LTX2PipelineOutput(frames=refined.frames, audio=audio)

    @contextlib.contextmanager
    def _refine_scheduler(self):
        """The refine stage's scheduler: the model's FlowMatch config without dynamic or terminal shift, so the
        refine sigmas are sampled as given."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = self.pipe.scheduler
        self.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config, use_dynamic_shifting=False, shift_terminal=None)
        try:
            yield
        finally:
            self.pipe.scheduler = scheduler

    def _latent_upsample_pipe(self):
        """diffusers' latent upsample pipeline over this VAE and ``high.upsampler`` (loaded once)."""
        if self._upsample_pipe is None:
            from diffusers import LTX2LatentUpsamplePipeline
            from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel

            upsampler = LTX2LatentUpsamplerModel.from_pretrained(
                self.spec.options.high.upsampler, subfolder="latent_upsampler", torch_dtype=self.dtype)
            self._upsample_pipe = LTX2LatentUpsamplePipeline(vae=self.pipe.vae, latent_upsampler=upsampler.to(self.device))
            self._upsample_pipe.set_progress_bar_config(disable=True)
        return self._upsample_pipe

    def _prepare_high_resolution(self) -> None:
        """Load the high mode's upsampler and distilled LoRA on first use (the LoRA joins the stack on the refine
        pass side and stays there)."""
        from ..lora.stack import LoraRequest

        self._latent_upsample_pipe()
        if not self._refine_loras:
            high = self.spec.options.high
            path = resolve_lora_source(high.distilled_lora)
            self._refine_loras = [LoraRequest(path=path, strength=high.distilled_lora_strength,
                                              side=LTX2_REFINE_LORA_SIDE, name=f"distilled LoRA ({high.distilled_lora})")]
            self.set_loras(self._user_loras)

    def _image_per_item(self, call: dict, batch_size: int) -> dict:
        """With one generator per batch item, diffusers' image-to-video pipeline takes one image per item, and takes
        a list only without its H.264 re-compression of the image: re-compress it here as it would, once."""
        import numpy as np
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf, resolve_default_image_crf
        from PIL import Image

        image = call["image"]
        crf = call.get("image_crf")
        if crf is None:
            crf = resolve_default_image_crf(self.pipe.text_encoder)
        if crf != 0:
            image = Image.fromarray(apply_image_conditioning_crf(np.array(image.convert("RGB")), crf))
        return {"image": [image] * batch_size, "image_crf": 0}

    def _image_to_video_pipe(self):
        """diffusers' image-to-video pipeline over the same modules (built once, as ai-toolkit does per sample)."""
        if self._image_pipe is None:
            from diffusers import LTX2ImageToVideoPipeline

            p = self.pipe
            self._image_pipe = LTX2ImageToVideoPipeline(
                scheduler=p.scheduler, vae=p.vae, audio_vae=p.audio_vae, text_encoder=p.text_encoder,
                tokenizer=p.tokenizer, connectors=p.connectors, transformer=p.transformer, vocoder=p.vocoder,
            )
            self._image_pipe.set_progress_bar_config(disable=True)
        return self._image_pipe

    def _staged_progress(self, progress):
        def report(step: int, total: int) -> None:
            if progress is not None:
                progress(step, total)
            if step == total:
                # the pipeline decodes video and audio right after its last step
                self.stage = "decode"
                self._decode_started = time.perf_counter()
                if progress is not None:
                    progress(total, total)

        return report

    def generate(self, prompt: str, progress=None, **kwargs) -> GenerationResult:
        """As :meth:`AITKPipeline.generate`, with ``num_frames`` (8k+1), ``fps`` and an optional control image
        (image-to-video); ``images`` is ``[B, T, H, W, C]``, ``audio`` ``[B, channels, samples]``."""
        with self.lock:
            self.stage = "denoise"
            self._decode_started = None
            try:
                result = super().generate(prompt, progress=self._staged_progress(progress), **kwargs)
                finished = time.perf_counter()
            finally:
                self.stage = "done"
        if self._decode_started is not None:
            result.timings["decode"] = round(finished - self._decode_started, 4)
        return result

    def postprocess(self, output, params: GenerationParams) -> dict:
        import numpy as np

        return {
            "images": np.asarray(output.frames, dtype=np.float32),
            "audio": output.audio.detach().float().cpu().numpy(),
            "sample_rate": int(self.pipe.vocoder.config.output_sampling_rate),
        }
