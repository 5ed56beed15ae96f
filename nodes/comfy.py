"""ComfyUI's own modules when the pack runs inside ComfyUI, and the files in its model folders; shared by ``schema``
(the LoRA and base-file lists) and ``core``. Outside ComfyUI every ComfyUI module is None and every folder is empty."""

from __future__ import annotations

import importlib


def comfy_module(module_name: str):
    """A ComfyUI module (``folder_paths``, ``comfy.utils``...) or None when not running inside ComfyUI."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def lora_choices() -> list[str]:
    """LoRA files in ComfyUI's ``loras`` folders (empty outside ComfyUI)."""
    folder_paths = comfy_module("folder_paths")
    return list(folder_paths.get_filename_list("loras")) if folder_paths else []


#: ComfyUI's folders of single-file base models, as the Load node's ``base_file`` list names them
#: (``<folder>/<file>``); ``unet`` is the older name of ``diffusion_models`` (ComfyUIs that know the new name map the
#: old one onto it, so only one of the two is a key of ``folder_names_and_paths``)
BASE_FILE_FOLDERS = ("diffusion_models", "unet", "checkpoints")
NO_BASE_FILE = "none"


def base_file_choices() -> list[str]:
    """``none``, then the ``.safetensors``/``.sft`` files of ComfyUI's ``diffusion_models`` (``unet``) and
    ``checkpoints`` folders (with their ``extra_model_paths.yaml`` paths), as ``<folder>/<file>``."""
    folder_paths = comfy_module("folder_paths")
    choices = [NO_BASE_FILE]
    if folder_paths is None:
        return choices
    known = getattr(folder_paths, "folder_names_and_paths", {})
    for folder in BASE_FILE_FOLDERS:
        if folder in known:
            choices += [f"{folder}/{name}" for name in folder_paths.get_filename_list(folder)
                        if name.endswith((".safetensors", ".sft"))]
    return choices
