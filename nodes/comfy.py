"""ComfyUI's own modules when the pack runs inside ComfyUI, and the files in its model folders; shared by ``schema``
(the LoRA list) and ``core``. Outside ComfyUI every ComfyUI module is None and every folder is empty."""

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
