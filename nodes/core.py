"""What the nodes do, as plain functions over the library; the V3 and classic front ends only call these.

ComfyUI's own modules (``folder_paths``, ``comfy.utils``, ``comfy.model_management``) are imported lazily and are
optional, so this module also runs (and is tested) outside ComfyUI. torch is imported only inside :func:`sample` and
:func:`job_previews`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..pipelines.component_files import FILE_COMPONENTS
from ..pipelines.hub import hub_cache, hub_offline, repo_cache_folder
from ..pipelines.registry import get_spec
from ..pipelines.runtime import cache
from ..pipelines.runtime.options import LoadOptions
from ..pipelines.single_file import EXPERT_FILE_SEPARATOR
from .comfy import BASE_FILE_FOLDERS, NO_BASE_FILE
from .comfy import comfy_module as _comfy
from .previews import make_previewer
from .schema import (ATTENTION_KERNELS, COMPILE_MODES, DEVICES, DTYPES, LORA_MODES, OFFLOAD_MODES, QUANTIZE_MODES,
                     SAMPLE, TRANSFORMER_SIDES)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------- handle
@dataclass(frozen=True)
class PipelineHandle:
    """What flows along an ``AITK_PIPELINE`` link: load settings plus the LoRA set, never the weights themselves.

    The pipeline is looked up in ``pipelines.runtime.cache`` by these settings when a node needs it, so evicting the cache
    really frees memory, and a handle from a cached graph output still works after an eviction (it reloads).

    Args:
        model (str): the registry model id.
        options (LoadOptions): the load options (base resolved to a path or repo id; device None = the library's
            choice).
        loras (tuple[tuple[str, float, str | None], ...], defaults to ()): (path, strength, side) per LoRA, in order.
    """

    model: str
    options: LoadOptions
    loras: tuple[tuple[str, float, str | None], ...] = ()

    def get_pipeline(self):
        """The cached pipeline for these settings (loaded on first use or after an eviction)."""
        return cache.get_pipeline(self.model, self.options)

    def lora_requests(self) -> list:
        from ..pipelines.lora.stack import LoraRequest

        return [LoraRequest(path=path, strength=strength, side=side) for path, strength, side in self.loras]


@dataclass(frozen=True)
class JobHandle:
    """What flows along an ``AITK_JOB`` link: the job's config, its model and load options, and its checkpoints as
    they were when the Training Job node read the folder (a new checkpoint makes a new handle).

    Args:
        config (str): the job's ``config.yaml``.
        model (str): the registry model id the job's ``model`` section maps to.
        options (LoadOptions): how its pipeline loads (LoRAs live: see ``pipelines.jobs.grid``).
        checkpoints (tuple[JobCheckpoint, ...]): the LoRA saves, oldest first.
    """

    config: str
    model: str
    options: LoadOptions
    checkpoints: tuple

    def get_pipeline(self):
        return cache.get_pipeline(self.model, self.options)

    def checkpoint_lines(self) -> str:
        return "\n".join(f"step {c.step}: {c.name}" for c in self.checkpoints)


@dataclass(frozen=True)
class SampleOutput:
    """The AITK Sample node's outputs plus the UI message it sends to the front end."""

    images: Any
    width: int
    height: int
    seed: int
    fps: float = 0.0
    audio: dict | None = None

    def result(self) -> tuple:
        """The outputs in the order the schema declares them."""
        return (self.images, self.width, self.height, self.seed, self.fps, self.audio)

    def ui(self) -> dict:
        return {"aitk_effective": [{"width": self.width, "height": self.height, "seed": str(self.seed)}]}


# ---------------------------------------------------------------------------------------------------------------- files
def resolve_base(base: str) -> str | None:
    """Resolve the Load node's ``base``: empty -> None, a path, a folder under ``models/diffusers``, or a repo id."""
    base = (base or "").strip()
    if not base:
        return None
    expanded = [os.path.expanduser(part.strip()) for part in base.split(EXPERT_FILE_SEPARATOR)]
    if all(os.path.exists(path) for path in expanded):
        return EXPERT_FILE_SEPARATOR.join(os.path.abspath(path) for path in expanded)
    folder_paths = _comfy("folder_paths")
    roots = list(folder_paths.get_folder_paths("diffusers")) if folder_paths else []
    for root in roots:
        candidate = os.path.join(root, base)
        if os.path.isdir(candidate):
            return candidate
    parts = base.split("/")
    if len(parts) == 2 and all(parts) and not os.path.isabs(base):
        return base  # a Hugging Face repo id
    where = f" nor a folder under {roots}" if roots else ""
    raise ValueError(
        f"base {base!r} is not an existing path{where}, nor a Hugging Face repo id like 'owner/name'. Put the "
        "diffusers folder under ComfyUI/models/diffusers and give its name, or leave base empty for the default."
    )


def find_model_file(value: str, folders) -> str | None:
    """The path of a file widget's ``value``: a full path (API-format workflows), or ``<folder>/<file>`` from one of
    ComfyUI's model ``folders`` (extra paths included); None when it is neither."""
    expanded = os.path.expanduser(value)
    if os.path.isfile(expanded):
        return os.path.abspath(expanded)
    folder, _, name = value.partition("/")
    folder_paths = _comfy("folder_paths")
    return folder_paths.get_full_path(folder, name) if folder_paths and folder in folders else None


def resolve_base_file(base_file: str) -> str | None:
    """The path of the Load node's ``base_file``: ``none`` -> None; ``<folder>/<file>`` from ComfyUI's
    ``diffusion_models``/``unet``/``checkpoints`` folders, or a full path (API-format workflows)."""
    base_file = (base_file or NO_BASE_FILE).strip()
    if base_file == NO_BASE_FILE:
        return None
    found = find_model_file(base_file, BASE_FILE_FOLDERS)
    if found:
        return found
    raise ValueError(
        f"base_file {base_file!r} not found. Put the .safetensors file into ComfyUI/models/diffusion_models (a "
        "transformer/UNet file) or ComfyUI/models/checkpoints (an all-in-one checkpoint) and refresh, or give its "
        "full path.")


def base_file_input_problem(base_file: str | None) -> bool | str:
    """ComfyUI's input validation for the Load node's ``base_file``: True, or the message saying what to fix (lets an
    API-format workflow give a full path, or a ``high|low`` pair, instead of a name from the list)."""
    try:
        resolve_base_files("", base_file or NO_BASE_FILE)
    except ValueError as e:
        return str(e)
    return True


def resolve_component_file(component: str, value: str | None) -> str | None:
    """The path of the Load node's ``<component>_file``: ``none`` -> None; ``<folder>/<file>`` from ComfyUI's
    folders of that component (``text_encoders``/``clip``, ``vae``), or a full path (API-format workflows)."""
    value = (value or NO_BASE_FILE).strip()
    if value == NO_BASE_FILE:
        return None
    folders, examples = FILE_COMPONENTS[component]
    found = find_model_file(value, folders)
    if found:
        return found
    raise ValueError(f"{component}_file {value!r} not found. Put the .safetensors file into ComfyUI/models/"
                     f"{folders[0]} ({examples}) and refresh, or give its full path.")


def load_input_problem(base_file: str | None = None, **component_files: str | None) -> bool | str:
    """ComfyUI's input validation for the Load node's file inputs (``base_file`` and ``<component>_file``): True, or
    the message saying what to fix (lets an API-format workflow give full paths instead of names from the lists)."""
    problem = base_file_input_problem(base_file)
    if problem is not True:
        return problem
    try:
        for component in FILE_COMPONENTS:
            resolve_component_file(component, component_files.get(f"{component}_file"))
    except ValueError as e:
        return str(e)
    return True


def resolve_base_files(base: str, base_file: str) -> tuple[str | None, str | None]:
    """(base, components) for the library from the Load node's ``base`` and ``base_file``: with a ``base_file``, the
    file is the base and ``base`` (a diffusers folder or repo id, or empty for the model's repo) the source of the
    components it lacks. A two-expert model's other file is found beside it by name, or named after ``|``."""
    files = [resolve_base_file(part) for part in (base_file or NO_BASE_FILE).split(EXPERT_FILE_SEPARATOR)]
    if files == [None]:
        return resolve_base(base), None
    if None in files:
        raise ValueError(f"base_file {base_file!r}: name each file of the pair (high|low), not 'none'.")
    return EXPERT_FILE_SEPARATOR.join(files), resolve_base(base)


#: files :func:`_folder_bytes` counts at most: a model folder or hub snapshot holds a few hundred, so a base such as
#: ``/`` (which the front end's request may name) ends the walk early instead of reading the whole disk
MAX_COUNTED_FILES = 5000


def _folder_bytes(folder: str) -> int | None:
    """Bytes under ``folder``, counting each blob once (snapshots are links to blobs); None past
    :data:`MAX_COUNTED_FILES` files (not a model folder)."""
    total, seen = 0, 0
    for root, _, files in os.walk(folder):
        for name in files:
            seen += 1
            if seen > MAX_COUNTED_FILES:
                return None
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


_HUB_SIZES: dict[str, tuple[int | None, bool | None]] = {}


def hub_download_size(repo_id: str) -> tuple[int | None, bool | None]:
    """(bytes a diffusers load downloads, gated) for a hub repo, asked once from the hub; (None, None) offline.

    The size counts ``model_index.json`` and the component folders, which is what a diffusers load fetches (a
    repo's root-level single-file checkpoints are skipped)."""
    if repo_id not in _HUB_SIZES:
        size, gated = None, None
        if not hub_offline():
            try:
                from huggingface_hub import HfApi

                info = HfApi().model_info(repo_id, files_metadata=True, timeout=10)
                size = sum(file.size or 0 for file in info.siblings
                           if "/" in file.rfilename or file.rfilename == "model_index.json")
                gated = bool(info.gated)
            except Exception as e:  # offline, unknown repo, rate limit: the size is simply not known
                logger.info("AITK Inference: no download size for %s (%s)", repo_id, e)
        _HUB_SIZES[repo_id] = (size, gated)
    return _HUB_SIZES[repo_id]


def base_source(model: str, base: str = "", base_file: str = "") -> dict:
    """Where the Load node's base comes from, for the front end: ``{"kind", "source", "bytes", "cached", "gated"}``
    (plus ``offline`` for a repo not yet downloaded). With a ``base_file``, ``source`` and ``bytes`` are the file's
    and ``components`` is where the rest comes from (the same dict for ``base``)."""
    if base_file and base_file != NO_BASE_FILE:
        try:
            files, _ = resolve_base_files("", base_file)
        except ValueError as e:
            return {"kind": "error", "source": str(e), "bytes": None, "cached": False, "gated": None}
        paths = files.split(EXPERT_FILE_SEPARATOR)
        components = _base_source(model, base)
        if components["kind"] == "hub" and not components["cached"]:
            # only the folders the file lacks are fetched, not the whole repo the hub's size counts
            components.update(bytes=None, partial=True)
        size = sum(os.path.getsize(path) for path in paths if os.path.isfile(path))
        return {"kind": "local", "source": " + ".join(paths), "bytes": size, "cached": True, "gated": None,
                "components": components}
    return _base_source(model, base)


def _base_source(model: str, base: str) -> dict:
    """:func:`base_source` of ``base`` alone.

    ``kind`` is ``local`` (a path or a folder under models/diffusers), ``hub`` (a repo id: empty base = the model's
    default repo) or ``error`` (``source`` is then the message). ``bytes`` is the size on disk when local or already in
    the hub cache, else the download size when the hub answers, else None. Asks the hub only for a repo not yet in
    the cache, once per repo."""
    try:
        spec = get_spec(model)
        resolved = resolve_base(base) or spec.base
    except ValueError as e:
        return {"kind": "error", "source": str(e), "bytes": None, "cached": False, "gated": None}
    if os.path.exists(resolved):
        size = _folder_bytes(resolved) if os.path.isdir(resolved) else os.path.getsize(resolved)
        return {"kind": "local", "source": resolved, "bytes": size, "cached": True, "gated": None}
    cached = repo_cache_folder(hub_cache(), resolved)
    if os.path.isdir(os.path.join(cached, "snapshots")):
        return {"kind": "hub", "source": resolved, "bytes": _folder_bytes(cached), "cached": True, "gated": None}
    size, gated = hub_download_size(resolved)
    return {"kind": "hub", "source": resolved, "bytes": size, "cached": False, "gated": gated,
            "offline": hub_offline()}


def resolve_lora(lora: str) -> str:
    """The full path of the Apply node's ``lora``: a name from ComfyUI's ``loras`` folders or a file path."""
    lora = (lora or "").strip()
    if not lora:
        raise ValueError("No LoRA chosen: pick a .safetensors file from ComfyUI/models/loras (or give its full path).")
    expanded = os.path.expanduser(lora)
    if os.path.isfile(expanded):
        return os.path.abspath(expanded)
    folder_paths = _comfy("folder_paths")
    found = folder_paths.get_full_path("loras", lora) if folder_paths else None
    if found:
        return found
    where = f" in {list(folder_paths.get_folder_paths('loras'))}" if folder_paths else ""
    raise ValueError(
        f"LoRA {lora!r} not found{where}. Put the .safetensors file into ComfyUI/models/loras and refresh, or give "
        "its full path."
    )


def lora_input_problem(lora: str) -> bool | str:
    """ComfyUI's input validation for the Apply node's ``lora``: True, or the message saying what to fix. Declaring
    ``lora`` there lets an API-format workflow pass a full path instead of a name from the list."""
    try:
        resolve_lora(lora)
    except ValueError as e:
        return str(e)
    return True


def lora_fingerprint(lora: str) -> str:
    """Changes when the LoRA file changes on disk (a retrained file under the same name re-runs the graph)."""
    try:
        path = resolve_lora(lora)
    except ValueError:
        return ""
    stat = os.stat(path)
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}.")
    return value


def resolve_device(device: str) -> str | None:
    """``auto`` -> the device ComfyUI computes on (None outside ComfyUI: the library picks CUDA, MPS or CPU)."""
    _choice("device", device, DEVICES)
    if device != "auto":
        return device
    model_management = _comfy("comfy.model_management")
    return str(model_management.get_torch_device()) if model_management else None


# ---------------------------------------------------------------------------------------------------------------- ComfyUI hooks
def comfy_progress(total: int, model_id: str) -> tuple[Callable[[int, int], None] | None, Callable | None]:
    """``(progress, on_latents)`` for ``generate``: ``progress`` ticks ComfyUI's progress bar (with the step's
    preview, when ``on_latents`` made one) and raises on ComfyUI's interrupt; ``on_latents`` is None when ComfyUI's
    preview method makes no preview for ``model_id`` (see ``previews``). (None, None) outside ComfyUI."""
    utils = _comfy("comfy.utils")
    model_management = _comfy("comfy.model_management")
    if utils is None or model_management is None:
        return None, None
    bar = utils.ProgressBar(total)
    previewer = make_previewer(model_id)
    pending = []

    def on_latents(step: int, steps: int, latents) -> None:
        pending[:] = [previewer(latents)]

    def progress(step: int, steps: int) -> None:
        bar.update_absolute(step, steps, pending.pop() if pending else None)
        model_management.throw_exception_if_processing_interrupted()

    return progress, (on_latents if previewer is not None else None)


def install_memory_hook() -> bool:
    """Evict cached pipelines when ComfyUI frees memory; returns whether the hook is (now) installed.

    Our diffusers pipelines are not ComfyUI ModelPatchers, so ComfyUI's unloading does not see them. Every unload in
    ComfyUI goes through ``comfy.model_management.free_memory`` (the "Free model and node cache" button and
    ``POST /free`` call ``unload_all_models()``, which calls it with 1e30 bytes). We wrap that one function: after
    ComfyUI has freed its own models, our cache is emptied when everything was asked for, or when the device still
    has less free memory than ComfyUI needs (another model is being loaded and memory is short).
    """
    model_management = _comfy("comfy.model_management")
    if model_management is None:
        return False
    original = model_management.free_memory
    if getattr(original, "aitk_hook", False):
        return True

    def free_memory(memory_required, device, *args, **kwargs):
        result = original(memory_required, device, *args, **kwargs)
        short = getattr(device, "type", str(device)) != "cpu" and \
            model_management.get_free_memory(device) < memory_required
        if cache.cached_keys() and (memory_required >= 1e30 or short):
            logger.info("ComfyUI is freeing memory: evicting %d cached AITK pipeline(s).", cache.evict())
        return result

    free_memory.aitk_hook = True
    model_management.free_memory = free_memory
    return True


# ---------------------------------------------------------------------------------------------------------------- nodes
def load(model: str, base: str = "", dtype: str = "auto", offload: str = "none", device: str = "auto",
         lora_mode: str = "model default", compile: str = "none", attention: str = "sdpa",
         quantize: str = "none", base_file: str = NO_BASE_FILE, text_encoder_file: str = NO_BASE_FILE,
         text_encoder_2_file: str = NO_BASE_FILE, vae_file: str = NO_BASE_FILE) -> PipelineHandle:
    """Load AITK Pipeline: validate, load (or reuse) the cached pipeline, return its handle."""
    # 1. Validate
    get_spec(model)
    _choice("dtype", dtype, DTYPES)
    _choice("offload", offload, OFFLOAD_MODES)
    _choice("lora_mode", lora_mode, LORA_MODES)
    _choice("compile", compile, COMPILE_MODES)
    _choice("attention", attention, ATTENTION_KERNELS)
    _choice("quantize", quantize, QUANTIZE_MODES)
    base, components = resolve_base_files(base, base_file)
    given = {"text_encoder": text_encoder_file, "text_encoder_2": text_encoder_2_file, "vae": vae_file}
    files = {f"{component}_file": resolve_component_file(component, given[component]) for component in FILE_COMPONENTS}
    options = LoadOptions(base=base, components=components, device=resolve_device(device), dtype=dtype, offload=offload,
                          lora_mode=None if lora_mode == "model default" else lora_mode, compile=compile,
                          attention=attention, quantize=quantize, **files)
    handle = PipelineHandle(model=model, options=options)
    # 2. Get pipeline from cache (loads it on a miss, so load errors show on this node)
    install_memory_hook()
    handle.get_pipeline()
    return handle


def apply_lora(pipeline: PipelineHandle, lora: str, strength: float = 1.0, transformer: str = "none") -> PipelineHandle:
    """Apply AITK LoRA: return a new handle with the LoRA appended (``pipeline`` itself is never modified).

    The LoRA is checked here by the pipeline's own front door (:meth:`AITKPipeline.check_lora`: strength, side,
    file read and matched against the model, weights untouched; cached by file identity), so a LoRA of the wrong
    family fails on this node with a message that names the family its keys look like. The handle keeps what the
    check resolved (the side a family infers from the file name), so Sample applies exactly what the library would.
    """
    # 1. Validate
    if not isinstance(pipeline, PipelineHandle):
        raise ValueError(f"pipeline must come from Load AITK Pipeline, got {type(pipeline).__name__}.")
    path = resolve_lora(lora)
    side = None if _choice("transformer", transformer, TRANSFORMER_SIDES) == "none" else transformer
    # 2. Check the LoRA against the cached model
    checked = pipeline.get_pipeline().check_lora((path, strength, side))
    return dataclasses.replace(pipeline, loras=pipeline.loras + ((path, checked.strength, checked.request.side),))


def sample(
    pipeline: PipelineHandle,
    prompt: str,
    negative: str = "",
    trigger_word: str = "",
    width: int = 1024,
    height: int = 1024,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 42,
    batch_size: int = 1,
    control_image=None,
    control_image_2=None,
    control_image_3=None,
    num_frames: int = 0,
    fps: int = 0,
    vae_tiling: bool = False,
    options: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> SampleOutput:
    """AITK Sample: set the handle's LoRAs on the cached pipeline and generate.

    Args:
        control_image, control_image_2, control_image_3 (torch.Tensor, *optional*): ComfyUI IMAGEs ``[1,H,W,C]``.
        num_frames, fps (int, defaults to 0): 0 = the model's default (video models).
        vae_tiling (bool, defaults to False): decode in tiles (less memory).
        options (str, defaults to ""): the model's generation options as a JSON object (see :func:`parse_options`).
        progress (callable, *optional*): ``progress(step, total)``; defaults to ComfyUI's progress bar + interrupt,
            with live step previews as ComfyUI's preview method says (see ``previews``).

    Returns:
        SampleOutput: images as a CPU float32 tensor ``[B,H,W,C]`` (video: ``[B*frames,H,W,C]``), and the
        effective width, height and seed.
    """
    import torch

    # 1. Validate
    if not isinstance(pipeline, PipelineHandle):
        raise ValueError(f"pipeline must come from Load AITK Pipeline, got {type(pipeline).__name__}.")
    controls = [image for image in (control_image, control_image_2, control_image_3) if image is not None]
    extra = parse_options(options)
    # 2. Get pipeline from cache
    loaded = pipeline.get_pipeline()
    on_latents = None
    if progress is None:
        progress, on_latents = comfy_progress(steps, pipeline.model)
    with loaded.lock:
        # 3. Apply LoRAs (unchanged entries stay as they are; strength-only changes rescale in place)
        loaded.set_loras(pipeline.lora_requests())
        # 4. Run
        result = loaded.generate(
            prompt=prompt, negative=negative, width=width, height=height, steps=steps, guidance=guidance,
            seed=seed, batch_size=batch_size, control_images=controls, trigger_word=trigger_word or None,
            num_frames=num_frames or None, fps=fps or None, vae_tiling=bool(vae_tiling),
            progress=progress, on_latents=on_latents, **extra,
        )
    # 5. Post-process: ComfyUI IMAGE layout, video frames flattened into the batch; an audio-only model gives one
    # black placeholder image per item
    images = torch.from_numpy(result.images if not result.is_audio else audio_placeholder(len(result.audio))).float()
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[2:])
    fps = float(result.params.fps or 0)
    return SampleOutput(images=images.contiguous(), width=result.width, height=result.height, seed=result.seed,
                        fps=fps, audio=comfy_audio(result, frames=images.shape[0]))


def parse_options(text: str) -> dict:
    """The Sample node's ``options`` text: empty, or a JSON object of generation options (the model checks names and
    values, and its error lists the ones it takes)."""
    if not text or not text.strip():
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"options must be a JSON object such as {{\"kv_cache\": false}}; {error.msg} at character "
                         f"{error.pos} of {text!r}.") from None
    if not isinstance(options, dict):
        raise ValueError(f"options must be a JSON object of name: value pairs, got {type(options).__name__} {text!r}.")
    from ..pipelines.base import GENERATE_ARGUMENTS

    node_inputs = sorted(set(options) & (GENERATE_ARGUMENTS | {field.name for field in SAMPLE.inputs}))
    if node_inputs:
        raise ValueError(f"options must not repeat the node's own inputs ({', '.join(node_inputs)}): set them on the "
                         "node.")
    return options


SILENCE_RATE = 16000
#: side of the black IMAGE an audio-only model's Sample node returns (the sound is on its AUDIO output)
AUDIO_PLACEHOLDER_SIDE = 64


def audio_placeholder(batch_size: int):
    import numpy as np

    return np.zeros((batch_size, AUDIO_PLACEHOLDER_SIDE, AUDIO_PLACEHOLDER_SIDE, 3), dtype=np.float32)


def comfy_audio(result, frames: int) -> dict:
    """ComfyUI AUDIO (``{"waveform": [B, C, S], "sample_rate"}``): the model's audio, or silence as long as the video."""
    import torch

    if result.audio is not None:
        return {"waveform": torch.from_numpy(result.audio).float().cpu(), "sample_rate": int(result.sample_rate)}
    seconds = frames / result.params.fps if result.params.fps else 0.0
    return {"waveform": torch.zeros(1, 1, max(1, round(seconds * SILENCE_RATE))), "sample_rate": SILENCE_RATE}


def training_job(job_folder: str, base: str = "", dtype: str = "auto", device: str = "auto") -> tuple[JobHandle, str]:
    """AITK Training Job: read the job folder and list its checkpoints; returns (handle, one line per checkpoint)."""
    from ..pipelines.jobs.config import job_checkpoints, read_job
    from ..pipelines.jobs.grid import GRID_LORA_MODE
    from ..pipelines.jobs.reproduce import job_base

    # 1. Validate
    if not (job_folder or "").strip():
        raise ValueError("job_folder is empty: give the ai-toolkit job folder (<training_folder>/<name>/, with its "
                         "config.yaml).")
    _choice("dtype", dtype, DTYPES)
    # 2. Read the job and its checkpoints
    training = read_job(job_folder.strip())
    model = training.model_id
    checkpoints = tuple(job_checkpoints(training.folder, training.name, training.process))
    # 3. Resolve where its base comes from (nothing is loaded until the previews are rendered)
    if (base or "").strip():
        source = resolve_base(base)
    else:
        source = job_base(training)
        try:
            source = resolve_base(source)
        except ValueError:
            raise ValueError(f"The job's model.name_or_path {source!r} is neither a path on this machine nor a Hugging "
                             "Face repo id: set base to the base model's diffusers folder.") from None
    options = LoadOptions(base=source, device=resolve_device(device), dtype=dtype, lora_mode=GRID_LORA_MODE)
    handle = JobHandle(config=training.config_path, model=model, options=options, checkpoints=checkpoints)
    return handle, handle.checkpoint_lines()


def job_fingerprint(job_folder: str) -> str:
    """Changes when a checkpoint or sample is added to (or rewritten in) the job folder, so ComfyUI re-runs the Training
    Job node instead of reusing its cached listing."""
    from ..pipelines.jobs.config import find_job_config

    try:
        folder = os.path.dirname(os.path.abspath(find_job_config((job_folder or "").strip())))
    except (FileNotFoundError, OSError):
        return ""
    entries = []
    for sub in (folder, os.path.join(folder, "samples")):
        if os.path.isdir(sub):
            for entry in sorted(os.scandir(sub), key=lambda e: e.name):
                if entry.is_file():
                    stat = entry.stat()
                    entries.append(f"{entry.name}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(entries)


def job_previews(job: JobHandle, checkpoints: str = "all", strengths: str = "", prompts: str = "",
                 progress: Callable[[int, int], None] | None = None):
    """AITK Job Previews: the job's previews grid (``pipelines.jobs.grid``) as a ComfyUI IMAGE ``[1,H,W,3]``.

    Args:
        progress (callable, *optional*): ``progress(cells_done, cells_total)``; defaults to ComfyUI's progress bar
            (one tick per cell) + interrupt.
    """
    import numpy as np
    import torch

    from ..pipelines.jobs.config import read_job
    from ..pipelines.jobs.grid import check_image_model, grid_cell_count, job_grid

    # 1. Validate (before anything loads)
    if not isinstance(job, JobHandle):
        raise ValueError(f"job must come from AITK Training Job, got {type(job).__name__}.")
    training = read_job(job.config)
    check_image_model(get_spec(job.model))
    cells = grid_cell_count(training, list(job.checkpoints), checkpoints, strengths, prompts)
    # 2. Get pipeline from cache
    loaded = job.get_pipeline()
    with loaded.lock:
        # 3. Render: one LoRA switch per checkpoint and strength; the bar ticks per cell (no step previews)
        progress = progress if progress is not None else comfy_progress(cells, job.model)[0]
        grid = job_grid(loaded, training, list(job.checkpoints), checkpoints, strengths, prompts, progress=progress)
    # 4. Post-process: ComfyUI IMAGE layout
    pixels = np.asarray(grid.image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None].contiguous()
