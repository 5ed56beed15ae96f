"""The model registry: one ordered table from model id to everything a family needs, as data.

Nothing here imports torch or diffusers, so the nodes, the CLI's ``--help`` and the server's schema can read the
registry without paying for heavy imports. Family code is imported only when a pipeline of that family is loaded.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

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

# ai-toolkit's Lumina2 scheduler (toolkit/sampler.py lumina2_config): static shift 6.0.
LUMINA2_FLOWMATCH = {**FLUX_FLOWMATCH, "shift": 6.0, "use_dynamic_shifting": False}

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


@dataclass(frozen=True)
class VideoSpec:
    """Video defaults. ``frame_step`` k means frame counts are snapped to k*n+1 (4 for Wan, 8 for LTX-2)."""

    num_frames: int
    fps: int
    frame_step: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines one model id.

    Args:
        model_id (str): stable id, the same as the reference implementation's.
        family (str): ``"<module>:<Class>"`` of the family pipeline class inside ``pipelines/families/``.
        pipeline_class (str): the diffusers pipeline class the family drives (by name, imported lazily).
        base (str): default base checkpoint (Hugging Face repo id).
        steps, guidance, width, height, seed, negative: generation defaults.
        divisor (int): width/height are floored to a multiple of this after ai-toolkit's floor to 8.
        scheduler (SchedulerSpec, *optional*): the scheduler ai-toolkit samples with; None keeps the checkpoint's.
        lora_mode (str): ``"dynamic"`` (live PEFT adapters) or ``"fused"`` (merged into the weights).
        lora_components (tuple): pipeline components a LoRA may target (``transformer``, ``unet``, ``text_encoder``...).
        guidance_kind (str): ``"distilled"`` (guidance embedding, one forward per step), ``"cfg"`` or ``"true_cfg"``.
        uses_negative (bool): whether the negative prompt has any effect at the default settings.
        control_images (tuple[int, int]): (min, max) number of control images.
        video (VideoSpec, *optional*): video defaults; None for image models.
        tiny (str): ``"<module>:<function>"`` in ``tiny/`` that builds the tiny random-weight pipeline.
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
    scheduler: SchedulerSpec | None = None
    lora_mode: str = "dynamic"
    lora_components: tuple[str, ...] = ("transformer",)
    guidance_kind: str = "cfg"
    uses_negative: bool = True
    control_images: tuple[int, int] = (0, 0)
    video: VideoSpec | None = None
    width: int = 1024
    height: int = 1024
    seed: int = 42
    negative: str = ""
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def requires_control_image(self) -> bool:
        return self.control_images[0] > 0

    @property
    def is_video(self) -> bool:
        return self.video is not None

    def family_class(self):
        """Import and return the family pipeline class (this is where torch/diffusers get imported)."""
        return _import_symbol(self.family)

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
            "scheduler": None if self.scheduler is None else {"class": self.scheduler.class_name, **self.scheduler.config},
            "notes": self.notes,
        }


def _import_symbol(ref: str):
    """``"<module>:<name>"`` of a module in ``pipelines/families/``."""
    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(f"{__package__}.families.{module_name}"), attr)


_FLUX_NOTES = (
    "FLUX.1 is guidance-distilled: `guidance` feeds the guidance embedding (one forward per step) and the negative "
    "prompt has no effect, exactly as in ai-toolkit's previews."
)

_QWEN_NOTES = (
    "Guidance is true CFG (`true_cfg_scale`) with the negative prompt; an empty negative is encoded, as ai-toolkit does. "
    "Divisor 32 as ai-toolkit samples (the reference uses 16)."
)

_QWEN_EDIT_PLUS_NOTES = (
    "1 to 3 control images (ctrl_img_1..3), passed to the pipeline as they are; prompt and negative are encoded with "
    "them (at about 384x384) as ai-toolkit does. True CFG u + g(c - u) WITHOUT diffusers' norm rescale (ai-toolkit "
    "do_cfg_norm: false). Divisor 32."
)

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

_ZIMAGE_NOTES = (
    "Guidance is standard CFG: ai-toolkit passes max(0, guidance - 1) to diffusers' ZImagePipeline (4 -> 3, 1 -> 0 = "
    "no CFG). FlowMatch Euler static shift 3.0; divisor 16 as ai-toolkit samples (the reference uses 32)."
)

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

_LTX2_NOTES = (
    "Video with audio (MP4 with the audio track). FlowMatch Euler with LTX-2's dynamic shift (0.95..2.05 over "
    "1024..4096 tokens, terminal 0.1), true CFG with the negative prompt, divisor 32, frames 8k+1. An optional control "
    "image (LANCZOS-resized to the target size) makes it image-to-video. LoRAs in original LTX names load."
)

REGISTRY: "OrderedDict[str, ModelSpec]" = OrderedDict(
    (spec.model_id, spec)
    for spec in [
        ModelSpec(
            model_id="flux",
            family="flux:FluxFamilyPipeline",
            pipeline_class="FluxPipeline",
            base="black-forest-labs/FLUX.1-dev",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX_FLOWMATCH),
            lora_mode="dynamic",
            guidance_kind="distilled",
            uses_negative=False,
            tiny="flux:build_flux",
            notes=_FLUX_NOTES,
        ),
        ModelSpec(
            model_id="flex1",
            family="flux:FluxFamilyPipeline",
            pipeline_class="FluxPipeline",
            base="ostris/Flex.1-alpha",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX_FLOWMATCH),
            lora_mode="fused",
            guidance_kind="distilled",
            uses_negative=False,
            tiny="flux:build_flux",
            notes="Flex.1-alpha runs as FLUX.1 (ai-toolkit aliases arch flex1 to flux). " + _FLUX_NOTES,
        ),
        ModelSpec(
            model_id="flux_kontext",
            family="flux:FluxFamilyPipeline",
            pipeline_class="FluxKontextPipeline",
            base="black-forest-labs/FLUX.1-Kontext-dev",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX_FLOWMATCH),
            lora_mode="dynamic",
            guidance_kind="distilled",
            uses_negative=False,
            control_images=(1, 1),
            tiny="flux:build_flux_kontext",
            notes="The control image is resized (bilinear) to the target size and passed with max_area = width*height "
            "and no auto-resize, as ai-toolkit does. " + _FLUX_NOTES,
        ),
        ModelSpec(
            model_id="flex2",
            family="flex2:Flex2FamilyPipeline",
            pipeline_class="Flex2Pipeline",
            base="ostris/Flex.2-preview",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX_FLOWMATCH),
            lora_mode="fused",
            guidance_kind="distilled",
            uses_negative=False,
            control_images=(0, 1),
            tiny="flex2:build_flex2",
            notes="Our own Flex.2 pipeline (no hub remote code). Divisor 16 as ai-toolkit samples (the reference uses 32). "
            "The optional control image is encoded as Flex.2's control latent; without it the control channels are zero. "
            + _FLUX_NOTES,
        ),
        ModelSpec(
            model_id="sd15",
            family="stable_diffusion:StableDiffusionFamilyPipeline",
            pipeline_class="StableDiffusionPipeline",
            base="stable-diffusion-v1-5/stable-diffusion-v1-5",
            steps=30,
            guidance=6.0,
            divisor=8,
            width=512,
            height=512,
            scheduler=SchedulerSpec("DDPMScheduler", SD_DDPM),
            lora_mode="dynamic",
            lora_components=("unet", "text_encoder"),
            guidance_kind="cfg",
            uses_negative=True,
            tiny="stable_diffusion:build_sd15",
            notes="Sampled with ai-toolkit's DDPM (steps_offset 0, stochastic: per-step noise from the seeded CPU "
            "generator), real CFG with the negative prompt, safety checker off. Defaults are ai-toolkit's SD 1.5 "
            "preset (512x512, 30 steps, guidance 6). Kohya LoRAs (lora_unet_*, lora_te_*, LoCon convs) load with "
            "scale alpha/rank.",
        ),
        ModelSpec(
            model_id="sdxl",
            family="stable_diffusion:StableDiffusionFamilyPipeline",
            pipeline_class="StableDiffusionXLPipeline",
            base="stabilityai/stable-diffusion-xl-base-1.0",
            steps=30,
            guidance=6.0,
            divisor=8,
            scheduler=SchedulerSpec("DDPMScheduler", SD_DDPM),
            lora_mode="dynamic",
            lora_components=("unet", "text_encoder", "text_encoder_2"),
            guidance_kind="cfg",
            uses_negative=True,
            tiny="stable_diffusion:build_sdxl",
            notes="Sampled with ai-toolkit's DDPM (steps_offset 0, stochastic), real CFG, guidance_rescale 0, "
            "watermark off. An empty negative prompt is ENCODED as ai-toolkit does (diffusers' zeroed empty negative "
            "is switched off). Defaults are ai-toolkit's SDXL preset (1024x1024, 30 steps, guidance 6). Kohya LoRAs "
            "(lora_unet_*, lora_te1_*/lora_te2_*, LoCon convs) load with scale alpha/rank.",
        ),
        ModelSpec(
            model_id="qwen_image",
            family="qwen_image:QwenImageFamilyPipeline",
            pipeline_class="QwenImagePipeline",
            base="Qwen/Qwen-Image",
            steps=25,
            guidance=4.0,
            divisor=32,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", QWEN_FLOWMATCH),
            guidance_kind="true_cfg",
            tiny="qwen_image:build_qwen_image",
            notes=_QWEN_NOTES,
        ),
        ModelSpec(
            model_id="qwen_image_2512",
            family="qwen_image:QwenImageFamilyPipeline",
            pipeline_class="QwenImagePipeline",
            base="Qwen/Qwen-Image-2512",
            steps=25,
            guidance=4.0,
            divisor=32,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", QWEN_FLOWMATCH),
            lora_mode="fused",
            guidance_kind="true_cfg",
            tiny="qwen_image:build_qwen_image",
            notes=_QWEN_NOTES,
        ),
        ModelSpec(
            model_id="qwen_image_edit",
            family="qwen_image:QwenImageEditFamilyPipeline",
            pipeline_class="QwenImageEditPipeline",
            base="Qwen/Qwen-Image-Edit",
            steps=25,
            guidance=4.0,
            divisor=32,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", QWEN_FLOWMATCH),
            guidance_kind="true_cfg",
            control_images=(1, 1),
            tiny="qwen_image:build_qwen_image_edit",
            notes=_QWEN_NOTES + " One control image (required), resized bilinear to the output size for the VAE; "
            "prompt and negative are encoded with it (at about 1 MP) as ai-toolkit does. Stock CFG norm rescale.",
        ),
        ModelSpec(
            model_id="qwen_image_edit_plus",
            family="qwen_image:QwenImageEditPlusFamilyPipeline",
            pipeline_class="QwenImageEditPlusPipeline",
            base="Qwen/Qwen-Image-Edit-2509",
            steps=25,
            guidance=4.0,
            divisor=32,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", QWEN_FLOWMATCH),
            guidance_kind="true_cfg",
            control_images=(1, 3),
            tiny="qwen_image:build_qwen_image_edit_plus",
            notes=_QWEN_EDIT_PLUS_NOTES,
        ),
        ModelSpec(
            model_id="qwen_image_edit_plus_2511",
            family="qwen_image:QwenImageEditPlusFamilyPipeline",
            pipeline_class="QwenImageEditPlusPipeline",
            base="Qwen/Qwen-Image-Edit-2511",
            steps=25,
            guidance=4.0,
            divisor=32,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", QWEN_FLOWMATCH),
            lora_mode="fused",
            guidance_kind="true_cfg",
            control_images=(1, 3),
            tiny="qwen_image:build_qwen_image_edit_plus",
            notes=_QWEN_EDIT_PLUS_NOTES,
        ),
        ModelSpec(
            model_id="zimage",
            family="zimage:ZImageFamilyPipeline",
            pipeline_class="ZImagePipeline",
            base="Tongyi-MAI/Z-Image",
            steps=30,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", ZIMAGE_FLOWMATCH),
            tiny="zimage:build_zimage",
            notes=_ZIMAGE_NOTES,
        ),
        ModelSpec(
            model_id="zimage_turbo",
            family="zimage:ZImageFamilyPipeline",
            pipeline_class="ZImagePipeline",
            base="Tongyi-MAI/Z-Image-Turbo",
            steps=8,
            guidance=1.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", ZIMAGE_FLOWMATCH),
            uses_negative=False,
            tiny="zimage:build_zimage",
            notes="At the default guidance 1.0 CFG is off and the negative prompt has no effect. " + _ZIMAGE_NOTES,
        ),
        ModelSpec(
            model_id="zimage_deturbo",
            family="zimage:ZImageFamilyPipeline",
            pipeline_class="ZImagePipeline",
            base="Tongyi-MAI/Z-Image-Turbo",
            steps=25,
            guidance=3.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", ZIMAGE_FLOWMATCH),
            tiny="zimage:build_zimage_deturbo",
            extra={"transformer": "ostris/Z-Image-De-Turbo"},
            notes="Text encoder, tokenizer and VAE come from `base` (Z-Image-Turbo); the transformer from "
            "ostris/Z-Image-De-Turbo, or from `<base>/de_turbo_transformer` when a local base folder has one. "
            + _ZIMAGE_NOTES,
        ),
        ModelSpec(
            model_id="lumina2",
            family="lumina2:Lumina2FamilyPipeline",
            pipeline_class="Lumina2Pipeline",
            base="Alpha-VLLM/Lumina-Image-2.0",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", LUMINA2_FLOWMATCH),
            tiny="lumina2:build_lumina2",
            notes="FlowMatch Euler with static shift 6.0 (ai-toolkit's lumina2_config), real CFG with the negative "
            "prompt, Gemma2 prompts up to 256 tokens. Divisor 16 (the pipeline's own check; the reference uses 32).",
        ),
        ModelSpec(
            model_id="omnigen2",
            family="omnigen2:OmniGen2FamilyPipeline",
            pipeline_class="OmniGen2Pipeline",
            base="OmniGen2/OmniGen2",
            steps=25,
            guidance=4.0,
            divisor=16,
            # OmniGen2's own Euler (pipelines/omnigen2.py), not a diffusers class: shift sqrt(latent pixels) / 40
            scheduler=SchedulerSpec("OmniFlowMatchEulerScheduler", {"num_train_timesteps": 1000,
                                                                    "dynamic_time_shift": True}),
            control_images=(0, 3),
            tiny="omnigen2:build_omnigen2",
            notes="Our own OmniGen2 pipeline and transformer (diffusers has none; checkpoint weight names kept). "
            "`guidance` is the text guidance: real CFG against the negative prompt without the input images; image "
            "guidance fixed at 1.0. The Qwen2.5-VL chat template is applied twice, as ai-toolkit trains and samples. "
            "Up to 3 input images (control_images), resized to the target size then VAE-encoded as reference "
            "tokens. OmniGen2's Euler with the resolution-dependent time shift. LoRAs with diffusion_model. keys "
            "load with their alpha.",
        ),
        ModelSpec(
            model_id="flux2",
            family="flux2:Flux2FamilyPipeline",
            pipeline_class="Flux2Pipeline",
            base="black-forest-labs/FLUX.2-dev",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX2_EULER),
            guidance_kind="distilled",
            uses_negative=False,
            control_images=(0, 3),
            tiny="flux2:build_flux2",
            extra={"text_encoder_out_layers": (10, 20, 30)},
            notes=_FLUX2_NOTES + " FLUX.2-dev is guidance-distilled: `guidance` feeds the guidance embedding and the "
            "negative prompt has no effect.",
        ),
        ModelSpec(
            model_id="flux2_klein_4b",
            family="flux2:Flux2FamilyPipeline",
            pipeline_class="Flux2KleinPipeline",
            base="black-forest-labs/FLUX.2-klein-base-4B",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX2_EULER),
            guidance_kind="true_cfg",
            control_images=(0, 3),
            tiny="flux2:build_flux2_klein",
            extra={"text_encoder_out_layers": (9, 18, 27)},
            notes=_FLUX2_NOTES + _KLEIN_NOTES,
        ),
        ModelSpec(
            model_id="flux2_klein_9b",
            family="flux2:Flux2FamilyPipeline",
            pipeline_class="Flux2KleinPipeline",
            base="black-forest-labs/FLUX.2-klein-base-9B",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX2_EULER),
            guidance_kind="true_cfg",
            control_images=(0, 3),
            tiny="flux2:build_flux2_klein",
            extra={"text_encoder_out_layers": (9, 18, 27)},
            notes=_FLUX2_NOTES + _KLEIN_NOTES,
        ),
        ModelSpec(
            model_id="chroma",
            family="chroma:ChromaFamilyPipeline",
            pipeline_class="ChromaPipeline",
            base="lodestones/Chroma1-Base",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", FLUX_FLOWMATCH),
            guidance_kind="true_cfg",
            uses_negative=False,
            tiny="chroma:build_chroma",
            notes="Real CFG above guidance 1 with the guidance input fixed at 0. The unconditional prompt is EMPTY, as "
            "in ai-toolkit's previews: the negative prompt is ignored unless you pass `use_negative=True`. T5 runs "
            "without its attention mask (ai-toolkit); the transformer masks padding except one token. FlowMatch "
            "Euler, dynamic shift (0.5..1.15), sigmas linspace(1, 1/N, N). LoRAs with original BFL names load "
            "(fused qkv and linear1 are split). Divisor 16 (the reference uses 32).",
        ),
        ModelSpec(
            model_id="wan21_1b",
            family="wan:WanFamilyPipeline",
            pipeline_class="WanPipeline",
            base="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", WAN21_FLOWMATCH),
            video=VideoSpec(num_frames=41, fps=16, frame_step=4),
            tiny="wan:build_wan21_t2v",
            notes=_WAN21_NOTES,
        ),
        ModelSpec(
            model_id="wan21_14b",
            family="wan:WanFamilyPipeline",
            pipeline_class="WanPipeline",
            base="Wan-AI/Wan2.1-T2V-14B-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", WAN21_FLOWMATCH),
            video=VideoSpec(num_frames=41, fps=16, frame_step=4),
            tiny="wan:build_wan21_t2v",
            notes=_WAN21_NOTES,
        ),
        ModelSpec(
            model_id="wan21_i2v_14b",
            family="wan:WanFamilyPipeline",
            pipeline_class="WanImageToVideoPipeline",
            base="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", WAN21_FLOWMATCH),
            control_images=(1, 1),
            video=VideoSpec(num_frames=41, fps=16, frame_step=4),
            tiny="wan:build_wan21_i2v",
            notes=_WAN21_I2V_NOTES,
        ),
        ModelSpec(
            model_id="wan21_i2v_14b480p",
            family="wan:WanFamilyPipeline",
            pipeline_class="WanImageToVideoPipeline",
            base="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", WAN21_FLOWMATCH),
            control_images=(1, 1),
            video=VideoSpec(num_frames=41, fps=16, frame_step=4),
            tiny="wan:build_wan21_i2v",
            notes=_WAN21_I2V_NOTES,
        ),
        ModelSpec(
            model_id="wan22_14b_t2v",
            family="wan:WanFamilyPipeline",
            pipeline_class="WanPipeline",
            base="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", WAN22_FLOWMATCH),
            lora_components=("transformer", "transformer_2"),
            video=VideoSpec(num_frames=41, fps=16, frame_step=4),
            tiny="wan:build_wan22_14b_t2v",
            extra={"boundary_ratio": 0.875},
            notes=_WAN22_MOE_NOTES,
        ),
        ModelSpec(
            model_id="wan22_14b_i2v",
            family="wan:WanFamilyPipeline",
            pipeline_class="WanImageToVideoPipeline",
            base="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=16,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", WAN22_FLOWMATCH),
            lora_components=("transformer", "transformer_2"),
            control_images=(1, 1),
            video=VideoSpec(num_frames=41, fps=16, frame_step=4),
            tiny="wan:build_wan22_14b_i2v",
            extra={"boundary_ratio": 0.875},
            notes=_WAN22_MOE_NOTES + _WAN_I2V_RESIZE,
        ),
        ModelSpec(
            model_id="wan22_5b",
            family="wan:WanFamilyPipeline",
            pipeline_class="WanPipeline",
            base="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=32,
            width=768,
            height=768,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", WAN22_FLOWMATCH),
            control_images=(0, 1),
            video=VideoSpec(num_frames=121, fps=24, frame_step=4),
            tiny="wan:build_wan22_5b",
            extra={"expand_timesteps": True},
            notes=_WAN22_5B_NOTES,
        ),
        ModelSpec(
            model_id="ltx2",
            family="ltx2:LTX2FamilyPipeline",
            pipeline_class="LTX2Pipeline",
            base="Lightricks/LTX-2",
            steps=25,
            guidance=4.0,
            divisor=32,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", LTX2_FLOWMATCH),
            guidance_kind="true_cfg",
            control_images=(0, 1),
            video=VideoSpec(num_frames=41, fps=24, frame_step=8),
            tiny="ltx2:build_ltx2",
            extra={"guidance": LTX20_GUIDANCE},
            notes=_LTX2_NOTES + " LTX-2.0: plain true CFG (no STG or modality guidance), as ai-toolkit samples it.",
        ),
        ModelSpec(
            model_id="ltx2.3",
            family="ltx2:LTX2FamilyPipeline",
            pipeline_class="LTX2Pipeline",
            base="dg845/LTX-2.3-Diffusers",
            steps=25,
            guidance=4.0,
            divisor=32,
            scheduler=SchedulerSpec("FlowMatchEulerDiscreteScheduler", LTX2_FLOWMATCH),
            guidance_kind="true_cfg",
            control_images=(0, 1),
            video=VideoSpec(num_frames=41, fps=24, frame_step=8),
            tiny="ltx2:build_ltx23",
            extra={"guidance": LTX23_GUIDANCE, "stg_reference_depth": 48},
            notes=_LTX2_NOTES + " LTX-2.3: ai-toolkit's guidance extras (STG at block 28, modality guidance 3.0, "
            "guidance rescale 0.7, audio guidance 7.0, cross-modality timesteps).",
        ),
        ModelSpec(
            model_id="hidream",
            family="hidream:HiDreamFamilyPipeline",
            pipeline_class="HiDreamImagePipeline",
            base="HiDream-ai/HiDream-I1-Full",
            steps=50,
            guidance=5.0,
            divisor=16,
            scheduler=SchedulerSpec("UniPCMultistepScheduler", HIDREAM_UNIPC),
            tiny="hidream:build_hidream",
            extra={"llama": "unsloth/Meta-Llama-3.1-8B-Instruct"},
            notes="ai-toolkit's FlowUniPC schedule (UniPC on its shift-3.0 grid, shifted by exp(mu), mu = 1.15 for "
            "HiDream-I1's 4096 tokens), true CFG with the encoded negative prompt, 128-token prompts for CLIP-L, "
            "CLIP-G, T5 and Llama-3.1 (loaded from unsloth/Meta-Llama-3.1-8B-Instruct). Any size is rescaled to the "
            "1024x1024 area (aspect kept, floored to 16) as ai-toolkit's pipeline does. LoRAs: diffusion_model. + "
            "diffusers names, alpha honoured.",
        ),
        ModelSpec(
            model_id="hidream_e1",
            family="hidream:HiDreamFamilyPipeline",
            pipeline_class="HiDreamImagePipeline",
            base="HiDream-ai/HiDream-E1-Full",
            steps=28,
            guidance=5.0,
            divisor=16,
            scheduler=SchedulerSpec("UniPCMultistepScheduler", HIDREAM_E1_UNIPC),
            control_images=(1, 1),
            tiny="hidream:build_hidream_e1",
            extra={"llama": "unsloth/Meta-Llama-3.1-8B-Instruct"},
            notes="Our own editing loop around diffusers' HiDream transformer (diffusers has no E1 pipeline). The "
            "control image (required) is resized BILINEAR to the target size and appended to the latent along the "
            "width. Three-pass guidance with ai-toolkit's norm clipping; image guidance 2.0, the value ai-toolkit's "
            "previews get (`image_guidance` overrides it). FlowUniPC schedule, shift 3.0. LoRAs: diffusion_model. "
            "+ diffusers names, alpha honoured.",
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


def model_ids() -> list[str]:
    return list(REGISTRY)
