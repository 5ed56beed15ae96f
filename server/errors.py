"""The reference's error shape, ``{"detail": {"error": {"code", "message", "details"}}}``, and its OpenAPI entries."""

from __future__ import annotations

from fastapi import HTTPException

from .schemas import ErrorResponse


class APIError(HTTPException):
    """An HTTP error with a stable ``code``; FastAPI renders it as ``{"detail": {"error": {...}}}``."""

    def __init__(self, status_code: int, code: str, message: str, details: dict | None = None):
        super().__init__(status_code, detail={"error": {"code": code, "message": message, "details": details}})
        self.code = code


def responses(*statuses: int) -> dict:
    """OpenAPI ``responses=`` entries for the given error statuses."""
    descriptions = {
        400: "Invalid request (codes: MODEL_NOT_FOUND, LORA_FILE_REQUIRED, MOE_FORMAT_REQUIRED, SINGLE_MOE_CONFIG_ONLY, "
             "MOE_FORMAT_NOT_SUPPORTED, SINGLE_LORA_ONLY, TOO_MANY_LORAS, LORA_NOT_FOUND, LORA_PATH_NOT_ALLOWED, "
             "INVALID_LORA_URL, CONTROL_IMAGE_REQUIRED, CONTROL_IMAGE_NOT_SUPPORTED, CONTROL_IMAGE_INVALID)",
        401: "Missing or wrong X-API-Key (code: UNAUTHORIZED)",
        404: "Unknown request id or output index (codes: REQUEST_NOT_FOUND, OUTPUT_NOT_FOUND)",
        409: "The request already finished (code: REQUEST_ALREADY_FINISHED)",
        413: "The request body is over AITK_MAX_BODY_BYTES (code: REQUEST_TOO_LARGE)",
    }
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}
