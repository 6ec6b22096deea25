"""Who may call what: the access key of every request checked against the scope of its route, and its rate.

Only added to the app when ``API_KEYS`` is set; without keys the admin routes refuse every request themselves.
"""

from __future__ import annotations

from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from moviematch_ml.api.handlers import error_response
from moviematch_ml.online.access import AccessKey, AccessKeys, RateLimiter
from moviematch_ml.online.lifecycle import HEALTH_PROBES, route_path

# Routes open to anyone, keys or not: the platform's probes carry no key.
# The scope each route needs; any other route (GET /, the docs, the schema...) needs a key of any scope.
ROUTE_SCOPES: Final[dict[str, str]] = {
    "/predict": "predict",
    "/predict-batch": "predict",
    "/feedback": "feedback",
    "/metrics": "metrics",
}
ADMIN_PREFIX: Final[str] = "/admin"
_AUTHORIZATION: Final[bytes] = b"authorization"
_BEARER: Final[bytes] = b"bearer "
_CHALLENGE: Final[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="moviematch-ml"'}


def required_scope(path: str) -> str | None:
    """The scope a route needs (None: any valid key)."""
    if path.startswith(ADMIN_PREFIX):
        return "admin"
    return ROUTE_SCOPES.get(path)


def bearer(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer`` header, or None."""
    for key, value in scope["headers"]:
        if key == _AUTHORIZATION:
            raw: bytes = value
            return raw[7:].strip() if raw[:7].lower() == _BEARER else None
    return None


class AccessGuard:
    """401 without a valid key, 403 for a key without the route's scope, 429 past the key's rate; neither message
    says which keys exist. The key's short name (a hash prefix, never the secret) goes into the request's state
    for the access log."""

    def __init__(self, app: ASGIApp, *, keys: AccessKeys, limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The path the router and the fast path match: without the root path when served under a prefix, so that
        # /ml/predict needs the predict scope as /predict does.
        path = route_path(scope)
        if path in HEALTH_PROBES:
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        key: AccessKey | None = self.keys.find(token) if token else None
        if key is None:
            response = error_response(
                401, "unauthorized", "a valid API key is required: Authorization: Bearer <key>", headers=_CHALLENGE
            )
            await response(scope, receive, send)
            return
        needed = required_scope(path)
        if needed is not None and not key.allows(needed):
            await error_response(403, "forbidden", f"this key may not call {path}")(scope, receive, send)
            return
        scope.setdefault("state", {})["key"] = key.name
        limiter = self.limiter
        if limiter is not None and not await limiter.allow(key.bucket):
            retry = str(limiter.retry_after())
            response = error_response(
                429,
                "rate_limited",
                f"too many requests for this key; retry in {retry} s",
                headers={"Retry-After": retry},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
