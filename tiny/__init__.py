"""The offline tiny-model kit: tiny random-weight pipelines of the real classes, and LoRA files in every layout.

Used by the tests, by ``demo`` and by ``make-tiny``. Each registry entry names its builder (``ModelSpec.tiny``).
Builds are deterministic (``torch.manual_seed(0)`` before every component) and take well under a second.
"""

from __future__ import annotations

import importlib
import os

from ..pipelines.atomic import atomic_path

#: bump when a builder changes, so cached tiny models are rebuilt
KIT_VERSION = "1"
#: what marks a saved pipeline folder: a classic pipeline's index, or a modular pipeline's (Anima)
PIPELINE_INDEX_FILES = ("model_index.json", "modular_model_index.json")


def default_cache_dir() -> str:
    return os.environ.get("AITK_TINY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aitk_inference", "tiny")


def build_tiny_pipeline(model_id: str, **variant):
    """Build (in memory) the tiny diffusers pipeline of ``model_id``. ``variant``: keyword arguments of its builder,
    for a model sized for one job (an end-to-end job's ``base.json`` names them); none gives the tiny model."""
    from ..pipelines.registry import get_spec

    module_name, _, function = get_spec(model_id).tiny.partition(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, function)(**variant)


def variant_folder_name(model_id: str, variant: dict) -> str:
    """``hidream`` or, for a variant, ``hidream@max_resolution=128x128,patch_size=4`` (arguments sorted)."""
    def text(value):
        return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    arguments = ",".join(f"{name}={text(value)}" for name, value in sorted(variant.items()))
    return f"{model_id}@{arguments}" if arguments else model_id


def native_lora_writer(model_id: str):
    """The family's ``write_native_loras(pipe, out_dir, seed)`` (the layout ai-toolkit itself saves when it differs
    from diffusers' names: original Wan / BFL names), or None."""
    from ..pipelines.registry import get_spec

    module_name = get_spec(model_id).tiny.partition(":")[0]
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), "write_native_loras", None)


def save_tiny_pipeline(model_id: str, out_dir: str, **variant) -> str:
    """Build the tiny pipeline of ``model_id`` and ``save_pretrained`` it to ``out_dir`` (written atomically)."""
    pipe = build_tiny_pipeline(model_id, **variant)
    with atomic_path(out_dir, folder=True) as staging:
        pipe.save_pretrained(staging)
    return out_dir


def tiny_model_dir(model_id: str, cache_dir: str | None = None, **variant) -> str:
    """The cached tiny pipeline folder of ``model_id`` (or of a builder ``variant``), built on first use. Processes
    sharing the cache (parallel test workers) build each folder once: the others wait for it, then read it."""
    from filelock import FileLock

    folder = os.path.join(cache_dir or default_cache_dir(), f"v{KIT_VERSION}", variant_folder_name(model_id, variant))

    def saved() -> bool:
        return any(os.path.isfile(os.path.join(folder, index)) for index in PIPELINE_INDEX_FILES)

    if not saved():
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        with FileLock(f"{folder}.lock"):
            if not saved():
                save_tiny_pipeline(model_id, folder, **variant)
    return folder
