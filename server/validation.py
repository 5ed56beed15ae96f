"""The HTTP edges: a request-body size limit, and 422 validation errors that always encode (NaN included), name the
parameter, and suggest the closest valid name for an unknown field.

A 422 keeps FastAPI's shape, ``{"detail": [{"type", "loc", "msg", "input"}]}``, so the reference's clients read it as
before; ``msg`` starts with the parameter's path (``prompts[0].guidance_scale: ...``) and ``input`` is made
JSON-safe (NaN and Infinity become the strings ``"NaN"``/``"Infinity"``, long strings are cut).
"""

from __future__ import annotations

import difflib
import math
import typing

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from .errors import APIError
from .schemas import InferenceInput

#: the model of each request part that has fields (only ``POST /v1/inference`` takes a body)
BODY_MODEL = InferenceInput
ECHO_CHARS = 200  # an echoed input value is cut to this many characters


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413 ``REQUEST_TOO_LARGE``, from its
    ``Content-Length`` before reading it, or while streaming a body sent without one."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def error(self) -> APIError:
        return APIError(413, "REQUEST_TOO_LARGE", f"The request body is over the {self.max_bytes}-byte limit "
                        "(AITK_MAX_BODY_BYTES); send control images as http(s) URLs or smaller images.",
                        {"max_bytes": self.max_bytes})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = self.error()
            return await JSONResponse({"detail": error.detail}, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.error()  # an HTTPException: FastAPI's body reader passes it on to the 413 handler
            return message

        await self.app(scope, limited_receive, send)


def json_safe(value):
    """``value`` with every non-finite float as a string and long strings cut, so a 422 can always be encoded."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + f"... ({len(value)} characters)"
    if isinstance(value, dict):
        return {str(k)[:ECHO_CHARS]: json_safe(v) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value[:50]]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return repr(value)[:ECHO_CHARS]


def field_path(loc: tuple) -> str:
    """``("body", "prompts", 0, "guidance_scale")`` -> ``prompts[0].guidance_scale``."""
    path = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "request body"


def _nested_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def valid_names(loc: tuple) -> list[str]:
    """The field names allowed where the body error at ``loc`` (ending in the unknown name) is."""
    model: type[BaseModel] | None = BODY_MODEL
    for part in loc[1:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _nested_model(field.annotation) if field else None
    return list(model.model_fields) if model else []


def describe(error: dict) -> dict:
    """One pydantic error as a 422 entry whose ``msg`` names the parameter (and, for an unknown one, its fix)."""
    loc = tuple(error.get("loc", ()))
    path = field_path(loc)
    if error.get("type") == "extra_forbidden" and loc and loc[0] == "body":
        names = valid_names(loc)
        close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"valid fields here: {', '.join(names)}."
        message = f"{path}: unknown field ({hint}) Unknown fields are refused so that a typo cannot silently run " \
                  "with the default."
    elif error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        message = f"The request body is not valid JSON (at character {loc[-1]}): {reason}".rstrip(": ")
    elif error.get("type") == "finite_number":
        message = f"{path}: must be a finite number; NaN and Infinity are not accepted."
    else:
        message = f"{path}: {error.get('msg', 'invalid value')}"
    return {"type": error.get("type"), "loc": [json_safe(part) for part in loc], "msg": message,
            "input": json_safe(error.get("input"))}


async def validation_error_handler(request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": [describe(error) for error in exc.errors()]}, status_code=422)
