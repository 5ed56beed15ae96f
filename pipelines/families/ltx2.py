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
"""

from __future__ import annotations

import time

from ..base import AITKPipeline, GenerationParams, GenerationResult, LatentLayout
from ..lora.convert import ltx2_original_to_diffusers
from ..registry import LTX2Options
from .ltx2_comfy import is_comfy_source, load_comfy_pipeline

GEMMA_MAX_LENGTH = 1024


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

    def job_options(self, model_config: dict) -> dict:
        """ai-toolkit's previews are conditioned on ``preview_frame_rate`` whatever the job's ``fps``."""
        return {"frame_rate": self.spec.options.preview_frame_rate}

    def conditioning_frame_rate(self, params: GenerationParams) -> float:
        """The rate the model is conditioned on: the ``frame_rate`` option, else the requested fps."""
        rate = {**self.spec.options.defaults(), **params.extra}["frame_rate"]
        return float(params.fps if rate is None else rate)

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        kwargs = self.prompt_call(params, num_frames=params.num_frames, frame_rate=self.conditioning_frame_rate(params),
                                  max_sequence_length=GEMMA_MAX_LENGTH, **self.guidance_kwargs())
        if params.control_images:
            from PIL import Image

            kwargs["image"] = params.control_images[0].resize((params.width, params.height), Image.LANCZOS)
            if self.spec.options.image_crf is not None:
                kwargs["image_crf"] = self.spec.options.image_crf
        return kwargs

    def call_pipeline(self, call: dict):
        if "image" not in call:
            return self.pipe(**call)
        if isinstance(call["generator"], list):
            call = {**call, **self._image_per_item(call, len(call["generator"]))}
        return self._image_to_video_pipe()(**call)

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
