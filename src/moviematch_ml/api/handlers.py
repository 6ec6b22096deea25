"""The one place where exceptions become HTTP error responses: ``{"error", "message", "detail"?}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from moviematch_ml.errors import CODE_BY_STATUS, MISSING, FieldError, InputError, StoreError

log = logging.getLogger("moviematch_ml.api")

_MAX_VALUE_CHARS: Final[int] = 200


def error_response(
    status: int,
    code: str,
    message: str,
    detail: Sequence[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A JSON error response in the contract's shape."""
    body: dict[str, Any] = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = list(detail)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _safe_value(value: Any) -> Any:
    """The offending value as sent, unless it is too big to echo back (then a short description of it)."""
    if isinstance(value, str):
        return value if len(value) <= _MAX_VALUE_CHARS else value[: _MAX_VALUE_CHARS - 3] + "..."
    if isinstance(value, list | dict):
        try:
            if len(orjson.dumps(value)) <= _MAX_VALUE_CHARS:
                return value
        except TypeError:  # orjson refuses what it cannot write (a value nested too deep, say)
            pass
        return f"<{type(value).__name__} of {len(value)} items>"
    if value is None or isinstance(value, bool | int | float):
        return value
    return repr(value)[:_MAX_VALUE_CHARS]


def field_error_response(errors: Sequence[FieldError]) -> Response:
    """422: the first broken rule in ``message``, every one in ``detail``."""
    detail = [
        {"field": e.loc, "rule": e.rule}
        if e.value is MISSING
        else {"field": e.loc, "rule": e.rule, "value": _safe_value(e.value)}
        for e in errors
    ]
    return error_response(422, "validation_error", errors[0].message, detail)


def input_error_response(exc: InputError) -> Response:
    """Any refused request: 422 for a broken field rule, else the error's own status and code."""
    if isinstance(exc, FieldError):
        return field_error_response([exc])
    return error_response(exc.status, exc.error_code, exc.message)


def internal_error_response() -> Response:
    """500 that says nothing about the internals (the traceback goes to the log, with the request id)."""
    return error_response(500, "internal_error", "the service failed to answer this request; it has been logged")


def not_ready_response(message: str) -> Response:
    return error_response(503, "not_ready", message)


def _loc_to_field(loc: Sequence[str | int]) -> str:
    """FastAPI's ``("body", "movies", 3, "vote_average")`` -> the contract's ``movies[3].vote_average``."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


async def _on_input_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InputError)
    return input_error_response(exc)


async def _on_store_error(request: Request, exc: Exception) -> Response:
    # Retrying with the same keys is always safe: a rating that did commit meanwhile is then a duplicate.
    log.error("feedback store failed", extra={"reason": str(exc)})
    return error_response(
        503,
        "store_unavailable",
        "the feedback store could not write; retry with the same keys (a rating stored meanwhile is a duplicate)",
        headers={"Retry-After": "1"},
    )


async def _on_request_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(_loc_to_field(e.get("loc", ())), "is required")
        if e.get("type") == "missing"  # pydantic's input is then the enclosing object, not a value of the field
        else FieldError(_loc_to_field(e.get("loc", ())), str(e.get("msg", "is invalid")), e.get("input"))
        for e in exc.errors()
    ]
    if not errors:
        return error_response(422, "validation_error", "the request is invalid")
    return field_error_response(errors)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = CODE_BY_STATUS.get(exc.status_code, "http_error")
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, code, message, headers=exc.headers)


def install(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are turned into 500s by the request middleware."""
    app.add_exception_handler(InputError, _on_input_error)
    app.add_exception_handler(StoreError, _on_store_error)
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
