"""Wiring only: the FastAPI app, its lifespan (task store, worker, pipeline cache) and ``serve()``."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import Callable, Sequence

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..pipelines.runtime import cache
from .dependencies import require_api_key
from .routers import health, inference, models, requests
from .settings import Settings
from .store import TaskStore
from .validation import BodyLimit, validation_error_handler
from .worker import Worker

logger = logging.getLogger(__name__)


def remove_partial_files(*folders: str) -> None:
    """Delete the temporary files (``pipelines.atomic``) a killed process left half-written."""
    for folder in folders:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".") and ".partial" in name and os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))


def create_app(settings: Settings | None = None, get_pipeline: Callable | None = None,
               make_worker: Callable[..., Worker] = Worker) -> FastAPI:
    """Build the app.

    Args:
        settings (Settings, *optional*): defaults to :meth:`Settings.from_env`.
        get_pipeline (callable, *optional*): the worker's pipeline source; defaults to ``pipelines.runtime.cache.get_pipeline``.
        make_worker (callable, defaults to :class:`Worker`): ``(settings, store, get_pipeline) -> Worker``, what
            runs the queue: the worker thread, or the Ray replicas (``server.ray_serve``).
    """
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        os.makedirs(settings.inputs_path, exist_ok=True)
        remove_partial_files(settings.output_base_path, settings.inputs_path)
        store = TaskStore(settings.database_path)
        worker = make_worker(settings, store, get_pipeline or cache.get_pipeline)
        requeued, failed = worker.recover()
        if requeued or failed:
            logger.warning("Unfinished requests from a previous run: %d queued again, %d failed.", requeued, failed)
        worker.sweep(force=True)
        worker.start()
        app.state.store, app.state.worker = store, worker
        yield
        await asyncio.to_thread(worker.stop)
        cache.evict()
        store.close()

    app = FastAPI(
        title="AITK Inference",
        version=__version__,
        description="Run ai-toolkit LoRAs as their training previews were sampled. Compatible with the reference "
                    "/v1 API, plus cancel, listing, progress and output downloads.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key"])
    app.include_router(health.router)
    for area in (models, inference, requests):
        app.include_router(area.router, dependencies=[Depends(require_api_key)])
    return app


def serve(host: str | None = None, port: int | None = None, bases: Sequence[str] | None = None, ray: bool = False,
          replicas: int | None = None, ray_address: str | None = None) -> int:
    """Run the server until interrupted: uvicorn in this process, or with ``ray`` the same app on Ray Serve with
    ``replicas`` generator replicas (default: one per GPU; see ``server.ray_serve``). CLI values override the
    environment (see ``Settings``)."""
    if not ray and (replicas is not None or ray_address is not None):
        raise ValueError("--replicas and --ray-address configure the Ray Serve deployment; add --ray.")
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas {replicas}: run at least one replica (one per GPU).")
    settings = Settings.from_env(host=host, port=port, bases=bases)
    if ray:
        try:
            from .ray_serve import serve_ray
        except ImportError as e:
            raise ValueError(f"serve --ray needs Ray Serve ({e}); install it with pip install 'aitk-inference[ray]'.") from e
        return serve_ray(settings, replicas, ray_address)
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
