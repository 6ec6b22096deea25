"""Pure ASGI middleware: request id, body size limit, last-resort 500, one JSON access-log line and the request
metrics of every request."""

from __future__ import annotations

import logging
import time
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moviematch_ml.api.fastpath import route_path
from moviematch_ml.api.handlers import input_error_response, internal_error_response
from moviematch_ml.errors import BodyTooLargeError, InputError
from moviematch_ml.logs import ACCESS_LOGGER, DirectLog
from moviematch_ml.online.contract import new_id
from moviematch_ml.online.telemetry import HttpMetrics

# The access line of every request: without a LogRecord when the service's logging is in place (logs.DirectLog).
access_log = DirectLog(logging.getLogger(ACCESS_LOGGER))
error_log = logging.getLogger("moviematch_ml.api")

REQUEST_ID_HEADER: Final[str] = "X-Request-ID"
MAX_REQUEST_ID_LENGTH: Final[int] = 128
_HEADER_KEY: Final[bytes] = b"x-request-id"


def valid_request_id(value: str) -> bool:
    """A client's id is echoed into our headers and logs, so only short printable ASCII is trusted."""
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable()


def _request_id_and_length(scope: Scope) -> tuple[str, int | None]:
    """The client's request id if it is one we trust (else a new one) and the Content-Length, in one header pass."""
    request_id: str | None = None
    length: int | None = None
    seen_id = False
    for key, raw in scope["headers"]:
        if key == b"content-length":
            try:
                length = int(raw)
            except ValueError:
                length = None
        elif key == _HEADER_KEY and not seen_id:
            seen_id = True
            value: str = raw.decode("latin-1")
            if valid_request_id(value):
                request_id = value
    return (request_id if request_id is not None else new_id()), length


class RequestContextMiddleware:
    """Outermost layer of the app, so that every response, errors and CORS preflights included, is covered.

    Written as plain ASGI rather than BaseHTTPMiddleware: no extra task and no body buffering per request. The
    request metrics are recorded here too, with the status and duration the access log has already measured: one
    more layer would cost more than the metrics.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: HttpMetrics | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id, length = _request_id_and_length(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (_HEADER_KEY, request_id.encode("latin-1"))
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        limit = self.max_body_bytes
        received = 0

        async def receive_limited() -> Message:
            # Only for bodies without Content-Length (chunked): they can grow past the limit while streaming.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(f"request body is larger than {limit} bytes")
            return message

        try:
            if length is not None and length > limit:
                response = input_error_response(
                    BodyTooLargeError(f"request body of {length} bytes is larger than {limit} bytes")
                )
                await response(scope, receive, send_with_id)
            else:
                # With a Content-Length the server delivers exactly that many bytes, already checked above, so
                # the counting wrapper (one more coroutine per receive) is needed only for chunked bodies.
                await self.app(scope, receive if length is not None else receive_limited, send_with_id)
        except InputError as exc:
            if not started:
                await input_error_response(exc)(scope, receive, send_with_id)
        except Exception:
            error_log.exception(
                "unhandled error", extra={"request_id": request_id, "method": scope["method"], "path": scope["path"]}
            )
            if not started:
                await internal_error_response()(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.observe(route_path(scope), scope["method"], status, seconds)
            access_log.info(
                "request",
                {
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round(seconds * 1000.0, 3),
                    "request_id": request_id,
                },
            )
