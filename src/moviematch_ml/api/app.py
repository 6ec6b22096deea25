"""The composition root: ``create_app(settings)`` wires the online services into the FastAPI application."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware

from moviematch_ml import __version__
from moviematch_ml.api import docs, handlers, schemas
from moviematch_ml.api.fastpath import FastPathMiddleware
from moviematch_ml.api.guard import AccessGuard
from moviematch_ml.api.middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from moviematch_ml.api.routes import build_router
from moviematch_ml.errors import StoreError
from moviematch_ml.logs import configure_logging
from moviematch_ml.online.access import AccessKeys, RateLimiter
from moviematch_ml.online.caches import AsyncAnswerCache, RedisCache
from moviematch_ml.online.contract import BatchDecoder, FloatArray, decode_answer, decode_one, encode_answer
from moviematch_ml.online.counters import NO_CALLS
from moviematch_ml.online.journal import PredictionLog
from moviematch_ml.online.lifecycle import PROCESS, Lifecycle
from moviematch_ml.online.models import ModelSet
from moviematch_ml.online.reloads import Reloader
from moviematch_ml.online.service import wire_services
from moviematch_ml.online.store import FeedbackStore, StoreHealth, make_engine, watch
from moviematch_ml.online.telemetry import PROCESS_SAMPLE_SECONDS, Telemetry
from moviematch_ml.online.user_views import maintain
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR
from moviematch_ml.runtime.registry import Registry
from moviematch_ml.settings import Settings, load_settings, parse_rate, parse_weights, require_drivers

log = logging.getLogger(__name__)

DESCRIPTION = """Predicts the rating (0-10, the scale of TMDB's `vote_average`) a user would give a movie, from six
features the app computes. Answers come from the trained model, or from a documented fallback rule when the model
cannot be loaded (`/health` then says `degraded` and why). Every error is JSON:
`{"error": "<code>", "message": "<text>", "detail": [...]}`. Every response carries `X-Request-ID`. When the service
has access keys (`API_KEYS`), every endpoint but the health probes needs one: `Authorization: Bearer <key>`."""
# How often the store is pinged for /health, and how long a ping may take.
STORE_PING_SECONDS = 5.0


def create_app(
    settings: Settings,
    *,
    models: ModelSet | None = None,
    store: FeedbackStore | None = None,
    lifecycle: Lifecycle = PROCESS,
    now: Callable[[], float] = time.time,
) -> FastAPI:
    """Build the service from its settings; the models are loaded and the store migrated by the lifespan, not here.
    ``now`` is the unix time the service reads (a test replaying dated ratings passes their time)."""
    require_drivers(settings)
    model_set = models if models is not None else model_set_of(settings)
    # Creating the engine does not connect: a database that is down costs /feedback, not the predictions.
    feedback_store = (
        store
        if store is not None
        else FeedbackStore(
            make_engine(
                settings.database_url,
                connect_timeout=settings.store_connect_timeout,
                statement_timeout=settings.store_statement_timeout,
            )
        )
    )
    health = StoreHealth.of(settings.database_url, ephemeral=settings.ephemeral_store)
    telemetry = (
        Telemetry(settings.metrics_dir, drift_share=settings.metrics_drift_share) if settings.metrics_enabled else None
    )
    if telemetry is not None:
        feedback_store.calls = telemetry.store_calls
        telemetry.models_changed(model_set.current)
        model_set.listeners.append(telemetry.models_changed)
    cache = _shared_cache(settings, telemetry)
    prediction_log = _prediction_log(settings, telemetry)
    services = wire_services(
        settings,
        model_set,
        feedback_store,
        cache=cache,
        telemetry=telemetry,
        log=prediction_log,
        health=health,
        now=now,
    )
    service, feedback, user_views = services.predictions, services.feedback, services.user_views
    keys = AccessKeys.parse(None if settings.api_keys is None else settings.api_keys.get_secret_value())
    reloader = Reloader(model_set, on_outcome=None if telemetry is None else telemetry.reload_done)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_set.load()
        await _migrate(feedback_store, health, settings.store_write_timeout)
        # What start-up built (modules, the models, their tables) lives as long as the process: out of the cyclic
        # garbage collector's sight, its full collections no longer walk it (docs/performance-history.md).
        gc.freeze()
        tasks = [_task(watch(feedback_store, health, interval=STORE_PING_SECONDS, timeout=STORE_PING_SECONDS))]
        if settings.state_ttl_seconds > 0 and settings.state_cache_users > 0:
            share = settings.state_warm_share
            timeout = max(settings.store_statement_timeout, 1.0)
            keep = maintain(
                user_views,
                lambda: model_set.lineup.personalized_models(),
                warm_share=share,
                timeout=timeout,
                model_of=lambda user: model_set.lineup.pick(user)[1].personalized,
            )
            tasks.append(_task(keep))
        if prediction_log is not None:
            days = settings.prediction_log_retention_days
            retention = days * 86400.0 if days > 0 else None
            tasks.append(_task(prediction_log.run(feedback_store, retention_seconds=retention)))
        reloader.attach()
        lifecycle.on_reload(reloader.signal)
        if model_set.registry is not None and settings.registry_poll_seconds > 0:
            tasks.append(_task(reloader.poll(settings.registry_poll_seconds)))
        if telemetry is not None and telemetry.registry.directory is not None:
            # Other workers answer scrapes too: they read this worker's CPU time and memory from its file.
            tasks.append(_task(_sample_process(telemetry)))
        current = model_set.current
        log.info(
            "service started",
            extra={
                "status": current.status,
                "model_version": current.version,
                "variants": model_set.lineup.variants(),
                "reason": current.reason,
                "ready": model_set.ready,
                "store": health.kind,
                "auth": "on" if keys.enabled else "off",
            },
        )
        if not keys.enabled:
            log.warning("no API_KEYS: every endpoint but /admin is open to anyone who can reach the service")
        if settings.ephemeral_store:
            log.warning(
                "the feedback store is a SQLite file inside the container: a redeploy loses every rating; "
                "set DATABASE_URL to a PostgreSQL database (docs/api.md, Deploying on Railway)"
            )
        yield
        lifecycle.off_reload(reloader.signal)
        for task in tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if prediction_log is not None:
            await prediction_log.flush(feedback_store)
        if isinstance(cache, RedisCache):
            await cache.aclose()
        feedback_store.close()
        if telemetry is not None:
            telemetry.close()
        log.info("service stopped")

    app = FastAPI(
        title="MovieMatch ML",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by api/docs.py from the package, not from a public CDN
        redoc_url=None,
        # FastAPI checks on every request whether OpenTelemetry providers are set up (environment look-ups
        # included), which costs microseconds for nothing when none is: off unless asked for.
        telemetry=None if settings.fastapi_telemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.models = model_set
    app.state.service = service
    app.state.store = feedback_store
    app.state.store_health = health
    app.state.user_views = user_views
    app.state.telemetry = telemetry
    app.state.prediction_log = prediction_log
    router = build_router(
        model_set,
        service,
        feedback,
        time.monotonic(),
        telemetry,
        reloader=reloader,
        store_health=health,
        lifecycle=lifecycle,
        require_model=settings.require_model,
        auth=keys.enabled,
    )
    app.include_router(router)
    docs.install(app)
    handlers.install(app)

    if settings.fast_path:
        # Added first, so it sits inside CORS and the request middleware: both still apply to the hot routes.
        app.add_middleware(FastPathMiddleware, service=service)
    if keys.enabled:
        rate = parse_rate(settings.rate_limit)
        limiter = None
        if rate is not None:
            limiter = RateLimiter(rate[0], rate[1], redis=_redis(settings))
        # Inside CORS (browsers send no key on a preflight), outside everything that answers.
        app.add_middleware(AccessGuard, keys=keys, limiter=limiter)
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
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_concurrency=settings.max_concurrency,
        lifecycle=lifecycle,
        metrics=http_metrics,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # The predict routes read their body themselves; their schemas are added here for the docs.
            spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas.request_components())
            app.openapi_schema = schemas.finish(spec, auth=keys.enabled)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _task(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coroutine)


async def _migrate(store: FeedbackStore, health: StoreHealth, timeout: float) -> None:
    """Bring the store's schema up to date and probe that it takes writes (``store.ping``), in a worker thread and
    ``timeout`` seconds at most: a database that is down, read-only or hangs costs /feedback (503) and
    personalisation, never the start of the service, and /health says so before the first request. A store not
    migrated here is migrated by the first write or probe that reaches it (``FeedbackStore.migrated``)."""
    try:
        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(store.ping, abandon_on_cancel=True)
        health.ok()
    except StoreError as exc:
        health.failed(str(exc))
        # The driver's own message (hosts, roles, files) goes to the operator's log only, never to /health.
        log.error("feedback store unavailable", extra={"reason": str(exc), "detail": str(exc.__cause__)})
    except TimeoutError:
        health.failed(f"no answer within {timeout} s")
        log.error("feedback store unavailable", extra={"reason": f"migration did not finish within {timeout} s"})


def _redis(settings: Settings) -> Any:
    """An asyncio Redis client for ``REDIS_URL`` with the Redis timeout, or None without one."""
    if not settings.redis_url:
        return None
    import redis.asyncio

    timeout = settings.redis_timeout
    return redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _shared_cache(settings: Settings, telemetry: Telemetry | None) -> AsyncAnswerCache | None:
    """The Redis answer cache when asked for; None leaves the in-process one (or none) to PredictionService."""
    if settings.prediction_cache_backend != "redis" or settings.redis_url is None or not settings.prediction_cache_size:
        return None
    return RedisCache.from_url(
        settings.redis_url,
        timeout=settings.redis_timeout,
        encode=encode_answer,
        decode=decode_answer,
        calls=NO_CALLS if telemetry is None else telemetry.redis_calls,
    )


def model_set_of(settings: Settings) -> ModelSet:
    """The model set the settings describe: MODEL_PATH (or the bundled model), or the registry MODEL_REGISTRY."""
    return ModelSet(
        settings.model_path or BUNDLED_MODEL_DIR,
        registry=None if settings.model_registry is None else Registry(settings.model_registry),
        weights=parse_weights(settings.variant_weights),
        salt=settings.experiment_salt,
        noncommercial=settings.serve_noncommercial_models,
        movie_id_space=settings.movie_id_space,
    )


def _prediction_log(settings: Settings, telemetry: Telemetry | None) -> PredictionLog | None:
    if not settings.prediction_log:
        return None
    batch = BatchDecoder(settings.max_batch_size)

    def decode(body: bytes) -> tuple[FloatArray, Sequence[str | int | None]]:
        # A cached answer's body, decoded when it is written: its features and movie ids.
        if b'"movies"' in body:
            request = batch(body)
            return request.x, request.ids
        one = decode_one(body)
        return one.x, [one.movie_id]

    log_ = PredictionLog(max_rows=settings.prediction_log_queue, share=settings.prediction_log_share, decode=decode)
    if telemetry is not None:
        log_.on_written = telemetry.log_written.inc
        log_.on_dropped = telemetry.log_dropped.inc
        log_.on_queued = telemetry.log_queued.set
    return log_


async def _sample_process(telemetry: Telemetry) -> None:
    while True:
        telemetry.sample_process()
        await asyncio.sleep(PROCESS_SAMPLE_SECONDS)


def app_from_env() -> FastAPI:
    """The uvicorn factory (``--factory``): reads Settings from the environment once, in each worker process."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
