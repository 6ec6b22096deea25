"""Pure ASGI middleware: request id, body limit, overload, security headers, last-resort 500, one access-log line
and the request metrics of every request.

Written as plain ASGI rather than BaseHTTPMiddleware: no extra task and no body buffering per request. It is the
outermost layer of the app, so every response (errors, CORS preflights, refusals of the access guard) is covered.
The request metrics are recorded here too, with the status and duration the access log has already measured: one
more layer would cost more than the metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moviematch_ml.api.handlers import error_response, input_error_response, internal_error_response
from moviematch_ml.errors import BodyTooLargeError, InputError
from moviematch_ml.logs import ACCESS_LOGGER, DirectLog
from moviematch_ml.online.contract import new_id
from moviematch_ml.online.lifecycle import HEALTH_PROBES, OVERLOADED, Lifecycle, route_path
from moviematch_ml.online.telemetry import HttpMetrics

# The access line of every request: without a LogRecord when the service's logging is in place (logs.DirectLog).
access_log = DirectLog(logging.getLogger(ACCESS_LOGGER))
error_log = logging.getLogger("moviematch_ml.api")

REQUEST_ID_HEADER: Final[str] = "X-Request-ID"
MAX_REQUEST_ID_LENGTH: Final[int] = 128
# A client that closed the connection before its answer (nginx's code for it): not a server error.
CLIENT_CLOSED: Final[int] = 499
# An oversized body is read (and thrown away) up to this many times the limit before the 413, so that even a client
# whose connection closes after the answer (Connection: close) reads it instead of a reset. The rest of a bigger one
# is thrown away by the server after the answer, on a connection kept open, until the next request's header
# deadline (supervisor.DeadlineProtocol): closing it at once would reset the connection under a client still
# sending, which never sees its 413.
DRAIN_FACTOR: Final[int] = 4
_HEADER_KEY: Final[bytes] = b"x-request-id"
_SECURITY_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
_CLOSE: Final[tuple[bytes, bytes]] = (b"connection", b"close")


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


async def _drain(receive: Receive, limit: int) -> None:
    """Read and discard the request body, to its end or ``limit`` bytes."""
    read = 0
    while read <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        read += len(message.get("body", b""))


class RequestContextMiddleware:
    """Request id, body size limit, at most ``max_concurrency`` requests in progress (past it, 503 with
    Retry-After, at once), security headers on every answer (and ``Connection: close`` while the process drains),
    and one JSON access-log line per request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_concurrency: int,
        lifecycle: Lifecycle,
        metrics: HttpMetrics | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id, length = _request_id_and_length(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        extra = [(_HEADER_KEY, request_id.encode("latin-1")), *_SECURITY_HEADERS]
        lifecycle = self.lifecycle
        status = 500
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                headers = [*message.get("headers", ()), *extra]
                if lifecycle.draining:
                    headers.append(_CLOSE)  # clients stop reusing the connection before the listener closes
                message["headers"] = headers
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

        # The route's path: behind a proxy's prefix (root_path) the probes must still skip the limit.
        # Probes answer even when the worker is saturated: a platform restarting a busy worker makes things worse.
        limited = route_path(scope) not in HEALTH_PROBES
        counted = False
        try:
            if limited and (self.in_flight >= self.max_concurrency or state.get(OVERLOADED, False)):
                response = error_response(
                    503, "overloaded", "the service is at capacity; retry shortly", headers={"Retry-After": "1"}
                )
                await response(scope, receive, send_with_headers)
            elif length is not None and length > limit:
                await _drain(receive, DRAIN_FACTOR * limit)
                error = BodyTooLargeError(f"request body of {length} bytes is larger than {limit} bytes")
                await input_error_response(error)(scope, receive, send_with_headers)
            else:
                if limited:
                    counted = True
                    self.in_flight += 1
                # With a Content-Length the server delivers exactly that many bytes, already checked above, so
                # the counting wrapper (one more coroutine per receive) is needed only for chunked bodies.
                await self.app(scope, receive if length is not None else receive_limited, send_with_headers)
        except InputError as exc:
            if not started:
                if isinstance(exc, BodyTooLargeError):
                    await _drain(receive, DRAIN_FACTOR * limit)
                await input_error_response(exc)(scope, receive, send_with_headers)
        except ClientDisconnect:
            pass  # nothing to answer: logged below as the client's
        except Exception:
            error_log.exception(
                "unhandled error", extra={"request_id": request_id, "method": scope["method"], "path": scope["path"]}
            )
            if not started:
                await internal_error_response()(scope, receive, send_with_headers)
        finally:
            if counted:
                self.in_flight -= 1
            if not started:
                status = CLIENT_CLOSED  # the app ended without an answer: the client went away
            seconds = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.observe(route_path(scope), scope["method"], status, seconds)
            fields = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "latency_ms": round(seconds * 1000.0, 3),
                "request_id": request_id,
            }
            key = state.get("key")
            if key is not None:  # set by the access guard: a short hash of the key, never the secret
                fields["key"] = key
            access_log.info("request", fields)
