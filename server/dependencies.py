"""Shared ``Depends`` callables: settings, task store and worker come from ``app.state`` (set in the lifespan), so
tests can override any of them with ``app.dependency_overrides``."""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from .errors import APIError
from .settings import Settings
from .store import TaskStore
from .worker import Worker

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Required when AITK_API_KEY is set.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> TaskStore:
    return request.app.state.store


def get_worker(request: Request) -> Worker:
    return request.app.state.worker


def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    """Check ``X-API-Key`` against AITK_API_KEY; a no-op when no key is configured."""
    expected = request.app.state.settings.api_key
    if expected and not (key and hmac.compare_digest(key.encode(), expected.encode())):
        raise APIError(401, "UNAUTHORIZED", "Missing or wrong X-API-Key header.")
