"""MiniMax-H3 (video + stereo audio): diffusers' MiniMax-H3 classes driven as ai-toolkit's previews sample them
(``extensions_built_in/diffusion_models/minimax_h3/minimax_h3.py`` and its ``src/pipeline.py``).

MiniMax-H3 denoises one packed sequence ``[text | keyframe rows | audio rows | video rows]`` with a single
guidance-distilled transformer: one forward per step, no negative prompt, no CFG. diffusers 0.42 ships it as a modular
pipeline only (``MiniMaxH3ModularPipeline`` / ``MiniMaxH3Blocks``); ai-toolkit samples with its own transformer, VAEs
and loop. We run diffusers' transformer, VAEs and schedulers through our own blocks where ai-toolkit's loop differs
from diffusers' blocks, and diffusers' blocks where it does not.

What ai-toolkit's previews do, and so do we:

* the prompt is presented raw (no chat template, no special tokens), capped at 512 caption tokens; a first-frame
  keyframe adds ``"<Picture 1>: "`` and a vision block (its rows tagged as video) before it; an empty prompt becomes
  one pad token. The conditioning is ``hidden_states[50]`` of the Qwen3-VL conditioner (diffusers'
  ``get_qwen3vl_prompt_embeds``). The conditioner sees the keyframe at its own size, after ai-toolkit's round trip
  of the image through the model dtype (a bf16 model shifts a few pixel values by one level);
* the keyframe is stretched (LANCZOS) onto the canvas and encoded with the released recipe: posterior sample under
  a generator seeded 42 (never the request's), rounded to float16, normalized (diffusers' ``encode_vae_condition``),
  then noised to t = 0.999 with noise from the request's generator and held there;
* the request's generator draws the keyframe noise first, then the video noise ``(1, 24, t, h, w)``, then the audio
  noise ``(1, 2, 32, a)`` packed channel-major (diffusers' blocks draw the audio noise directly in row order, which
  gives other numbers);
* ``steps`` model evaluations: the sigmas are ``linspace(1, 0, steps + 1)`` through the exponential shift 12.0,
  duplicates collapsed (``MiniMaxH3Scheduler.set_timesteps(steps + 1)``; diffusers' blocks count the terminal 0 as a
  step); the audio sigmas are the video sigmas remapped onto shift 3.0 (the same position of the base grid);
* the Euler update ``x + (1 - r) * sigma * v`` of ``MiniMaxH3Scheduler`` for both streams (diffusers' loop blocks);
* frames are floored to the VAE's 17n+5 grid, at 24 fps only; width and height to multiples of 32;
* ``minimax_h3_ref2va`` (``MinimaxH3Ref2VAModel``, the ``transformer_ref`` partition): every control image is a
  reference, never a first frame. Each keeps its aspect, is scaled down (never up) to the target's pixel area on the
  /32 grid (LANCZOS), gets its own noise draw and the keyframe recipe, and is packed as its own block on its own
  rotary grid (diffusers' ``build_ref2va_packed_sequence``: each image advances the clock by one); the conditioner
  sees ``<Picture i>: `` per reference, at its own size.

Where we differ on purpose: diffusers' video VAE decodes whole 17-frame chunks, so fewer than 22 frames (ai-toolkit's
5-frame clips and single images) are refused; the frames come back as float32 without ai-toolkit's rounding to
8 bits. diffusers' blocks also refuse videos shorter than 5 s (120 frames) and round frame counts up; ai-toolkit's
107-frame default needs neither, so our blocks do not. ai-toolkit's ref2va reference videos and its
``image_refs_as_video`` option are not reproduced (image references only, ai-toolkit's default).

Batches: the packed sequence holds one request, as in ai-toolkit (one sample per call); image i of a batch is the
single video of seed + i.

LoRAs: ai-toolkit saves ``diffusion_model.`` + the original checkpoint's module names (fused ``attn.qkv_proj``,
``mlp.fc1`` as ``[gate; value]``...). :func:`minimax_h3_original_to_diffusers` renames them onto diffusers' modules,
splitting the fused QKV and swapping the SwiGLU halves; diffusers names pass through.

Weights: the bf16 originals (``MiniMaxAI/MiniMax-H3``, diffusers' modular layout), or the ComfyUI repack ai-toolkit
loads by default (``Comfy-Org/MiniMax-H3``: int8 ConvRot transformer, full or pruned; nvfp4-AWQ 50-layer text stack;
VAEs under other names), read and dequantized by ``minimax_h3_comfy``.

Progress: ``progress(step, total)`` after every denoising step (raising from it interrupts).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from types import SimpleNamespace

from diffusers.modular_pipelines import ModularPipelineBlocks, SequentialPipelineBlocks
from diffusers.modular_pipelines.minimax_h3.before_denoise import (
    MiniMaxH3PrepareLayoutStep,
    MiniMaxH3Ref2VAPrepareLayoutStep,
    MiniMaxH3SetTimestepsStep,
    patchify_video_latents,
)
from diffusers.modular_pipelines.minimax_h3.decoders import MiniMaxH3AfterDenoiseStep
from diffusers.modular_pipelines.minimax_h3.denoise import MiniMaxH3DenoiseStep, MiniMaxH3Ref2VADenoiseStep
from diffusers.modular_pipelines.minimax_h3.encoders import encode_vae_condition, get_qwen3vl_prompt_embeds
from diffusers.modular_pipelines.minimax_h3.modular_pipeline import audio_latent_num_frames, video_latent_num_frames
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam

from ..base import AITKPipeline, GenerationParams
from ..lora.convert import ConvertedLora, ModulePatch, join_patch_rows, rename_patches, split_patch_rows
from ..registry import MINIMAX_H3_AUDIO_SHIFT, MINIMAX_H3_VIDEO_SHIFT
from .minimax_h3_comfy import is_comfy_source, is_truncated_text_encoder, load_comfy_components
from .modular import StepEndBlock, block_errors_not_echoed, disable_progress_bars
from .nucleus_image import Qwen3VLTextProcessor

logger = logging.getLogger(__name__)

MAX_CAPTION_TOKENS = 512  # ai-toolkit's model_kwargs.max_text_length default
CANVAS_MULTIPLE = 32


# ---------------------------------------------------------------------------------------------------------------- modular
# ---------------------------------------------------------------------------------------------------------------- geometry
def reference_pixel_size(width: int, height: int, target_height: int, target_width: int) -> tuple[int, int]:
    """ai-toolkit's ref2va reference size (ComfyUI's "match"): the reference's own aspect, scaled down (never up) to
    the target's pixel area, each side rounded to a multiple of 32 (at least 32). Returns (height, width)."""
    scale = min(1.0, math.sqrt(target_height * target_width / (width * height)))
    return (max(CANVAS_MULTIPLE, round(height * scale / CANVAS_MULTIPLE) * CANVAS_MULTIPLE),
            max(CANVAS_MULTIPLE, round(width * scale / CANVAS_MULTIPLE) * CANVAS_MULTIPLE))


def fit_reference(image, target_height: int, target_width: int):
    from PIL import Image

    height, width = reference_pixel_size(image.width, image.height, target_height, target_width)
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def shift_sigmas(sigmas, shift: float):
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def remap_sigmas(sigmas, from_shift: float, to_shift: float):
    """Sigmas of the ``from_shift`` schedule moved onto the ``to_shift`` one at the same base-grid position."""
    return shift_sigmas(sigmas / (from_shift + sigmas * (1.0 - from_shift)), to_shift)


def dtype_round_trip(image, dtype):
    """ai-toolkit hands control images to the conditioner as [0, 1] tensors in the model dtype and turns them back
    into 8-bit pictures; in bf16 that moves some pixel values by one level."""
    import numpy as np
    import torch
    from PIL import Image

    pixels = torch.from_numpy(np.array(image.convert("RGB"))).float() / 255.0
    pixels = (pixels.to(dtype).float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.numpy())


# ---------------------------------------------------------------------------------------------------------------- blocks
class MiniMaxH3AitkTextEncoderStep(ModularPipelineBlocks):
    """ai-toolkit's presentation of a prompt and its pictures (``encode_minimax_h3_prompt``)."""

    model_name = "minimax-h3"

    @property
    def description(self) -> str:
        return "Encode a MiniMax-H3 prompt and its pictures (a first frame or references) as ai-toolkit does."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from transformers import Qwen2TokenizerFast, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

        return [ComponentSpec("text_encoder", Qwen3VLForConditionalGeneration),
                ComponentSpec("tokenizer", Qwen2TokenizerFast), ComponentSpec("processor", Qwen3VLProcessor)]

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("prompt", required=True, type_hint=str), InputParam("conditioner_images", type_hint=list),
                InputParam("dtype")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("prompt_embeds"), OutputParam("text_token_tags")]

    def __call__(self, components, state):
        import torch

        block_state = self.get_block_state(state)
        tokenizer, processor = components.tokenizer, components.processor
        images = block_state.conditioner_images or []
        token_ids, token_tags, vision_inputs = [], [], {}
        if images:
            vision_inputs = dict(processor.image_processor(images=images, return_tensors="pt"))
            merge = processor.image_processor.merge_size ** 2
            for index, grid in enumerate(vision_inputs["image_grid_thw"]):
                label = tokenizer(f"<Picture {index + 1}>: ", add_special_tokens=False)["input_ids"]
                vision = ([tokenizer.convert_tokens_to_ids("<|vision_start|>")]
                          + [tokenizer.convert_tokens_to_ids("<|image_pad|>")] * (int(grid.prod()) // merge)
                          + [tokenizer.convert_tokens_to_ids("<|vision_end|>")])
                token_ids += label + vision
                token_tags += [components.text_tag] * len(label) + [components.video_tag] * len(vision)
        caption = tokenizer(block_state.prompt.strip(), add_special_tokens=False)["input_ids"][:MAX_CAPTION_TOKENS]
        token_ids += caption
        token_tags += [components.text_tag] * len(caption)
        if not token_ids:
            token_ids, token_tags = [tokenizer.pad_token_id or 0], [components.text_tag]
        # the ComfyUI text stack stops at that layer, without the final norm: its last hidden state is the one
        layer = -1 if is_truncated_text_encoder(components.text_encoder) else components.text_encoder_layer
        with torch.no_grad():
            block_state.prompt_embeds = get_qwen3vl_prompt_embeds(
                components.text_encoder, processor, token_ids, vision_inputs, text_encoder_layer=layer,
                device=components._execution_device, dtype=block_state.dtype)
        block_state.text_token_tags = torch.tensor(token_tags, dtype=torch.long)
        self.set_block_state(state, block_state)
        return components, state


#: what the prepare step hands the transformer by name (diffusers' loop denoiser collects them)
LAYOUT_FIELDS = ("position_ids", "token_tags", "video_indices", "audio_indices", "text_indices")


class MiniMaxH3AitkPrepareStep(ModularPipelineBlocks):
    """Layout, conditioning rows, noise and schedules as ai-toolkit's ``MiniMaxH3Pipeline.__call__`` makes them."""

    model_name = "minimax-h3"

    @property
    def description(self) -> str:
        return "Prepare the packed MiniMax-H3 sequence, its noise and its two schedules as ai-toolkit does."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from diffusers import AutoencoderKLMiniMaxH3, MiniMaxH3Scheduler

        return [ComponentSpec("vae", AutoencoderKLMiniMaxH3), ComponentSpec("scheduler", MiniMaxH3Scheduler),
                ComponentSpec("audio_scheduler", MiniMaxH3Scheduler)]

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam(name, required=True) for name in
                ("text_token_tags", "height", "width", "num_frames", "num_inference_steps")] + [
            InputParam("keyframe"), InputParam("references"), InputParam("generator")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        names = ("latents", "audio_latents", "num_latent_frames", "latent_height", "latent_width", "num_audio_latents",
                 "num_condition_video_rows", "num_condition_audio_rows", "timesteps", "audio_timesteps",
                 "row_timestep_plan")
        return ([OutputParam(name) for name in names]
                + [OutputParam(name, kwargs_type="denoiser_input_fields") for name in LAYOUT_FIELDS])

    def __call__(self, components, state):
        import numpy as np
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        s = self.get_block_state(state)
        device, patch = components._execution_device, components.patch_size
        ratio, channels = components.vae_spatial_compression_ratio, components.vae_latent_channels
        s.num_latent_frames = video_latent_num_frames(s.num_frames, components.vae_frames_per_chunk,
                                                      components.vae_latents_per_chunk)
        s.latent_height, s.latent_width = s.height // ratio, s.width // ratio
        s.num_audio_latents = audio_latent_num_frames(s.num_frames, components.fps)
        noise_aug = components.keyframe_noise_aug
        # the conditions in packed order, each with its own noise draw before it is encoded (ai-toolkit's order)
        conditions = [s.keyframe] if s.keyframe is not None else list(s.references or [])
        rows, condition_latents = [], []
        for image in conditions:
            noise = randn_tensor((1, channels, 1, image.height // ratio, image.width // ratio), generator=s.generator,
                                 dtype=torch.float32).to(device)
            pixels = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None, :, None]
            clean = encode_vae_condition(components.vae, pixels, components.pixel_mean, components.pixel_std,
                                         components.keyframe_encode_seed).to(device)
            condition_latents.append(noise_aug * clean + (1.0 - noise_aug) * noise)
            rows.append(patchify_video_latents(condition_latents[-1], patch))
        geometry = (s.num_latent_frames, s.latent_height, s.latent_width, s.num_audio_latents, patch,
                    components.audio_channels, components.audio_tag, components.video_tag)
        if s.references:
            layout = MiniMaxH3Ref2VAPrepareLayoutStep.build_ref2va_packed_sequence(
                s.text_token_tags, [SimpleNamespace(kind="image")] * len(conditions), condition_latents, [],
                *geometry)
        else:
            anchors = ("first",) if s.keyframe is not None else ()
            layout = MiniMaxH3PrepareLayoutStep.build_packed_sequence(s.text_token_tags, *geometry, anchors)
        *fields, s.num_condition_video_rows, s.num_condition_audio_rows = layout
        for name, value in zip(LAYOUT_FIELDS, fields):
            setattr(s, name, value.to(device))

        video = randn_tensor((1, channels, s.num_latent_frames, s.latent_height, s.latent_width),
                             generator=s.generator, dtype=torch.float32).to(device)
        rows.append(patchify_video_latents(video, patch))
        audio = randn_tensor((1, components.audio_channels, components.audio_latent_channels, s.num_audio_latents),
                             generator=s.generator, dtype=torch.float32).to(device)
        s.latents = torch.cat(rows)
        s.audio_latents = audio[0].permute(0, 2, 1).reshape(-1, components.audio_latent_channels).contiguous()

        components.scheduler.set_timesteps(s.num_inference_steps + 1, device=device)
        video_sigmas = components.scheduler.sigmas.cpu()
        audio_sigmas = remap_sigmas(video_sigmas, components.scheduler.shift, components.audio_scheduler.shift)
        components.audio_scheduler.set_timesteps(sigmas=audio_sigmas, device=device)
        s.timesteps, s.audio_timesteps = components.scheduler.timesteps, components.audio_scheduler.timesteps
        s.row_timestep_plan = [
            tuple(t.to(device) for t in MiniMaxH3SetTimestepsStep.build_row_timesteps(
                s.video_indices.cpu(), s.audio_indices.cpu(), s.num_condition_video_rows, s.num_condition_audio_rows,
                s.text_indices.numel(), float(t), float(t_audio), max(float(t), noise_aug), 1.0))
            for t, t_audio in zip(s.timesteps, s.audio_timesteps)]
        self.set_block_state(state, s)
        return components, state


class MiniMaxH3StepEnd(StepEndBlock):
    model_name = "minimax-h3"


class MiniMaxH3AitkDenoiseStep(MiniMaxH3DenoiseStep):
    block_classes = [*MiniMaxH3DenoiseStep.block_classes, MiniMaxH3StepEnd]
    block_names = [*MiniMaxH3DenoiseStep.block_names, "step_end"]


class MiniMaxH3AitkDecodeStep(ModularPipelineBlocks):
    """Decode both streams: the video (denormalized latents in the VAE's dtype, ImageNet-normalized RGB back to
    [0, 1]) as float32 ``[T, H, W, C]``, the audio as ``[2, samples]`` (each stereo channel one batch item of the
    mono audio VAE)."""

    model_name = "minimax-h3"

    @property
    def description(self) -> str:
        return "Decode MiniMax-H3 video and audio latents."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from diffusers import AutoencoderKLMiniMaxH3, AutoencoderKLMiniMaxH3Audio

        return [ComponentSpec("vae", AutoencoderKLMiniMaxH3), ComponentSpec("audio_vae", AutoencoderKLMiniMaxH3Audio)]

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("latents", required=True), InputParam("audio_latents", required=True)]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("video"), OutputParam("audio")]

    def __call__(self, components, state):
        import torch

        s = self.get_block_state(state)
        vae, audio_vae = components.vae, components.audio_vae
        device = s.latents.device

        def denormalized(latents, module):
            shape = (1, -1) + (1,) * (latents.dim() - 2)
            std, mean = (torch.tensor(getattr(module.config, name), device=device).view(shape)
                         for name in ("latents_std", "latents_mean"))
            return (latents * std + mean).to(module.dtype)

        with torch.no_grad():
            video = vae.decode(denormalized(s.latents, vae), return_dict=False)[0].float()
            mean = torch.tensor(components.pixel_mean, device=device).view(1, -1, 1, 1, 1)
            std = torch.tensor(components.pixel_std, device=device).view(1, -1, 1, 1, 1)
            s.video = (video * std + mean).clamp(0, 1)[0].permute(1, 2, 3, 0).cpu().numpy()
            audio = audio_vae.decode(denormalized(s.audio_latents, audio_vae), return_dict=False)[0]
            s.audio = audio[:, 0].float().cpu().numpy()
        self.set_block_state(state, s)
        return components, state


class MiniMaxH3AitkBlocks(SequentialPipelineBlocks):
    """ai-toolkit's MiniMax-H3 sample path over diffusers' components and loop blocks."""

    model_name = "minimax-h3"
    block_classes = [MiniMaxH3AitkTextEncoderStep, MiniMaxH3AitkPrepareStep, MiniMaxH3AitkDenoiseStep,
                     MiniMaxH3AfterDenoiseStep, MiniMaxH3AitkDecodeStep]
    block_names = ["text_encoder", "prepare", "denoise", "after_denoise", "decode"]

    @property
    def description(self) -> str:
        return "MiniMax-H3 text/first-frame to video + audio, as ai-toolkit samples it."


class MiniMaxH3AitkRef2VADenoiseStep(MiniMaxH3Ref2VADenoiseStep):
    block_classes = [*MiniMaxH3Ref2VADenoiseStep.block_classes, MiniMaxH3StepEnd]
    block_names = [*MiniMaxH3Ref2VADenoiseStep.block_names, "step_end"]


class MiniMaxH3AitkRef2VABlocks(MiniMaxH3AitkBlocks):
    """The same path against the ref2va partition (``transformer_ref``), with references instead of a keyframe."""

    block_classes = [MiniMaxH3AitkRef2VADenoiseStep if block is MiniMaxH3AitkDenoiseStep else block
                     for block in MiniMaxH3AitkBlocks.block_classes]

    @property
    def description(self) -> str:
        return "MiniMax-H3 references to video + audio (ref2va), as ai-toolkit samples it."


# ---------------------------------------------------------------------------------------------------------------- LoRA names
# The original checkpoint's module names (what ai-toolkit saves under `diffusion_model.`) -> diffusers' names.
MINIMAX_H3_TOP_NAMES = {
    "video_patch_proj": "proj_in",
    "audio_patch_proj": "audio_proj_in",
    "condition_proj": "context_embedder",
    "time_embedder.proj_in": "time_embedder.linear_1",
    "time_embedder.proj_out": "time_embedder.linear_2",
    "final_layer.adaln_proj.linear": "norm_out.linear",
    "final_layer.video_out": "proj_out",
    "final_layer.audio_out": "audio_proj_out",
}
MINIMAX_H3_BLOCK_NAMES = {
    "attn.qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.out_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",  # [gate; value] here, [value; gate] in diffusers' SwiGLU
    "mlp.fc2": "ff.net.2",
    "adaln_proj.linear": "adaln_proj.linear",
}
_MINIMAX_H3_BLOCK = re.compile(r"^(blocks|token_refiner\.blocks)\.(\d+)\.(.+)$")
_BLOCK_PARENTS = {"blocks": "transformer_blocks", "token_refiner.blocks": "token_refiner.refiner_blocks"}


def minimax_h3_original_to_diffusers(converted: ConvertedLora) -> ConvertedLora:
    """Place a MiniMax-H3 LoRA saved under the original module names on ``MiniMaxH3Transformer3DModel``: the fused
    QKV splits into ``to_q``/``to_k``/``to_v`` (equal thirds), the SwiGLU input projection swaps its two halves, the
    rest is renamed. diffusers names pass through."""
    def rename(path: str, patch: ModulePatch):
        block = _MINIMAX_H3_BLOCK.match(path)
        if block and block.group(3) in MINIMAX_H3_BLOCK_NAMES:
            parent = f"{_BLOCK_PARENTS[block.group(1)]}.{block.group(2)}."
            target = MINIMAX_H3_BLOCK_NAMES[block.group(3)]
            rows = patch.delta_shape()[0]
            if isinstance(target, tuple):
                return [(parent + name, part) for name, part in zip(target, split_patch_rows(patch, [rows // 3] * 3))]
            if block.group(3) == "mlp.fc1":
                gate, value = split_patch_rows(patch, [rows // 2, rows - rows // 2])
                patch = join_patch_rows([value, gate])
            return [(parent + target, patch)]
        if path in MINIMAX_H3_TOP_NAMES:
            return [(MINIMAX_H3_TOP_NAMES[path], patch)]
        return None

    return rename_patches(converted, rename, "MiniMax-H3", "+minimax_names")


# ---------------------------------------------------------------------------------------------------------------- family
class MiniMaxH3FamilyPipeline(AITKPipeline):
    """``minimax_h3`` (text or first frame to video with audio)."""

    denoiser = "transformer"
    blocks = MiniMaxH3AitkBlocks
    #: control images are ref2va references (their own aspect, the target's area), not a first frame
    references = False

    offload_refusal = ("runs on diffusers' modular pipeline, which has no CPU offloading in this package: use "
                       "offload='none', or 'auto', which streams the transformer's blocks where it does not fit.")

    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        """The modular pipeline of :class:`MiniMaxH3AitkBlocks` with the checkpoint's components (the bf16 repo's
        modular layout, or the ComfyUI files of ``Comfy-Org/MiniMax-H3``: ``minimax_h3_comfy``), and the two
        schedulers ai-toolkit samples with (video shift 12, audio shift 3). The audio VAE stays float32, as
        ai-toolkit keeps it."""
        import torch
        from diffusers import MiniMaxH3Scheduler

        pipe = cls.blocks().init_pipeline(None if is_comfy_source(source) else source)
        if is_comfy_source(source):
            pipe.update_components(**load_comfy_components(source, spec.base, cls.denoiser, torch_dtype))
        else:
            local = {"pretrained_model_name_or_path": source} if os.path.isdir(source) else {}
            names = [cls.denoiser, "vae", "audio_vae", "text_encoder", "tokenizer"]
            pipe.load_components(names=names, dtype={"audio_vae": torch.float32, "default": torch_dtype}, **local)
            # the checkpoint's processor folder, without the video processor (which needs torchvision)
            pipe.update_components(processor=Qwen3VLTextProcessor.from_pretrained(source, subfolder="processor"))
        missing = [name for name in [cls.denoiser, "vae", "audio_vae", "text_encoder", "tokenizer", "processor"]
                   if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"{source!r}: the MiniMax-H3 components {missing} could not be loaded (see the log above).")
        pipe.update_components(scheduler=MiniMaxH3Scheduler(shift=MINIMAX_H3_VIDEO_SHIFT),
                               audio_scheduler=MiniMaxH3Scheduler(shift=MINIMAX_H3_AUDIO_SHIFT))
        disable_progress_bars(pipe._blocks)
        return pipe

    def lora_name_mapper(self):
        return minimax_h3_original_to_diffusers

    @contextlib.contextmanager
    def _vae_tiling(self, enabled: bool):
        """MiniMax-H3's video VAE tiles by default, and the released frames are the tiled ones: ``vae_tiling`` has
        nothing to switch on, and switching it off afterwards (as the base class does) would change later videos."""
        yield

    def resolve_params(self, prompt: str, **kwargs) -> GenerationParams:
        params = super().resolve_params(prompt, **kwargs)
        video = self.spec.video
        if params.fps != video.fps:
            raise ValueError(f"{self.spec.model_id} generates at {video.fps} fps only (its audio and rotary clocks are "
                             f"tied to it), got fps={params.fps}.")
        # diffusers' video VAE decodes whole chunks: the shortest video is one frame step long
        if params.num_frames < video.frames(1):
            raise ValueError(f"{self.spec.model_id} needs at least {video.frames(1)} frames ({video.frame_step}n+"
                             f"{video.frame_offset} with n >= 1: {video.frames(1)}, {video.frames(2)}, ... "
                             f"{video.num_frames}): diffusers' video VAE decodes whole {video.frame_step}-frame chunks; "
                             f"got {params.num_frames}.")
        return params

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        from PIL import Image

        call = {"prompt": params.prompt, "height": params.height, "width": params.width,
                "num_frames": params.num_frames, "dtype": getattr(self.pipe, self.denoiser).dtype}
        images = params.control_images
        if images:
            # the conditioner sees each control image at its own size, the VAE the canvas-fitted one
            call["conditioner_images"] = [dtype_round_trip(image, self.dtype) for image in images]
            if self.references:
                call["references"] = [fit_reference(image, params.height, params.width) for image in images]
            else:
                call["keyframe"] = images[0].resize((params.width, params.height), Image.LANCZOS)
        return call

    def call_pipeline(self, call: dict):
        """One packed sequence per batch item, each with its own generator (seed + i)."""
        generators = call.pop("generator")
        videos, audios = [], []
        with block_errors_not_echoed():
            for generator in generators if isinstance(generators, list) else [generators]:
                state = self.pipe(**call, generator=generator)
                videos.append(state.get("video"))
                audios.append(state.get("audio"))
        return videos, audios

    def postprocess(self, output, params: GenerationParams) -> dict:
        import numpy as np

        videos, audios = output
        return {"images": np.stack(videos).astype(np.float32), "audio": np.stack(audios).astype(np.float32),
                "sample_rate": int(self.pipe.audio_vae.config.sampling_rate)}


class MiniMaxH3Ref2VAFamilyPipeline(MiniMaxH3FamilyPipeline):
    """``minimax_h3_ref2va`` (reference images to video with audio), on the ``transformer_ref`` partition."""

    denoiser = "transformer_ref"
    blocks = MiniMaxH3AitkRef2VABlocks
    references = True
