"""Pure-ASGI fast path: POST /predict and /predict-batch served straight through PredictionService, FastAPI skipped."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moviematch_ml.api.handlers import input_error_response
from moviematch_ml.errors import InputError, UnsupportedMediaTypeError
from moviematch_ml.online.lifecycle import route_path
from moviematch_ml.online.service import PredictionService

_JSON: Final[bytes] = b"application/json"
_CONTENT_TYPE: Final[bytes] = b"content-type"


def check_content_type(scope: Scope) -> None:
    """Refuse (415) a body that says it is not JSON: the same rule and message as ``routes.check_json``."""
    for key, raw in scope["headers"]:
        if key == _CONTENT_TYPE:
            if raw == _JSON:  # what every client sends: skip the decoding below
                return
            content_type: str = raw.decode("latin-1")
            media = content_type.split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                raise UnsupportedMediaTypeError(f"Content-Type must be application/json (got {content_type!r})")
            return


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away before sending it."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class FastPathMiddleware:
    """Answers the two prediction routes without FastAPI's routing, dependency and response machinery.

    FastAPI routing alone costs more per request than the whole prediction (docs/performance-history.md), so
    the hot routes are served here: bytes in, ``PredictionService``, bytes out. Errors are raised as the same
    ``InputError`` subclasses and turned into responses by the same ``input_error_response`` as the FastAPI route,
    so both paths answer byte-identical errors. Every other request (docs, health, feedback, OpenAPI, other
    methods on these paths) goes on to FastAPI, which still declares the two routes for ``/openapi.json``.
    Placed inside the request-id/access-log middleware and CORS, so those apply here too.
    """

    def __init__(self, app: ASGIApp, *, service: PredictionService) -> None:
        self.app = app
        self.routes: dict[str, Callable[[bytes], Awaitable[bytes]]] = {
            "/predict": service.predict_one,
            "/predict-batch": service.predict_batch,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if (handler := self.routes.get(route_path(scope))) is None:
            await self.app(scope, receive, send)
            return
        try:
            check_content_type(scope)
            body = await read_body(receive)
            if body is None:
                return
            answer = await handler(body)
        except InputError as exc:
            await input_error_response(exc)(scope, receive, send)
            return
        start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(answer)).encode("latin-1")), (_CONTENT_TYPE, _JSON)],
        }
        await send(start)
        await send({"type": "http.response.body", "body": answer})
