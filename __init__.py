"""AITK Inference: run ai-toolkit LoRAs exactly as their training previews were sampled.

This folder is both the Python package ``aitk_inference`` (``pip install -e .``) and a ComfyUI custom node pack
(drop it into ``ComfyUI/custom_nodes/`` under any folder name). Importing it is cheap: torch, diffusers and the node
definitions are imported only when something asks for them.
"""

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"

_NODE_EXPORTS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint")
_LIBRARY_EXPORTS = ("load_pipeline", "LoraRequest", "GenerationResult", "GenerationInterrupted", "AITKPipeline",
                    "REGISTRY", "get_spec", "model_ids")


def __getattr__(name):
    if name in _NODE_EXPORTS:
        from . import nodes

        return getattr(nodes, name)
    if name in _LIBRARY_EXPORTS:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "WEB_DIRECTORY", *_LIBRARY_EXPORTS]
