from __future__ import annotations

import os
from typing import Optional

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import FileResponse

from ..dependencies import get_settings, get_store, get_worker
from ..errors import APIError, responses
from ..outputs import MEDIA_TYPES, OUTPUT_KINDS
from ..schemas import FINISHED, InferenceResultResponse, InferenceStatusResponse, RequestList, TaskStatus
from ..settings import Settings
from ..store import TaskStore
from ..worker import Worker

router = APIRouter(prefix="/v1/requests", tags=["requests"], responses=responses(401))


def _task(store: TaskStore, request_id: str) -> dict:
    task = store.get(request_id)
    if task is None:
        raise APIError(404, "REQUEST_NOT_FOUND", f"Request '{request_id}' not found", {"request_id": request_id})
    return task


def _status(task: dict, worker: Worker) -> InferenceStatusResponse:
    step = total = position = None
    if task["status"] == "in_queue":
        position = worker.position(task["id"])
    elif task["status"] == "in_progress":
        step, total = worker.progress(task["id"]) or (None, None)
    elif task["status"] == "succeeded" and task["metadata"]:
        step = total = sum(g["steps"] for g in task["metadata"]["generations"])
    return InferenceStatusResponse(
        request_id=task["id"], status=task["status"], created_at=task["created_at"], started_at=task["started_at"],
        finished_at=task["finished_at"], error=task["error"], queue_position=position, step=step, total_steps=total,
        attempts=task["attempts"],
    )


@router.get("", response_model=RequestList)
def list_requests(limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0, le=2**62),
                  status: Optional[TaskStatus] = Query(None), store: TaskStore = Depends(get_store),
                  worker: Worker = Depends(get_worker)) -> RequestList:
    """All requests, newest first, ``limit`` at a time; filter by ``status``."""
    rows, total = store.list(limit, offset, status)
    return RequestList(requests=[_status(r, worker) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{request_id}/status", response_model=InferenceStatusResponse, responses=responses(404))
def get_status(request_id: str, store: TaskStore = Depends(get_store),
               worker: Worker = Depends(get_worker)) -> InferenceStatusResponse:
    """Status, with ``queue_position`` while queued and ``step``/``total_steps`` while running."""
    return _status(_task(store, request_id), worker)


@router.get("/{request_id}/result", response_model=InferenceResultResponse, responses=responses(404))
def get_result(request_id: str, store: TaskStore = Depends(get_store)) -> InferenceResultResponse:
    """Outputs (null until the request succeeds), error and timings."""
    task = _task(store, request_id)
    return InferenceResultResponse(request_id=task["id"], status=task["status"], outputs=task["outputs"],
                                   error=task["error"], created_at=task["created_at"],
                                   finished_at=task["finished_at"], metadata=task["metadata"])


@router.post("/{request_id}/cancel", response_model=InferenceStatusResponse, responses=responses(404, 409))
def cancel(request_id: str, store: TaskStore = Depends(get_store),
           worker: Worker = Depends(get_worker)) -> InferenceStatusResponse:
    """Cancel: a queued request at once, a running one within one denoising step (poll the status)."""
    task = _task(store, request_id)
    if task["status"] in FINISHED or not worker.cancel(request_id):
        raise APIError(409, "REQUEST_ALREADY_FINISHED", f"Request '{request_id}' already finished ({task['status']}).",
                       {"status": task["status"]})
    return _status(_task(store, request_id), worker)


@router.get("/{request_id}/outputs/{index}", response_class=FileResponse, responses=responses(404))
def download(request_id: str, index: int = Path(..., ge=0, le=10_000), store: TaskStore = Depends(get_store),
             settings: Settings = Depends(get_settings)) -> FileResponse:
    """Download output ``index`` (the ``index`` field of an entry of ``outputs.images``/``videos``/``audios``)."""
    task = _task(store, request_id)
    entries = [e for kind in OUTPUT_KINDS for e in (task["outputs"] or {}).get(kind, [])]
    entry = next((e for e in entries if e["index"] == index), None)
    root = os.path.realpath(settings.output_base_path)
    if entry is not None and task["outputs_deleted_at"]:
        raise APIError(404, "OUTPUT_NOT_FOUND", f"Output {index} of request '{request_id}' was deleted by the output "
                       f"retention settings (AITK_OUTPUT_MAX_AGE / AITK_OUTPUT_MAX_BYTES) at {task['outputs_deleted_at']}.",
                       {"request_id": request_id, "index": index, "deleted_at": task["outputs_deleted_at"]})
    if entry is None or not os.path.isfile(entry["file_path"]) or \
            os.path.commonpath([root, os.path.realpath(entry["file_path"])]) != root:
        raise APIError(404, "OUTPUT_NOT_FOUND", f"Request '{request_id}' has no output {index}.",
                       {"request_id": request_id, "index": index})
    path = entry["file_path"]
    return FileResponse(path, media_type=MEDIA_TYPES[os.path.splitext(path)[1]], filename=os.path.basename(path))
