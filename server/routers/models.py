from __future__ import annotations

from fastapi import APIRouter, Depends

from ...pipelines.registry import REGISTRY
from ..dependencies import get_settings
from ..errors import responses
from ..schemas import ModelInfo, ModelList
from ..settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"], responses=responses(401))


@router.get("", response_model=ModelList)
def list_models(settings: Settings = Depends(get_settings)) -> ModelList:
    """Every model id with the defaults a prompt falls back to (the reference's fields, plus ``base_override``)."""
    return ModelList(models=[
        ModelInfo(
            id=spec.model_id, base_model=spec.base, resolution_divisor=spec.divisor, default_steps=spec.steps,
            default_guidance_scale=spec.guidance, requires_control_image=spec.requires_control_image,
            is_video_model=spec.is_video, default_num_frames=spec.video.num_frames if spec.video else None,
            default_fps=spec.video.fps if spec.video else None, base_override=settings.bases.get(spec.model_id),
        )
        for spec in REGISTRY.values()
    ])
