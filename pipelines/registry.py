"""The model registry: one ordered table from model id to everything a family needs, as data.

Nothing here imports torch or diffusers, so the nodes, the CLI's ``--help`` and the server's schema can read the
registry without paying for heavy imports. Family code is imported only when a pipeline of that family is loaded.
"""

from __future__ import annotations

import importlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

# ai-toolkit's FLUX-style FlowMatch config (toolkit/sampler.py flux_config); also what Flex.1/Flex.2/Chroma use.
FLUX_FLOWMATCH = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


# ai-toolkit's SD/SDXL sampler `ddpm` (toolkit/sampler.py sd_config as DDPMScheduler reads it). steps_offset 0, not the
# checkpoints' 1: 4 steps give timesteps 750/500/250/0. DDPM is stochastic: each step draws noise from the generator.
SD_DDPM = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "thresholding": False,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
# ai-toolkit's SD 1.x previews build StableDiffusionPipeline(scheduler=...) with that config, and the pipeline's __init__
# rewrites any steps_offset other than 1 to 1 (a diffusers deprecation fix that StableDiffusionXLPipeline lacks): 4 steps
# give 751/501/251/1 there (proven by the sd15 end-to-end golden, tests/goldens/e2e/sd15).
SD15_DDPM = {**SD_DDPM, "steps_offset": 1}


# ai-toolkit's PixArt sampler `ddpm` (toolkit/sampler.py get_sampler with arch "pixart"): DDPMScheduler.from_config of its
# pixart_config, a DPM-Solver config, so the DDPM defaults it does not name hold: clip_sample true, no variance_type (the
# raw posterior variance), linear betas 1e-4..0.02, linspace spacing (2 steps: 999/0).
PIXART_DDPM = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": None,
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

# ai-toolkit's `flowmatch` sampler for SD3 and AuraFlow (get_sampler's sd_flow_config) as it really samples: no shift.
# The config says static shift 3.0, but CustomFlowMatchEulerDiscreteScheduler's __init__ takes only *args/**kwargs,
# so from_config reaches no argument: .config reads 3.0 while the shift used is the default 1.0 (as with Lumina2).
SD_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 1.0, "use_dynamic_shifting": False}

# ai-toolkit's Qwen-Image scheduler (extensions_built_in/diffusion_models/qwen_image/qwen_image.py scheduler_config,
# the stock Qwen-Image config): dynamic exponential shift with mu from 256..8192 tokens, stretched to end at 0.02.
QWEN_FLOWMATCH = {
    **FLUX_FLOWMATCH,
    "shift": 1.0,
    "max_shift": 0.9,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
}

# ai-toolkit's Z-Image scheduler (z_image.py scheduler_config): static shift 3.0.
ZIMAGE_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 3.0, "use_dynamic_shifting": False}

# ai-toolkit's PRXPixel scheduler (extensions_built_in/diffusion_models/prx_pixel_t2i/prx_pixel_t2i.py scheduler_config, the
# released checkpoint's): static shift 3.0.
PRX_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 3.0, "use_dynamic_shifting": False}

# ai-toolkit's HiDream-O1 scheduler (extensions_built_in/diffusion_models/hidream/hidream_o1_model.py scheduler_config;
# its pipeline calls set_shift(3.0) again before sampling): static shift 3.0, no dynamic shifting.
HIDREAM_O1_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 3.0, "use_dynamic_shifting": False}

# ai-toolkit's Lumina2 scheduler as it really samples: no shift at all. Its lumina2_config says static shift 6.0, but
# get_sampler builds the scheduler with from_config on a subclass whose __init__ takes only *args/**kwargs, so no value
# reaches __init__: the values read through .config hold, while the shift attribute keeps its default of 1.0.
LUMINA2_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 1.0, "use_dynamic_shifting": False}

# ai-toolkit's CogView4 scheduler (toolkit/models/cogview4.py scheduler_config): dynamic shifting with the linear time
# shift; the pipeline computes mu itself, 0.25 + 0.75 * sqrt(image tokens / 256), and passes unshifted timesteps.
COGVIEW4_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 1.0, "base_shift": 0.25, "max_shift": 0.75, "time_shift_type": "linear"}

# ai-toolkit's ERNIE-Image scheduler (extensions_built_in/diffusion_models/ernie_image/ernie_image.py scheduler_config):
# static shift 3.0, no dynamic shifting.
ERNIE_IMAGE_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 3.0, "use_dynamic_shifting": False}
# ai-toolkit's Nucleus-Image scheduler (extensions_built_in/diffusion_models/nucleus_image/nucleus_image_model.py
# scheduler_config): static shift 1.0 without dynamic shifting, so the pipeline's linspace(1, 1/N, N) sigmas are kept.
NUCLEUS_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 1.0, "use_dynamic_shifting": False}
# ai-toolkit's MiniMax-H3 flow shifts (extensions_built_in/diffusion_models/minimax_h3/src/packing.py): exponential,
# 12.0 for the video rows and 3.0 for the audio rows (MiniMaxH3Scheduler(shift=...), one scheduler per stream).
MINIMAX_H3_VIDEO_SHIFT = 12.0
MINIMAX_H3_AUDIO_SHIFT = 3.0

# ai-toolkit's Anima scheduler (extensions_built_in/diffusion_models/anima/anima.py scheduler_config): static shift 3.0;
# the modular pipeline hands it sigmas linspace(1, 1/N, N), which the scheduler shifts.
ANIMA_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 3.0, "use_dynamic_shifting": False}

# FLUX.2 / FLUX.2-klein: ai-toolkit samples with BFL's own schedule (pipelines/families/flux2.py bfl_schedule), not with a
# scheduler's shifting. The family passes the finished sigmas; shift 1.0 without dynamic shifting keeps them as given.
FLUX2_EULER = {**FLUX_FLOWMATCH, "shift": 1.0, "use_dynamic_shifting": False}

# ai-toolkit's Wan schedulers (toolkit/models/wan21/wan21.py, wan22): FlowMatch Euler, static shift 3.0 for Wan 2.1 and
# 5.0 for Wan 2.2 (not the checkpoints' UniPC, which ai-toolkit disabled).
WAN21_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 3.0, "use_dynamic_shifting": False}
WAN22_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 5.0, "use_dynamic_shifting": False}

# ai-toolkit's LTX-2 scheduler (extensions_built_in/diffusion_models/ltx2/ltx2.py scheduler_config): dynamic exponential
# shift with mu from 1024..4096 video tokens (0.95..2.05), stretched to end at 0.1.
LTX2_FLOWMATCH = {
    **FLUX_FLOWMATCH,
    "shift": 1.0,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
    "shift_terminal": 0.1,
}

# ai-toolkit samples every LTX-2 version through the diffusers it pins (c943837), whose LTX2Pipeline computes mu at
# max_image_seq_len (4096 tokens) whatever the size: always max_shift, 2.05 (MANIFEST "ltx25"). diffusers 0.42 computes
# it from the video token count; base_shift = max_shift makes that formula give the same constant.
LTX2_PREVIEW_FLOWMATCH = {**LTX2_FLOWMATCH, "base_shift": LTX2_FLOWMATCH["max_shift"]}

# The ComfyUI single files Lightricks/LTX-2.5 publishes, the ones ai-toolkit loads (its COMFY_LTX25_FILES): int8 ConvRot
# transformer and Gemma-4 text encoder, the conv video VAE (the default 2.5 VAE file is a diffusion decoder that
# diffusers has no class for), the audio VAE with the vocoder.
LTX25_COMFY_FILES = {
    "transformer": "diffusion_models/ltx-2.5-22b-dev-transformer-comfy-int8-convrot.safetensors",
    "text_encoder": "text_encoders/gemma4-12b-with-proj-ltx-2.5-comfy-int8-convrot.safetensors",
    "video_vae": "vae/ltx-2.5-video-vae-conv-bf16.safetensors",
    "audio_vae": "vae/ltx-2.5-audio-vae-bf16.safetensors",
}

# LTX2Pipeline guidance arguments. LTX-2.0: ai-toolkit passes none, i.e. plain CFG in the diffusers it was written for;
# diffusers 0.42's defaults are LTX-2.3's, so the plain values are explicit. LTX-2.3: what ai-toolkit passes.
LTX20_GUIDANCE = {
    "stg_scale": 0.0, "modality_scale": 1.0, "guidance_rescale": 0.0, "audio_guidance_scale": None,
    "audio_stg_scale": None, "audio_modality_scale": None, "audio_guidance_rescale": None,
    "spatio_temporal_guidance_blocks": None, "use_cross_timestep": False,
}
LTX23_GUIDANCE = {
    "stg_scale": 1.0, "modality_scale": 3.0, "guidance_rescale": 0.7, "audio_guidance_scale": 7.0,
    "audio_stg_scale": 1.0, "audio_modality_scale": 3.0, "audio_guidance_rescale": 0.7,
    "spatio_temporal_guidance_blocks": [28], "use_cross_timestep": True,
}

# ai-toolkit samples HiDream with its FlowUniPCMultistepScheduler(shift=3.0, use_dynamic_shifting=False): UniPC-bh2,
# order 2, on flow sigmas. The family passes that scheduler's step grid as `sigmas` (pipelines/hidream.py); E1's
# editing pipeline then shifts it by 3.0, I1's by exp(mu) with mu from the transformer's max_seq (dynamic, exponential).
HIDREAM_E1_UNIPC = {
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "timestep_spacing": "linspace",
    "final_sigmas_type": "zero",
}
HIDREAM_UNIPC = {**HIDREAM_E1_UNIPC, "use_dynamic_shifting": True}

@dataclass(frozen=True)
class SchedulerSpec:
    """The scheduler ai-toolkit samples with: a diffusers scheduler class name and its full config."""

    class_name: str
    config: Mapping[str, Any]


VIDEO_PREVIEW_FORMATS = ("webp", "mp4")


@dataclass(frozen=True)
class VideoSpec:
    """Video defaults. Frame counts are floored to ``frame_step * n + frame_offset``: 4n+1 for Wan, 8n+1 for LTX-2,
    17n+5 for MiniMax-H3. ``preview_format``: the file ai-toolkit writes this id's video previews as, ``webp`` (its
    trainer's animated WEBP) or ``mp4`` (LTX-2 and MiniMax-H3 write their own: H.264 at the encoder's default quality,
    with the audio track, through diffusers' ``encode_video``); ``reproduce`` writes ours the same way."""

    num_frames: int
    fps: int
    frame_step: int
    frame_offset: int = 1
    preview_format: str = "webp"

    def __post_init__(self):
        if self.preview_format not in VIDEO_PREVIEW_FORMATS:
            raise ValueError(f"VideoSpec.preview_format {self.preview_format!r} is not one of {VIDEO_PREVIEW_FORMATS}.")

    def frames(self, steps: int) -> int:
        """The frame count ``steps`` frame steps long (``frames(1)`` is the shortest multi-step video)."""
        return steps * self.frame_step + self.frame_offset


_EXPERT_IN_NAME = re.compile(r"(?P<lead>^|[_.\-])(?P<side>high|low)(?P<gap>[_\-]?)noise(?=[_.\-]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Experts:
    """A two-expert denoiser (Wan 2.2 A14B): ``high`` runs while ``t >= boundary_ratio * 1000``, ``low`` after.

    ai-toolkit saves a LoRA of such a model as one combined file (``transformer_1.``/``transformer_2.`` keys) or as
    two files whose names say their expert (``<name>_high_noise.safetensors`` / ``<name>_low_noise.safetensors``);
    :meth:`side_from_name`, :meth:`file_stem` and :meth:`sibling` are that naming rule.
    """

    boundary_ratio: float
    high: str = "transformer"
    low: str = "transformer_2"

    SIDES: ClassVar[tuple[str, str]] = ("high", "low")

    @property
    def components(self) -> tuple[str, str]:
        return (self.high, self.low)

    def component(self, side: str) -> str:
        return {"high": self.high, "low": self.low}[side]

    @staticmethod
    def side_from_name(path: str) -> str | None:
        """``"high"``/``"low"`` when the file name names exactly one expert (``*_high_noise``), else None."""
        sides = {m.group("side").lower() for m in _EXPERT_IN_NAME.finditer(os.path.basename(path))}
        return sides.pop() if len(sides) == 1 else None

    @staticmethod
    def without_side(stem: str) -> str:
        """``stem`` with its expert part removed (``job_000000100_high_noise`` -> ``job_000000100``)."""
        return _EXPERT_IN_NAME.sub("", stem)

    @staticmethod
    def file_stem(stem: str, side: str) -> str:
        """The file stem ai-toolkit gives one expert's half of a split save."""
        return f"{stem}_{side}_noise"

    @staticmethod
    def sibling(path: str) -> str | None:
        """The path of the other expert's file of a split save, or None when the name names no single expert."""
        folder, name = os.path.split(path)
        side = Experts.side_from_name(name)
        if side is None:
            return None
        other = "low" if side == "high" else "high"
        swapped = _EXPERT_IN_NAME.sub(lambda m: f"{m.group('lead')}{other}{m.group('gap')}noise", name)
        return os.path.join(folder, swapped)


@dataclass(frozen=True)
class AitkArch:
    """An ai-toolkit ``model.arch`` that a job maps to this id. With a ``checkpoint_hint`` (lower case), the job's
    ``name_or_path`` must contain it; the id without a hint is the arch's default."""

    name: str
    checkpoint_hint: str | None = None


@dataclass(frozen=True)
class LoraSignature:
    """What marks a LoRA for ``label`` in its key names (a regular expression searched in each key); used to name the
    family a LoRA was made for when it does not fit the loaded model. ``refines`` names a signature whose marks this
    family's files have too (an SDXL file has SD 1.5's ``lora_unet_`` keys): when both match, this one wins."""

    label: str
    pattern: str
    refines: LoraSignature | None = None


# ---------------------------------------------------------------------------------------------- typed family options
@dataclass(frozen=True)
class ZImageOptions:
    """``transformer``: hub repo of a transformer that replaces the base's (Z-Image De-Turbo)."""

    transformer: str | None = None


@dataclass(frozen=True)
class ZImageL2POptions:
    """``extras``: hub repo or folder of the text encoder and tokenizer that go with the single-file L2P checkpoint;
    ``checkpoint_file``: that file's name in the base repo."""

    extras: str
    checkpoint_file: str


@dataclass(frozen=True)
class StableDiffusionOptions:
    """``v_prediction``: the UNet predicts v, not the noise (the 768-pixel SD 2.x checkpoints). ai-toolkit reads it
    from the job's ``model.is_v_pred`` only (default false; it never looks at the checkpoint), so ``reproduce`` passes
    that flag and a plain ``generate`` uses this default, the base checkpoint's own."""

    v_prediction: bool = False


@dataclass(frozen=True)
class Flux2Options:
    """``text_encoder_out_layers``: the text encoder's hidden-state layers stacked into the prompt embedding."""

    text_encoder_out_layers: tuple[int, ...]


@dataclass(frozen=True)
class WanOptions:
    """``expand_timesteps``: Wan 2.2 TI2V-5B's per-token timesteps (first-frame conditioning from a control image).
    ``sample_first_frame``: the control image's latent is a draw from the VAE posterior (ai-toolkit's Wan 2.2 A14B
    I2V previews), not its mode (diffusers' image-to-video pipeline)."""

    expand_timesteps: bool = False
    sample_first_frame: bool = False


#: the ``lora_pass_sides`` side whose LoRAs act in the high resolution mode's refine stage only (``LTX2HighResolution``)
LTX2_REFINE_LORA_SIDE = "refine"
#: the ``resolution`` generation option's values; ``default`` is one stage at the requested size (ai-toolkit's previews)
LTX2_RESOLUTION_MODES = ("default", "high")


@dataclass(frozen=True)
class LTX2HighResolution:
    """The reference implementation's (runcomfy ai-toolkit-inference) ``resolution="High"`` mode of LTX-2.3: stage 1
    at half the requested size, the latents upscaled 2x by a latent upsampler, then a short refine at the requested
    size with a distilled LoRA added beside the user's.

    ``upsampler``: hub repo (or local folder) whose ``latent_upsampler`` folder holds the ``LTX2LatentUpsamplerModel``;
    ``distilled_lora``: hub repo, folder or ``.safetensors`` file of the distilled LoRA (diffusers names; a repo or
    folder must hold exactly one ``.safetensors``), applied at ``distilled_lora_strength`` in the refine stage only;
    ``refine_sigmas``: the refine stage's sigmas (its first is also the noise scale the upscaled latents are re-noised
    with), sampled by FlowMatch Euler without dynamic or terminal shift at guidance 1; ``guidance``: the
    ``LTX2Pipeline`` guidance arguments of both stages (the reference passes none, which in the diffusers it pins
    meant plain CFG)."""

    upsampler: str
    distilled_lora: str
    distilled_lora_strength: float
    refine_sigmas: tuple[float, ...]
    guidance: Mapping[str, Any]


@dataclass(frozen=True)
class LTX2Options:
    """``guidance``: LTX2Pipeline's guidance arguments; ``stg_reference_depth``: the transformer depth that the STG
    block indices in ``guidance`` refer to (they are rescaled to the loaded transformer's depth); ``image_crf``: the
    H.264 CRF the control image is re-compressed at before image-to-video (0, the default: none, as in the diffusers
    ai-toolkit pins; None: diffusers 0.42's default);
    ``comfy_files``: where the base repo keeps its ComfyUI single files, by component, when it has no diffusers
    folders (``families/ltx2_comfy.py`` loads them).

    ``high``: the id's high resolution mode (:class:`LTX2HighResolution`), None when it has none.

    Generation options: ``frame_rate``, the frame rate the model is conditioned on (the video positions' time
    scale and the audio's length); None, the default, takes the requested ``fps``. ``resolution`` (one of
    :data:`LTX2_RESOLUTION_MODES`): ``high`` runs ``high``'s three stages. ``preview_frame_rate``: the rate
    ai-toolkit's previews are conditioned on whatever the job's ``fps`` (it passes none, so the pipeline's default;
    the ``fps`` only sets the MP4's rate); ``reproduce`` passes it as ``frame_rate``."""

    guidance: Mapping[str, Any]
    stg_reference_depth: int | None = None
    image_crf: int | None = 0
    comfy_files: Mapping[str, str] | None = None
    high: LTX2HighResolution | None = None
    frame_rate: float | None = None
    resolution: str = "default"
    preview_frame_rate: float = 24.0

    @property
    def generation_options(self) -> tuple[str, ...]:
        """The ``generate()`` options this id takes."""
        return ("frame_rate", "resolution")

    def defaults(self) -> dict:
        return {name: getattr(self, name) for name in self.generation_options}


# The reference implementation's LTX-2.3 High mode (its src/pipelines/ltx2.py LTX23Pipeline): the sigmas are diffusers'
# STAGE_2_DISTILLED_SIGMA_VALUES; both stages get no guidance arguments, plain CFG in the diffusers it pins (072d15ee).
LTX23_HIGH_RESOLUTION = LTX2HighResolution(
    upsampler="dg845/LTX-2.3-Spatial-Upsampler-Diffusers",
    distilled_lora="CalamitousFelicitousness/LTX-2.3-distilled-lora-384-Diffusers",
    distilled_lora_strength=0.8,
    refine_sigmas=(0.909375, 0.725, 0.421875),
    guidance=LTX20_GUIDANCE,
)


@dataclass(frozen=True)
class HiDreamOptions:
    """``llama``: hub repo of the Llama-3.1 text encoder (HiDream's repos do not include it)."""

    llama: str


@dataclass(frozen=True)
class Krea2Options:
    """ai-toolkit's Krea 2 ``model_kwargs`` that change sampling, as this id's defaults (each can be passed per call).

    ``schedule_mu`` pins the time shift (None: linear in the image token count, ai-toolkit's default for Raw and
    Turbo alike). ``edit`` ids take reference images, which need ``vision_processor`` (the hub repo of the Qwen3-VL
    processor, ai-toolkit's text encoder repo) when the checkpoint has no processor; their ``kv_cache`` (reference
    tokens attend only to each other) and ``match_target_res`` (reference latents at the target's area instead of the
    1 MP cap) defaults are ai-toolkit's ``krea2:o_edit`` UI preset's."""

    edit: bool = False
    vision_processor: str | None = None
    schedule_mu: float | None = None
    kv_cache: bool = False
    match_target_res: bool = False

    @property
    def generation_options(self) -> tuple[str, ...]:
        """The ``generate()`` options this id takes."""
        return ("schedule_mu", "kv_cache", "match_target_res") if self.edit else ("schedule_mu",)

    def defaults(self) -> dict:
        return {name: getattr(self, name) for name in self.generation_options}


@dataclass(frozen=True)
class BooguImageOptions:
    """``edit``: the id takes reference images (Boogu-Image Edit). ``match_target_res``: its reference latents take
    the target's area instead of ai-toolkit's 1 MP cap (ai-toolkit's ``model_kwargs.match_target_res``, default off);
    the edit id's only generation option."""

    edit: bool = False
    match_target_res: bool = False

    @property
    def generation_options(self) -> tuple[str, ...]:
        """The ``generate()`` options this id takes."""
        return ("match_target_res",) if self.edit else ()

    def defaults(self) -> dict:
        return {name: getattr(self, name) for name in self.generation_options}


@dataclass(frozen=True)
class MageFlowOptions:
    """ai-toolkit's Mage-Flow ``model_kwargs`` that change sampling, as this id's defaults (each can be passed per
    call): ``cfg_renormalization`` (rescale the guided velocity to the conditional one's norm, off by default),
    ``static_shift`` (the sigma shift, 6.0) and, for the edit id, ``vae_sample_posterior`` (reference latents are a
    draw from the VAE posterior, the default, or its mean). ``edit`` ids take reference images and use the edit prompt
    template."""

    edit: bool = False
    cfg_renormalization: bool = False
    static_shift: float = 6.0
    vae_sample_posterior: bool = True

    @property
    def generation_options(self) -> tuple[str, ...]:
        """The ``generate()`` options this id takes."""
        return ("cfg_renormalization", "static_shift") + (("vae_sample_posterior",) if self.edit else ())

    def defaults(self) -> dict:
        return {name: getattr(self, name) for name in self.generation_options}


#: the LoRA side of a LoRA that acts in the unconditional CFG pass only (Ideogram 4's, ai-toolkit's
#: ``unconditional_lora_path``; ``lora.stack`` "pass sides")
UNCONDITIONAL_LORA_SIDE = "uncond"


@dataclass(frozen=True)
class ChromaRadianceOptions:
    """Where the T5-XXL text encoder and tokenizer of a Chroma Radiance checkpoint come from (the checkpoint files
    hold the transformer only): ai-toolkit's ``chroma_radiance`` loads ``ostris/Flex.1-alpha``'s ``text_encoder_2``
    and ``tokenizer_2``."""

    text_encoder: str = "ostris/Flex.1-alpha"
    text_encoder_subfolder: str = "text_encoder_2"
    tokenizer_subfolder: str = "tokenizer_2"


@dataclass(frozen=True)
class Ideogram4Options:
    """ai-toolkit's Ideogram 4 sampling constants (``src/pipeline.py``, ``ideogram4.py``): the logit-normal schedule's
    base mean and std (its ``ideogram_schedule_mu``/``_std`` model kwargs, default 0 and 1.75), the prompt token cap,
    and the text encoder it loads when the checkpoint folder has none (stock Qwen3-VL-8B-Instruct)."""

    schedule_mu: float = 0.0
    schedule_std: float = 1.75
    max_text_tokens: int = 3072
    text_encoder: str = "Qwen/Qwen3-VL-8B-Instruct"


@dataclass(frozen=True)
class ZetaChromaOptions:
    """Where ai-toolkit's ``zeta_chroma`` finds its parts: ``transformer_file``, the checkpoint file it loads from the
    base repo or folder when the base names no file; ``text_encoder``, the hub repo whose ``text_encoder/`` (Qwen3) and
    ``tokenizer/`` it uses (its ``extras_name_or_path``, Z-Image-Turbo in its UI preset)."""

    transformer_file: str = "zeta-chroma-base-x0-pixel-dino-distance.safetensors"
    text_encoder: str = "Tongyi-MAI/Z-Image-Turbo"


@dataclass(frozen=True)
class AceStepOptions:
    """ACE-Step 1.5's base repo holds ComfyUI all-in-one files only: ``aio_file`` is this id's file in it (DiT,
    condition encoder, Qwen3 text encoder and VAE); ``tokenizer`` the hub repo of the tokenizer ai-toolkit loads
    (the file has none)."""

    aio_file: str
    tokenizer: str = "Qwen/Qwen3-Embedding-0.6B"


# ---------------------------------------------------------------------------------------------------------- the spec
GUIDANCE_KINDS = ("distilled", "cfg", "true_cfg")
#: how LoRAs are applied: live PEFT adapters or merged into the weights (see ``lora.stack``)
LORA_MODES = ("dynamic", "fused")
#: family module (``pipelines/families/<module>.py``) -> the kinds of context parallelism (the ``parallel`` load option)
#: that shard its denoisers (every expert of a two-expert model) with their diffusers plan (``_cp_plan``), two ranks
#: giving the one-process image on the tiny models. Qwen-Image splits its text tokens too, whose count follows the
#: prompt: Ulysses runs it with uneven shards, ring needs even ones. Not ltx2: diffusers' plan fails on its split
#: rotary embedding ("The size of tensor a (2) must match the size of tensor b (4)").
CONTEXT_PARALLEL_FAMILIES = {
    "flux": ("ulysses", "ring"),
    "flex2": ("ulysses", "ring"),
    "flux2": ("ulysses", "ring"),
    "wan": ("ulysses", "ring"),
    "qwen_image": ("ulysses",),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines one model id.

    Args:
        model_id (str): stable id, the same as the reference implementation's.
        family (str): ``"<module>:<Class>"`` of the family pipeline class in ``pipelines/families/``.
        pipeline_class (str): the diffusers pipeline class the family drives (by name, imported lazily).
        base (str): default base checkpoint (Hugging Face repo id).
        steps, guidance, width, height, seed, negative: generation defaults.
        divisor (int): width/height are floored to a multiple of this after ai-toolkit's floor to 8.
        tiny (str): ``"<module>:<function>"`` in ``tiny/`` that builds the tiny random-weight pipeline.
        aitk_archs (tuple[AitkArch, ...]): the ai-toolkit ``model.arch`` values (with checkpoint hints) of this id.
        lora_signatures (tuple[LoraSignature, ...]): key names that mark a LoRA as made for this family.
        scheduler (SchedulerSpec, *optional*): the scheduler ai-toolkit samples with; None keeps the checkpoint's.
        lora_mode (str): ``"dynamic"`` (live PEFT adapters) or ``"fused"`` (merged into the weights).
        lora_components (tuple): pipeline components a LoRA may target; defaults to the experts of a two-expert model,
            else ``("transformer",)``.
        guidance_kind (str): ``"distilled"`` (guidance embedding, one forward per step), ``"cfg"`` or ``"true_cfg"``.
        unconditional_is_negative (bool): whether CFG's unconditional pass encodes the negative prompt (Chroma's
            previews encode an empty prompt there instead).
        cfg_unless_one (bool): CFG runs at every guidance but exactly 1 (below 1 too), as ai-toolkit's own loop for
            the family does; otherwise only above 1.
        control_images (tuple[int, int]): (min, max) number of control images.
        video (VideoSpec, *optional*): video defaults; None for image models.
        audio_only (bool): the model makes audio and no image (``GenerationResult.images`` is None); width and height
            are then unused.
        experts (Experts, *optional*): the two experts of a two-expert denoiser; None for one denoiser.
        lora_pass_sides (tuple[str, ...]): LoRA sides whose LoRAs act in one denoiser pass only
            (:data:`UNCONDITIONAL_LORA_SIDE`); empty for most models.
        options (*optional*): the family's typed options (``ZImageOptions``, ``Flux2Options``...), or None.
        notes (str): what differs from the stock diffusers pipeline and why (shown by ``models``).
    """

    model_id: str
    family: str
    pipeline_class: str
    base: str
    steps: int
    guidance: float
    divisor: int
    tiny: str
    aitk_archs: tuple[AitkArch, ...]
    lora_signatures: tuple[LoraSignature, ...]
    scheduler: SchedulerSpec | None = None
    lora_mode: str = "dynamic"
    lora_components: tuple[str, ...] = ()
    guidance_kind: str = "cfg"
    unconditional_is_negative: bool = True
    cfg_unless_one: bool = False
    control_images: tuple[int, int] = (0, 0)
    video: VideoSpec | None = None
    audio_only: bool = False
    experts: Experts | None = None
    lora_pass_sides: tuple[str, ...] = ()
    options: Any = None
    width: int = 1024
    height: int = 1024
    seed: int = 42
    negative: str = ""
    notes: str = ""

    def __post_init__(self):
        if not self.lora_components:
            object.__setattr__(self, "lora_components", self.experts.components if self.experts else ("transformer",))
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"{self.model_id}: lora_mode {self.lora_mode!r} is not one of dynamic, fused.")
        if self.guidance_kind not in GUIDANCE_KINDS:
            raise ValueError(f"{self.model_id}: guidance_kind {self.guidance_kind!r} is not one of {GUIDANCE_KINDS}.")

    @property
    def requires_control_image(self) -> bool:
        return self.control_images[0] > 0

    @property
    def is_video(self) -> bool:
        return self.video is not None

    @property
    def context_parallel(self) -> tuple[str, ...]:
        """The kinds of the ``parallel`` load option that can shard this model's denoiser (``CONTEXT_PARALLEL_FAMILIES``);
        empty when none can."""
        return CONTEXT_PARALLEL_FAMILIES.get(self.family.partition(":")[0], ())

    def negative_has_effect(self, guidance: float) -> bool:
        """Whether the negative prompt changes the output at ``guidance``: only real CFG runs an unconditional pass,
        and only above guidance 1 (or at any guidance but 1 with ``cfg_unless_one``), and only a family whose
        unconditional pass encodes the negative uses it."""
        runs_cfg = guidance != 1.0 if self.cfg_unless_one else guidance > 1.0
        return self.guidance_kind != "distilled" and self.unconditional_is_negative and runs_cfg

    @property
    def uses_negative(self) -> bool:
        """Whether the negative prompt has any effect at the default guidance."""
        return self.negative_has_effect(self.guidance)

    def family_class(self):
        """Import and return the family pipeline class (this is where torch/diffusers get imported)."""
        module_name, _, attr = self.family.partition(":")
        return getattr(importlib.import_module(f"{__package__}.families.{module_name}"), attr)

    def defaults(self) -> dict[str, Any]:
        """The user-facing defaults, with the library's parameter names."""
        out = {
            "steps": self.steps,
            "guidance": self.guidance,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "negative": self.negative,
            "divisor": self.divisor,
        }
        if self.video is not None:
            out.update(num_frames=self.video.num_frames, fps=self.video.fps)
        return out

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (used by ``models --json``, the server and the nodes' front end)."""
        return {
            "id": self.model_id,
            "base_model": self.base,
            "pipeline": self.pipeline_class,
            **self.defaults(),
            "resolution_divisor": self.divisor,
            "lora_mode": self.lora_mode,
            "guidance_kind": self.guidance_kind,
            "uses_negative": self.uses_negative,
            "requires_control_image": self.requires_control_image,
            "control_images": list(self.control_images),
            "is_video_model": self.is_video,
            "is_audio_model": self.audio_only,
            "scheduler": None if self.scheduler is None else {"class": self.scheduler.class_name, **self.scheduler.config},
            "notes": self.notes,
        }


class Preset:
    """The field values a family's ids share: ``PRESET("id", **differences)`` is one :class:`ModelSpec`, and
    ``PRESET.derive(**differences)`` a narrower preset. An entry then states only what sets it apart."""

    def __init__(self, **fields):
        self.fields = fields

    def derive(self, **differences) -> "Preset":
        return Preset(**{**self.fields, **differences})

    def __call__(self, model_id: str, **differences) -> ModelSpec:
        return ModelSpec(model_id=model_id, **{**self.fields, **differences})


# ------------------------------------------------------------------------------------------------ LoRA signatures
FLUX1_NAMES = LoraSignature("FLUX.1 / Flex / Kontext (diffusers names)", r"single_transformer_blocks\.\d+\.")
BFL_NAMES = LoraSignature("FLUX.2 / FLUX.2-klein / Chroma (original BFL names)",
                          r"(^|\.)double_blocks\.\d+\.img_attn|(^|\.)single_blocks\.\d+\.linear1")
KOHYA_SD15 = LoraSignature("SD 1.5 (kohya)", r"lora_unet_|lora_te_")
KOHYA_SDXL = LoraSignature("SDXL (kohya)", r"lora_te2_|lora_unet_.*add_embedding|lora_unet_down_blocks_2_attentions",
                           refines=KOHYA_SD15)
# ai-toolkit saves PixArt and AuraFlow LoRAs kohya-style under `lora_transformer_` (not PEFT), SD3's as PEFT
# `transformer.` + diffusers names. SD3's block names are FLUX.1's double blocks' (and Qwen-Image's), so a FLUX.1 or
# Qwen-Image file matches it too and keeps its own, earlier, label; AuraFlow's single blocks are named as FLUX.1's.
PIXART_NAMES = LoraSignature("PixArt (alpha / Sigma)", r"lora_transformer_transformer_blocks_\d+_attn2_to_")
SD3_NAMES = LoraSignature("Stable Diffusion 3", r"(^|\.)transformer_blocks\.\d+\.attn\.add_q_proj")
AURAFLOW_NAMES = LoraSignature("AuraFlow", r"joint_transformer_blocks[._]\d+[._]", refines=FLUX1_NAMES)
QWEN_NAMES = LoraSignature("Qwen-Image", r"transformer_blocks\.\d+\.img_mlp|transformer_blocks\.\d+\.txt_mlp")
ZIMAGE_NAMES = LoraSignature("Z-Image", r"layers\.\d+\.attention\.to_q|layers\.\d+\.feed_forward\.w1")
LUMINA2_NAMES = LoraSignature("Lumina2 or OmniGen2 (they share block names)",
                              r"layers\.\d+\.attn\.to_q|context_refiner\.\d+\.attn\.")
OMNIGEN2_NAMES = LoraSignature("OmniGen2", r"ref_image_refiner", refines=LUMINA2_NAMES)
WAN_ORIGINAL = LoraSignature("Wan 2.1/2.2 (original Wan names)", r"(^|\.)blocks\.\d+\.(self_attn|cross_attn)\.")
WAN_DIFFUSERS = LoraSignature("Wan (diffusers names)", r"(^|\.)blocks\.\d+\.attn1\.")
WAN_COMBINED = LoraSignature("Wan 2.2 14B (combined high/low-noise file)", r"(^|[._])transformer_[12]\.blocks\.\d+\.",
                             refines=WAN_ORIGINAL)
COGVIEW4_NAMES = LoraSignature("CogView4", r"(^|\.)transformer_blocks\.\d+\.attn1\.")
LTX2_NAMES = LoraSignature("LTX-2", r"audio_attn|audio_ff|video_to_audio", refines=COGVIEW4_NAMES)  # LTX-2 has attn1 too
# Anima LoRAs come in ComfyUI / original Cosmos names (`blocks.N.self_attn.q_proj`, `adaln_modulation_*`), which also
# match the original Wan pattern, and `llm_adapter.` for the text conditioner.
ANIMA_NAMES = LoraSignature("Anima (ComfyUI / original Cosmos names)",
                            r"adaln_modulation_(self_attn|cross_attn|mlp)|llm_adapter\.|(self_attn|cross_attn)\.(q|k|v|output)_proj",
                            refines=WAN_ORIGINAL)
HIDREAM_NAMES = LoraSignature("HiDream", r"double_stream_blocks|single_stream_blocks")
ERNIE_IMAGE_NAMES = LoraSignature("ERNIE-Image", r"(^|\.)layers\.\d+\.(self_attention\.|mlp\.linear_fc2)")
# Nucleus-Image shares Qwen-Image's img_mlp/img_mod names; its per-block text projection and MoE layers are its own.
NUCLEUS_NAMES = LoraSignature("Nucleus-Image",
                              r"transformer_blocks\.\d+\.(encoder_proj|img_mlp\.(gate|shared_expert|experts))",
                              refines=QWEN_NAMES)
# F-Lite's `blocks.N.self_attn.` / `cross_attn.` match the original Wan names too; its fused qkv and context_kv mark it.
F_LITE_NAMES = LoraSignature("F-Lite", r"(^|\.)blocks\.\d+\.(self_attn\.qkv|cross_attn\.context_kv)",
                             refines=WAN_ORIGINAL)
HIDREAM_O1_NAMES = LoraSignature("HiDream-O1", r"diffusion_model\.language_model\.layers\.\d+\.|"
                                 r"(^|\.)(t_embedder1|x_embedder\.proj1|final_layer2)\.")
PRX_NAMES = LoraSignature("PRXPixel", r"(^|\.)blocks\.\d+\.attention\.(img_qkv_proj|txt_kv_proj)")
# Chroma Radiance: Chroma's original BFL names plus its pixel head (a whole-model LoRA adapts nerf_* too)
RADIANCE_NAMES = LoraSignature("Chroma Radiance (original names, NeRF pixel head)",
                               r"(^|\.)(nerf_blocks\.\d+\.|nerf_image_embedder\.|nerf_final_layer)", refines=BFL_NAMES)
KREA2_NAMES = LoraSignature("Krea 2", r"(^|\.)(blocks\.\d+\.attn\.wq|txtfusion\.|transformer_blocks\.\d+\.attn\.to_gate)")
# Boogu-Image shares OmniGen2's refiners and block internals (and so Lumina2's); its stream stacks are its own.
BOOGU_IMAGE_NAMES = LoraSignature("Boogu-Image", r"(^|\.)(double_stream_layers|single_stream_layers)\.\d+\.",
                                  refines=OMNIGEN2_NAMES)
# Ideogram 4 files share Z-Image's `layers.N.feed_forward.w1`; its fused `attention.qkv` and `adaln_modulation` (Z-Image:
# `adaLN_modulation`) mark them.
ACE_STEP_NAMES = LoraSignature("ACE-Step 1.5", r"(^|\.)decoder\.layers\.\d+\.(self_attn|cross_attn)\.[qkvo]_proj\.",
                                refines=ANIMA_NAMES)
IDEOGRAM4_NAMES = LoraSignature("Ideogram 4", r"(^|\.)layers\.\d+\.(attention\.qkv|adaln_modulation)\.|(^|\.)llm_cond_proj\.",
                                refines=ZIMAGE_NAMES)
# Zeta-Chroma's transformer blocks have Z-Image's names (and, in the real models, shapes): a file of `layers.N` modules
# only (ai-toolkit's default) cannot be told apart; its DCT pixel head (`dec_net.`) marks a whole-model file.
ZETA_CHROMA_NAMES = LoraSignature("Zeta-Chroma", r"(^|\.)dec_net\.", refines=ZIMAGE_NAMES)
# MiniMax-H3: original names (fused attn.qkv_proj, adaln_proj in every block, the text token refiner) or diffusers'.
MINIMAX_H3_NAMES = LoraSignature("MiniMax-H3", r"(^|\.)(blocks\.\d+\.(attn\.qkv_proj|adaln_proj\.linear)|"
                                 r"token_refiner\.(blocks|refiner_blocks)\.\d+\.|transformer_blocks\.\d+\.adaln_proj\.)")


def lora_signatures() -> list[LoraSignature]:
    """Every family's signatures, once each, in registry order."""
    return list(OrderedDict.fromkeys(s for spec in REGISTRY.values() for s in spec.lora_signatures))


# ------------------------------------------------------------------------------------------------------- presets
def _flow(config: Mapping[str, Any]) -> SchedulerSpec:
    return SchedulerSpec("FlowMatchEulerDiscreteScheduler", config)


_FLUX_NOTES = (
    "FLUX.1 is guidance-distilled: `guidance` feeds the guidance embedding (one forward per step) and the negative "
    "prompt has no effect, exactly as in ai-toolkit's previews."
)
FLUX1 = Preset(family="flux:FluxFamilyPipeline", pipeline_class="FluxPipeline", steps=25, guidance=4.0, divisor=16,
               scheduler=_flow(FLUX_FLOWMATCH), guidance_kind="distilled", tiny="flux:build_flux",
               lora_signatures=(FLUX1_NAMES,), notes=_FLUX_NOTES)

SD = Preset(family="stable_diffusion:StableDiffusionFamilyPipeline", steps=30, guidance=6.0, divisor=8,
            scheduler=SchedulerSpec("DDPMScheduler", SD_DDPM), guidance_kind="cfg")

# ai-toolkit's legacy archs without a UI preset or example config sample with SampleConfig's defaults
# (toolkit/config_modules.py): 20 steps, guidance 7, 512x512, sampler `ddpm`.
SAMPLE_CONFIG_DEFAULTS = {"steps": 20, "guidance": 7.0, "width": 512, "height": 512}
_LEGACY_DEFAULTS_NOTE = (
    " Defaults are ai-toolkit's SampleConfig defaults (20 steps, guidance 7, 512x512): it has no UI preset or example "
    "config for this arch."
)
_SEGMIND_NOTES = (
    "A distilled SDXL UNet, sampled exactly as `sdxl` (ai-toolkit loads it through its SDXL branch). In ai-toolkit "
    "0.12.26 only a job with the legacy flags `is_xl: true` plus `is_{}: true` samples (its arch then resolves to sdxl); "
    "`arch: {}` alone fails at its first preview (ai-toolkit builds an SD 1.x pipeline with both text encoders). Kohya LoRAs with diffusers module names, as ai-toolkit "
    "writes them when its keymap files are missing; with toolkit/keymaps present it writes original (LDM) names, "
    "which do not load here." + _LEGACY_DEFAULTS_NOTE
)
PIXART = Preset(family="pixart:PixArtFamilyPipeline", scheduler=SchedulerSpec("DDPMScheduler", PIXART_DDPM), divisor=8,
                lora_signatures=(PIXART_NAMES,), **SAMPLE_CONFIG_DEFAULTS)

_QWEN_NOTES = (
    "Guidance is true CFG (`true_cfg_scale`) with the negative prompt; an empty negative is encoded, as ai-toolkit does. "
    "Divisor 32 as ai-toolkit samples (the reference uses 16)."
)
_QWEN_EDIT_PLUS_NOTES = (
    "1 to 3 control images (ctrl_img_1..3), passed to the pipeline as they are; prompt and negative are encoded with "
    "them (at about 384x384) as ai-toolkit does. True CFG u + g(c - u) WITHOUT diffusers' norm rescale (ai-toolkit "
    "do_cfg_norm: false). Divisor 32."
)
QWEN = Preset(family="qwen_image:QwenImageFamilyPipeline", pipeline_class="QwenImagePipeline", steps=25, guidance=4.0,
              divisor=32, scheduler=_flow(QWEN_FLOWMATCH), guidance_kind="true_cfg", tiny="qwen_image:build_qwen_image",
              aitk_archs=(AitkArch("qwen_image"),), lora_signatures=(QWEN_NAMES,), notes=_QWEN_NOTES)
QWEN_EDIT_PLUS = QWEN.derive(family="qwen_image:QwenImageEditPlusFamilyPipeline",
                             pipeline_class="QwenImageEditPlusPipeline", control_images=(1, 3),
                             tiny="qwen_image:build_qwen_image_edit_plus", notes=_QWEN_EDIT_PLUS_NOTES)

_ZIMAGE_NOTES = (
    "Guidance is standard CFG: ai-toolkit passes max(0, guidance - 1) to diffusers' ZImagePipeline (4 -> 3, 1 -> 0 = "
    "no CFG). FlowMatch Euler static shift 3.0; divisor 16 as ai-toolkit samples (the reference uses 32)."
)
ZIMAGE = Preset(family="zimage:ZImageFamilyPipeline", pipeline_class="ZImagePipeline", steps=30, guidance=4.0,
                divisor=16, scheduler=_flow(ZIMAGE_FLOWMATCH), tiny="zimage:build_zimage",
                lora_signatures=(ZIMAGE_NAMES,), notes=_ZIMAGE_NOTES)

_FLUX2_NOTES = (
    "Sampled with BFL's schedule as ai-toolkit does: t = linspace(1, 0, N+1) time-shifted with mu interpolated from "
    "the packed sequence length (256 -> 0.5, 4096 -> 1.15), Euler steps; the stock pipeline's empirical mu is not "
    "used. Up to 3 reference images (control_images) become reference tokens. LoRAs with original BFL names "
    "(double_blocks.N.img_attn.qkv, single_blocks.N.linear1, ...) load; fused qkv is split for diffusers."
)
_KLEIN_NOTES = (
    " klein is not guidance-distilled: guidance above 1 is real CFG u + g(c - u) with the negative prompt "
    "(empty by default, encoded)."
)
FLUX2 = Preset(family="flux2:Flux2FamilyPipeline", pipeline_class="Flux2Pipeline", steps=25, guidance=4.0, divisor=16,
               scheduler=_flow(FLUX2_EULER), guidance_kind="distilled", control_images=(0, 3), tiny="flux2:build_flux2",
               lora_signatures=(BFL_NAMES,))
FLUX2_DEV = FLUX2.derive(base="black-forest-labs/FLUX.2-dev", options=Flux2Options(text_encoder_out_layers=(10, 20, 30)),
                         notes=_FLUX2_NOTES + " FLUX.2-dev is guidance-distilled: `guidance` feeds the guidance embedding "
                         "and the negative prompt has no effect.")
FLUX2_KLEIN = FLUX2.derive(pipeline_class="Flux2KleinPipeline", guidance_kind="true_cfg",
                           tiny="flux2:build_flux2_klein", options=Flux2Options(text_encoder_out_layers=(9, 18, 27)),
                           notes=_FLUX2_NOTES + _KLEIN_NOTES)

_WAN_COMMON = (
    "FlowMatch Euler with static shift {} as ai-toolkit samples (the reference uses UniPC), true CFG with the negative "
    "prompt, UMT5 prompts up to 512 tokens, frames snapped to 4k+1, written as H.264 MP4. LoRAs in original Wan names "
    "(blocks.N.self_attn.q, cross_attn.o, ffn.0...) are renamed to diffusers'."
)
_WAN_I2V_RESIZE = " The control image (required) is resized with LANCZOS to the target size, as ai-toolkit does."
_WAN21_NOTES = _WAN_COMMON.format("3.0")
_WAN21_I2V_NOTES = _WAN21_NOTES + _WAN_I2V_RESIZE + " Image cross-attention from the CLIP vision encoder (k_img/v_img LoRA keys)."
_WAN22_MOE_NOTES = _WAN_COMMON.format("5.0") + (
    " Two experts: transformer (high noise) runs while t >= 875, transformer_2 (low noise) after, for T2V and I2V alike "
    "(ai-toolkit's boundary 0.875; the I2V checkpoint says 0.9), guidance_scale_2 = guidance. LoRAs: side high/low "
    "(*_high_noise / *_low_noise files are recognised by name) or one combined transformer_1/transformer_2 file; a "
    "missing side means nothing is applied to that expert."
)
_WAN22_5B_NOTES = _WAN_COMMON.format("5.0") + (
    " Divisor 32 (16x VAE x 2x2 patches). Defaults are ai-toolkit's UI preset for this model: 121 frames at 24 fps, "
    "768x768 (the reference uses 41 at 16). An optional control image becomes first-frame conditioning "
    "(diffusers' WanImageToVideoPipeline with expand_timesteps)."
)
WAN21 = Preset(family="wan:WanFamilyPipeline", pipeline_class="WanPipeline", steps=25, guidance=4.0, divisor=16,
               scheduler=_flow(WAN21_FLOWMATCH), video=VideoSpec(num_frames=41, fps=16, frame_step=4),
               tiny="wan:build_wan21_t2v", lora_signatures=(WAN_ORIGINAL, WAN_DIFFUSERS), notes=_WAN21_NOTES)
WAN21_I2V = WAN21.derive(pipeline_class="WanImageToVideoPipeline", control_images=(1, 1), tiny="wan:build_wan21_i2v",
                         aitk_archs=(AitkArch("wan21_i2v"),), notes=_WAN21_I2V_NOTES)
WAN22_A14B = WAN21.derive(scheduler=_flow(WAN22_FLOWMATCH), experts=Experts(boundary_ratio=0.875),
                          lora_signatures=(WAN_COMBINED, WAN_ORIGINAL, WAN_DIFFUSERS), notes=_WAN22_MOE_NOTES)

_LTX2_NOTES = (
    "Video with audio (MP4 with the audio track). FlowMatch Euler with LTX-2's exponential shift at mu 2.05 whatever "
    "the size (ai-toolkit's pinned diffusers computes it at 4096 tokens), terminal 0.1, true CFG with the negative "
    "prompt, divisor 32, frames 8k+1. An optional control image (LANCZOS-resized to the target size, not "
    "re-compressed) makes it image-to-video. LoRAs in original LTX names load."
)
LTX2 = Preset(family="ltx2:LTX2FamilyPipeline", pipeline_class="LTX2Pipeline", steps=25, guidance=4.0, divisor=32,
              scheduler=_flow(LTX2_PREVIEW_FLOWMATCH), guidance_kind="true_cfg", control_images=(0, 1),
              video=VideoSpec(num_frames=41, fps=24, frame_step=8, preview_format="mp4"), lora_signatures=(LTX2_NAMES,))

_MINIMAX_H3_NOTES = (
    "Video with stereo 32 kHz audio, one guidance-distilled forward per step (guidance and the negative prompt have no "
    "effect). ai-toolkit's own sampler reproduced over diffusers' MiniMax-H3 classes: steps model evaluations on "
    "linspace(1, 0, steps + 1) shifted by 12.0 (video), the audio sigmas remapped onto shift 3.0; noise drawn "
    "condition, video (1, 24, t, h, w), audio (1, 2, 32, a); raw Qwen3-VL prompt (hidden state 50, 512 caption "
    "tokens). Frames floored to 17n+5 (at least 22), 24 fps only, divisor 32. Defaults are ai-toolkit's UI preset "
    "(28 steps, guidance 1, 107 frames at 24 fps, 768x768). LoRAs: diffusion_model. + original names (fused QKV split, "
    "SwiGLU halves swapped) or diffusers names. Loads the bf16 originals (MiniMaxAI/MiniMax-H3) or, with "
    "base=Comfy-Org/MiniMax-H3 or a folder of its files, the ComfyUI repack ai-toolkit loads by default (int8 "
    "ConvRot transformer, pruned or full; nvfp4-AWQ 50-layer text encoder; renamed VAEs), dequantized at load."
)
MINIMAX_H3 = Preset(family="minimax_h3:MiniMaxH3FamilyPipeline", pipeline_class="MiniMaxH3ModularPipeline",
                    base="MiniMaxAI/MiniMax-H3", steps=28, guidance=1.0, width=768, height=768, divisor=32,
                    guidance_kind="distilled",
                    video=VideoSpec(num_frames=107, fps=24, frame_step=17, frame_offset=5, preview_format="mp4"),
                    lora_signatures=(MINIMAX_H3_NAMES,))

HIDREAM = Preset(family="hidream:HiDreamFamilyPipeline", pipeline_class="HiDreamImagePipeline", guidance=5.0,
                 divisor=16, lora_signatures=(HIDREAM_NAMES,),
                 options=HiDreamOptions(llama="unsloth/Meta-Llama-3.1-8B-Instruct"))

_KREA2_NOTES = (
    "ai-toolkit's own Krea 2 sampler on diffusers' Krea2Transformer2DModel: Euler on t = linspace(1, 0, N+1) "
    "time-shifted with mu linear in image tokens (256 -> 0.5, 6400 -> 1.15) for Raw and Turbo alike (option "
    "`schedule_mu` pins it, as the job's model_kwargs.schedule_mu does); real CFG u + g(c - u) with the encoded negative "
    "above guidance 1 (diffusers' guidance_scale gets g - 1); prompts at natural length, up to 512 tokens plus the "
    "assistant suffix; float32 latents. LoRAs and LoKr with original Krea names (diffusion_model.blocks.N.attn.wq, "
    "text-fusion blocks included) load."
)
_KREA2_EDIT_NOTES = (
    " Up to 3 reference images (at least 1): a <=384x384 copy (bicubic, antialias) goes into the Qwen3-VL prompt, and "
    "VAE latents (at most 1 MP, or the target's area with `match_target_res`, default on as in ai-toolkit's o_edit "
    "preset; /16, bilinear) follow the image tokens at t = 0. `kv_cache` (default on, the preset's) keeps the "
    "reference tokens attending only to each other, their keys and values computed once."
)
# Defaults from ai-toolkit's UI presets (ui/src/app/jobs/new/options.ts): `krea2` and `krea2:o_edit` set no sample
# values, so the UI's 25 steps / guidance 4 apply; `krea2:turbo` 9 / 1; `krea2:o_edit_turbo` 8 / 1; both o_edit presets
# set model_kwargs edit, kv_cache and match_target_res to true.
KREA2 = Preset(family="krea2:Krea2FamilyPipeline", pipeline_class="Krea2Pipeline", base="krea/Krea-2-Raw", steps=25,
               guidance=4.0, divisor=16, tiny="krea2:build_krea2", lora_signatures=(KREA2_NAMES,),
               options=Krea2Options(), notes=_KREA2_NOTES)
KREA2_EDIT = KREA2.derive(control_images=(1, 3), tiny="krea2:build_krea2_edit",
                          options=Krea2Options(edit=True, vision_processor="Qwen/Qwen3-VL-4B-Instruct", kv_cache=True,
                                               match_target_res=True),
                          notes=_KREA2_NOTES + _KREA2_EDIT_NOTES)

_BOOGU_NOTES = (
    "Our own Boogu-Image pipeline and transformer (diffusers has none; checkpoint weight names kept), sampling as "
    "ai-toolkit's own sampler does: Euler on t = i/N (0 = noise) time-shifted with mu linear in patch tokens (256 -> "
    "0.5, 4096 -> 1.15); real CFG u + g(c - u) with the encoded negative prompt above guidance 1; Qwen3-VL prompts "
    "(last hidden state, Boogu's system prompt, chat template) at natural length up to 1024 tokens; float32 noise "
    "and latents. Divisor 16. Defaults are ai-toolkit's UI default sample settings (25 steps, guidance 4, 1024x1024). "
    "LoRAs and LoKr: diffusion_model. + the checkpoint's module names."
)
_BOOGU_EDIT_NOTES = (
    " Edit: 1 to 3 reference images (required), each given to Qwen3-VL (prompt and negative, with the edit system "
    "prompt) as a copy within 384x384 pixels of area and 768 a side (/16, bicubic, antialias) and to the transformer "
    "as VAE latents at most 1 MP (`match_target_res`: the target's area), /16, bilinear, a posterior sample."
)
# Defaults: ai-toolkit's UI default job sample settings (25 steps, guidance 4, 1024x1024); the snapshot of ai-toolkit we
# read has no UI presets for Boogu (its ui/ folder is not part of it) and the model classes set no sample values.
BOOGU_IMAGE = Preset(family="boogu_image:BooguImageFamilyPipeline", pipeline_class="BooguImagePipeline", steps=25,
                     guidance=4.0, divisor=16, lora_signatures=(BOOGU_IMAGE_NAMES,))
_MAGEFLOW_NOTES = (
    "ai-toolkit's own Mage-Flow sampler on our implementation of its transformer and MageVAE: Euler on sigmas "
    "linspace(1, 1/N, N) with static shift 6.0 (option `static_shift`) and a final 0; real CFG u + g(c - u) with the "
    "encoded negative above guidance 1, optionally renormalised to the conditional velocity's norm (option "
    "`cfg_renormalization`, ai-toolkit's model_kwargs, off by default); Qwen3-VL prompts at natural length in "
    "Mage-Flow's system template, system tokens dropped; float32 latents. Defaults are "
    "ai-toolkit's UI defaults (25 steps, guidance 4, 1024x1024), divisor 16. LoRAs and LoKr: diffusion_model. + the "
    "transformer's names, which are Qwen-Image's block names (a Mage-Flow LoRA also fits Qwen-Image's first 12 "
    "blocks, so a foreign-LoRA message names Qwen-Image)."
)
_MAGEFLOW_EDIT_NOTES = (
    " 1 to 3 reference images: a copy with a long edge of at most 384 (bicubic) goes into the Qwen3-VL prompt (edit "
    "template; the negative is encoded with the same images), and VAE latents at the target's area (own aspect, /16, "
    "bicubic with antialias, posterior sample seeded with the image's seed on the model's device) follow the target "
    "tokens in both CFG passes."
)
MAGEFLOW = Preset(family="mageflow:MageFlowFamilyPipeline", pipeline_class="MageFlowPipeline",
                  base="microsoft/Mage-Flow-Base", steps=25, guidance=4.0, divisor=16, tiny="mageflow:build_mageflow",
                  lora_signatures=(QWEN_NAMES,), options=MageFlowOptions(), notes=_MAGEFLOW_NOTES)
# ACE-Step 1.5 (audio only): ai-toolkit's audio UI preset (defaultAudioSampleConfig: 30 steps, guidance 4, seed 42; its
# width/height are unused) and its own sampling loop (families/ace_step.py). Both ids load the publisher's ComfyUI
# all-in-one file ai-toolkit's UI names (ostris/ace_step_1.5_ComfyUI_files).
ACE_STEP = Preset(
    family="ace_step:AceStepFamilyPipeline", pipeline_class="AceStepPipeline", base="ostris/ace_step_1.5_ComfyUI_files",
    steps=30, guidance=4.0, divisor=8, tiny="ace_step:build_ace_step", lora_signatures=(ACE_STEP_NAMES,),
    unconditional_is_negative=False, audio_only=True,
    notes="Audio only (48 kHz stereo; no image). ai-toolkit's own loop around diffusers' ACE-Step classes: the prompt "
    "is ai-toolkit's tagged sample prompt (<CAPTION>, <LYRICS>, <BPM>, <DURATION>, <LANGUAGE>; a prompt without tags "
    "is the caption; the metas always say key C and time signature 4/4 as ai-toolkit's sampler writes them), "
    "sigmas linspace(1, 0, N+1)[:-1] shifted by 3.0, plain CFG u + g(c - u) above guidance 1 with the learned null "
    "condition (the negative prompt has no effect), int(25 * duration) latent frames with ai-toolkit's fixed silence "
    "latent as context, no loudness normalisation. Loads the ComfyUI all-in-one file. LoRAs: diffusion_model.decoder. "
    "+ ComfyUI names (PEFT or LoKr) on the DiT's attention and MLP Linears.",
)

# ------------------------------------------------------------------------------------------------------ registry
REGISTRY: "OrderedDict[str, ModelSpec]" = OrderedDict(
    (spec.model_id, spec)
    for spec in [
        FLUX1("flux", base="black-forest-labs/FLUX.1-dev", aitk_archs=(AitkArch("flux"),)),
        FLUX1("flex1", base="ostris/Flex.1-alpha", lora_mode="fused",
              aitk_archs=(AitkArch("flex1"), AitkArch("flux", "flex.1")),
              notes="Flex.1-alpha runs as FLUX.1 (ai-toolkit aliases arch flex1 to flux). " + _FLUX_NOTES),
        FLUX1("flux_kontext", pipeline_class="FluxKontextPipeline", base="black-forest-labs/FLUX.1-Kontext-dev",
              control_images=(1, 1), tiny="flux:build_flux_kontext", aitk_archs=(AitkArch("flux_kontext"),),
              notes="The control image is resized (bilinear) to the target size and passed with max_area = "
              "width*height and no auto-resize, as ai-toolkit does. " + _FLUX_NOTES),
        FLUX1("flex2", family="flex2:Flex2FamilyPipeline", pipeline_class="Flex2Pipeline", base="ostris/Flex.2-preview",
              lora_mode="fused", control_images=(0, 1), tiny="flex2:build_flex2", aitk_archs=(AitkArch("flex2"),),
              notes="Our own Flex.2 pipeline (no hub remote code). Divisor 16 as ai-toolkit samples (the reference "
              "uses 32). The optional control image is encoded as Flex.2's control latent; without it the control "
              "channels are zero. " + _FLUX_NOTES),
        SD("sd15", pipeline_class="StableDiffusionPipeline", base="stable-diffusion-v1-5/stable-diffusion-v1-5",
           width=512, height=512, lora_components=("unet", "text_encoder"), tiny="stable_diffusion:build_sd15",
           aitk_archs=(AitkArch("sd1"),), lora_signatures=(KOHYA_SD15,),
           scheduler=SchedulerSpec("DDPMScheduler", SD15_DDPM),
           notes="Sampled with ai-toolkit's DDPM (steps_offset 1, as its SD 1.x pipeline sets it; stochastic: "
           "per-step noise from the seeded CPU generator), real CFG with the negative prompt, safety checker off. "
           "Defaults are ai-toolkit's SD 1.5 "
           "preset (512x512, 30 steps, guidance 6). Kohya LoRAs (lora_unet_*, lora_te_*, LoCon convs) load with "
           "scale alpha/rank."),
        SD("sd2", pipeline_class="StableDiffusionPipeline", base="stabilityai/stable-diffusion-2-1",
           lora_components=("unet", "text_encoder"), tiny="stable_diffusion:build_sd2",
           aitk_archs=(AitkArch("sd2"),), lora_signatures=(KOHYA_SD15,),
           scheduler=SchedulerSpec("DDPMScheduler", SD15_DDPM), options=StableDiffusionOptions(v_prediction=True),
           **SAMPLE_CONFIG_DEFAULTS,
           notes="Sampled as SD 1.5: ai-toolkit's DDPM (steps_offset 1, stochastic), real CFG with the negative "
           "prompt, safety checker off. v-prediction (the 768-pixel 2.x checkpoints) comes from the job's "
           "model.is_v_pred only (ai-toolkit's default: false, epsilon); here the option `v_prediction`, default on "
           "for stabilityai/stable-diffusion-2-1, and `reproduce` passes the job's flag. Kohya LoRAs (lora_unet_*, "
           "lora_te_*) load with scale alpha/rank." + _LEGACY_DEFAULTS_NOTE),
        SD("sdxl", pipeline_class="StableDiffusionXLPipeline", base="stabilityai/stable-diffusion-xl-base-1.0",
           lora_components=("unet", "text_encoder", "text_encoder_2"), tiny="stable_diffusion:build_sdxl",
           aitk_archs=(AitkArch("sdxl"),), lora_signatures=(KOHYA_SDXL,),
           notes="Sampled with ai-toolkit's DDPM (steps_offset 0, stochastic), real CFG, guidance_rescale 0, "
           "watermark off. An empty negative prompt is ENCODED as ai-toolkit does (diffusers' zeroed empty negative "
           "is switched off). Defaults are ai-toolkit's SDXL preset (1024x1024, 30 steps, guidance 6). Kohya LoRAs "
           "(lora_unet_*, lora_te1_*/lora_te2_*, LoCon convs) load with scale alpha/rank."),
        SD("ssd", pipeline_class="StableDiffusionXLPipeline", base="segmind/SSD-1B",
           lora_components=("unet", "text_encoder", "text_encoder_2"), tiny="stable_diffusion:build_ssd",
           aitk_archs=(AitkArch("ssd"), AitkArch("sdxl", "ssd-1b")), lora_signatures=(KOHYA_SDXL,),
           **SAMPLE_CONFIG_DEFAULTS, notes=_SEGMIND_NOTES.format("ssd", "ssd")),
        SD("vega", pipeline_class="StableDiffusionXLPipeline", base="segmind/Segmind-Vega",
           lora_components=("unet", "text_encoder", "text_encoder_2"), tiny="stable_diffusion:build_vega",
           aitk_archs=(AitkArch("vega"), AitkArch("sdxl", "vega")), lora_signatures=(KOHYA_SDXL,),
           **SAMPLE_CONFIG_DEFAULTS, notes=_SEGMIND_NOTES.format("vega", "vega")),
        QWEN("qwen_image", base="Qwen/Qwen-Image"),
        QWEN("qwen_image_2512", base="Qwen/Qwen-Image-2512", lora_mode="fused",
             aitk_archs=(AitkArch("qwen_image", "2512"),)),
        QWEN("qwen_image_edit", family="qwen_image:QwenImageEditFamilyPipeline", pipeline_class="QwenImageEditPipeline",
             base="Qwen/Qwen-Image-Edit", control_images=(1, 1), tiny="qwen_image:build_qwen_image_edit",
             aitk_archs=(AitkArch("qwen_image_edit"),),
             notes=_QWEN_NOTES + " One control image (required), resized bilinear to the output size for the VAE; "
             "prompt and negative are encoded with it (at about 1 MP) as ai-toolkit does. Stock CFG norm rescale."),
        QWEN_EDIT_PLUS("qwen_image_edit_plus", base="Qwen/Qwen-Image-Edit-2509",
                       aitk_archs=(AitkArch("qwen_image_edit_plus"),)),
        QWEN_EDIT_PLUS("qwen_image_edit_plus_2511", base="Qwen/Qwen-Image-Edit-2511", lora_mode="fused",
                       aitk_archs=(AitkArch("qwen_image_edit_plus", "2511"),)),
        ZIMAGE("zimage", base="Tongyi-MAI/Z-Image", aitk_archs=(AitkArch("zimage"),)),
        ZIMAGE("zimage_turbo", base="Tongyi-MAI/Z-Image-Turbo", steps=8, guidance=1.0,
               aitk_archs=(AitkArch("zimage", "turbo"),),
               notes="At the default guidance 1.0 CFG is off and the negative prompt has no effect. " + _ZIMAGE_NOTES),
        ZIMAGE("zimage_deturbo", base="Tongyi-MAI/Z-Image-Turbo", steps=25, guidance=3.0,
               tiny="zimage:build_zimage_deturbo", aitk_archs=(AitkArch("zimage", "de-turbo"),),
               options=ZImageOptions(transformer="ostris/Z-Image-De-Turbo"),
               notes="Text encoder, tokenizer and VAE come from `base` (Z-Image-Turbo); the transformer from "
               "ostris/Z-Image-De-Turbo, or from `<base>/de_turbo_transformer` when a local base folder has one. "
               + _ZIMAGE_NOTES),
        ZIMAGE("zimage_l2p", family="zimage_l2p:ZImageL2PFamilyPipeline", pipeline_class="ZImageL2PPipeline",
               base="zhen-nan/L2P", tiny="zimage_l2p:build_zimage_l2p", aitk_archs=(AitkArch("zimage_l2p"),),
               options=ZImageL2POptions(extras="Tongyi-MAI/Z-Image-Turbo",
                                        checkpoint_file="model-1k-merge.safetensors"),
               notes="Pixel space (no VAE): Z-Image's transformer embeds 16x16 RGB patches and a small U-Net "
               "(local_decoder) turns its image tokens and the noisy image into the prediction; the loop is "
               "ZImagePipeline's on [-1, 1] pixels, initial noise randn(1, 3, H, W) in float32. The transformer comes "
               "from the base's single file model-1k-merge.safetensors, the text encoder and tokenizer from "
               "Tongyi-MAI/Z-Image-Turbo, as ai-toolkit loads them. Defaults are Z-Image's (ai-toolkit has no L2P "
               "preset). LoRAs: diffusion_model. + Z-Image names (the main layers only), so Z-Image LoRAs fit too. "
               + _ZIMAGE_NOTES),
        ModelSpec(
            model_id="lumina2", family="lumina2:Lumina2FamilyPipeline", pipeline_class="Lumina2Pipeline",
            base="Alpha-VLLM/Lumina-Image-2.0", steps=25, guidance=4.0, divisor=16,
            scheduler=_flow(LUMINA2_FLOWMATCH), tiny="lumina2:build_lumina2", aitk_archs=(AitkArch("lumina2"),),
            lora_signatures=(LUMINA2_NAMES,),
            notes="FlowMatch Euler with the unshifted sigmas ai-toolkit's previews use (its lumina2_config names "
            "shift 6.0, which its scheduler construction drops), real CFG with the negative prompt, Gemma2 prompts up "
            "to 256 tokens. Divisor 16 (the pipeline's own check; the reference uses 32).",
        ),
        ModelSpec(
            model_id="omnigen2", family="omnigen2:OmniGen2FamilyPipeline", pipeline_class="OmniGen2Pipeline",
            base="OmniGen2/OmniGen2", steps=25, guidance=4.0, divisor=16,
            # OmniGen2's own Euler (pipelines/families/omnigen2.py), not a diffusers class: shift sqrt(latent pixels) / 40
            scheduler=SchedulerSpec("OmniFlowMatchEulerScheduler", {"num_train_timesteps": 1000,
                                                                    "dynamic_time_shift": True}),
            control_images=(0, 3), tiny="omnigen2:build_omnigen2", aitk_archs=(AitkArch("omnigen2"),),
            lora_signatures=(OMNIGEN2_NAMES,),
            notes="Our own OmniGen2 pipeline and transformer (diffusers has none; checkpoint weight names kept). "
            "`guidance` is the text guidance: real CFG against the negative prompt without the input images; image "
            "guidance fixed at 1.0. The Qwen2.5-VL chat template is applied twice, as ai-toolkit trains and samples. "
            "Up to 3 input images (control_images), resized to the target size then VAE-encoded as reference "
            "tokens. OmniGen2's Euler with the resolution-dependent time shift. LoRAs with diffusion_model. keys "
            "load with their alpha.",
        ),
        FLUX2_DEV("flux2", aitk_archs=(AitkArch("flux2"),)),
        # The reference implementation's id for FLUX.2-dev through diffusers: the same model, sampled as `flux2` is.
        FLUX2_DEV("flux2_diffusers", aitk_archs=(),
                  notes="The reference implementation's id for FLUX.2-dev, kept so that its requests and workflows run: "
                  "the same pipeline and sampling as `flux2` (ai-toolkit's jobs map to `flux2`). " + FLUX2_DEV.fields["notes"]),
        FLUX2_KLEIN("flux2_klein_4b", base="black-forest-labs/FLUX.2-klein-base-4B",
                    aitk_archs=(AitkArch("flux2_klein_4b"),)),
        FLUX2_KLEIN("flux2_klein_9b", base="black-forest-labs/FLUX.2-klein-base-9B",
                    aitk_archs=(AitkArch("flux2_klein_9b"),)),
        FLUX1("chroma", family="chroma:ChromaFamilyPipeline", pipeline_class="ChromaPipeline",
              base="lodestones/Chroma1-Base", guidance_kind="true_cfg",
              tiny="chroma:build_chroma", aitk_archs=(AitkArch("chroma"),), lora_signatures=(BFL_NAMES,),
              notes="Real CFG above guidance 1 with the guidance input fixed at 0, the unconditional pass encoding the "
              "negative prompt (empty by default), as ai-toolkit's previews do. T5 "
              "runs without its attention mask (ai-toolkit); the transformer masks padding except one token. "
              "FlowMatch Euler, dynamic shift (0.5..1.15), sigmas linspace(1, 1/N, N). LoRAs with original BFL names "
              "load (fused qkv and linear1 are split). Divisor 16 (the reference uses 32)."),
        WAN21("wan21_1b", base="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", aitk_archs=(AitkArch("wan21", "1.3b"),)),
        WAN21("wan21_14b", base="Wan-AI/Wan2.1-T2V-14B-Diffusers", aitk_archs=(AitkArch("wan21"),)),
        WAN21_I2V("wan21_i2v_14b", base="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"),
        WAN21_I2V("wan21_i2v_14b480p", base="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                  aitk_archs=(AitkArch("wan21_i2v", "480p"),)),
        WAN22_A14B("wan22_14b_t2v", base="Wan-AI/Wan2.2-T2V-A14B-Diffusers", tiny="wan:build_wan22_14b_t2v",
                   aitk_archs=(AitkArch("wan22_14b"),)),
        WAN22_A14B("wan22_14b_i2v", pipeline_class="WanImageToVideoPipeline", base="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                   control_images=(1, 1), tiny="wan:build_wan22_14b_i2v", aitk_archs=(AitkArch("wan22_14b_i2v"),),
                   options=WanOptions(sample_first_frame=True),
                   notes=_WAN22_MOE_NOTES + _WAN_I2V_RESIZE + " Its latent is a draw from the VAE posterior made "
                   "after the initial noise, as ai-toolkit's previews make it (diffusers takes the posterior mode)."),
        WAN21("wan22_5b", base="Wan-AI/Wan2.2-TI2V-5B-Diffusers", divisor=32, width=768, height=768,
              scheduler=_flow(WAN22_FLOWMATCH), control_images=(0, 1),
              video=VideoSpec(num_frames=121, fps=24, frame_step=4), tiny="wan:build_wan22_5b",
              aitk_archs=(AitkArch("wan22_5b"),), options=WanOptions(expand_timesteps=True), notes=_WAN22_5B_NOTES),
        LTX2("ltx2", base="Lightricks/LTX-2", tiny="ltx2:build_ltx2", aitk_archs=(AitkArch("ltx2"),),
             options=LTX2Options(guidance=LTX20_GUIDANCE),
             notes=_LTX2_NOTES + " LTX-2.0: plain true CFG (no STG or modality guidance), as ai-toolkit samples it."),
        LTX2("ltx2.3", base="dg845/LTX-2.3-Diffusers", tiny="ltx2:build_ltx23", aitk_archs=(AitkArch("ltx2.3"),),
             options=LTX2Options(guidance=LTX23_GUIDANCE, stg_reference_depth=48, high=LTX23_HIGH_RESOLUTION),
             lora_pass_sides=(LTX2_REFINE_LORA_SIDE,),
             notes=_LTX2_NOTES + " LTX-2.3: ai-toolkit's guidance extras (STG at block 28, modality guidance 3.0, "
             "guidance rescale 0.7, audio guidance 7.0, cross-modality timesteps). Option resolution='high': the "
             "reference implementation's High mode (stage 1 at half the size with plain CFG, 2x latent upsampler "
             "dg845/LTX-2.3-Spatial-Upsampler-Diffusers, 3 refine steps at guidance 1 with the distilled LoRA "
             "CalamitousFelicitousness/LTX-2.3-distilled-lora-384-Diffusers at 0.8 beside the user's); width and "
             "height are the output size, multiples of 64."),
        LTX2("ltx2.5", base="Lightricks/LTX-2.5", tiny="ltx2:build_ltx25", aitk_archs=(AitkArch("ltx2.5"),),
             width=768, height=768, video=VideoSpec(num_frames=121, fps=24, frame_step=8, preview_format="mp4"),
             options=LTX2Options(guidance=LTX23_GUIDANCE, stg_reference_depth=48, comfy_files=LTX25_COMFY_FILES),
             notes=_LTX2_NOTES + " LTX-2.5: sampled exactly as LTX-2.3 (ai-toolkit shares the code path); the "
             "transformer has no video feed-forward biases and the text encoder is Gemma-4 12B; mu is 2.05 at every size and "
             "the control image is not re-compressed, as with ai-toolkit's pinned diffusers. Loads the ComfyUI single "
             "files Lightricks/LTX-2.5 publishes (int8 ConvRot transformer and Gemma-4 text encoder, dequantized; "
             "conv VAE; audio VAE and vocoder), from the hub or a folder holding them, or a diffusers folder."),
        HIDREAM("hidream", base="HiDream-ai/HiDream-I1-Full", steps=50, scheduler=SchedulerSpec("UniPCMultistepScheduler",
                HIDREAM_UNIPC), tiny="hidream:build_hidream", aitk_archs=(AitkArch("hidream"),),
                notes="ai-toolkit's FlowUniPC schedule (UniPC on its shift-3.0 grid, shifted by exp(mu), mu = 1.15 "
                "for HiDream-I1's 4096 tokens), true CFG with the encoded negative prompt, 128-token prompts for "
                "CLIP-L, CLIP-G, T5 and Llama-3.1 (loaded from unsloth/Meta-Llama-3.1-8B-Instruct). Any size is "
                "rescaled to the 1024x1024 area (aspect kept, floored to 16) as ai-toolkit's pipeline does. LoRAs: "
                "diffusion_model. + diffusers names, alpha honoured."),
        HIDREAM("hidream_e1", base="HiDream-ai/HiDream-E1-1", steps=28,
                scheduler=SchedulerSpec("UniPCMultistepScheduler", HIDREAM_E1_UNIPC), control_images=(1, 1),
                tiny="hidream:build_hidream_e1", aitk_archs=(AitkArch("hidream_e1"),),
                notes="Our own editing loop around diffusers' HiDream transformer (diffusers has no E1 pipeline). The "
                "control image (required) is resized BILINEAR to the target size and appended to the latent along "
                "the width. Three-pass guidance with ai-toolkit's norm clipping; image guidance 2.0, the value "
                "ai-toolkit's previews get (`image_guidance` overrides it). FlowUniPC schedule, shift 3.0. LoRAs: "
                "diffusion_model. + diffusers names, alpha honoured."),
        ModelSpec(
            model_id="cogview4", family="cogview4:CogView4FamilyPipeline", pipeline_class="CogView4Pipeline",
            base="THUDM/CogView4-6B", steps=50, guidance=5.0, divisor=16,
            scheduler=_flow(COGVIEW4_FLOWMATCH), tiny="cogview4:build_cogview4", aitk_archs=(AitkArch("cogview4"),),
            lora_signatures=(COGVIEW4_NAMES,),
            notes="ai-toolkit's built-in CogView4 (config-only, not in its UI; its source marks it unfinished). "
            "FlowMatch Euler with dynamic linear shifting, mu = 0.25 + 0.75 * sqrt(image tokens / 256) as the "
            "pipeline computes it; real CFG with the negative prompt (an empty one is encoded); GLM prompts up to "
            "1024 tokens. Divisor 16 (the pipeline rejects other sizes; ai-toolkit floors to 8 only). Defaults are "
            "the pipeline's (50 steps, guidance 5.0): ai-toolkit has no CogView4 preset.",
        ),
        ModelSpec(
            model_id="ernie_image", family="ernie_image:ErnieImageFamilyPipeline", pipeline_class="ErnieImagePipeline",
            base="baidu/ERNIE-Image", steps=30, guidance=4.0, divisor=32,
            scheduler=_flow(ERNIE_IMAGE_FLOWMATCH), tiny="ernie_image:build_ernie_image",
            aitk_archs=(AitkArch("ernie_image"),), lora_signatures=(ERNIE_IMAGE_NAMES,),
            notes="FlowMatch Euler with static shift 3.0 (ai-toolkit's scheduler_config), real CFG u + g(c - u) with "
            "the negative prompt (an empty one is encoded) above guidance 1; Mistral-3 prompt embeddings (second-to-"
            "last hidden state, unpadded). The checkpoint's optional prompt enhancer is not loaded and prompts are "
            "not rewritten, as in ai-toolkit. Divisor 32 (ai-toolkit's floor). Defaults are ai-toolkit's UI defaults "
            "(its ERNIE-Image preset sets none): 30 steps, guidance 4, 1024x1024. LoRAs: diffusion_model. + diffusers "
            "names.",
        ),
        ModelSpec(
            model_id="nucleus_image", family="nucleus_image:NucleusImageFamilyPipeline",
            pipeline_class="NucleusMoEImagePipeline", base="NucleusAI/Nucleus-Image", steps=30, guidance=4.0,
            divisor=32, scheduler=_flow(NUCLEUS_FLOWMATCH), tiny="nucleus_image:build_nucleus_image",
            aitk_archs=(AitkArch("nucleus_image"),), lora_signatures=(NUCLEUS_NAMES,),
            notes="ai-toolkit's Nucleus-Image extension: the stock pipeline with FlowMatch Euler at static shift 1.0 "
            "(the linspace sigmas unshifted), real CFG with the pipeline's norm rescale and the negative prompt (an "
            "empty one is encoded), Qwen3-VL prompts up to 1024 tokens. Divisor 32 (16x VAE x 2x2 patches). "
            "Defaults are ai-toolkit's UI sample defaults (30 steps, guidance 4); its Nucleus preset sets none. "
            "LoRAs: diffusion_model. + diffusers names (no diffusers loader; ours reads them), Linear layers only: "
            "the routed MoE experts are packed parameters that ai-toolkit never adapts.",
        ),
        ModelSpec(
            model_id="prx_pixel", family="prx_pixel:PRXPixelFamilyPipeline", pipeline_class="PRXPixelPipeline",
            base="Photoroom/prxpixel-t2i", steps=28, guidance=5.0, divisor=16, scheduler=_flow(PRX_FLOWMATCH),
            cfg_unless_one=True, tiny="prx_pixel:build_prx_pixel", aitk_archs=(AitkArch("prx_pixel"),),
            lora_signatures=(PRX_NAMES,),
            notes="Pixel space (no VAE), sampled with ai-toolkit's own preview loop: the transformer predicts the "
            "clean image, guidance is applied to that prediction whenever it is not 1 (below 1 too) with the "
            "negative prompt (an empty one is encoded), then it becomes a velocity (x - x0) / max(t, 0.05) for the "
            "Euler step. Initial noise randn * 2.0 in float32. FlowMatch Euler, static shift 3.0. Qwen3-VL prompts "
            "padded to 256 tokens, not cleaned; no aspect-ratio binning. Defaults are ai-toolkit's PRXPixel example "
            "(28 steps, guidance 5.0). LoRAs: diffusion_model. + diffusers names (PEFT or LoKr).",
        ),
        ModelSpec(
            model_id="chroma_radiance", family="chroma_radiance:ChromaRadianceFamilyPipeline",
            pipeline_class="ChromaRadiancePipeline", base="lodestones/Chroma1-Radiance", steps=25, guidance=4.0,
            divisor=16, scheduler=_flow(FLUX_FLOWMATCH), guidance_kind="true_cfg",
            tiny="chroma_radiance:build_chroma_radiance", aitk_archs=(AitkArch("chroma_radiance"),),
            lora_signatures=(BFL_NAMES, RADIANCE_NAMES), options=ChromaRadianceOptions(),
            notes="Pixel-space Chroma (no VAE): our own pipeline and transformer (diffusers has none; checkpoint "
            "names kept, so the original-name LoRAs ai-toolkit saves load as they are). Sampled as ai-toolkit's "
            "chroma_radiance samples it: real CFG above guidance 1 with the negative prompt (an empty one is "
            "encoded) and the guidance input fixed at 0; T5 prompts padded to 512 tokens, encoded without their mask, "
            "attending to the prompt plus one padding token; noise randn(B, 3, H, W); FlowMatch Euler with Chroma's "
            "dynamic shift, whose mu ai-toolkit computes from the channel count (3), so 0.457 at every size. Loads "
            "a checkpoint file or lodestones/Chroma1-<name> (its <name>.safetensors, as ai-toolkit does) with T5 "
            "from ostris/Flex.1-alpha; x0-prediction Radiance files, which ai-toolkit cannot load, are refused. "
            "Defaults from ai-toolkit's Chroma example config (25 steps, guidance 4, 1024x1024): the arch is not in "
            "its UI. Divisor 16, the patch size (ai-toolkit's pipeline floors to 2 only).",
        ),
        ModelSpec(
            model_id="zeta_chroma", family="zeta_chroma:ZetaChromaFamilyPipeline", pipeline_class="ZetaChromaPipeline",
            base="lodestones/Zeta-Chroma", steps=30, guidance=4.0, divisor=32, tiny="zeta_chroma:build_zeta_chroma",
            aitk_archs=(AitkArch("zeta_chroma"),), lora_signatures=(ZETA_CHROMA_NAMES,), options=ZetaChromaOptions(),
            notes="Pixel space (no VAE, 32x32 patches as tokens), our own transformer (the checkpoint's names) in "
            "ai-toolkit's own preview loop: x0 prediction turned into a velocity, Euler steps on flow times "
            "linspace(1, 0, N+1) shifted with mu linear in the patch count (0.5 at 256, 1.15 at 4096), unshifted "
            "when steps <= 8 and guidance <= 1; CFG n + g(p - n) above guidance 1 with the negative prompt (an empty "
            "one is encoded). Qwen3 chat-template prompts padded to 512 tokens, second-to-last hidden state; the "
            "image's rope positions start after the longer of prompt and negative. Initial noise randn in the model "
            "dtype, drawn in patch layout. Base: the single file zeta-chroma-base-x0-pixel-dino-distance.safetensors "
            "of lodestones/Zeta-Chroma (or a local file or folder), text encoder and tokenizer from "
            "Tongyi-MAI/Z-Image-Turbo. Steps 30 and guidance 4 are ai-toolkit's UI sample defaults (its Zeta Chroma "
            "preset sets none). LoRAs: diffusion_model. + the checkpoint's names (PEFT or LoKr).",
        ),
        ModelSpec(
            model_id="f_lite", family="f_lite:FLiteFamilyPipeline", pipeline_class="FLitePipeline",
            base="Freepik/F-Lite", steps=30, guidance=6.0, divisor=16, scheduler=None, tiny="f_lite:build_f_lite",
            aitk_archs=(AitkArch("f-lite"),), lora_signatures=(F_LITE_NAMES,), lora_components=("dit_model",),
            notes="fal's own DiT (no diffusers class; ours, with the checkpoint's names) sampled with F-Lite's own "
            "loop as ai-toolkit does: t = i/N warped by a t / (1 + (a - 1) t), a = 2 sqrt(latent area / 4096), Euler "
            "steps accumulated in the model dtype; CFG u + g(c - u) in one batched pass whenever guidance >= 1 "
            "(only the conditional pass below 1), the negative prompt encoded (an empty one too). ai-toolkit's "
            "FlowMatch scheduler with dynamic shifting is its training scheduler, unused by previews. T5 hidden state "
            "-8 through the final layer norm, 512 tokens, no mask. Noise randn(1, 16, H/8, W/8) in the model dtype. "
            "Defaults are F-Lite's pipeline defaults (30 steps, guidance 6.0; ai-toolkit has no F-Lite preset). "
            "LoRAs: diffusion_model. + the DiT's names (ai-toolkit adapts the Linears of the blocks).",
        ),
        ModelSpec(
            model_id="hidream_o1", family="hidream_o1:HiDreamO1FamilyPipeline", pipeline_class="HiDreamO1Pipeline",
            base="HiDream-ai/HiDream-O1-Image", steps=30, guidance=4.0, width=2048, height=2048, divisor=32,
            scheduler=_flow(HIDREAM_O1_FLOWMATCH), tiny="hidream_o1:build_hidream_o1",
            aitk_archs=(AitkArch("hidream_o1"),), lora_signatures=(HIDREAM_O1_NAMES,),
            notes="Pixel space (no VAE, 32x32 patches), one Qwen3-VL model for text and image, sampled with "
            "ai-toolkit's own preview loop: the chat-templated prompt + <|boi_token|><|tms_token|>, then the image "
            "patches; the model predicts the clean image, turned into a velocity (x - x0) / max(t, 0.001); CFG on the "
            "velocities when guidance > 1 with the negative prompt (an empty one is encoded). Initial noise "
            "8.0 * randn, latents kept in bfloat16 between steps as ai-toolkit keeps them. FlowMatch Euler, static "
            "shift 3.0. Size 2048x2048 from ai-toolkit's HiDream-O1 UI preset; steps 30 and guidance 4 are its UI "
            "sample defaults. LoRAs: diffusion_model. + the Qwen3-VL module names without .model. (PEFT or LoKr).",
        ),
        ModelSpec(
            model_id="anima", family="anima:AnimaFamilyPipeline", pipeline_class="AnimaModularPipeline",
            base="circlestone-labs/Anima-Base-v1.0-Diffusers", steps=30, guidance=4.0, divisor=32,
            negative="worst quality, low quality, score_1, score_2, score_3, blurry, jpeg artifacts, sepia, signature, "
            "artist name",
            scheduler=_flow(ANIMA_FLOWMATCH), cfg_unless_one=True, tiny="anima:build_anima",
            aitk_archs=(AitkArch("anima"),),
            lora_components=("transformer", "text_conditioner"), lora_signatures=(ANIMA_NAMES,),
            notes="ai-toolkit's Anima (Cosmos-Predict2 DiT, Qwen3 text encoder, LLM adapter, Qwen-Image VAE), sampled "
            "through diffusers' Anima modular blocks as ai-toolkit does: FlowMatch Euler with static shift 3.0 on "
            "sigmas linspace(1, 1/N, N); real CFG (the modular guider, at any guidance but 1) with the negative "
            "prompt, whose default is ai-toolkit's Anima UI preset; prompts encoded as ai-toolkit encodes them (an "
            "empty prompt becomes one masked pad token that the LLM adapter still attends to). Divisor 32. LoRAs in "
            "ComfyUI / original Cosmos names, the LLM adapter's (`llm_adapter.`) included. Steps 30 and guidance 4 "
            "are ai-toolkit's UI sample defaults (its Anima preset sets none).",
        ),
        ACE_STEP("ace_step_15", options=AceStepOptions(aio_file="ace_step_1.5_base_aio.safetensors"),
                 aitk_archs=(AitkArch("ace_step_15"),)),
        ACE_STEP("ace_step_15_xl", options=AceStepOptions(aio_file="ace_step_1.5_xl_base_aio.safetensors"),
                 aitk_archs=(AitkArch("ace_step_15_xl"),)),
        KREA2("krea2", aitk_archs=(AitkArch("krea2"),)),
        KREA2("krea2_turbo", base="krea/Krea-2-Turbo", steps=9, guidance=1.0, tiny="krea2:build_krea2_turbo",
              aitk_archs=(AitkArch("krea2", "turbo"),)),
        KREA2_EDIT("krea2_o_edit", aitk_archs=(AitkArch("krea2:o_edit"),)),
        KREA2_EDIT("krea2_o_edit_turbo", base="krea/Krea-2-Turbo", steps=8, guidance=1.0,
                   tiny="krea2:build_krea2_edit_turbo", aitk_archs=(AitkArch("krea2:o_edit_turbo"),)),
        BOOGU_IMAGE("boogu_image", base="Boogu/Boogu-Image-0.1-Base", tiny="boogu_image:build_boogu_image",
                    aitk_archs=(AitkArch("boogu_image"),), options=BooguImageOptions(), notes=_BOOGU_NOTES),
        BOOGU_IMAGE("boogu_image_edit", base="Boogu/Boogu-Image-0.1-Edit", control_images=(1, 3),
                    tiny="boogu_image:build_boogu_image_edit", aitk_archs=(AitkArch("boogu_image_edit"),),
                    options=BooguImageOptions(edit=True), notes=_BOOGU_NOTES + _BOOGU_EDIT_NOTES),
        MAGEFLOW("mageflow", aitk_archs=(AitkArch("mageflow"),)),
        MAGEFLOW("mageflow_edit", base="microsoft/Mage-Flow-Edit-Base", control_images=(1, 3),
                 tiny="mageflow:build_mageflow_edit", aitk_archs=(AitkArch("mageflow_edit"),),
                 options=MageFlowOptions(edit=True), notes=_MAGEFLOW_NOTES + _MAGEFLOW_EDIT_NOTES),
        ModelSpec(
            model_id="ideogram4", family="ideogram4:Ideogram4FamilyPipeline", pipeline_class="Ideogram4Pipeline",
            base="ideogram-ai/ideogram-4-fp8", steps=30, guidance=4.0, divisor=16,
            tiny="ideogram4:build_ideogram4", aitk_archs=(AitkArch("ideogram4"),),
            lora_signatures=(IDEOGRAM4_NAMES,), unconditional_is_negative=False, options=Ideogram4Options(),
            lora_pass_sides=(UNCONDITIONAL_LORA_SIDE,),
            notes="ai-toolkit's own sampler around diffusers' transformer and VAE: one transformer for both CFG "
            "passes (the unconditional one image-only with zero text features, so the negative prompt has no "
            "effect), u + g(c - u) above guidance 1; logit-normal sigmas with mean 0.5 ln(wh/512^2) and std 1.75; "
            "noise drawn as (1, 128, h/16, w/16) and scaled by the first sigma; ai-toolkit's fixed latent "
            "normalisation. An optional unconditional LoRA (side 'uncond') acts in the unconditional pass only. "
            "Loads ai-toolkit's checkpoint (ideogram-ai/ideogram-4-fp8, Ideogram's names, FP8 folded) with "
            "Qwen3-VL-8B-Instruct, or a diffusers folder without its unconditional transformer. Defaults are "
            "ai-toolkit's UI defaults (30 steps, guidance 4, 1024x1024). LoRAs: diffusion_model. + Ideogram's names "
            "(fused attention.qkv split onto to_q/to_k/to_v).",
        ),
        MINIMAX_H3(
            "minimax_h3", control_images=(0, 1), tiny="minimax_h3:build_minimax_h3",
            aitk_archs=(AitkArch("minimax_h3"),),
            notes=_MINIMAX_H3_NOTES + " An optional control image is the first frame (fl2va): stretched onto the "
            "canvas, encoded with the released fixed-seed (42) posterior sample, held at t = 0.999, and shown to the "
            "conditioner as <Picture 1>.",
        ),
        MINIMAX_H3(
            "minimax_h3_ref2va", family="minimax_h3:MiniMaxH3Ref2VAFamilyPipeline", control_images=(0, 4),
            lora_components=("transformer_ref",), tiny="minimax_h3:build_minimax_h3_ref2va",
            aitk_archs=(AitkArch("minimax_h3_ref2va"),),
            notes=_MINIMAX_H3_NOTES + " The ref2va partition (transformer_ref): up to 4 control images are "
            "references, never a first frame: each keeps its aspect, is scaled down (never up) to the target's "
            "pixel area on the /32 grid (LANCZOS), encoded with the fixed-seed posterior, noised to t = 0.999, "
            "packed as its own block on its own rotary grid, and shown to the conditioner as <Picture i> at its own "
            "size. Reference videos and image_refs_as_video are not supported.",
        ),
        ModelSpec(
            model_id="sd3", family="sd3:SD3FamilyPipeline", pipeline_class="StableDiffusion3Pipeline",
            base="stabilityai/stable-diffusion-3.5-large", steps=25, guidance=4.0, divisor=16,
            scheduler=_flow(SD_FLOWMATCH), tiny="sd3:build_sd3", aitk_archs=(AitkArch("sd3"),),
            lora_signatures=(SD3_NAMES,),
            notes="ai-toolkit's `flowmatch` sampler, as its SD 3.5 example samples: FlowMatch Euler on the pipeline's "
            "linspace grid with NO shift (its sd_flow_config says 3.0, which its scheduler construction drops), real "
            "CFG with the encoded negative (CLIP-L, CLIP-G, T5 up to 256 tokens, as the stock pipeline encodes them). "
            "Divisor 16 (the pipeline rejects other sizes; ai-toolkit floors to 8 only). Defaults are ai-toolkit's "
            "train_lora_sd35_large_24gb example (25 steps, guidance 4, 1024x1024). LoRAs: transformer. + diffusers "
            "names (PEFT, no alpha: scale 1).",
        ),
        PIXART("pixart", pipeline_class="PixArtAlphaPipeline", base="PixArt-alpha/PixArt-XL-2-1024-MS",
               tiny="pixart:build_pixart", aitk_archs=(AitkArch("pixart"),),
               notes="ai-toolkit's `ddpm` sampler for PixArt (DDPM from its pixart_config: linear betas, linspace "
               "spacing, clip_sample on; stochastic), real CFG with the encoded negative, T5 prompts padded to 120 "
               "tokens, the text neither lowercased nor cleaned, the pipeline's aspect-ratio binning. ai-toolkit samples every PixArt "
               "through PixArtSigmaPipeline, which gives this checkpoint no resolution/aspect micro-conditions and "
               "fails on it; we use PixArtAlphaPipeline, which feeds them. Its `flowmatch` sampler falls back to "
               "FLUX.1's dynamic config, which PixArt's pipelines cannot run (no mu). LoRAs: kohya-style "
               "lora_transformer_* with alpha." + _LEGACY_DEFAULTS_NOTE,
               ),
        PIXART("pixart_sigma", pipeline_class="PixArtSigmaPipeline", base="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
               tiny="pixart:build_pixart_sigma",
               aitk_archs=(AitkArch("pixart_sigma"),),
               notes="As `pixart`, through PixArtSigmaPipeline with T5 prompts padded to 300 tokens, as ai-toolkit "
               "samples it. In ai-toolkit 0.12.26 a job with `arch: pixart_sigma` fails to load (that arch falls "
               "through to its SD 1.x loader); the working form is `arch: pixart` (or `is_pixart: true`) with "
               "`is_pixart_sigma: true`, which `reproduce` maps here (without that flag ai-toolkit samples a Sigma "
               "checkpoint as `pixart`, with 120-token prompts, and so does `reproduce`)." + _LEGACY_DEFAULTS_NOTE,
               ),
        ModelSpec(
            model_id="auraflow", family="auraflow:AuraFlowFamilyPipeline", pipeline_class="AuraFlowPipeline",
            base="fal/AuraFlow", divisor=16, scheduler=_flow(SD_FLOWMATCH), tiny="auraflow:build_auraflow",
            aitk_archs=(AitkArch("auraflow"),), lora_signatures=(AURAFLOW_NAMES,), **SAMPLE_CONFIG_DEFAULTS,
            notes="ai-toolkit's `flowmatch` sampler (the only one AuraFlow's pipeline can run): FlowMatch Euler on "
            "the scheduler's linspace grid with NO shift (sd_flow_config's 3.0 is dropped, as for SD3), real CFG "
            "with the encoded negative, UMT5 prompts padded to 256 tokens with padding zeroed. Divisor 16 (the "
            "pipeline rejects other sizes). LoRAs: kohya-style lora_transformer_* with alpha." + _LEGACY_DEFAULTS_NOTE,
        ),
    ]
)


def get_spec(model_id: str) -> ModelSpec:
    """Return the spec of ``model_id`` or raise a ValueError listing the valid ids."""
    try:
        return REGISTRY[model_id]
    except KeyError:
        raise ValueError(
            f"Unknown model id {model_id!r}. Valid ids are: {', '.join(REGISTRY)}. "
            "Run `python -m aitk_inference models` to see them with their defaults."
        ) from None


def aitk_arch_names() -> list[str]:
    """Every ai-toolkit ``model.arch`` some id answers for."""
    return sorted({arch.name for spec in REGISTRY.values() for arch in spec.aitk_archs})


def model_id_for_arch(arch: str, name_or_path: str = "") -> str:
    """The id of an ai-toolkit job's ``model.arch``: among the ids of that arch, the one whose checkpoint hint is in
    ``name_or_path`` (the longest, so that "de-turbo" wins over "turbo"), else the arch's default."""
    source = name_or_path.lower()
    candidates = [(a.checkpoint_hint, spec.model_id) for spec in REGISTRY.values() for a in spec.aitk_archs
                  if a.name == arch]
    hinted = [(len(hint), model_id) for hint, model_id in candidates if hint and hint in source]
    if hinted:
        return max(hinted)[1]
    defaults = [model_id for hint, model_id in candidates if hint is None]
    if not defaults:
        raise ValueError(
            f"model.arch {arch!r} has no aitk-inference model; known archs: {', '.join(aitk_arch_names())}. "
            "Pass --model with a model id (see `python -m aitk_inference models`)."
        )
    return defaults[0]


def model_ids() -> list[str]:
    return list(REGISTRY)
