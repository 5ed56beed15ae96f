from __future__ import annotations

from fastapi import APIRouter

from ..schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """Liveness: the process is up and serving."""
    return Health()
