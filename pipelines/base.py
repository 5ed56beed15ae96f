"""Behaviour shared by every family, taken from ai-toolkit's sample path (``ai-toolkit.md`` §2.1).

A family file subclasses :class:`AITKPipeline` and overrides only what differs: how its diffusers pipeline is loaded,
how generation parameters map onto that pipeline's ``__call__``, and any extra validation. The rest is here:
size snapping, seeds and noise, trigger words, control-image preparation, LoRA application, progress and
interruption, and a typed result.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import numbers
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import hub, single_file
from .component_files import check_component_files
from .runtime import accelerate, parallel
from .runtime.options import MASKLESS_ATTENTION_KERNELS, LoadOptionError, LoadOptions, compile_offload_conflict
from .runtime.readahead import start_readahead
from .registry import ModelSpec, get_spec

logger = logging.getLogger(__name__)

MAX_SIDE = 8192
MAX_STEPS = 1000
MAX_BATCH = 16
MAX_SEED = 2**64 - 1
RANDOM_SEED_MAX = 2**32 - 1  # ai-toolkit draws random seeds in [0, 2^32 - 1]

ProgressCallback = Callable[[int, int], None]
#: ``on_latents(step, total, latents)``: the step's latents, image-shaped (see :meth:`AITKPipeline.preview_latents`)
LatentsCallback = Callable[[int, int, Any], None]


class GenerationInterrupted(RuntimeError):
    """Raised (by a progress callback) to stop sampling between two steps."""


class NonFiniteOutputError(ValueError):
    """The model produced NaN or inf pixels (or audio samples): nothing usable came out, so nothing is returned."""


# ---------------------------------------------------------------------------------------------------------------- helpers
def floor_sample_size(value: int) -> int:
    """ai-toolkit's sample-config size rule (``GenerateImageConfig``): floor to a multiple of 8, at least 64."""
    return max(64, value - value % 8)


def snap_size(value: int, divisor: int) -> int:
    """ai-toolkit's size rule: :func:`floor_sample_size`, then floor to the family's divisor."""
    value = floor_sample_size(value)
    return value - value % divisor


def snap_frames(num_frames: int, step: int, offset: int = 1) -> int:
    """Floor a frame count to ``step * k + offset`` (4k+1 for Wan, 8k+1 for LTX-2, 17k+5 for MiniMax-H3), at least
    ``offset``."""
    return max(offset, ((num_frames - offset) // step) * step + offset)


def apply_trigger(prompt: str, trigger_word: str | None) -> str:
    """Replace ``[trigger]`` and ``[name]`` by the trigger word, only when one is set (as ai-toolkit does)."""
    if not trigger_word:
        return prompt
    return prompt.replace("[trigger]", trigger_word).replace("[name]", trigger_word)


def to_pil_rgb(image):
    """Accept a PIL image, a path, a numpy array or a torch tensor (H,W,C or 1,H,W,C in 0..1) and return PIL RGB."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"A control image must be a single image, got a batch of {array.shape[0]}.")
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"A control image must be H x W x 3 (or 4), got shape {tuple(array.shape)}.")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array[..., :3])


def check_finite_output(model_id: str, fields: dict) -> None:
    """Raise :class:`NonFiniteOutputError` when the generated ``images`` or ``audio`` hold NaN or inf (the image
    processor's clamp turns inf into white but keeps NaN, which would be written as black pixels)."""
    import numpy as np

    for name, what in (("images", "frames" if np.ndim(fields["images"]) == 5 else "an image"), ("audio", "audio")):
        values = fields.get(name)
        if values is None:
            continue
        finite = np.isfinite(values)
        if not finite.all():
            raise NonFiniteOutputError(
                f"{model_id} produced {what} with {finite.size - int(finite.sum())} NaN/inf values out of {finite.size}; "
                "nothing was returned. Usual causes: a LoRA at too high a strength or from a training run that diverged "
                "(try a lower strength or an earlier checkpoint), or fp16 overflow (load with dtype bf16 or fp32).")


# ---------------------------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class GenerationParams:
    """Resolved parameters of one generation: what really runs (after snapping, seed drawing, trigger words)."""

    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    batch_size: int = 1
    control_images: tuple = ()
    num_frames: int | None = None
    fps: int | None = None
    extra: dict = field(default_factory=dict)
    #: per-image prompts, negatives and seeds of a batch given as lists (``generate(prompt=[...], seed=[...])``);
    #: empty when every image shares ``prompt``/``negative`` and image i uses ``seed + i``
    item_prompts: tuple[str, ...] = ()
    item_negatives: tuple[str, ...] = ()
    item_seeds: tuple[int, ...] = ()

    @property
    def prompts(self) -> list[str]:
        """The prompt of each image of the batch."""
        return list(self.item_prompts or (self.prompt,) * self.batch_size)

    @property
    def negatives(self) -> list[str]:
        """The negative prompt of each image of the batch."""
        return list(self.item_negatives or (self.negative,) * self.batch_size)

    @property
    def seeds(self) -> list[int]:
        """The seed of each image of the batch: the given per-image seeds, else ``seed + i`` for image i, as
        ai-toolkit's ``walk_seed`` previews."""
        return list(self.item_seeds or (self.seed + i for i in range(self.batch_size)))

    @property
    def distinct_texts(self) -> bool:
        """Whether the images of the batch have different prompts or negatives."""
        return len(set(self.prompts)) > 1 or len(set(self.negatives)) > 1


@dataclass
class GenerationResult:
    """What :meth:`AITKPipeline.generate` returns.

    Attributes:
        images (np.ndarray or None): float32 in 0..1, ``[B, H, W, C]`` for images or ``[B, T, H, W, C]`` for videos;
            None for audio-only models.
        params (GenerationParams): the effective parameters (snapped size, drawn seed, prompt after trigger words).
        model_id (str): the registry id.
        loras (list[dict]): the applied LoRAs with their strength and matched module counts.
        timings (dict): seconds, e.g. ``total``, ``denoise``, ``steps``.
        audio (np.ndarray, *optional*): ``[B, channels, samples]`` float32 for audio-video and audio-only models.
        sample_rate (int, *optional*): the audio sample rate.
    """

    images: Any
    params: GenerationParams
    model_id: str
    loras: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    audio: Any = None
    sample_rate: int | None = None

    @property
    def width(self) -> int:
        return self.params.width

    @property
    def height(self) -> int:
        return self.params.height

    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def is_video(self) -> bool:
        return self.images is not None and self.images.ndim == 5

    @property
    def is_audio(self) -> bool:
        """An audio-only result: no images, ``audio`` holds the waveforms."""
        return self.images is None

    def to_pil(self) -> list:
        """One PIL image per batch item (for videos: the frames of the first item)."""
        import numpy as np
        from PIL import Image

        arrays = self.images[0] if self.is_video else self.images
        return [Image.fromarray((np.clip(a, 0, 1) * 255.0 + 0.5).astype(np.uint8)) for a in arrays]

    def metadata(self, index: int = 0) -> dict:
        """The parameters of image ``index`` of the batch as a JSON-friendly dict (embedded in PNG text chunks): its
        own seed, which makes it again alone."""
        p = self.params
        out = {
            "model": self.model_id, "prompt": p.prompts[index], "negative": p.negatives[index], "width": p.width,
            "height": p.height,
            "steps": p.steps, "guidance": p.guidance, "seed": p.seeds[index],
            "loras": [{"name": l["name"], "strength": l["strength"]} for l in self.loras],
            "software": "aitk-inference",
        }
        if p.num_frames is not None:
            out.update(num_frames=p.num_frames, fps=p.fps)
        if p.extra:
            out["options"] = dict(p.extra)
        return out


@dataclass(frozen=True)
class LatentLayout:
    """How a family's sampling loop holds its latents between steps, so that a preview can see them as an image.

    Args:
        tokens (bool, defaults to False): a ``[B, N, D]`` token sequence over (latent frames,) rows and columns, row by
            row; False: ``[B, C, H, W]`` or ``[B, C, T, H, W]`` already.
        patch (int, defaults to 1): each token (or each group of ``patch**2`` channels) packs a ``patch x patch``
            block of every latent channel (FLUX-style 2x2 packing: 2).
        channels_last (bool, defaults to False): the packed values run (patch row, patch column, channel) with the
            channel fastest; False: (channel, patch row, patch column).
        temporal_ratio (str, *optional*): for video tokens, the pipeline attribute holding the VAE's temporal
            compression (the latent frame count follows from ``num_frames``).
    """

    tokens: bool = False
    patch: int = 1
    channels_last: bool = False
    temporal_ratio: str | None = None


# ---------------------------------------------------------------------------------------------------------------- base
def freeze(pipe) -> None:
    """Mark every weight of ``pipe``'s model components as not requiring gradients, as they are while ai-toolkit
    samples (its base model is frozen) and as the first LoRA would leave them (PEFT freezes the layers it wraps).
    Not only bookkeeping: torch's CPU ``matmul`` folds a non-contiguous input differently when the weight requires
    gradients, so a pipeline's first outputs moved (2e-7 on ACE-Step) once any LoRA had been applied."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)


@contextlib.contextmanager
def tiles_when_out_of_memory(vae, model_id: str):
    """Within the block, a ``vae.decode`` that runs out of GPU memory is run again in tiles (the VAE's
    ``enable_tiling``), with a warning: an image slightly different from the untiled one rather than an error after
    the whole denoising. A tiled decode that still does not fit raises as before."""
    import torch

    untiled = vae.decode
    patched_before = "decode" in vae.__dict__

    def decode(*args, **kwargs):
        try:
            return untiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            pass  # out of the except block first, so that the failed attempt's tensors are released
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("%s: decoding ran out of GPU memory; decoding again in tiles, which changes the output slightly "
                       "(vae_tiling=True tiles from the start).", model_id)
        vae.enable_tiling()
        try:
            return untiled(*args, **kwargs)
        finally:
            vae.disable_tiling()

    vae.decode = decode
    try:
        yield
    finally:
        if patched_before:
            vae.decode = untiled
        else:
            del vae.decode


class AITKPipeline:
    """A loaded model id: the diffusers pipeline, its LoRA stack and ai-toolkit's sampling behaviour.

    Build one with :func:`aitk_inference.load_pipeline` (or ``AITKPipeline.from_spec``); then call
    :meth:`set_loras` and :meth:`generate`. ``.pipe`` is the underlying diffusers pipeline.
    """

    #: the pipeline component a ``transformer.``/``diffusion_model.`` LoRA key targets
    denoiser: str = "transformer"
    #: the type of ``spec.options`` this family reads (a registry options dataclass), None when it reads none
    options_type: type | None = None
    #: the fields of a job's :class:`~.jobs.config.SampleSpec`, beyond the common ones, that this family's ai-toolkit
    #: previews use; ``reproduce`` passes them to :meth:`generate` as generation options
    sample_options: tuple[str, ...] = ()
    #: whether a single-file base (ComfyUI's ``diffusion_models``/``checkpoints`` files) goes through
    #: ``pipelines/single_file.py``: the denoiser(s) from the file, the rest from ``components``. Families that read
    #: their own checkpoint files, or refuse them, leave it off and see the file in :meth:`load_diffusers_pipeline`
    single_file_denoisers: bool = False
    #: why this family cannot take the pipeline-wide CPU offload modes (``model``, ``sequential``, ``group``: the end
    #: of a sentence that starts with the model id), or None when it can; such a family takes ``offload="none"`` and
    #: ``"auto"``, which streams its denoiser's blocks (our own streaming, no pipeline hooks) when it does not fit
    offload_refusal: str | None = None
    #: the components this family can take from ComfyUI's text-encoder and VAE files (``text_encoder_file``...):
    #: component -> the layout its file has (``pipelines/component_files.py``)
    component_files: dict = {}
    #: how the latents ``callback_on_step_end`` sees are laid out (for :meth:`preview_latents`)
    latent_layout: LatentLayout = LatentLayout()
    #: whether one call may give the images of a batch different prompts and negatives (``generate(prompt=[...])``),
    #: each image then matching its one-by-one render (measured per id by benchmarks/batch_parity.py); families
    #: without it render a batch of one prompt only, and ``reproduce`` renders their distinct previews one by one
    batches_distinct_prompts: bool = False

    def __init__(self, spec: ModelSpec, pipe, device: str, dtype, offload: str, lora_mode: str, source: str):
        from .lora.stack import LoraStack

        self.spec = spec
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.offload = offload
        self.lora_mode = lora_mode
        self.source = source
        self.compiled: str | None = None
        #: the ``torch.compile`` settings of ``compiled``, for the blocks a later placement leaves resident
        self.compile_kwargs: dict = {}
        self.attention = "sdpa"
        self.quantize = "none"
        #: the ``parallel`` load option this pipeline's denoisers are sharded with (``none``: one process)
        self.parallel = "none"
        #: with ``offload="group"`` chosen by ``auto``: denoiser component -> bytes of its blocks kept on the GPU
        self.resident: dict[str, int] | None = None
        #: with that choice: the components placed on the GPU as they are (``accelerate.components_placed_whole``)
        self.placed_whole: set[str] = set()
        self.lock = threading.RLock()
        self.loras = LoraStack(
            self.lora_components(), lora_mode, self.denoiser, spec.model_id,
            name_mapper=self.lora_name_mapper(), route=self.lora_route(), pass_sides=spec.lora_pass_sides,
        )

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_spec(cls, spec: ModelSpec, options: LoadOptions | None = None) -> "AITKPipeline":
        """Load ``spec``'s pipeline with ``options`` (default: ``LoadOptions()``, the model's base checkpoint on the
        best device); every option is checked before any weights load."""
        options = (options or LoadOptions()).resolve(spec)
        source, device, torch_dtype, offload = options.base, options.device, options.dtype, options.offload
        if cls.offload_refusal and offload not in ("none", "auto"):
            raise ValueError(f"{spec.model_id} {cls.offload_refusal}")
        if options.parallel != "none":
            parallel.init_process_group(device)
        started = time.perf_counter()
        start_readahead(source)
        overrides = accelerate.direct_load_options(device, offload)
        if options.components is not None and not cls.single_file_denoisers:
            raise ValueError(f"{spec.model_id} does not take `components`: its family loads a single file as a whole "
                             "(or not at all); give the file or folder as `base` alone.")
        files = options.component_files()
        check_component_files(cls, spec, files)
        if files or (cls.single_file_denoisers and single_file.is_single_file_source(source)):
            pipe = single_file.load_single_file_pipeline(cls, spec, source, options.components, torch_dtype, overrides,
                                                         files)
        else:
            try:
                pipe = cls.load_diffusers_pipeline(spec, source, torch_dtype, **overrides)
            except Exception as error:
                unavailable = hub.base_unavailable(spec, source, error)
                if unavailable is None:
                    raise
                raise unavailable from error
        if spec.scheduler is not None:
            pipe.scheduler = cls.make_scheduler(spec)
        freeze(pipe)
        pipe.set_progress_bar_config(disable=True)
        pipeline = cls(spec, pipe, device, torch_dtype, offload, options.lora_mode, source)
        if offload == "auto":
            pipeline.resolve_auto_offload(options.quantize, options.compile)
        accelerate.place(pipe, device, pipeline.offload, pipeline.resident, pipeline.placed_whole)
        logger.info("Loaded %s from %s in %.2fs (%s, %s, offload=%s)", spec.model_id, source,
                    time.perf_counter() - started, device, torch_dtype, pipeline.offload)
        pipeline.set_attention_kernel(options.attention)
        if options.quantize == "fp8" and pipeline.quantize != "fp8":
            pipeline.quantize_fp8()
        if options.quantize == "fp8" and options.compile == "none":
            logger.warning("%s: quantize='fp8' without compile saves GPU memory but runs slower than bf16 (measured "
                           "eager: FLUX.1-dev and Qwen-Image, BENCHMARKS.md); compile='regional' makes it the fast "
                           "mode.", spec.model_id)
        if options.parallel != "none":
            parallel.enable_context_parallel(pipeline.denoisers(), options.parallel, device)
            pipeline.parallel = options.parallel
        if options.compile != "none":
            pipeline.compile_denoiser(options.compile)
        return pipeline

    def resolve_auto_offload(self, quantize: str = "none", compile: str = "none") -> None:
        """Replace ``offload="auto"`` by the placement it becomes for this pipeline, whose weights are still on the
        CPU (:meth:`choose_offload`; ``offload`` and ``resident`` are set, nothing is placed). With ``quantize="fp8"``
        weights that do not all fit as they are get quantized here, where they are (each layer computed on the GPU),
        and the plan is made again with their FP8 bytes. ``compile`` is checked against the choice."""
        offload, resident, whole = self.choose_offload(self.spec, self.pipe, self.device)
        if quantize == "fp8" and offload != "none":
            self.quantize_fp8()
            offload, resident, whole = self.choose_offload(self.spec, self.pipe, self.device, whole_components=False)
        self.offload, self.resident, self.placed_whole = offload, resident, whole
        conflict = compile_offload_conflict(compile, offload)
        if conflict:
            raise LoadOptionError(f"offload='auto' chose {offload!r} (the weights do not all fit the GPU memory this "
                                  f"process may use), and {conflict}.", {"compile": compile, "offload": "auto"})

    @classmethod
    def choose_offload(cls, spec: ModelSpec, pipe, device: str,
                       whole_components: bool = True) -> tuple[str, dict | None, set[str]]:
        """What ``offload="auto"`` becomes for ``pipe`` (loaded on the CPU) on ``device``: the fastest placement that
        fits the GPU memory this process may use (``accelerate.choose_offload``), keeping room for activations and
        the decode (``accelerate.activation_reserve``), and, when that is ``group``, the components placed whole on
        the GPU (``accelerate.components_placed_whole``) and how many bytes of each denoiser's blocks stay on the GPU
        beside them (``accelerate.resident_block_budget``; the rest stream through). Block Linears already in FP8 count
        their FP8 bytes. ``model`` becomes ``group`` where whole components cannot move: FP8 weights
        (``whole_components=False``: they are streamed as plain tensors but were never measured moving whole) and a
        family whose pipeline has no CPU offloading (``offload_refusal``)."""
        sizes = accelerate.component_bytes(pipe)
        budget = accelerate.gpu_memory_budget(device)
        reserve = accelerate.activation_reserve(getattr(pipe, "vae", None), bool(spec.video), spec.width * spec.height)
        offload = accelerate.choose_offload(sizes, budget, reserve)
        if offload == "model" and (cls.offload_refusal or not whole_components):
            offload = "group"
        resident, whole = None, set()
        if offload == "group":
            names = spec.experts.components if spec.experts else (cls.denoiser,)
            whole = accelerate.components_placed_whole(pipe, bool(spec.video), sizes, budget, reserve)
            resident = accelerate.resident_block_budget({name: getattr(pipe, name) for name in names}, budget,
                                                        reserve + sum(sizes.get(name, 0) for name in whole))
        if budget is not None:
            logger.info("%s: offload='auto' -> %r (weights %.1f GiB, largest component %.1f GiB, %.1f GiB kept for "
                        "activations, %.1f GiB of GPU memory usable%s)", spec.model_id, offload,
                        sum(sizes.values()) / 2**30, max(sizes.values(), default=0) / 2**30, reserve / 2**30,
                        budget / 2**30, f"; denoiser blocks kept on the GPU: {resident}, placed whole: "
                        f"{sorted(whole)}" if resident else "")
        return offload, resident, whole

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        """Load the diffusers pipeline; ``overrides`` (components or init flags, e.g. ``safety_checker=None``) go to
        ``from_pretrained``/``from_single_file``. Families with extra components override this."""
        pipeline_cls = cls.diffusers_pipeline_class(spec)
        if os.path.isfile(source) and source.endswith((".safetensors", ".sft")):
            if not hasattr(pipeline_cls, "from_single_file"):
                raise ValueError(f"{spec.model_id}: {pipeline_cls.__name__} cannot load a single file; give a diffusers folder.")
            overrides.pop("device_map", None)  # single-file loading has no device map; place() moves it
            return pipeline_cls.from_single_file(source, dtype=torch_dtype, **overrides)
        if os.path.exists(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
            raise FileNotFoundError(
                f"{source!r} is not a diffusers pipeline folder (no model_index.json). Give the folder of a "
                f"save_pretrained/hub snapshot of {spec.base}, or a hub repo id."
            )
        return pipeline_cls.from_pretrained(source, dtype=torch_dtype, **overrides)

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        import diffusers

        return getattr(diffusers, spec.pipeline_class)

    @classmethod
    def make_scheduler(cls, spec: ModelSpec):
        import diffusers

        return getattr(diffusers, spec.scheduler.class_name).from_config(dict(spec.scheduler.config))

    # ------------------------------------------------------------------------------------------------ acceleration
    # Thin methods over ``runtime.accelerate`` that apply to this pipeline's ``denoisers()`` and record the setting.
    place = staticmethod(accelerate.place)

    def compile_denoiser(self, mode: str = "regional", **compile_kwargs) -> None:
        """``torch.compile`` the denoiser(s) in place (see ``accelerate.compile_denoiser``).

        In ``fused`` LoRA mode strength changes and LoRA switches edit the weights in place, so the compiled graphs
        are reused (no recompilation). In ``dynamic`` mode adding PEFT layers or changing a strength recompiles.
        With ``offload="auto"``, ``regional`` compiles the blocks that stay on the device and those that stream, also
        after a LoRA change places them again (:meth:`_placed_again`); with ``group`` or ``sequential`` (hooks on
        every layer) the blocks run eager; ``full`` refuses offloading.
        """
        conflict = compile_offload_conflict(mode, self.offload)
        if conflict:
            raise LoadOptionError(conflict + ".", {"compile": mode, "offload": self.offload})
        accelerate.compile_denoiser(self.denoisers(), mode, **compile_kwargs)
        self.compiled, self.compile_kwargs = mode, compile_kwargs

    def _placed_again(self) -> None:
        """After offloading was applied again (LoRA changes): a regionally compiled denoiser compiles its blocks as
        they are placed now (``accelerate.compile_resident_blocks``)."""
        if self.compiled == "regional":
            for denoiser in self.denoisers():
                accelerate.compile_resident_blocks(denoiser, **self.compile_kwargs)

    def denoisers(self) -> list:
        """The denoiser module(s) that compile, attention and quantization settings apply to (MoE families: all
        experts)."""
        return [getattr(self.pipe, self.denoiser)]

    def set_attention_kernel(self, kernel: str) -> None:
        """Run the denoiser's attention with ``kernel``, a key of ``runtime.options.ATTENTION_KERNELS`` (see
        ``accelerate.set_attention_kernel``)."""
        accelerate.set_attention_kernel(self.denoisers(), kernel, self.device, self.spec.model_id)
        self.attention = kernel

    def quantize_fp8(self) -> None:
        """Give the denoiser's block Linears FP8 weights (see ``pipelines.runtime.quantize``). In ``fused`` LoRA mode LoRAs
        are merged before quantizing (the original weights are kept for that, on the GPU where they fit); in ``dynamic`` mode they run as
        adapters next to the FP8 layers."""
        if self.loras.active:
            raise ValueError("Quantize before applying LoRAs: remove them with set_loras([]) and apply them again "
                             "after quantize_fp8().")
        keep_master = self.lora_mode == "fused"
        count = accelerate.quantize_fp8(self.denoisers(), self.device, self.offload, keep_master)
        logger.info("%s: %d block Linear layers now have FP8 weights (LoRAs %s)", self.spec.model_id, count,
                    "merged before quantizing" if keep_master else "as adapters")
        self.quantize = "fp8"

    # ------------------------------------------------------------------------------------------------ LoRA hooks
    def lora_components(self) -> dict:
        """The components LoRAs may patch (those of the spec that exist on the pipeline)."""
        return {name: getattr(self.pipe, name) for name in self.spec.lora_components
                if getattr(self.pipe, name, None) is not None}

    def lora_name_mapper(self):
        """A family's renaming stage for original (non-diffusers) module names; None when names are diffusers'."""
        return None

    def lora_route(self):
        """A MoE family's routing of high/low-noise LoRAs onto its experts; None for single-transformer models."""
        return None

    def complete_lora_request(self, request):
        """Fill what a family can infer about a LoRA request (Wan 2.2: the expert from the file name)."""
        return request

    def check_lora(self, item):
        """Check one LoRA against this model without touching any weight: the request completed by the family (Wan
        2.2 A14B: the expert from a ``*_high_noise``/``*_low_noise`` file name), its strength, its side, and its
        file read, converted and matched against the model's modules (cached by file identity, so applying it later
        re-reads nothing). Every way of applying a LoRA (:meth:`set_loras`, the ComfyUI nodes, the server) goes
        through here.

        Args:
            item (LoraRequest | str | tuple[str, float] | tuple[str, float, str]): a request, a path, or
                ``(path, strength[, side])``.

        Returns:
            CheckedLora: the completed ``request`` (with the side the family inferred), its ``strength`` and
            ``summary()`` (layout, modules matched, components).
        """
        from .lora.stack import as_lora_request

        request = self.complete_lora_request(as_lora_request(item))
        with self.lock:
            return self.loras.check(request)

    def set_loras(self, loras: Sequence) -> list[dict]:
        """Make ``loras`` the active LoRA set without reloading the base model.

        Args:
            loras (Sequence[LoraRequest | str | tuple[str, float]]): the LoRAs with their strengths; an empty list
                removes every LoRA. Entries already applied with the same strength are left as they are.

        Returns:
            list[dict]: per LoRA, its layout, the number of modules matched, and its strength.
        """
        hooks = {"sequential": self._weights_unhooked, "group": self._group_offload_refreshed}
        before_change = hooks.get(self.offload)
        if self.parallel != "none":  # parallel goes with offload "none" only
            before_change = functools.partial(parallel.context_parallel_reapplied, self.denoisers())
        with self.lock:
            checked = [self.check_lora(item) for item in loras]
            return self.loras.set_checked(checked, before_change=before_change)

    @contextlib.contextmanager
    def _group_offload_refreshed(self):
        """Group offloading and block streaming keep their own references to the weights (and miss new PEFT layers):
        apply them again to the patched components, as diffusers' own LoRA loader does."""
        from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

        try:
            yield
        finally:
            for name, component in self.lora_components().items():
                if self.resident and name in self.resident:
                    accelerate.offload_blocks_keeping_resident(component, self.device, self.resident[name])
                else:
                    _maybe_remove_and_reapply_group_offloading(component)
            self._placed_again()

    @contextlib.contextmanager
    def _vae_tiling(self, enabled: bool):
        vae = getattr(self.pipe, "vae", None)
        tiles = vae is not None and hasattr(vae, "enable_tiling")
        if enabled and not tiles:
            raise ValueError(f"{self.spec.model_id}'s VAE cannot decode in tiles; leave vae_tiling off.")
        if not tiles:
            yield
        elif not enabled:
            with tiles_when_out_of_memory(vae, self.spec.model_id):
                yield
        else:
            vae.enable_tiling()
            try:
                yield
            finally:
                vae.disable_tiling()

    @contextlib.contextmanager
    def _weights_unhooked(self):
        """Sequential offload keeps the weights in accelerate's offload map (the modules hold meta tensors); take the
        hooks off (which puts the weights back on the modules), patch, and offload again."""
        self.pipe.remove_all_hooks()
        try:
            yield
        finally:
            self.place(self.pipe, self.device, self.offload, self.resident, self.placed_whole)
            self._placed_again()

    # ------------------------------------------------------------------------------------------------ generation
    def resolve_params(
        self,
        prompt: str | Sequence[str],
        negative: str | Sequence[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | Sequence[int] | None = None,
        batch_size: int | None = None,
        control_images: Sequence | None = None,
        trigger_word: str | None = None,
        num_frames: int | None = None,
        fps: int | None = None,
        **extra,
    ) -> GenerationParams:
        """Validate the inputs and apply the defaults and ai-toolkit's rules; raise ValueError naming any bad value."""
        spec = self.spec
        prompts = _per_item("prompt", prompt, str, "a string")
        if prompts is not None:
            if batch_size not in (None, len(prompts)):
                raise ValueError(f"`batch_size`={batch_size!r} disagrees with the {len(prompts)} prompts given as a "
                                 "list (one image per prompt); leave `batch_size` out.")
            batch_size = len(prompts)
        batch_size = 1 if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"`batch_size` must be an integer in 1..{MAX_BATCH}, got {batch_size!r}.")
        prompts = [apply_trigger(text, trigger_word) for text in prompts or [prompt] * batch_size]
        negative = spec.negative if negative is None else negative
        negatives = _per_item("negative", negative, str, "a string", batch_size) or [negative] * batch_size
        distinct = len(set(prompts)) > 1 or len(set(negatives)) > 1
        if distinct and not self.batches_distinct_prompts:
            raise ValueError(f"{spec.model_id} renders one prompt (and negative) per call; call generate once per "
                             "prompt.")

        sizes = {}
        for name, value, default in (("width", width, spec.width), ("height", height, spec.height)):
            value = default if value is None else value
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an integer, got {value!r}.")
            if value < spec.divisor or value > MAX_SIDE:
                raise ValueError(
                    f"`{name}`={value} is out of range for {spec.model_id}: use {spec.divisor}..{MAX_SIDE} "
                    f"(it is floored to a multiple of {spec.divisor}, minimum 64)."
                )
            sizes[name] = snap_size(value, spec.divisor)
            if sizes[name] != value:
                logger.warning("%s %d floored to %d (multiple of %d, as ai-toolkit samples).", name, value, sizes[name], spec.divisor)

        steps = spec.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"`steps` must be an integer in 1..{MAX_STEPS}, got {steps!r}.")
        if steps < 2 and spec.scheduler is not None and spec.scheduler.config.get("shift_terminal"):
            raise ValueError(
                f"{spec.model_id} needs at least 2 steps: its scheduler stretches the schedule to a terminal sigma "
                f"(shift_terminal={spec.scheduler.config['shift_terminal']}), which is undefined for one step."
            )
        guidance = spec.guidance if guidance is None else guidance
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
                or not 0.0 <= guidance <= 100.0:
            raise ValueError(f"`guidance` must be a number in 0..100, got {guidance!r}.")
        guidance = float(guidance)

        seed = spec.seed if seed is None else seed
        item_seeds = _per_item("seed", seed, int, "an integer", batch_size) or ()
        for value in item_seeds or [seed]:
            if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_SEED:
                raise ValueError(f"`seed` must be an integer in -1..{MAX_SEED} (-1 draws a random seed), got "
                                 f"{value!r}.")
        item_seeds = tuple(random.SystemRandom().randint(0, RANDOM_SEED_MAX) if value == -1 else value
                           for value in item_seeds)
        if item_seeds:
            seed = item_seeds[0]
        elif seed == -1:
            seed = random.SystemRandom().randint(0, RANDOM_SEED_MAX)
        if not item_seeds and seed + batch_size - 1 > MAX_SEED:
            raise ValueError(f"Image i of a batch uses seed + i: with batch_size {batch_size}, `seed` must be at most "
                             f"{MAX_SEED - batch_size + 1}, got {seed}.")

        images = tuple(to_pil_rgb(im) for im in (control_images or ()) if im is not None)
        low, high = spec.control_images
        if len(images) < low:
            raise ValueError(
                f"Model {spec.model_id!r} needs {low} control image(s) (got {len(images)}): "
                "pass `control_images` (CLI: --ctrl-img FILE; ComfyUI: connect control_image)."
            )
        if len(images) > high:
            what = "takes no control image" if high == 0 else f"takes at most {high} control image(s)"
            raise ValueError(f"Model {spec.model_id!r} {what}, got {len(images)}.")

        if spec.video is not None:
            num_frames = spec.video.num_frames if num_frames is None else num_frames
            if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= 1001:
                raise ValueError(f"`num_frames` must be an integer in 1..1001, got {num_frames!r}.")
            snapped = snap_frames(num_frames, spec.video.frame_step, spec.video.frame_offset)
            if snapped != num_frames:
                logger.warning("num_frames %d floored to %d (%dk+%d).", num_frames, snapped, spec.video.frame_step,
                               spec.video.frame_offset)
            num_frames = snapped
            fps = spec.video.fps if fps is None else fps
            if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 120:
                raise ValueError(f"`fps` must be an integer in 1..120, got {fps!r}.")
        elif num_frames not in (None, 1):
            raise ValueError(f"Model {spec.model_id!r} makes images; `num_frames` does not apply.")
        else:
            num_frames, fps = None, None

        if any(negatives) and not spec.negative_has_effect(guidance):
            logger.warning("%s ignores the negative prompt at guidance %s (%s guidance); it has no effect.",
                           spec.model_id, guidance, spec.guidance_kind)
        params = GenerationParams(prompt=prompts[0], negative=negatives[0], width=sizes["width"],
                                  height=sizes["height"], steps=steps, guidance=guidance, seed=seed,
                                  batch_size=batch_size, control_images=images, num_frames=num_frames, fps=fps,
                                  extra=dict(extra), item_prompts=tuple(prompts) if distinct else (),
                                  item_negatives=tuple(negatives) if distinct else (), item_seeds=item_seeds)
        self.check_inputs(params)
        return params

    @property
    def generation_options(self) -> tuple[str, ...]:
        """The names of the model's own ``generate()`` options (``GenerationParams.extra``): those its registry
        options declare, else none. Families whose options do not live in the registry override this."""
        return tuple(getattr(self.spec.options, "generation_options", ()))

    def check_inputs(self, params: GenerationParams) -> None:
        """Refuse options the model does not take (:attr:`generation_options`); families extend this to check the
        values of the ones it takes."""
        unknown = sorted(set(params.extra) - set(self.generation_options))
        if unknown:
            takes = (", ".join(self.generation_options) if self.generation_options
                     else "none (its docs page lists the options of the models that take some)")
            raise ValueError(f"Unknown generation option(s) for {self.spec.model_id}: {unknown}; it takes {takes}.")

    def job_options(self, model_config: dict) -> dict:
        """``generate`` keyword arguments that an ai-toolkit job's ``model`` section sets for its previews (family
        options read from ``model_kwargs``); ``reproduce`` passes them. None by default."""
        return {}

    def control_inputs(self, images: Sequence) -> dict:
        """``generate`` keyword arguments for an ai-toolkit sample's control images (``ctrl_img``/``ctrl_img_N``).
        Families with other conditioning slots (Flex.2's inpaint image) override this."""
        return {"control_images": list(images)}

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        """Map the resolved parameters onto the diffusers pipeline's ``__call__``; every family overrides this."""
        raise NotImplementedError

    def prompt_call(self, params: GenerationParams, negative: bool = True, **family) -> dict:
        """The ``pipeline_kwargs`` most families start from: the prompt (and the negative, with ``negative``) once per
        batch item, the size, ``guidance_scale`` and ``output_type="np"``; ``family`` adds or overrides arguments."""
        call = {"prompt": params.prompts, "width": params.width, "height": params.height,
                "guidance_scale": params.guidance, "output_type": "np"}
        if negative:
            call["negative_prompt"] = params.negatives
        return {**call, **family}

    def call_pipeline(self, call: dict):
        """Run the diffusers pipeline; a family that switches pipelines per request (e.g. text vs image input)
        overrides this."""
        return self.pipe(**call)

    def postprocess(self, output, params: GenerationParams) -> dict:
        """Turn the diffusers output into ``GenerationResult`` fields (``images`` float32 [B,H,W,C] by default)."""
        import numpy as np

        return {"images": np.asarray(output.images, dtype=np.float32)}

    def preview_latents(self, latents, params: GenerationParams):
        """The latents of a step as an image-shaped ``[B, C, H, W]`` (video ``[B, C, T, H, W]``) tensor, unpacked as
        :attr:`latent_layout` says; never modified in place, so previews cannot change the result."""
        layout = self.latent_layout
        if layout.tokens:
            batch, count, width = latents.shape
            frames = 1
            if layout.temporal_ratio is not None:
                frames = (params.num_frames - 1) // getattr(self.pipe, layout.temporal_ratio) + 1
            rows = round(math.sqrt(count // frames * params.height / params.width))
            columns = count // frames // rows
            latents = latents.reshape(batch, frames, rows, columns, width).movedim(-1, 1)
            if layout.temporal_ratio is None:
                latents = latents[:, :, 0]
        if layout.patch > 1:
            p = layout.patch
            batch, packed, *grid, rows, columns = latents.shape
            channels = packed // (p * p)
            blocks, patch_dims = ((p, p, channels), (1, 2)) if layout.channels_last else ((channels, p, p), (2, 3))
            latents = latents.reshape(batch, *blocks, *grid, rows, columns).movedim(patch_dims, (-3, -1))
            latents = latents.reshape(batch, channels, *grid, rows * p, columns * p)
        return latents

    def generate(self, prompt: str | Sequence[str], progress: ProgressCallback | None = None, vae_tiling: bool = False,
                 on_latents: LatentsCallback | None = None, **kwargs) -> GenerationResult:
        """Generate images (or video frames) as ai-toolkit's sample previews are generated.

        Args:
            prompt (str or list[str]): the prompt; ``[trigger]``/``[name]`` are replaced when ``trigger_word`` is set.
                A list gives one image per prompt in one call (families with ``batches_distinct_prompts``; others
                take a list of one repeated prompt).
            negative (str or list[str], defaults to the model's): negative prompt, used by families with real CFG
                only; a list gives one per image.
            width, height (int, defaults to 1024): floored to 8 (min 64) then to the family's divisor.
            steps (int), guidance (float): defaults from the registry.
            seed (int or list[int], defaults to 42): -1 draws a random seed; the effective seed is in the result.
                A list gives each image of the batch its own seed.
            batch_size (int, defaults to 1, or the length of a ``prompt`` list): images per call; image i uses
                seed + i (or its own seed from a list) and equals the single image of that seed and prompt
                (ai-toolkit's ``walk_seed`` previews).
            control_images (Sequence, *optional*): control/reference images for families that take them.
            trigger_word (str, *optional*): replaces ``[trigger]``/``[name]``.
            num_frames, fps (int, *optional*): video families only.
            progress (callable, *optional*): ``progress(step, total)`` after every denoising step; raising
                :class:`GenerationInterrupted` (or any exception) stops sampling within one step.
            vae_tiling (bool, defaults to False): decode in overlapping tiles (the VAE's ``enable_tiling``), for this
                call only: much less memory for large videos and images, at the cost of some speed. Off, a decode
                that runs out of GPU memory is run again in tiles, with a warning.
            on_latents (callable, *optional*): ``on_latents(step, total, latents)`` after every denoising step (before
                ``progress``) with the step's latents from :meth:`preview_latents` (for live previews; read-only).
                Families whose loop hands out no latents do not call it.

        Returns:
            GenerationResult: images/frames plus the effective parameters, the applied LoRAs and timings.
        """
        import torch

        # 1. Validate and resolve parameters
        params = self.resolve_params(prompt, **kwargs)
        if self.parallel != "none":
            params = parallel.same_on_every_rank(params)  # one drawn seed for all ranks
        with self.lock:
            # 2. Build the call: noise comes from a freshly seeded CPU generator in the latent dtype (ai-toolkit), one
            # per image of a batch, so that image i is the image of seed + i alone
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in params.seeds]
            generator = generators[0] if len(generators) == 1 else generators
            call = self.pipeline_kwargs(params)
            call.update(generator=generator, num_inference_steps=params.steps)
            step_times: list[float] = []

            def on_step_end(pipe, step, timestep, callback_kwargs):
                step_times.append(time.perf_counter())
                if on_latents is not None and callback_kwargs.get("latents") is not None:
                    on_latents(step + 1, params.steps, self.preview_latents(callback_kwargs["latents"], params))
                if progress is not None:
                    progress(step + 1, params.steps)
                return callback_kwargs

            call["callback_on_step_end"] = on_step_end
            # 3. Run
            started = time.perf_counter()
            with torch.inference_mode(), self._vae_tiling(vae_tiling):
                try:
                    output = self.call_pipeline(call)
                except ValueError as error:
                    if self.attention in MASKLESS_ATTENTION_KERNELS and "attn_mask" in str(error):
                        raise ValueError(f"{self.spec.model_id} masks its attention (padded text tokens), which "
                                         f"attention={self.attention!r} cannot take; load it with attention='sdpa' "
                                         "(or 'sdpa_cudnn').") from error
                    raise
                except Exception as error:
                    message = self.compiled and accelerate.recompile_limit_message(error, self.spec.model_id)
                    if message:
                        raise ValueError(message) from error
                    raise
                # 4. Post-process (families that decode here do it inside the tiling scope)
                fields = self.postprocess(output, params)
            total = time.perf_counter() - started
        check_finite_output(self.spec.model_id, fields)
        timings = {"total": round(total, 4)}
        if step_times:
            timings["first_step_done"] = round(step_times[0] - started, 4)
            timings["denoise"] = round(step_times[-1] - started, 4)
        return GenerationResult(params=params, model_id=self.spec.model_id, loras=self.loras.describe(),
                                timings=timings, **fields)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec.model_id!r}, source={self.source!r}, device={self.device!r}, "
                f"dtype={self.dtype}, lora_mode={self.lora_mode!r}, attention={self.attention!r}, "
                f"quantize={self.quantize!r})")


def _per_item(name: str, value, item_type: type, what: str, count: int | None = None) -> list | None:
    """``value`` as a list when it is given per image (a list or tuple), checked against ``item_type`` and, with
    ``count``, the batch size; None when it is one value for the whole batch (checked here too)."""
    if not isinstance(value, (list, tuple)):
        if item_type is str and not isinstance(value, str):
            raise ValueError(f"`{name}` must be {what}, got {type(value).__name__} (or a list of them, one per "
                             "image).")
        return None
    if not value:
        raise ValueError(f"`{name}` is an empty list; give one {name} per image.")
    bad = [item for item in value if isinstance(item, bool) or not isinstance(item, item_type)]
    if bad:
        raise ValueError(f"Every item of `{name}` must be {what}, got {bad[0]!r}.")
    if count is not None and len(value) != count:
        raise ValueError(f"`{name}` has {len(value)} items for a batch of {count}: give one per image (a list of "
                         "prompts or `batch_size` sets the batch).")
    return list(value)


def _named_arguments(function) -> set[str]:
    return {name for name, parameter in inspect.signature(function).parameters.items()
            if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD}


#: the arguments :meth:`AITKPipeline.generate` names itself; every other keyword is a family's generation option
GENERATE_ARGUMENTS = frozenset(_named_arguments(AITKPipeline.generate) | _named_arguments(AITKPipeline.resolve_params))


def load_pipeline(
    model_id: str,
    base: str | None = None,
    device: str | None = None,
    dtype=None,
    offload: str | None = None,
    lora_mode: str | None = None,
    compile: str | None = None,
    attention: str | None = None,
    quantize: str | None = None,
    parallel: str | None = None,
    components: str | None = None,
    text_encoder_file: str | None = None,
    text_encoder_2_file: str | None = None,
    vae_file: str | None = None,
) -> AITKPipeline:
    """Load the pipeline of a registered model id (not cached; see ``pipelines.runtime.cache`` for the shared cache).

    Args:
        model_id (str): a registry id (``python -m aitk_inference models`` lists them).
        base (str, *optional*): HF repo id, local diffusers folder, or single ``.safetensors`` file(s) as ComfyUI
            keeps them (see ``pipelines.single_file``: a transformer/UNet file, an all-in-one checkpoint, or the two
            expert files of Wan 2.2 A14B as ``high|low``); defaults to the model's base checkpoint.
        device (str, *optional*): defaults to CUDA when available, else CPU.
        dtype (str | torch.dtype, *optional*): ``auto`` (fp32 on CPU, bf16 on GPU), ``fp32``, ``bf16`` or ``fp16``.
        offload (str, *optional*): ``none`` (default), or CPU offload: ``model``, ``sequential`` or ``group``; ``auto``
            picks the fastest that fits the GPU memory left (:meth:`AITKPipeline.choose_offload`).
        lora_mode (str, *optional*): ``dynamic`` or ``fused``; defaults to the model's registry setting.
        compile (str, *optional*): ``none`` (default), ``regional`` or ``full`` torch.compile of the denoiser (see
            :meth:`AITKPipeline.compile_denoiser`; use with ``lora_mode="fused"`` to avoid recompiles). Compiled
            kernels are kept on disk (see ``runtime.accelerate.use_persistent_compile_cache``), so a later process
            compiles faster. With ``offload="auto"`` ``regional`` compiles every block, resident or streamed; with
            ``group`` or ``sequential`` offload the blocks run eager; ``full`` refuses offloading.
        attention (str, *optional*): the attention kernel, a key of ``runtime.options.ATTENTION_KERNELS``; ``sdpa``
            (default) is diffusers' default.
        quantize (str, *optional*): ``none`` (default) or ``fp8``: FP8 weights for the denoiser's blocks (torchao; a
            CUDA GPU with compute capability 8.9+; less exact, see BENCHMARKS.md; use with ``compile="regional"``).
            With ``lora_mode="fused"`` LoRAs are merged before quantizing (the fast mode; keeps the bf16 weights of
            the quantized layers, on the GPU while a quarter of it stays free, else in host RAM); with ``dynamic``
            they run as adapters (about half the transformer's GPU memory).
            FP8 weights of a single-file base are upcast on load and re-quantized here. Goes with ``offload`` none or
            ``auto`` (when the bf16 weights do not fit, quantized on the host first, then placed whole when the FP8
            weights fit, else as many blocks kept on the GPU as fit and the rest streamed).
        parallel (str, *optional*): ``none`` (default), or context parallelism of each generation over the processes
            ``torchrun`` starts: ``ulysses=N``, ``ring=N`` or ``ulysses=N,ring=M`` (the product the world size; see
            ``runtime.parallel``). Every process calls this and then ``generate`` with the same arguments; write
            outputs on rank 0 only (``runtime.parallel.writes_outputs``).
        components (str, *optional*): for a single-file ``base``, where the components the file lacks come from: a
            diffusers folder or a hub repo id; defaults to the model's base repo (from the hub cache).
        text_encoder_file, text_encoder_2_file, vae_file (str, *optional*): that component from a ``.safetensors``
            file as ComfyUI keeps it in ``models/text_encoders`` or ``models/vae`` (FLUX: ``clip_l`` + ``t5xxl``;
            SDXL: ``clip_l`` + ``clip_g``; Wan: ``umt5_xxl``; Qwen-Image: ``qwen_2.5_vl_7b``; FP8 files included),
            with ``base`` a single file, a diffusers folder or a repo; see ``pipelines.component_files``.
    """
    spec = get_spec(model_id)
    options = LoadOptions(base=base, device=device, dtype=dtype, offload=offload, lora_mode=lora_mode, compile=compile,
                          attention=attention, quantize=quantize, parallel=parallel, components=components,
                          text_encoder_file=text_encoder_file, text_encoder_2_file=text_encoder_2_file,
                          vae_file=vae_file)
    return spec.family_class().from_spec(spec, options)


__all__ = ["AITKPipeline", "GenerationInterrupted", "GenerationParams", "GenerationResult", "LatentLayout",
           "NonFiniteOutputError",
           "load_pipeline", "snap_size", "snap_frames", "apply_trigger"]
