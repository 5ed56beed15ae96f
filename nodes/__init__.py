"""ComfyUI nodes: Load AITK Pipeline, Apply AITK LoRA, AITK Sample, AITK Training Job, AITK Job Previews.

One implementation (``core``) and one declaration of the inputs (``schema``), with two thin front ends:

* ``v3``: ComfyUI's schema API (``comfy_api.latest``), used whenever the running ComfyUI has it. This module then
  exports ``comfy_entrypoint`` and no ``NODE_CLASS_MAPPINGS`` (ComfyUI checks that first, and it would win).
* ``classic``: ``NODE_CLASS_MAPPINGS``/``NODE_DISPLAY_NAME_MAPPINGS`` for older ComfyUI or outside ComfyUI (tests).
  ``AITK_COMFY_NODE_API=classic`` forces it inside a V3-capable ComfyUI too.

Importing this package imports neither torch nor diffusers.
"""

import asyncio
import os
import sys

from .schema import NODES


def _has_v3_api() -> bool:
    if os.environ.get("AITK_COMFY_NODE_API", "").lower() == "classic":
        return False
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        return False
    return True


def _register_routes() -> None:
    """Routes read by ``web/aitk_inference.js``: ``GET /aitk_inference/models`` (every model id's defaults) and
    ``GET /aitk_inference/base?model=&base=&base_file=`` (where the Load node's base comes from, and its size)."""
    server = sys.modules.get("server")  # ComfyUI's server module, imported by main.py before custom nodes load
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return
    from aiohttp import web

    from ..pipelines.registry import REGISTRY

    @prompt_server.routes.get("/aitk_inference/models")
    async def models(request):
        return web.json_response({model_id: spec.describe() for model_id, spec in REGISTRY.items()})

    @prompt_server.routes.get("/aitk_inference/base")
    async def base_line(request):
        from .core import base_source

        query = request.query
        return web.json_response(await asyncio.to_thread(base_source, query.get("model", ""), query.get("base", ""),
                                                       query.get("base_file", "")))


_register_routes()

if _has_v3_api():
    from .v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "NODES"]
else:
    from .classic import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NODES"]
