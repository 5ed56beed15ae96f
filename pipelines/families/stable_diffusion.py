"""SD 1.5, SD 2 and SDXL (with its distilled SSD-1B and Segmind-Vega): diffusers ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` as ai-toolkit samples them.

What ai-toolkit does here (``toolkit/stable_diffusion_model.py`` generate_images), and so do we:

* the scheduler is its ``ddpm`` sampler: ``DDPMScheduler`` with the SD betas, ``leading`` spacing and
  ``steps_offset 0`` (the registry's ``SD_DDPM``), not the checkpoint's own scheduler; SD 1.x uses ``steps_offset 1``
  (``SD15_DDPM``), because ``StableDiffusionPipeline.__init__``, which ai-toolkit hands that scheduler to, rewrites
  it. DDPM is stochastic: every step
  draws noise from the generator, which is the seeded CPU generator the base class passes, as ai-toolkit's
  ``torch.manual_seed(seed)`` global generator;
* real classifier-free guidance with the negative prompt, which is ENCODED even when empty. SDXL's stock pipeline
  would use zero embeddings for an empty negative when ``force_zeros_for_empty_prompt`` is set (the SDXL base
  checkpoint sets it); we switch that off;
* SDXL's two text encoders: both get the prompt; the first gets the negative, the second ``negative_2``, which
  defaults to the negative. In a job's previews a ``--n`` flag replaces the first encoder's negative only, while the
  second keeps the job's ``neg`` (``reproduce`` passes it as ``negative_2``), often ``""``; the stock pipeline cannot
  give an empty negative to the second encoder only, so we encode the two halves ourselves;
* SDXL: ``guidance_rescale`` from the job's ``sample.guidance_rescale`` or ``--gr`` (default 0), no invisible
  watermark; SD 1.5 / 2: no safety checker, and neither option;
* SD 2: the scheduler's prediction type is v (``v_prediction``) exactly when the job says ``model.is_v_pred: true``;
  ai-toolkit never reads it from the checkpoint (default epsilon), so the option ``v_prediction`` (the registry's
  default: the base checkpoint's own) is what a job's flag sets in ``reproduce``;
* SSD-1B and Segmind-Vega are sampled as SDXL (ai-toolkit loads them through its SDXL branch; in 0.12.26 only jobs
  whose flags resolve to arch ``sdxl`` sample them, see the registry notes).

LoRAs are kohya files (``lora_unet_*``, ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*``, ``.alpha``); the generic
converter resolves their flattened names against the UNet's and text encoders' module names.
"""

from __future__ import annotations

import math

from ..base import AITKPipeline, GenerationParams
from ..component_files import CLIP_G, SD_CLIP, SD_VAE
from ..registry import ModelSpec, StableDiffusionOptions

SDXL_GUIDANCE_RESCALE = 0.0  # ai-toolkit's sample.guidance_rescale default
SDXL_SAMPLE_OPTIONS = ("negative_2", "guidance_rescale")
V_PREDICTION_OPTION = "v_prediction"


class StableDiffusionFamilyPipeline(AITKPipeline):
    """``sd15``, ``sd2``, ``sdxl``, ``ssd`` and ``vega``."""

    single_file_denoisers = True
    component_files = {"text_encoder": SD_CLIP, "text_encoder_2": CLIP_G, "vae": SD_VAE}

    denoiser = "unet"
    options_type = StableDiffusionOptions
    batches_distinct_prompts = True

    @property
    def is_xl(self) -> bool:
        return self.spec.pipeline_class == "StableDiffusionXLPipeline"

    @property
    def sample_options(self) -> tuple[str, ...]:
        return SDXL_SAMPLE_OPTIONS if self.is_xl else ()

    @property
    def generation_options(self) -> tuple[str, ...]:
        """The ``generate()`` options: the sample options, and ``v_prediction`` for an id with that option."""
        return self.sample_options + ((V_PREDICTION_OPTION,) if self.spec.options is not None else ())

    def job_options(self, model_config: dict) -> dict:
        if self.spec.options is None:
            return {}
        return {V_PREDICTION_OPTION: bool(model_config.get("is_v_pred", False))}

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        if spec.pipeline_class == "StableDiffusionXLPipeline":
            pipe = super().load_diffusers_pipeline(spec, source, torch_dtype, add_watermarker=False, **overrides)
            pipe.register_to_config(force_zeros_for_empty_prompt=False)
            return pipe
        return super().load_diffusers_pipeline(
            spec, source, torch_dtype, safety_checker=None, requires_safety_checker=False, **overrides
        )

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        if not isinstance(params.extra.get(V_PREDICTION_OPTION, False), bool):
            raise ValueError(f"`v_prediction` must be true or false, got {params.extra[V_PREDICTION_OPTION]!r}.")
        negative_2 = params.extra.get("negative_2")
        if negative_2 is not None and not isinstance(negative_2, str):
            raise ValueError(f"`negative_2` must be a string, got {type(negative_2).__name__}.")
        rescale = params.extra.get("guidance_rescale", SDXL_GUIDANCE_RESCALE)
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not (
                math.isfinite(rescale) and 0.0 <= rescale <= 1.0):
            raise ValueError(f"`guidance_rescale` must be a number in 0..1, got {rescale!r}.")

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        if self.spec.options is not None:
            v_prediction = params.extra.get(V_PREDICTION_OPTION, self.spec.options.v_prediction)
            self.pipe.scheduler.register_to_config(prediction_type="v_prediction" if v_prediction else "epsilon")
        kwargs = self.prompt_call(params)
        if self.is_xl:
            negative_2 = params.extra.get("negative_2")
            if negative_2 is not None and any(negative != negative_2 for negative in params.negatives):
                del kwargs["negative_prompt"]
                kwargs.update(self.encode_split_negative(params.negatives, negative_2))
            kwargs["guidance_rescale"] = float(params.extra.get("guidance_rescale", SDXL_GUIDANCE_RESCALE))
        return kwargs

    def encode_split_negative(self, negatives: list[str], negative_2: str) -> dict:
        """SDXL's unconditional embeddings with one negative per text encoder, one row per image: the first
        encoder's hidden states of that image's negative, the second's of ``negative_2`` and its pooled output.
        Encoded one text at a time because the stock pipeline replaces an empty ``negative_prompt_2`` by
        ``negative_prompt``."""
        import torch

        first_width = self.pipe.text_encoder.config.hidden_size
        encoded = {}
        with torch.inference_mode():
            for text in {*negatives, negative_2}:
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=text, device=self.pipe._execution_device, do_classifier_free_guidance=False,
                )
                encoded[text] = (embeds, pooled)
        second = encoded[negative_2][0][..., first_width:]
        embeds = torch.cat([torch.cat([encoded[negative][0][..., :first_width], second], dim=-1)
                            for negative in negatives])
        return {"negative_prompt_embeds": embeds,
                "negative_pooled_prompt_embeds": encoded[negative_2][1].repeat(len(negatives), 1)}
