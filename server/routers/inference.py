from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from ..dependencies import get_settings, get_store, get_worker
from ..errors import responses
from ..mapping import build_job, redacted
from ..schemas import InferenceInput, InferenceResponse
from ..settings import Settings
from ..store import TaskStore, utc_now
from ..worker import Worker

router = APIRouter(prefix="/v1/inference", tags=["inference"], responses=responses(401))


@router.post("", response_model=InferenceResponse, responses=responses(400, 413))
def submit(body: InferenceInput, settings: Settings = Depends(get_settings), store: TaskStore = Depends(get_store),
           worker: Worker = Depends(get_worker)) -> InferenceResponse:
    """Validate the request, store it and queue it; returns at once with the URLs to poll."""
    task_id = str(uuid.uuid4())
    job = build_job(task_id, body, settings)
    created_at = utc_now()
    store.add(task_id, body.model, redacted(body), created_at, job.to_record(settings.inputs_path))
    position = worker.submit(job)
    base = f"{settings.public_url}/v1/requests/{task_id}"
    return InferenceResponse(request_id=task_id, status_url=f"{base}/status", result_url=f"{base}/result",
                             created_at=created_at, queue_position=position)
