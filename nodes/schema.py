"""The nodes' inputs and outputs, declared once as data.

Both front ends (``v3.py`` for ComfyUI's ``comfy_api`` schema API, ``classic.py`` for ``NODE_CLASS_MAPPINGS``) and the
example-workflow writer build from these tables, so a widget added here appears everywhere in the same order.
Nothing here imports torch, diffusers or ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from ..pipelines.component_files import FILE_COMPONENTS
from ..pipelines.lora import STRENGTH_RANGE
from ..pipelines.registry import REGISTRY, UNCONDITIONAL_LORA_SIDE, Experts
from ..pipelines.runtime import options as load_options
from ..pipelines.runtime.options import ATTENTION_KERNELS, DTYPES, OFFLOAD_MODES, QUANTIZE_MODES
from .comfy import NO_BASE_FILE, base_file_choices, component_file_choices, lora_choices

CATEGORY = "AITK Inference"
PIPELINE_TYPE = "AITK_PIPELINE"
JOB_TYPE = "AITK_JOB"
WIDGET_TYPES = ("COMBO", "STRING", "INT", "FLOAT", "BOOLEAN")
MAX_SEED = 0xFFFFFFFFFFFFFFFF

DEVICES = ("auto", "cpu", "cuda", "mps")
TRANSFORMER_SIDES = ("none", *Experts.SIDES, UNCONDITIONAL_LORA_SIDE)
#: the load options' choices as the Load node offers them: "model default" stands for an unset LoRA mode, and
#: compile leaves out "full"
LORA_MODES = ("model default", *load_options.LORA_MODES)
COMPILE_MODES = tuple(mode for mode in load_options.COMPILE_MODES if mode != "full")


@dataclass(frozen=True)
class Field:
    """One node input.

    Args:
        name (str): the input name (saved workflows refer to it; never rename).
        type (str): ``COMBO``, ``STRING``, ``INT``, ``FLOAT``, ``BOOLEAN``, ``IMAGE``, ``AITK_PIPELINE`` or
            ``AITK_JOB``.
        tooltip (str): shown on hover in ComfyUI.
        default (Any, *optional*): the widget default.
        options (Callable[[], list[str]], *optional*): for ``COMBO``, returns the choices (called when ComfyUI asks
            for the schema, so new files show up after a refresh).
        min, max, step (number, *optional*): numeric widget limits.
        multiline (bool, defaults to False): multi-line text box.
        optional (bool, defaults to False): the input may be left unconnected/unset.
        control_after_generate (bool, defaults to False): ComfyUI adds its fixed/increment/randomize control.
    """

    name: str
    type: str
    tooltip: str
    default: Any = None
    options: Callable[[], list[str]] | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    optional: bool = False
    control_after_generate: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def widget_options(self) -> dict:
        """The options both node APIs take under the same names (tooltip, default, limits, text and seed flags)."""
        options = {"tooltip": self.tooltip}
        if self.default is not None:
            options["default"] = self.default
        for key in ("min", "max", "step"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        if self.multiline:
            options["multiline"] = True
        if self.control_after_generate:
            options["control_after_generate"] = True
        return options


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[Field, ...]
    outputs: tuple[Output, ...]

    def widget_names(self) -> list[str]:
        """Widget values in the order a UI-format workflow stores them (seed is followed by its control widget)."""
        names = []
        for field in self.inputs:
            if field.is_widget:
                names.append(field.name)
                if field.control_after_generate:
                    names.append("control_after_generate")
        return names


def _model_ids() -> list[str]:
    return list(REGISTRY)


_FIRST = next(iter(REGISTRY.values()))

LOAD = NodeSpec(
    node_id="AITKLoadPipeline",
    display_name="Load AITK Pipeline",
    description="Load a model the way ai-toolkit samples it (cached: re-running the graph or changing sampling "
    "widgets or LoRA strengths reloads nothing). With base empty, the model's default Hugging Face repo is used: the "
    "first run downloads it into the hub cache (the line under the widgets names the repo and its size).",
    inputs=(
        Field("model", "COMBO", "The ai-toolkit model id (architecture) the LoRA was trained on.",
              default=_FIRST.model_id, options=_model_ids),
        Field("base", "STRING", "Base checkpoint override: empty for the model's default Hugging Face repo "
              "(downloaded on the first run into the hub cache, HF_HOME; gated repos need `huggingface-cli login`), "
              "a folder under ComfyUI/models/diffusers, a local diffusers folder or .safetensors file, or a repo id.",
              default=""),
        Field("dtype", "COMBO", "auto: fp32 on CPU, bf16 on GPUs that support it (else fp16).",
              default="auto", options=lambda: list(DTYPES)),
        Field("offload", "COMBO", "CPU offload: none, model (whole components), sequential (per layer, slowest, "
              "least VRAM) or group (per layer with overlapped transfers).", default="none",
              options=lambda: list(OFFLOAD_MODES)),
        Field("device", "COMBO", "auto: the device ComfyUI uses (CPU under --cpu).", default="auto",
              options=lambda: list(DEVICES)),
        Field("lora_mode", "COMBO", "How LoRAs are applied: dynamic (live adapters, instant strength changes) or "
              "fused (merged into the weights: faster steps, ai-toolkit's merged-preview math, ~0.1 s per strength "
              "change on FLUX). 'model default' uses the model's registry setting.", default="model default",
              options=lambda: list(LORA_MODES)),
        Field("compile", "COMBO", "regional: torch.compile the repeated transformer blocks once (the first run pays "
              "the compilation; strength changes and LoRA switches never recompile). Best with lora_mode fused. With "
              "offload auto, resident and streamed blocks compile; with group or sequential they run eager.",
              default="none", options=lambda: list(COMPILE_MODES)),
        # Optional, so that saved workflows from before these two inputs still load (they get the defaults).
        Field("attention", "COMBO", "Attention kernel of the transformer. sdpa (default): torch picks the kernel, as "
              "in diffusers. The others force one: sdpa_math runs on any device; sdpa_cudnn, sdpa_flash and "
              "sdpa_efficient need CUDA; flash_attn, flash_attn_3, sage and xformers need their package installed. "
              "flash_attn_3_fp8 (FLUX, FLUX.2, Krea 2, Wan, HiDream, LTX-2): FlashAttention-3 with FP8 inputs, a few "
              "percent less exact, for speed with quantize fp8. "
              "UNet models (SD 1.5, SDXL) and some transformers (Lumina 2, OmniGen2) take only sdpa.",
              default="sdpa", options=lambda: list(ATTENTION_KERNELS), optional=True),
        Field("quantize", "COMBO", "fp8: FP8 weights for the transformer blocks (torchao; Ada/Hopper GPUs, compute "
              "capability 8.9+), less exact than bf16; offload none, or auto (FP8 blocks that do not fit the GPU "
              "stream), use with compile regional. With "
              "lora_mode fused: the fast mode (LoRAs merged before quantizing; about 0.5x the step time of live "
              "adapters on an H200; keeps a bf16 copy in host RAM). With dynamic: LoRAs as adapters, about half the "
              "transformer's GPU memory.",
              default="none", options=lambda: list(QUANTIZE_MODES), optional=True),
        Field("base_file", "COMBO", "A single-file base as ComfyUI keeps it: a transformer/UNet file from "
              "models/diffusion_models (e.g. flux1-dev-fp8, qwen_image_fp8_e4m3fn; for Wan 2.2 A14B pick the "
              "high_noise file, its low_noise file is found beside it) or an all-in-one checkpoint from "
              "models/checkpoints (SD 1.5, SDXL; for other models only its transformer is read). FP8 weights are "
              "upcast to dtype. The components the file lacks (text encoders, VAE...) come from base: a diffusers "
              "folder, or empty for the model's default repo from the hub cache (only those folders are "
              "downloaded). none: base alone.", default=NO_BASE_FILE, options=base_file_choices, optional=True),
        *(Field(f"{component}_file", "COMBO", f"The {component} as a single file from ComfyUI's models/{folders[0]} "
                f"({examples}); FP8 files are upcast to dtype. none: from base (or the model's default repo).",
                default=NO_BASE_FILE, options=partial(component_file_choices, component), optional=True)
          for component, (folders, examples) in FILE_COMPONENTS.items()),
    ),
    outputs=(Output(PIPELINE_TYPE, "pipeline", "The loaded pipeline handle (no LoRA yet)."),),
)

APPLY = NodeSpec(
    node_id="AITKApplyLoRA",
    display_name="Apply AITK LoRA",
    description="Add an ai-toolkit LoRA to the pipeline handle; chain several to stack them. The base model is "
    "never copied or reloaded, and a strength change re-applies in place.",
    inputs=(
        Field("pipeline", PIPELINE_TYPE, "The pipeline handle from Load AITK Pipeline or another Apply AITK "
              "LoRA."),
        Field("lora", "COMBO", "A .safetensors LoRA from ComfyUI/models/loras (an API-format workflow may also give "
              "a full path).", options=lora_choices),
        Field("strength", "FLOAT", "ai-toolkit's network_multiplier (1.0 = as trained).", default=1.0,
              min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1], step=0.01),
        Field("transformer", "COMBO", "For two-expert (MoE) models such as Wan 2.2 14B: which expert the file "
              "targets (high or low noise). uncond (Ideogram 4): the file acts in the unconditional CFG pass only "
              "(ai-toolkit's unconditional LoRA). none for every other model.", default="none",
              options=lambda: list(TRANSFORMER_SIDES)),
    ),
    outputs=(Output(PIPELINE_TYPE, "pipeline", "A new handle carrying the LoRA set (the input is unchanged)."),),
)

SAMPLE = NodeSpec(
    node_id="AITKSample",
    display_name="AITK Sample",
    description="Generate exactly as ai-toolkit's training sample previews: its scheduler, seeds and size rules. "
    "Width/height are floored to the model's divisor; the effective values are outputs.",
    inputs=(
        Field("pipeline", PIPELINE_TYPE, "The pipeline handle (with its LoRAs)."),
        Field("prompt", "STRING", "The prompt; [trigger] and [name] are replaced by the trigger word when one is "
              "set, as in ai-toolkit.", default="", multiline=True),
        Field("negative", "STRING", "Negative prompt. Only used by models with real CFG; guidance-distilled models "
              "(FLUX.1, Flex, Kontext) ignore it, as ai-toolkit's previews do.", default="", multiline=True),
        Field("trigger_word", "STRING", "The job's trigger_word; replaces [trigger]/[name] in the prompt.",
              default=""),
        Field("width", "INT", "Floored to a multiple of 8 (min 64), then to the model's divisor (16 for FLUX). "
              "The effective width is an output.", default=_FIRST.width, min=64, max=8192, step=8),
        Field("height", "INT", "Floored like width; the effective height is an output.", default=_FIRST.height,
              min=64, max=8192, step=8),
        Field("steps", "INT", "Denoising steps (ai-toolkit's sample_steps).", default=_FIRST.steps, min=1, max=1000),
        Field("guidance", "FLOAT", "ai-toolkit's guidance_scale (the guidance embedding for distilled models).",
              default=_FIRST.guidance, min=0.0, max=100.0, step=0.1),
        Field("seed", "INT", "Noise seed (ai-toolkit: sample i of a walk_seed job uses seed + i).",
              default=_FIRST.seed, min=0, max=MAX_SEED, control_after_generate=True),
        Field("batch_size", "INT", "Images per run; image i uses seed + i and equals the single image of that seed.",
              default=1, min=1, max=16),
        Field("control_image", "IMAGE", "Control/reference image, required by edit models (FLUX Kontext); "
              "a single image.", optional=True),
        Field("control_image_2", "IMAGE", "Second control image (models that take several).", optional=True),
        Field("control_image_3", "IMAGE", "Third control image (models that take several).", optional=True),
        Field("num_frames", "INT", "Video models: frame count (floored to k*n+1); 0 = the model's default. Must "
              "stay 0 (or 1) for image models.", default=0, min=0, max=1001, optional=True),
        Field("fps", "INT", "Video models: frames per second; 0 = the model's default.", default=0, min=0, max=120,
              optional=True),
        Field("vae_tiling", "BOOLEAN", "Decode in tiles: less memory for large videos and images, somewhat slower "
              "(Wan 2.1 14B at 720p x 81 frames on an H100: 45.6 instead of 47.7 GiB peak). Off, a decode that runs "
              "out of GPU memory is retried in tiles.", default=False,
              optional=True),
        Field("options", "STRING", "Model-specific generation options as a JSON object, e.g. "
              '{"kv_cache": false, "schedule_mu": 0.8} for Krea 2 edit ids; each model\'s docs page lists the ones '
              "it takes and their defaults (ai-toolkit's). Empty: the defaults.", default="", optional=True),
    ),
    outputs=(
        Output("IMAGE", "image", "[B,H,W,C] float32 in 0..1; video frames come as an image batch."),
        Output("INT", "width", "The width that really ran (after flooring)."),
        Output("INT", "height", "The height that really ran (after flooring)."),
        Output("INT", "seed", "The seed that really ran."),
        Output("FLOAT", "fps", "Video models: the frame rate that ran (connect to Create Video); 0 for images."),
        Output("AUDIO", "audio", "Audio-video models (LTX-2): the generated soundtrack; audio-only models (ACE-Step): "
               "the music (their images output is a black 64x64 placeholder); silence for other models, so Create "
               "Video -> Save Video works for every video model."),
    ),
)

TRAINING_JOB = NodeSpec(
    node_id="AITKTrainingJob",
    display_name="AITK Training Job",
    description="Point at an ai-toolkit output folder (<training_folder>/<name>/ with its config.yaml, LoRA "
    "checkpoints and samples/): lists the saved checkpoints by step, for AITK Job Previews. Re-reads the folder when "
    "a new checkpoint or sample lands.",
    inputs=(
        Field("job_folder", "STRING", "The ai-toolkit job folder (or its config.yaml): the folder holding "
              "config.yaml, <name>_<step>.safetensors and samples/.", default=""),
        Field("base", "STRING", "Base checkpoint override: empty for the job's model.name_or_path, else as on Load "
              "AITK Pipeline (a folder under ComfyUI/models/diffusers, a local path or a repo id).", default=""),
        Field("dtype", "COMBO", "auto: fp32 on CPU, bf16 on GPUs that support it (else fp16).", default="auto",
              options=lambda: list(DTYPES)),
        Field("device", "COMBO", "auto: the device ComfyUI uses (CPU under --cpu).", default="auto",
              options=lambda: list(DEVICES)),
    ),
    outputs=(
        Output(JOB_TYPE, "job", "The job handle (folder, model, checkpoints; no weights loaded yet)."),
        Output("STRING", "checkpoints", "The checkpoints found, one line per step: 'step 500: name_000000500"
               ".safetensors'."),
    ),
)

JOB_PREVIEWS = NodeSpec(
    node_id="AITKJobPreviews",
    display_name="AITK Job Previews",
    description="Render the job's sample prompts for the chosen checkpoints and strengths as one labelled grid: rows "
    "= checkpoints (x strengths), columns = prompts, ai-toolkit's own sample for that step beside ours with the "
    "distance reproduce reports. One cached pipeline: checkpoints switch as live LoRAs, the base never reloads.",
    inputs=(
        Field("job", JOB_TYPE, "The job handle from AITK Training Job."),
        Field("checkpoints", "STRING", "all, 'last N', or steps such as '500, 1000' (the Training Job node lists "
              "them).", default="all"),
        Field("strengths", "STRING", "LoRA strengths such as '0.8, 1.0' (one row each per checkpoint); empty: each "
              "sample's network_multiplier from the job, the strength ai-toolkit's samples were made at.", default=""),
        Field("prompts", "STRING", "Indices of the job's sample prompts such as '0, 2' (in the job's order, from 0); "
              "empty: all.", default="", optional=True),
    ),
    outputs=(Output("IMAGE", "grid", "The labelled grid, one image [1,H,W,C]."),),
)

NODES = (LOAD, APPLY, SAMPLE, TRAINING_JOB, JOB_PREVIEWS)
