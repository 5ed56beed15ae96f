"""ComfyUI's own modules when the pack runs inside ComfyUI, and the files in its model folders; shared by ``schema``
(the LoRA, base-file and component-file lists) and ``core``. Outside ComfyUI every ComfyUI module is None and every
folder is empty."""

from __future__ import annotations

import importlib

from ..pipelines.component_files import FILE_COMPONENTS


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


def model_file_choices(folders) -> list[str]:
    """``none``, then the ``.safetensors``/``.sft`` files of ComfyUI's ``folders`` that it knows (with their
    ``extra_model_paths.yaml`` paths), as ``<folder>/<file>``."""
    folder_paths = comfy_module("folder_paths")
    choices = [NO_BASE_FILE]
    if folder_paths is None:
        return choices
    known = getattr(folder_paths, "folder_names_and_paths", {})
    for folder in folders:
        if folder in known:
            choices += [f"{folder}/{name}" for name in folder_paths.get_filename_list(folder)
                        if name.endswith((".safetensors", ".sft"))]
    return choices


def base_file_choices() -> list[str]:
    """``none``, then the files of ComfyUI's ``diffusion_models`` (``unet``) and ``checkpoints`` folders."""
    return model_file_choices(BASE_FILE_FOLDERS)


def component_file_choices(component: str) -> list[str]:
    """``none``, then the files of the ComfyUI folders of ``component``'s files (``text_encoders``/``clip``,
    ``vae``), for the Load node's ``<component>_file``."""
    return model_file_choices(FILE_COMPONENTS[component][0])
