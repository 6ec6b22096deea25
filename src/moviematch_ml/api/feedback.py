"""``POST /feedback``: the ratings the app's users give, stored durably and idempotently."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from moviematch_ml.api import schemas
from moviematch_ml.api.routes import check_json
from moviematch_ml.feedback import parse_feedback
from moviematch_ml.serving import InvalidJSONError
from moviematch_ml.store import FeedbackStore

IDEMPOTENCY_HEADER: Final[str] = "idempotency-key"

_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"model": schemas.FeedbackResponse, "description": "Every rating was already stored: nothing new."},
    400: {"model": schemas.ErrorResponse, "description": "The body is not valid JSON."},
    422: {"model": schemas.ErrorResponse, "description": "A field is missing, unknown, or breaks its rule."},
    503: {"model": schemas.ErrorResponse, "description": "The store could not write; nothing was stored, retry."},
}


_OPENAPI: Final[dict[str, Any]] = schemas.request_body(
    "FeedbackRating",
    {
        "one_rating": schemas.FEEDBACK_EXAMPLE,
        "batch": {"ratings": [schemas.FEEDBACK_EXAMPLE, {**schemas.FEEDBACK_EXAMPLE, "movie_id": 2}]},
    },
)
# The body is one rating or a batch of them.
_OPENAPI["requestBody"]["content"]["application/json"]["schema"] = {
    "oneOf": [{"$ref": "#/components/schemas/FeedbackRating"}, {"$ref": "#/components/schemas/FeedbackBatch"}]
}


def build_feedback_router(store: FeedbackStore, on_stored: Callable[[Iterable[str]], None] | None) -> APIRouter:
    """The feedback route bound to one store; ``on_stored`` hears which users have new ratings."""
    router = APIRouter()

    def write(body: bytes, key: str | None) -> tuple[int, bytes]:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None
        ratings = parse_feedback(obj, key, time.time())
        result = store.add(ratings)
        if on_stored is not None and result.accepted:
            on_stored({r.user_id for r, s in zip(ratings, result.stored, strict=True) if s})
        answer = {
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "results": [
                {"feedback_id": r.feedback_id, "status": "stored" if s else "duplicate"}
                for r, s in zip(ratings, result.stored, strict=True)
            ],
        }
        return (201 if result.accepted else 200), orjson.dumps(answer)

    @router.post(
        "/feedback",
        summary="Store the ratings users gave (idempotent: a retried request is not counted twice)",
        status_code=201,
        response_model=schemas.FeedbackResponse,
        responses=_RESPONSES,
        openapi_extra=_OPENAPI,
    )
    async def feedback(request: Request) -> Response:
        """One rating, or ``{"ratings": [...]}`` (up to 1000). A 2xx means every rating is committed to the store.

        Idempotency: each rating's key is its ``feedback_id``; else the ``Idempotency-Key`` header plus the
        rating's index in the request; else a hash of its content. Ratings whose key is already stored are
        reported as ``duplicate`` and change nothing.
        """
        check_json(request)
        body = await request.body()
        # The write blocks on the database (fsync): keep it off the event loop.
        status, payload = await run_in_threadpool(write, body, request.headers.get(IDEMPOTENCY_HEADER))
        return Response(payload, status_code=status, media_type="application/json")

    return router
