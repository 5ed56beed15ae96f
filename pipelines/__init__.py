"""The library: model registry, ai-toolkit LoRA loading, one file per model family. Never imports ComfyUI.

Importing this package is cheap; torch and diffusers are imported when a pipeline is loaded.
"""

from .registry import REGISTRY, ModelSpec, get_spec, model_ids

__all__ = ["REGISTRY", "ModelSpec", "get_spec", "model_ids", "load_pipeline", "LoraRequest", "GenerationResult",
           "GenerationInterrupted", "NonFiniteOutputError", "AITKPipeline"]


def __getattr__(name):
    if name in ("load_pipeline", "AITKPipeline", "GenerationResult", "GenerationInterrupted", "GenerationParams",
                "NonFiniteOutputError"):
        from . import base

        return getattr(base, name)
    if name == "LoraRequest":
        from .lora.stack import LoraRequest

        return LoraRequest
    raise AttributeError(name)
