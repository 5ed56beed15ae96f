"""Up-front validation (the reference's 400 codes, plus path confinement) and the ONE place where the reference's
request fields become the library's parameters:

=====================  ==================================
request field          library
=====================  ==================================
``sample_steps``       ``steps``
``guidance_scale``     ``guidance``
``neg``                ``negative``
``network_multiplier`` ``LoraRequest.strength``
``transformer``        ``LoraRequest.side``
``ctrl_img``,          ``control_images`` (``ctrl_img_1..3`` when any is set, else ``[ctrl_img]``)
``ctrl_img_1..3``
=====================  ==================================
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from ..pipelines.registry import REGISTRY, ModelSpec
from .downloads import DownloadError, check_url, decode_base64_image, without_credentials
from .errors import APIError
from .schemas import InferenceInput, PromptItem
from .settings import Settings


@dataclass
class LoraSource:
    """A LoRA of a job: a checked local path, or a URL the worker downloads."""

    strength: float
    side: str | None
    path: str | None = None
    url: str | None = None


def inputs_prefix(folder: str, task_id: str) -> str:
    """Where a queued job's inline control images are kept: ``<folder>/<task id>_control_<prompt>_<k>.png``."""
    return os.path.join(folder, f"{task_id}_control_")


@dataclass
class Job:
    """A validated request, in library terms; lives in memory while queued or running."""

    id: str
    model: str
    loras: list[LoraSource]
    prompts: list[dict]
    controls: list[list]  # per prompt: PIL images (decoded base64) or http(s) URLs (fetched by the worker)
    output_format: str
    hf_token: str | None
    total_steps: int
    own_token: bool = False  # the request brought its hf_token (never stored: a restart cannot download with it)
    cancel_requested: bool = False
    step: int = 0

    def to_record(self, inputs_folder: str) -> dict:
        """What is stored to run the job again after a restart: JSON, with inline control images written as
        lossless PNG files under ``inputs_folder`` (URLs are fetched again) and no token."""
        from ..pipelines.media import write_image

        controls = []
        for i, sources in enumerate(self.controls):
            controls.append([])
            for k, source in enumerate(sources):
                if isinstance(source, str):
                    controls[-1].append({"url": source})
                else:
                    controls[-1].append({"file": write_image(source, f"{inputs_prefix(inputs_folder, self.id)}{i}_{k}.png")})
        return {"loras": [dataclasses.asdict(lora) for lora in self.loras], "prompts": self.prompts,
                "controls": controls, "output_format": self.output_format, "total_steps": self.total_steps,
                "own_token": self.own_token}

    @classmethod
    def from_record(cls, task_id: str, model: str, record: dict, hf_token: str | None) -> "Job":
        """The job stored by :meth:`to_record` (raises OSError when an input file is gone)."""
        from PIL import Image

        def load(path: str):
            with Image.open(path) as image:
                return image.convert("RGB")

        controls = [[source["url"] if "url" in source else load(source["file"]) for source in sources]
                    for sources in record["controls"]]
        return cls(id=task_id, model=model, loras=[LoraSource(**lora) for lora in record["loras"]],
                   prompts=record["prompts"], controls=controls, output_format=record["output_format"],
                   hf_token=hf_token, total_steps=record["total_steps"], own_token=record["own_token"])


def is_moe(spec: ModelSpec) -> bool:
    """Two-expert models (Wan 2.2 14B) take one LoRA per ``transformer`` side."""
    return spec.experts is not None


def is_url(path: str) -> bool:
    return "://" in path


def resolve_local_lora(path: str, root: str) -> str:
    """``root/path`` after symlinks, or a 400 if ``path`` is absolute, has ``..``, or resolves outside ``root``."""
    hint = "Give a path relative to WORKFLOWS_BASE_PATH, inside it."
    if "\x00" in path:
        raise APIError(400, "LORA_PATH_NOT_ALLOWED", f"LoRA path {path!r} contains a NUL character. {hint}", {"path": path})
    if os.path.isabs(path) or path.startswith("~") or re.match(r"^[A-Za-z]:", path):
        raise APIError(400, "LORA_PATH_NOT_ALLOWED", f"LoRA path {path!r} is absolute. {hint}", {"path": path})
    if ".." in re.split(r"[\\/]", path):
        raise APIError(400, "LORA_PATH_NOT_ALLOWED", f"LoRA path {path!r} contains '..'. {hint}", {"path": path})
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real_root, full]) != real_root:
        raise APIError(400, "LORA_PATH_NOT_ALLOWED", f"LoRA path {path!r} resolves outside WORKFLOWS_BASE_PATH "
                                                     f"(through a symlink). {hint}", {"path": path})
    return full


def control_sources(item: PromptItem) -> list[str]:
    numbered = [s for s in (item.ctrl_img_1, item.ctrl_img_2, item.ctrl_img_3) if s]
    return numbered or ([item.ctrl_img] if item.ctrl_img else [])


def generate_kwargs(item: PromptItem, body: InferenceInput, spec: ModelSpec) -> dict:
    """The library's ``generate()`` arguments for one prompt (control images are added by the worker)."""
    kwargs = {
        "prompt": item.prompt,
        "negative": item.neg,
        "width": item.width,
        "height": item.height,
        "steps": item.sample_steps,
        "guidance": item.guidance_scale,
        "seed": item.seed,
        "trigger_word": item.trigger_word or body.trigger_word,
    }
    if spec.is_video or item.num_frames is not None:
        kwargs.update(num_frames=item.num_frames, fps=item.fps)
    kwargs.update(body.options or {})
    for name in ("kv_cache", "match_target_res"):
        if getattr(body, name) is not None:
            kwargs[name] = getattr(body, name)
    return kwargs


def _check_options(body: InferenceInput) -> None:
    """``options`` may not set what generate() names itself (prompt, size, steps, ...) or a field of the request."""
    from ..pipelines.base import GENERATE_ARGUMENTS

    clashes = sorted(set(body.options or {}) & GENERATE_ARGUMENTS)
    both = sorted(name for name in ("kv_cache", "match_target_res")
                  if getattr(body, name) is not None and name in (body.options or {}))
    if clashes or both:
        fields = ", ".join(clashes + both)
        raise APIError(400, "INVALID_OPTIONS", f"options must not set {fields}: use the request's own field(s) instead.",
                       {"fields": clashes + both})


def _check_lora_layout(model: str, spec: ModelSpec, body: InferenceInput, max_loras: int) -> None:
    loras = body.loras
    if not loras:
        raise APIError(400, "LORA_FILE_REQUIRED", "At least one LoRA is required")
    if is_moe(spec):
        if any(item.transformer is None for item in loras):
            raise APIError(400, "MOE_FORMAT_REQUIRED", f"Model '{model}' requires MoE LoRA format with transformer=low/high")
        for side in ("low", "high"):
            count = sum(item.transformer == side for item in loras)
            if count > max_loras:
                code = "SINGLE_MOE_CONFIG_ONLY" if max_loras == 1 else "TOO_MANY_LORAS"
                message = (f"Model '{model}' currently only supports one low/high MoE LoRA pair" if max_loras == 1 else
                           f"Model '{model}' takes at most {max_loras} LoRAs per transformer (AITK_MAX_LORAS); got {count} for {side}.")
                raise APIError(400, code, message, {"max_loras": max_loras})
        return
    if any(item.transformer is not None and item.transformer not in spec.lora_pass_sides for item in loras):
        raise APIError(400, "MOE_FORMAT_NOT_SUPPORTED", f"Model '{model}' does not support MoE LoRA format")
    if len(loras) > max_loras:
        code = "SINGLE_LORA_ONLY" if max_loras == 1 else "TOO_MANY_LORAS"
        message = (f"Model '{model}' only supports 1 LoRA file" if max_loras == 1 else
                   f"Model '{model}' takes at most {max_loras} stacked LoRAs (AITK_MAX_LORAS); got {len(loras)}.")
        raise APIError(400, code, message, {"max_loras": max_loras})


def _lora_sources(body: InferenceInput, spec: ModelSpec, settings: Settings) -> list[LoraSource]:
    sources, missing = [], []
    for item in body.loras:
        strength = 1.0 if item.network_multiplier is None else item.network_multiplier
        if is_url(item.path):
            try:
                url = check_url(item.path, settings.fetch_policy)
            except DownloadError as e:
                raise APIError(400, "INVALID_LORA_URL", str(e), {"path": without_credentials(item.path)}) from None
            sources.append(LoraSource(strength, item.transformer, url=url))
            continue
        full = resolve_local_lora(item.path, settings.workflows_base_path)
        if not os.path.isfile(full):
            missing.append(item.path)
        sources.append(LoraSource(strength, item.transformer, path=full))
    if missing:
        message = f"LoRA file(s) not found: {missing}" if is_moe(spec) else f"LoRA file not found: {missing[0]}"
        raise APIError(400, "LORA_NOT_FOUND", message, {"missing": missing})
    return sources


def _controls(model: str, spec: ModelSpec, body: InferenceInput, settings: Settings) -> list[list]:
    low, high = spec.control_images
    out = []
    for i, item in enumerate(body.prompts):
        sources = control_sources(item)
        if len(sources) < low:
            raise APIError(400, "CONTROL_IMAGE_REQUIRED", f"Model '{model}' requires a control image for prompt {i}",
                           {"prompt_index": i, "min_control_images": low})
        if len(sources) > high:
            what = "takes no control image" if high == 0 else f"takes at most {high} control image(s)"
            raise APIError(400, "CONTROL_IMAGE_NOT_SUPPORTED", f"Model '{model}' {what}; prompt {i} has {len(sources)}.",
                           {"prompt_index": i, "max_control_images": high})
        images = []
        for source in sources:
            try:
                if source.startswith(("http://", "https://")) or is_url(source):
                    images.append(check_url(source, settings.fetch_policy))
                else:
                    images.append(decode_base64_image(source, settings.control_image_max_bytes,
                                                      settings.control_image_max_pixels))
            except DownloadError as e:
                raise APIError(400, "CONTROL_IMAGE_INVALID", f"Prompt {i}: {e}", {"prompt_index": i}) from None
        out.append(images)
    return out


def redacted(body: InferenceInput) -> dict:
    """The request as stored: no token, no inline image data."""
    data = body.model_dump()
    if data.get("hf_token"):
        data["hf_token"] = "<redacted>"
    for prompt in data["prompts"]:
        for key in ("ctrl_img", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3"):
            value = prompt.get(key)
            if value and not value.startswith(("http://", "https://")):
                prompt[key] = f"<inline image, {len(value)} characters>"
    return data


def build_job(task_id: str, body: InferenceInput, settings: Settings) -> Job:
    """Validate ``body`` (raising :class:`APIError` 400s in the reference's order) and build its :class:`Job`."""
    spec = REGISTRY.get(body.model)
    if spec is None:
        raise APIError(400, "MODEL_NOT_FOUND", f"Model '{body.model}' is not supported",
                       {"supported_models": list(REGISTRY)})
    _check_lora_layout(body.model, spec, body, settings.max_loras)
    _check_options(body)
    loras = _lora_sources(body, spec, settings)
    controls = _controls(body.model, spec, body, settings)
    prompts = [generate_kwargs(item, body, spec) for item in body.prompts]
    total = sum(spec.steps if p["steps"] is None else p["steps"] for p in prompts)
    return Job(id=task_id, model=body.model, loras=loras, prompts=prompts, controls=controls,
               output_format=body.output_format, hf_token=body.hf_token or settings.hf_token, total_steps=total,
               own_token=bool(body.hf_token))
