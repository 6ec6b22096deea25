"""The composition root: ``create_app(settings)`` wires the online services into the FastAPI application."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware

from moviematch_ml import __version__
from moviematch_ml.api import handlers, schemas
from moviematch_ml.api.fastpath import FastPathMiddleware
from moviematch_ml.api.middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from moviematch_ml.api.routes import build_router
from moviematch_ml.errors import StoreError
from moviematch_ml.logs import configure_logging
from moviematch_ml.online.caches import AnswerCache
from moviematch_ml.online.contract import decode_answer, encode_answer
from moviematch_ml.online.feedback import FeedbackService
from moviematch_ml.online.models import ModelSet
from moviematch_ml.online.service import PredictionService
from moviematch_ml.online.store import FeedbackStore, make_engine
from moviematch_ml.online.telemetry import PROCESS_SAMPLE_SECONDS, Telemetry
from moviematch_ml.online.user_views import UserViews, keep_warm
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR
from moviematch_ml.settings import ENV_ONLY, Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Predicts the rating (0-10, the scale of TMDB's `vote_average`) a user would give a movie, from six
features the app computes. Answers come from the trained model, or from a documented fallback rule when the model
cannot be loaded (`/health` then says `degraded` and why). Every error is JSON:
`{"error": "<code>", "message": "<text>", "detail": [...]}`. Every response carries `X-Request-ID`."""


def create_app(settings: Settings, *, models: ModelSet | None = None, store: FeedbackStore | None = None) -> FastAPI:
    """Build the service from its settings; the models are loaded and the store migrated by the lifespan, not here."""
    model_set = models if models is not None else ModelSet(settings.model_path or BUNDLED_MODEL_DIR)
    # Creating the engine does not connect: a database that is down costs /feedback, not the predictions.
    feedback_store = store if store is not None else FeedbackStore(make_engine(settings.database_url))
    telemetry = (
        Telemetry(settings.metrics_dir, drift_share=settings.metrics_drift_share) if settings.metrics_enabled else None
    )
    if telemetry is not None:
        feedback_store.calls = telemetry.store_calls
        telemetry.models_changed(model_set.current)
        model_set.listeners.append(telemetry.models_changed)
    user_views = UserViews(feedback_store, ttl=settings.state_ttl_seconds, max_users=settings.state_cache_users)
    service = PredictionService(
        model_set,
        max_batch_size=settings.max_batch_size,
        cache_size=settings.prediction_cache_size,
        cache=_shared_cache(settings, telemetry),
        user_views=user_views,
        telemetry=telemetry,
    )
    feedback = FeedbackService(feedback_store, user_views.forget, telemetry=telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_set.load()
        try:
            feedback_store.migrate()
        except StoreError as exc:
            log.error("feedback store unavailable", extra={"reason": str(exc)})
        # What start-up built (modules, the models, their tables) lives as long as the process: out of the cyclic
        # garbage collector's sight, its full collections no longer walk it (docs/performance-history.md).
        gc.freeze()
        warming = None
        if settings.state_warm_share > 0 and settings.state_ttl_seconds > 0 and settings.state_cache_users > 0:
            warming = asyncio.create_task(
                keep_warm(user_views, lambda: model_set.current.personalized, settings.state_warm_share)
            )
        sampling = None
        if telemetry is not None and telemetry.registry.directory is not None:
            # Other workers answer scrapes too: they read this worker's CPU time and memory from its file.
            sampling = asyncio.create_task(_sample_process(telemetry))
        current = model_set.current
        log.info(
            "service started",
            extra={
                "status": current.status,
                "model_version": current.six.version,
                "reason": current.reason,
                "ready": model_set.ready,
            },
        )
        yield
        for task in (warming, sampling):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        feedback_store.close()
        if telemetry is not None:
            telemetry.close()
        log.info("service stopped")

    app = FastAPI(
        title="MovieMatch ML",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI checks on every request whether OpenTelemetry providers are set up (environment look-ups
        # included), which costs microseconds for nothing when none is: off unless asked for.
        telemetry=None if settings.fastapi_telemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.models = model_set
    app.state.service = service
    app.state.store = feedback_store
    app.state.user_views = user_views
    app.state.telemetry = telemetry
    router = build_router(model_set, service, feedback, time.monotonic(), telemetry)
    app.include_router(router)
    handlers.install(app)

    if settings.fast_path:
        # Added first, so it sits inside CORS and the request middleware: both still apply to the hot routes.
        app.add_middleware(FastPathMiddleware, service=service)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Content-Type", "Authorization", REQUEST_ID_HEADER, "Idempotency-Key"],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
    # Added last, so it is the outermost layer: CORS preflights and errors get a request id, a log line and their
    # place in the request metrics too. Every route is static: its path is its metric label, any other is "other".
    paths = {path for r in (*app.routes, *router.routes) if isinstance(path := getattr(r, "path", None), str)}
    http_metrics = None if telemetry is None else telemetry.serve_routes(paths)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=http_metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # The predict routes read their body themselves; their schemas are added here for the docs.
            spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas.request_components())
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _shared_cache(settings: Settings, telemetry: Telemetry | None) -> AnswerCache | None:
    """The Redis answer cache when asked for; None leaves the in-process one (or none) to PredictionService."""
    if settings.prediction_cache_backend != "redis" or settings.redis_url is None or not settings.prediction_cache_size:
        return None
    from moviematch_ml.online.caches import RedisCache

    cache = RedisCache.from_url(settings.redis_url, encode=encode_answer, decode=decode_answer)
    if telemetry is not None:
        cache.calls = telemetry.redis_calls
    return cache


async def _sample_process(telemetry: Telemetry) -> None:
    while True:
        telemetry.sample_process()
        await asyncio.sleep(PROCESS_SAMPLE_SECONDS)


def app_from_env() -> FastAPI:
    """The uvicorn factory (``--factory``): reads Settings from the environment once, in each worker process."""
    settings = Settings(**ENV_ONLY)
    configure_logging(settings.log_level)
    return create_app(settings)
