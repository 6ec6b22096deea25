"""The HTTP routes: predictions and feedback (bytes in, bytes out through the online services), info and health."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from moviematch_ml import SERVICE_NAME, __version__
from moviematch_ml.api import schemas
from moviematch_ml.api.handlers import not_ready_response
from moviematch_ml.errors import UnsupportedMediaTypeError
from moviematch_ml.online.feedback import FeedbackService
from moviematch_ml.online.lifecycle import Lifecycle
from moviematch_ml.online.models import ModelReport, ModelSet
from moviematch_ml.online.reloads import Reloader
from moviematch_ml.online.service import PredictionService
from moviematch_ml.online.store import StoreHealth
from moviematch_ml.online.telemetry import CONTENT_TYPE, Telemetry
from moviematch_ml.runtime.cards import API_SCALE_MAX
from moviematch_ml.runtime.drift import feature_bins

IDEMPOTENCY_HEADER: Final[str] = "idempotency-key"
# The operators' routes: the access keys' rules (a metrics or admin scope) match /metrics by this path.
METRICS_PATH: Final[str] = "/metrics"
MODELS_PATH: Final[str] = "/models"
ADMIN_PREFIX: Final[str] = "/admin"
RELOAD_PATH: Final[str] = "/reload"

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": schemas.ErrorResponse, "description": "The body is not valid JSON (NaN, Infinity and 1e999 too)."},
    413: {"model": schemas.ErrorResponse, "description": "The body is larger than MAX_BODY_BYTES."},
    415: {"model": schemas.ErrorResponse, "description": "Content-Type is set and is not JSON."},
    422: {"model": schemas.ErrorResponse, "description": "A field is missing, unknown, or breaks its rule."},
}
_FEEDBACK_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"model": schemas.FeedbackResponse, "description": "Every rating was already stored: nothing new."},
    400: {"model": schemas.ErrorResponse, "description": "The body is not valid JSON."},
    422: {"model": schemas.ErrorResponse, "description": "A field is missing, unknown, or breaks its rule."},
    503: {"model": schemas.ErrorResponse, "description": "The store could not write; nothing was stored, retry."},
}


def _json(obj: object, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def check_json(request: Request) -> None:
    """Refuse (415) a body that says it is not JSON."""
    # A missing Content-Type is accepted as JSON (curl -d sends form encoding only when told nothing else).
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Content-Type must be application/json (got {content_type!r})")


def build_router(
    models: ModelSet,
    service: PredictionService,
    ratings: FeedbackService,
    started_at: float,
    telemetry: Telemetry | None = None,
    *,
    reloader: Reloader,
    store_health: StoreHealth,
    lifecycle: Lifecycle,
    require_model: bool = False,
    auth: bool = False,
) -> APIRouter:
    """The routes, bound to one model set and its services (no globals, so tests can build many apps).

    /metrics only with ``telemetry`` (METRICS_ENABLED); ``require_model``: not ready while the trained model is not
    loaded; ``auth``: whether access keys are on (said in ``GET /``)."""
    router = APIRouter()

    @router.post(
        "/predict",
        summary="Predict one user's rating of one movie",
        response_model=schemas.PredictResponse,
        responses=_ERRORS,
        openapi_extra=schemas.request_body(
            "PredictRequest",
            {"example": schemas.PREDICT_EXAMPLE, "with_ids": {**schemas.PREDICT_EXAMPLE, "user_id": 42}},
        ),
    )
    async def predict(request: Request) -> Response:
        return await _answer(request, service.predict_one)

    @router.post(
        "/predict-batch",
        summary="Predict ratings for many movies, in request order or ranked best-first",
        response_model=schemas.BatchResponse,
        responses=_ERRORS,
        openapi_extra=schemas.request_body(
            "BatchRequest", {"example": schemas.BATCH_EXAMPLE, "ranked_top_k": schemas.RANKED_EXAMPLE}
        ),
    )
    async def predict_batch(request: Request) -> Response:
        return await _answer(request, service.predict_batch)

    @router.get("/", summary="Service name, version and model summary", response_model=schemas.RootResponse)
    async def root() -> Response:
        current = models.current
        return _json(
            {
                "service": SERVICE_NAME,
                "version": __version__,
                "answer_scale": {"min": 0.0, "max": API_SCALE_MAX},
                "model": models.summary(),
                "models": {
                    "six_features": current.six_report.summary(details=True),
                    "personalized": current.personalized_report.summary(details=True),
                },
                "variants": models.lineup.variants(),
                "auth": "on" if auth else "off",
                "docs": "/docs",
            }
        )

    @router.get(
        "/health",
        summary="Each model's status; ok, or degraded and why",
        response_model=schemas.HealthResponse,
    )
    async def health() -> Response:
        current = models.current
        return _json(
            {
                "status": current.status,
                "model_version": current.version,
                "source": current.six.source,
                "reason": current.reason,
                "uptime_seconds": round(time.monotonic() - started_at, 3),
                "models": current.reports(),
                "variants": models.lineup.variants(),
                "store": store_health.kind,
                "store_status": store_health.status,
                "store_reason": store_health.reason,
            }
        )

    @router.get("/health/live", summary="The process is up", response_model=schemas.StatusResponse)
    async def live() -> Response:
        return _json({"status": "alive"})

    @router.get(
        "/health/ready",
        summary="200 once the models are loaded and checked; 503 while starting, shutting down, or (REQUIRE_MODEL) "
        "answering with the fallback rule",
        response_model=schemas.StatusResponse,
        responses={503: {"model": schemas.ErrorResponse, "description": "Starting, shutting down, or no model."}},
    )
    async def ready() -> Response:
        if lifecycle.draining:
            return not_ready_response("the service is shutting down")
        if not models.ready:
            return not_ready_response("the service is starting: no canned prediction has succeeded yet")
        if require_model and models.current.six_report.status != "ok":
            return not_ready_response("the trained model is not loaded (REQUIRE_MODEL): the fallback rule answers")
        return _json({"status": "ready"})

    @router.post(
        "/feedback",
        summary="Store the ratings users gave (idempotent: a retried request is not counted twice)",
        status_code=201,
        response_model=schemas.FeedbackResponse,
        responses=_FEEDBACK_RESPONSES,
        openapi_extra=schemas.FEEDBACK_BODY,
    )
    async def feedback(request: Request) -> Response:
        """One rating, or ``{"ratings": [...]}`` (up to 1000). A 2xx means every rating is committed to the store.

        Idempotency: each rating's key is its ``feedback_id``; else the ``Idempotency-Key`` header plus the
        rating's index in the request; else a hash of its content. Ratings whose key is already stored are
        reported as ``duplicate`` and change nothing.
        """
        check_json(request)
        body = await request.body()
        new, payload = await ratings.record(body, request.headers.get(IDEMPOTENCY_HEADER))
        return Response(payload, status_code=201 if new else 200, media_type="application/json")

    @router.get(
        MODELS_PATH,
        summary="The loaded models: each one's status, version, model card and drift bins",
        response_model=schemas.ModelsResponse,
    )
    async def loaded_models() -> Response:
        current = models.current
        return _json(
            {
                "six_features": _loaded(current.six_report, with_drift=current.six.source == "model"),
                "personalized": _loaded(current.personalized_report, with_drift=False),
            }
        )

    # Admin routes hang off their own router: each one needs an admin key (the access guard checks its scope), and
    # with no API_KEYS at all nobody has one, so this router's dependency refuses every request.
    admin = APIRouter(prefix=ADMIN_PREFIX, dependencies=[Depends(_admin_only(auth))])

    @admin.post(
        RELOAD_PATH,
        summary="Load the registry's current assignment (or MODEL_PATH) again, in this worker; admin key",
        response_model=schemas.ReloadResponse,
        responses={
            401: {"model": schemas.ErrorResponse, "description": "No valid key."},
            403: {"model": schemas.ErrorResponse, "description": "Not an admin key, or no API_KEYS at all."},
            409: {"model": schemas.ReloadResponse, "description": "A new model did not load: the old ones serve."},
        },
    )
    async def admin_reload() -> Response:
        """Every model of the new lineup is loaded and checked (checksums, a canned prediction) in a worker thread
        while the old one answers, then swapped in whole; if any fails, nothing changes (409, with the reason).
        The other workers and replicas pick a registry change up within REGISTRY_POLL_SECONDS."""
        outcome = await reloader.reload()
        lineup = outcome.lineup
        body = {
            "reloaded": outcome.reloaded,
            "reason": outcome.reason,
            "revision": lineup.revision,
            "variants": lineup.variants(),
        }
        return _json(body, 200 if outcome.reloaded else 409)

    router.include_router(admin)

    if telemetry is not None:

        @router.get(
            METRICS_PATH,
            summary="Every metric of every worker process, in the Prometheus text format",
            response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "The Prometheus text format (0.0.4)."}},
        )
        async def metrics() -> Response:
            """Requests, predictions, errors, models, drift, cache, store and Redis calls, feedback, CPU and memory:
            docs/operations.md lists them with the queries that read them."""
            # Reading every worker's values and formatting them takes a few milliseconds: off the event loop.
            body = await run_in_threadpool(telemetry.render)
            return Response(body, headers={"content-type": CONTENT_TYPE})

    return router


def _admin_only(auth: bool) -> Callable[[], None]:
    def check() -> None:
        if not auth:
            raise HTTPException(403, "admin routes need an admin key: set API_KEYS")

    return check


def _names_only(value: object) -> object:
    """A card's content with any file path cut to its file name (a training machine's directories are nobody's
    business): a string with a slash or backslash and no space is taken for a path."""
    if isinstance(value, dict):
        return {k: _names_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_names_only(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value) and not any(c.isspace() for c in value):
        return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


def _loaded(report: ModelReport, *, with_drift: bool) -> dict[str, object]:
    """What ``GET /models`` says of one model (``schemas.LoadedModel``)."""
    card = report.card
    bins = feature_bins(card.feature_stats) if card is not None and with_drift and card.feature_stats else None
    drift = None
    if bins is not None:
        drift = {
            b.feature: [{"bin": k, "training_share": v} for k, v in zip(b.labels, b.shares, strict=True)] for b in bins
        }
    return {
        "status": report.status,
        "version": report.version,
        "card": None if card is None else _names_only(card.model_dump(mode="json")),
        "drift_bins": drift,
        "drift_shares_exact": None if bins is None else all(b.exact for b in bins),
    }


async def _answer(request: Request, handle: Callable[[bytes], Awaitable[bytes]]) -> Response:
    """Read a JSON body and answer it with ``handle`` (bytes to bytes)."""
    check_json(request)
    return _json_bytes(await handle(await request.body()))


def _json_bytes(body: bytes) -> Response:
    return Response(body, media_type="application/json")
