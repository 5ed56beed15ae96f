"""Base models as the single ``.safetensors`` files ComfyUI users keep in ``models/diffusion_models`` (``unet``) and
``models/checkpoints``.

Two kinds of file are read:

* a **denoiser file** (``diffusion_models``): only the transformer or UNet, in its original key names (with or without
  ComfyUI's ``model.diffusion_model.`` prefix), e.g. ``flux1-dev.safetensors``, ``flux1-dev-fp8.safetensors``,
  ``qwen_image_fp8_e4m3fn.safetensors``, or the two experts of Wan 2.2 A14B as two files;
* an **all-in-one checkpoint** (``checkpoints``): the denoiser under ``model.diffusion_model.`` plus the VAE and text
  encoders. SD 1.5 / SDXL checkpoints load whole through diffusers' ``from_single_file`` on the pipeline; for the
  other families only the denoiser is read from the file.

The text encoders and the VAE may come from their own files (ComfyUI's ``models/text_encoders`` and ``models/vae``,
read by ``component_files.py``, with a single-file base or a diffusers one). Everything else the files do not hold
(tokenizers, scheduler, configs, and the components given no file) comes from the *components* source: a
diffusers folder or a hub repo id, by default the model's base repo, taken from the hub cache (only those folders
are downloaded: never the weights the files replace). Offline and not cached, the load
stops with a message naming the repo, the folders to fetch and the command that fetches them.

Denoiser weights go through diffusers' single-file conversion (``from_single_file`` on the model class) where
diffusers has one that works at every size; FLUX.1 uses the conversion here, because diffusers' assumes the 12B
model's width (3072). FP8 weights (``float8_e4m3fn``/``e5m2``, ComfyUI's "scaled" FP8 files, whose layers carry
a ``scale_weight``, and its newer quantized files, whose layers carry a ``comfy_quant`` setting and a ``weight_scale``)
are upcast to the requested dtype; the ``fp8`` quantize option then re-quantizes the block
Linears from those upcast weights (torchao, one scale per row), so the file's own FP8 codes are not kept as they are.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from typing import Any

from .registry import Experts, ModelSpec

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
#: separates the two expert files of a two-expert model given explicitly (``high.safetensors|low.safetensors``)
EXPERT_FILE_SEPARATOR = "|"
#: the prefix ComfyUI puts before the denoiser's keys (in every all-in-one checkpoint and many denoiser files)
COMFY_DENOISER_PREFIX = "model.diffusion_model."
#: key prefixes of the other components of an all-in-one checkpoint (LDM/SGM names, ComfyUI's repackaged names)
CHECKPOINT_COMPONENT_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "vae.", "text_encoders.")
#: pipeline classes whose all-in-one checkpoints diffusers loads whole (``from_single_file`` on the pipeline)
WHOLE_CHECKPOINT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
#: ComfyUI's scaled FP8: a ``scaled_fp8`` marker key, and per layer ``<layer>.scale_weight`` (weight = fp8 * scale)
#: and ``<layer>.scale_input`` (activation calibration, unused when the weights are upcast)
SCALED_FP8_MARKER, SCALE_WEIGHT, SCALE_INPUT = "scaled_fp8", ".scale_weight", ".scale_input"
#: ComfyUI's newer quantized layers: per layer ``<layer>.comfy_quant`` (its settings as JSON in a uint8 tensor, e.g.
#: ``{"format": "float8_e4m3fn"}``), ``<layer>.weight_scale`` and an optional ``<layer>.input_scale``; a file may instead
#: name the settings of every layer in its header's ``_quantization_metadata`` (``{"layers": {layer: settings}}``)
COMFY_QUANT, WEIGHT_SCALE, INPUT_SCALE = ".comfy_quant", ".weight_scale", ".input_scale"
QUANTIZATION_METADATA = "_quantization_metadata"
#: the ``comfy_quant`` formats read here (upcast as ``weight * weight_scale``); the others (int8, nvfp4, mxfp8, ...)
#: are refused with their name
COMFY_QUANT_FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


class ComponentsUnavailableError(ValueError):
    """The components a single file lacks cannot be found (not in the hub cache and no network, or a folder that is
    not a diffusers folder)."""


# ------------------------------------------------------------------------------------------------ what the source is
def is_single_file_source(source: str) -> bool:
    """Whether ``source`` names single file(s): a ``.safetensors``/``.sft`` file, or two joined by ``|``."""
    return all(part.strip().endswith(SINGLE_FILE_SUFFIXES) for part in source.split(EXPERT_FILE_SEPARATOR))


def expert_files(spec: ModelSpec, source: str) -> dict[str, str]:
    """The file of each denoiser component (``{"transformer": path}``; two-expert models: both experts).

    A two-expert model takes ``high|low`` explicitly, or one file named like ComfyUI's
    (``wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors``) whose other expert lies beside it under the swapped name."""
    files = [os.path.expanduser(part.strip()) for part in source.split(EXPERT_FILE_SEPARATOR)]
    denoiser = spec.family_class().denoiser
    if spec.experts is None:
        if len(files) != 1:
            raise ValueError(f"{spec.model_id} has one denoiser: give one file, not {len(files)} ({source!r}).")
        pairs = {denoiser: files[0]}
    elif len(files) == 2:
        pairs = dict(zip(spec.experts.components, files))
    else:
        side = Experts.side_from_name(files[0])
        if len(files) != 1 or side is None:
            raise ValueError(
                f"{spec.model_id} has two experts (high noise, low noise): give both files as 'high.safetensors|"
                f"low.safetensors', or one whose name says its expert ('..._high_noise_...'); got {source!r}.")
        pairs = {spec.experts.component(side): files[0],
                 spec.experts.component("low" if side == "high" else "high"): Experts.sibling(files[0])}
    for component, path in pairs.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{spec.model_id}: the {component} file {path!r} does not exist"
                                    + (" (the other expert's file is looked for beside the one given, under the "
                                       "swapped high/low name)" if spec.experts is not None else "") + ".")
    return pairs


def checkpoint_layout(keys) -> str:
    """``"checkpoint"`` for an all-in-one file (the denoiser under ``model.diffusion_model.`` plus other components),
    else ``"denoiser"``."""
    keys = list(keys)
    has_denoiser = any(k.startswith(COMFY_DENOISER_PREFIX) for k in keys)
    has_others = any(k.startswith(CHECKPOINT_COMPONENT_PREFIXES) for k in keys)
    return "checkpoint" if has_denoiser and has_others else "denoiser"


# ---------------------------------------------------------------------------------------------------------- weights
def read_safetensors(path: str) -> dict:
    """Every tensor of ``path``; a header's ``_quantization_metadata`` becomes the per-layer ``<layer>.comfy_quant``
    entries it stands for (as ComfyUI reads such files), so that the rest sees one form."""
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        state_dict = {key: f.get_tensor(key) for key in f.keys()}
    if QUANTIZATION_METADATA in metadata:
        layers = json.loads(metadata[QUANTIZATION_METADATA]).get("layers", {})
        for layer, settings in layers.items():
            state_dict.setdefault(layer + COMFY_QUANT, torch.tensor(list(json.dumps(settings).encode()), dtype=torch.uint8))
    return state_dict


def _upcast_scaled_(state_dict: dict, weight_key: str, scale, dtype) -> None:
    import torch

    scale = scale.to(torch.float32)
    weight = state_dict[weight_key].to(torch.float32)
    weight = weight * (scale if scale.numel() == 1 else scale.reshape(-1, *[1] * (weight.ndim - 1)))
    state_dict[weight_key] = weight.to(dtype or torch.float32)


def dequantize_scaled_fp8(state_dict: dict, dtype=None) -> dict:
    """ComfyUI's FP8 layers as ``dtype`` (default float32): ``weight * scale`` computed in float32, one layer at a time
    (so that a whole model never lies in float32), for its scaled FP8 files (``scale_weight``) and its newer
    ``comfy_quant`` layers of a float8 format (``weight_scale``); markers, settings and input scales dropped. A layer
    quantized in another ``comfy_quant`` format raises a ValueError naming it."""
    state_dict = dict(state_dict)
    state_dict.pop(SCALED_FP8_MARKER, None)
    for scale_key in [k for k in state_dict if k.endswith(SCALE_WEIGHT)]:
        _upcast_scaled_(state_dict, scale_key[: -len(SCALE_WEIGHT)] + ".weight", state_dict.pop(scale_key), dtype)
    for settings_key in [k for k in state_dict if k.endswith(COMFY_QUANT)]:
        layer = settings_key[: -len(COMFY_QUANT)]
        settings = json.loads(bytes(state_dict.pop(settings_key).tolist()))
        if settings.get("format") not in COMFY_QUANT_FLOAT8_FORMATS:
            raise ValueError(f"Layer {layer!r} is quantized in ComfyUI's {settings.get('format')!r} format, which "
                             f"this package does not read (it reads {', '.join(COMFY_QUANT_FLOAT8_FORMATS)}, scaled "
                             "FP8 and unquantized files); use an FP8, bf16 or fp16 file of the model.")
        scale = state_dict.pop(layer + WEIGHT_SCALE, None)
        if scale is not None:
            _upcast_scaled_(state_dict, layer + ".weight", scale, dtype)
    for input_key in [k for k in state_dict if k.endswith((SCALE_INPUT, INPUT_SCALE))]:
        del state_dict[input_key]
    return state_dict


def read_denoiser_state_dict(path: str, dtype) -> dict:
    """The denoiser's weights of ``path`` in its original names (ComfyUI's prefix stripped; an all-in-one file's
    other components left out), FP8 upcast to ``dtype``."""
    state_dict = read_safetensors(path)
    if checkpoint_layout(state_dict) == "checkpoint" or any(k.startswith(COMFY_DENOISER_PREFIX) for k in state_dict):
        state_dict = {k[len(COMFY_DENOISER_PREFIX):]: v for k, v in state_dict.items()
                      if k.startswith(COMFY_DENOISER_PREFIX)}
    state_dict = dequantize_scaled_fp8(state_dict, dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


# ------------------------------------------------------------------------------------ FLUX.1 (BFL names -> diffusers)
# The FLUX.1 reference code's module names. A tuple of names is a fused projection split by output rows: q, k, v
# take ``inner_dim`` rows each, the single blocks' MLP input the rest.
FLUX1_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
FLUX1_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "modulation.lin": "norm.linear",
}
FLUX1_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
#: BFL's final modulation gives (shift, scale), diffusers' norm_out (scale, shift): the rows are swapped
FLUX1_SWAPPED_HALVES = ("norm_out.linear",)
#: RMSNorm weights are ``scale`` in BFL's names
FLUX1_PARAMETER_RENAMES = {"scale": "weight"}
_BFL_KEY = re.compile(r"^(?:(double_blocks|single_blocks)\.(\d+)\.)?(.+)\.(weight|bias|scale)$")


def convert_flux1_transformer(state_dict: dict, config: dict) -> dict:
    """A FLUX.1 transformer state dict in BFL names -> ``FluxTransformer2DModel`` names, sized by ``config``."""
    import torch

    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    converted, unknown = {}, []
    for key, value in state_dict.items():
        match = _BFL_KEY.match(key)
        kind, index, module, parameter = match.groups() if match else (None, None, None, None)
        table, parent = {"double_blocks": (FLUX1_DOUBLE, "transformer_blocks."),
                         "single_blocks": (FLUX1_SINGLE, "single_transformer_blocks.")}.get(kind, (FLUX1_TOP, ""))
        target = table.get(module) if match else None
        if target is None:
            unknown.append(key)
            continue
        prefix = f"{parent}{index}." if kind else ""
        parameter = FLUX1_PARAMETER_RENAMES.get(parameter, parameter)
        if isinstance(target, tuple):
            sizes = [inner_dim] * (len(target) - 1) + [value.shape[0] - inner_dim * (len(target) - 1)]
            for name, part in zip(target, value.split(sizes, dim=0)):
                converted[f"{prefix}{name}.{parameter}"] = part
            continue
        if target in FLUX1_SWAPPED_HALVES:
            shift, scale = value.chunk(2, dim=0)
            value = torch.cat([scale, shift], dim=0)
        converted[f"{prefix}{target}.{parameter}"] = value
    if unknown:
        raise ValueError(f"Not a FLUX.1 transformer file: {len(unknown)} key(s) with no FLUX.1 name, e.g. "
                         f"{unknown[:3]}.")
    return converted


def _build_from_state_dict(model_cls, config: dict, state_dict: dict, dtype, what: str):
    """``model_cls`` from ``config`` with every weight from ``state_dict`` (strict)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model's config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): is it a file of this model?")
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------- components
#: components read from beside a whole checkpoint (diffusers reads every model from the file, only their configs)
NOT_IN_CHECKPOINTS = ("tokenizer", "scheduler", "feature_extractor")


def pipeline_components(pipeline_cls) -> list[str]:
    """The component names a diffusers pipeline class requires (its ``__init__`` arguments without defaults)."""
    parameters = inspect.signature(pipeline_cls.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.default is inspect.Parameter.empty
            and p.kind is p.POSITIONAL_OR_KEYWORD]


def fetch_command(repo: str, folders: list[str], configs: list[str]) -> str:
    """The ``huggingface-cli`` line that fetches only what a single file needs beside it from ``repo``."""
    patterns = " ".join([*(f"'{c}/*'" for c in folders), *(f"{c}/config.json" for c in configs)])
    return f"huggingface-cli download {repo} --include model_index.json {patterns}"


#: where each front end takes the components source
COMPONENTS_OPTION = ("the components source (Load node: base, next to base_file; CLI: --components; library: "
                     "components=)")


def _unavailable(spec: ModelSpec, components: str, holds: str, problem: str,
                 command: str) -> ComponentsUnavailableError:
    return ComponentsUnavailableError(
        f"{spec.model_id}: {holds}; the rest comes from the hub repo {components}, but "
        f"{problem}. With a network, fetch just what is needed (no weights the files hold) once: {command} (gated "
        f"repos need `huggingface-cli login` first); or give a local diffusers folder of {spec.base} as "
        f"{COMPONENTS_OPTION}.")


def components_folder(spec: ModelSpec, components: str, in_file: list[str], whole_checkpoint: bool = False,
                      holds: str = "the single file holds the denoiser only") -> str:
    """The local diffusers folder of ``components`` with ``model_index.json``, every component the file lacks
    (folders in full) and the ``config.json`` of those it holds (``in_file``, described by ``holds`` in messages; a
    whole checkpoint: every model):
    ``components`` itself when it is a folder, else its hub snapshot of just those files (downloaded when missing
    and online; never the weights the file replaces).

    Raises :class:`ComponentsUnavailableError` naming the repo or folder and what to fetch when they cannot be had."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable = (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError)
    local = os.path.isdir(components)
    if not local and (os.path.exists(components) or components.count("/") != 1):
        raise ComponentsUnavailableError(f"{spec.model_id}: components source {components!r} is neither a diffusers "
                                         f"folder nor a Hugging Face repo id like {spec.base!r}.")
    holds = "the single file holds every model but not the tokenizers and scheduler" if whole_checkpoint else holds

    def split(names: list[str]) -> tuple[list[str], list[str]]:
        """(folders fetched whole, components whose config alone is fetched)."""
        if whole_checkpoint:
            folders = [c for c in names if c.startswith(NOT_IN_CHECKPOINTS)]
            return folders, [c for c in names if c not in folders]
        return [c for c in names if c not in in_file], list(in_file)

    # what the pipeline class requires: the fetch list when the repo's own index cannot be read
    required = pipeline_components(spec.family_class().diffusers_pipeline_class(spec)) + list(in_file)
    try:
        if local:
            index_path = os.path.join(components, "model_index.json")
        else:
            from huggingface_hub import hf_hub_download

            index_path = hf_hub_download(components, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
    except unreachable as e:
        if local:
            raise ComponentsUnavailableError(
                f"{spec.model_id}: {components!r} is not a diffusers folder (no model_index.json); the single file's "
                f"missing components come from a diffusers folder of {spec.base}.") from None
        raise _unavailable(spec, components, holds, f"it is not in the hub cache and could not be downloaded "
                           f"({type(e).__name__})", fetch_command(components, *split(required))) from None
    folders, configs = split([name for name, value in index.items()
                              if not name.startswith("_") and isinstance(value, list) and value[0] is not None])
    wanted = ["model_index.json", *folders, *(f"{c}/config.json" for c in configs)]
    command = fetch_command(components, folders, configs)
    folder = components
    if not local:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(components, allow_patterns=[*wanted[:1], *(f"{c}/*" for c in folders),
                                                                   *wanted[1 + len(folders):]])
        except unreachable as e:
            raise _unavailable(spec, components, holds, f"its files are not all in the hub cache and could not be "
                               f"downloaded ({type(e).__name__})", command) from None
    lacking = [path for path in wanted if not os.path.exists(os.path.join(folder, path))]
    if lacking:
        if local:
            raise ComponentsUnavailableError(
                f"{spec.model_id}: the single file does not hold {', '.join(folders)}; they come from the diffusers "
                f"folder {components!r}, which lacks {lacking}. Give a full diffusers folder of {spec.base} as "
                f"{COMPONENTS_OPTION}.")
        raise _unavailable(spec, components, holds, f"its hub cache lacks {lacking}", command)
    return folder


def load_denoiser(model_cls, state_dict: dict, folder: str, component: str, dtype, what: str):
    """The denoiser ``component`` from its original-named ``state_dict`` (prefix stripped), configured by
    ``folder/component``."""
    from accelerate import init_empty_weights

    config = model_cls.load_config(os.path.join(folder, component))
    if model_cls.__name__ == "FluxTransformer2DModel":
        return _build_from_state_dict(model_cls, config, convert_flux1_transformer(state_dict, config), dtype, what)
    if not hasattr(model_cls, "from_single_file"):
        raise ValueError(f"{what}: diffusers cannot load a {model_cls.__name__} from a single file; give a "
                         "diffusers folder as base.")
    with init_empty_weights():
        expected = set(model_cls.from_config(config).state_dict())
    if not set(state_dict) <= expected:
        # original names: diffusers' converters take them as ComfyUI writes them, under its prefix
        state_dict = {COMFY_DENOISER_PREFIX + k: v for k, v in state_dict.items()}
    incomplete = ValueError(f"{what} does not hold every weight of {model_cls.__name__} (diffusers' conversion left "
                            "some unset): is it a file of this model?")
    try:
        model = model_cls.from_single_file(state_dict, config=folder, subfolder=component, torch_dtype=dtype)
    except NotImplementedError:  # moving a model with weights still on the meta device
        raise incomplete from None
    except ValueError as e:  # e.g. a weight of another shape: a file of another model or size
        raise ValueError(f"{what} does not fit {model_cls.__name__} configured by {folder!r}: {e}") from None
    if any(tensor.is_meta for tensor in model.state_dict().values()):
        raise incomplete
    return model


def component_class(spec: ModelSpec, folder: str, component: str):
    """The class of ``component`` in ``folder``'s ``model_index.json`` (a diffusers or transformers class); a
    ValueError when it is none (the pack's own transformers, e.g. Chroma Radiance's, have no single-file layout)."""
    import importlib

    with open(os.path.join(folder, "model_index.json")) as f:
        library, class_name = json.load(f).get(component, (None, None))
    module = importlib.import_module(library) if library in ("diffusers", "transformers") else None
    if module is None or not hasattr(module, class_name):
        raise ValueError(f"{spec.model_id}: its {component} ({class_name}) cannot be loaded from a single file; give "
                         f"a diffusers folder of {spec.base} as base.")
    return getattr(module, class_name)


def load_single_file_pipeline(family_cls, spec: ModelSpec, source: str, components: str | None, torch_dtype,
                              overrides: dict[str, Any], component_files: dict[str, str] | None = None):
    """The family's diffusers pipeline with its denoiser(s) from the single file(s) ``source`` (or from ``source``
    itself when it is a diffusers folder or repo), the components in ``component_files`` (component -> file, see
    ``component_files.py``) from their files and the rest from ``components`` (default: the model's base repo);
    ``overrides`` as for ``load_diffusers_pipeline``."""
    from safetensors import safe_open

    from .component_files import load_component_file

    component_files = component_files or {}
    files = expert_files(spec, source) if is_single_file_source(source) else {}
    components = components or (spec.base if files else source)
    layout = "denoiser"
    if files:
        with safe_open(next(iter(files.values())), framework="pt") as f:
            layout = checkpoint_layout(f.keys())
    overrides = {k: v for k, v in overrides.items() if k != "device_map"}  # place() moves the modules afterwards
    whole_checkpoint = layout == "checkpoint" and spec.pipeline_class in WHOLE_CHECKPOINT_PIPELINES
    in_file = [*files, *component_files]
    holds = ("the single file holds the denoiser only" if not component_files
             else f"the single files hold the {', '.join(in_file)}")
    folder = components_folder(spec, components, [] if whole_checkpoint else in_file,
                               whole_checkpoint=whole_checkpoint, holds=holds)
    layouts = family_cls.component_files
    modules = {component: load_component_file(spec, component, layouts[component], path, folder,
                                              component_class(spec, folder, component), torch_dtype)
               for component, path in component_files.items()}
    if whole_checkpoint:
        return family_cls.load_diffusers_pipeline(spec, next(iter(files.values())), torch_dtype, config=folder,
                                                  **modules, **overrides)
    modules.update({component: load_denoiser(component_class(spec, folder, component),
                                             read_denoiser_state_dict(path, torch_dtype), folder, component,
                                             torch_dtype, f"{spec.model_id} {component} file {path!r}")
                    for component, path in files.items()})
    return family_cls.load_diffusers_pipeline(spec, folder, torch_dtype, **modules, **overrides)
