"""The prediction service without HTTP: the bytes of a /predict or /predict-batch request to the bytes of its answer.

The model set is read once per request, so one answer never mixes two models. Validation writes straight into a
feature matrix and each model is called once per request, never row by row: this is the hot path, so no pydantic
objects and no pandas here. Nothing here blocks the event loop: a user's ratings, when they are not in memory, are
read in a worker thread for at most ``store_read_timeout`` seconds, and the six-feature model answers when the
store is slow or down; a big body is decoded and predicted in a worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Final, TypeVar

import anyio
import anyio.to_thread
import numpy as np

from moviematch_ml.errors import StoreError
from moviematch_ml.online.caches import CACHE_MAX_BODY_BYTES, AsyncAnswerCache, LRUCache
from moviematch_ml.online.contract import (
    BatchAnswer,
    BatchDecoder,
    BatchRequest,
    OneAnswer,
    decode_one,
    new_id,
    render_batch,
    render_one,
)
from moviematch_ml.online.feedback import FeedbackService
from moviematch_ml.online.journal import Entry, PredictionLog
from moviematch_ml.online.models import Models, ModelSet
from moviematch_ml.online.store import FeedbackStore, StoreHealth
from moviematch_ml.online.telemetry import ENDPOINTS, Telemetry
from moviematch_ml.online.user_views import Inputs, UserViews
from moviematch_ml.runtime.personalized import PersonalizedModel
from moviematch_ml.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
Id = str | int
# Bodies above this size are decoded and predicted in a worker thread, one at a time: a batch below it blocks the
# loop for a few milliseconds at most, while the thread hop (and the GIL ping-pong it brings) costs a 1,000-movie
# batch a third of its throughput (docs/performance-history.md, section 6).
THREAD_BODY_BYTES: Final[int] = 1024 * 1024
# After a store read fails or times out, the next ones are not even tried for this long (the six-feature model
# answers at once): a database that hangs must not cost every request the whole timeout.
STORE_BACKOFF_SECONDS: Final[float] = 2.0
PREDICT, PREDICT_BATCH = ENDPOINTS  # the endpoint label of the prediction metrics
PERSONALIZED: Final[str] = "personalized"


def _read(users: UserViews, model: PersonalizedModel, user_id: str) -> Inputs | None:
    """What a prediction for the user needs, read from the store (in a worker thread)."""
    if not users.warm_ahead:  # nobody polls the change feed in the background: the read does it
        users.sync()
    return users.load(model, user_id)


class PredictionService:
    """Answers /predict and /predict-batch from the model set, the users' views (users the store knows) and the
    answer cache."""

    def __init__(
        self,
        models: ModelSet,
        *,
        max_batch_size: int,
        user_views: UserViews | None = None,
        cache_size: int = 0,
        cache: LRUCache | AsyncAnswerCache | None = None,
        store_read_timeout: float = 0.5,
        store_threads: int = 4,
        telemetry: Telemetry | None = None,
        log: PredictionLog | None = None,
    ) -> None:
        self.models = models
        self.user_views = user_views
        self.decode_batch = BatchDecoder(max_batch_size)
        # An explicit cache (say, the shared Redis one) wins; else an in-process LRU of cache_size entries.
        self.cache: LRUCache | AsyncAnswerCache | None = (
            cache if cache is not None else LRUCache(cache_size) if cache_size else None
        )
        self.store_read_timeout = store_read_timeout
        self._store_threads = store_threads
        self._limiters: dict[str, anyio.CapacityLimiter] = {}  # created in the event loop that uses them
        self._store_down_until = 0.0
        self.store_failures = 0
        self.telemetry = telemetry
        self.log = log  # the prediction log: every answer is queued in it
        if telemetry is not None and self.cache is not None:
            backend = "memory" if isinstance(self.cache, LRUCache) else "redis"
            self._hits, self._misses = telemetry.cache_lookups(backend)

    def _limiter(self, name: str, tokens: int) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(name)
        if limiter is None:
            limiter = self._limiters[name] = anyio.CapacityLimiter(tokens)
        return limiter

    async def predict_one(self, body: bytes) -> bytes:
        """``POST /predict``: six features, optional ``user_id`` and ``movie_id``."""
        prediction_id = new_id()
        telemetry = self.telemetry
        if telemetry is None:
            return render_one(await self._predict_one(body, prediction_id), prediction_id)
        try:
            answer = await self._predict_one(body, prediction_id)
        except Exception as exc:
            telemetry.prediction_failed(PREDICT, exc)
            raise
        telemetry.predicted(PREDICT, answer.variant, answer.source, answer.version, 1)
        return render_one(answer, prediction_id)

    async def predict_batch(self, body: bytes) -> bytes:
        """``POST /predict-batch``: one prediction per movie, in request order or ranked best-first."""
        request_id = new_id()
        telemetry = self.telemetry
        if telemetry is None:
            return render_batch(await self._predict_batch(body, request_id), request_id)
        try:
            answer = await self._predict_batch(body, request_id)
        except Exception as exc:
            telemetry.prediction_failed(PREDICT_BATCH, exc)
            raise
        n = len(answer.ids)
        telemetry.batch_size.observe(n)
        if answer.sources is None:  # one source for every row
            telemetry.predicted(PREDICT_BATCH, answer.variant, answer.source, answer.version, n)
        else:
            personal = answer.sources.count(PERSONALIZED)
            telemetry.predicted(PREDICT_BATCH, answer.variant, PERSONALIZED, answer.version, personal)
            telemetry.predicted(PREDICT_BATCH, answer.variant, answer.source, answer.version, n - personal)
        return render_batch(answer, request_id)

    async def _predict_one(self, body: bytes, prediction_id: str) -> OneAnswer:
        cached = await self._cached_answer(body)
        log = self.log
        if isinstance(cached, OneAnswer):
            if log is not None:
                log.add(
                    Entry(
                        prediction_id,
                        time.time(),
                        PREDICT,
                        cached.variant,
                        cached.version,
                        None,
                        None,
                        None,
                        (cached.rating,),  # tuples, not lists: see PredictionLog.add
                        cached.source,
                        None,
                        body=body,
                    )
                )
            return cached
        request = decode_one(body)
        users = self.user_views
        variant, models = self.models.lineup.pick(request.user_id)
        telemetry = self.telemetry
        if telemetry is not None and (drift := telemetry.drift(models)) is not None:
            drift.add(request.x)
        personal = models.personalized
        six = models.six
        answer = None
        if request.user_id is not None and users is not None and personal is not None:
            inputs = await self._personal_inputs(users, personal, request.user_id)
            start = perf_counter() if telemetry is not None else 0.0
            answered = None if inputs is None else users.answer(personal, inputs, [request.movie_id], request.x)
            if answered is not None and answered[1][0]:
                if telemetry is not None:
                    telemetry.inference[PERSONALIZED].observe(perf_counter() - start)
                # The six-feature model is not needed at all. A personalised answer changes with the user's
                # feedback: it is never cached.
                answer = OneAnswer(round(float(answered[0][0]), 3), PERSONALIZED, False, models.version, variant)
        if answer is None:
            if telemetry is None:
                y = float(six.predict(request.x)[0])
            else:
                start = perf_counter()
                y = float(six.predict(request.x)[0])
                telemetry.inference[six.source].observe(perf_counter() - start)
            # Only answers to bodies without a user id are cached: a user's answer depends on their variant too.
            answer = OneAnswer(round(y, 3), six.source, request.user_id is None, models.version, variant)
            await self._store(body, answer, answer.cacheable, 1)
        if log is not None:
            log.add(
                Entry(
                    prediction_id,
                    time.time(),
                    PREDICT,
                    variant,
                    models.version,
                    request.user_id,
                    (request.movie_id,),  # tuples, not lists: see PredictionLog.add
                    request.x,
                    (answer.rating,),
                    answer.source,
                    None,
                )
            )
        return answer

    async def _predict_batch(self, body: bytes, request_id: str) -> BatchAnswer:
        cached = await self._cached_answer(body)
        log = self.log
        if isinstance(cached, BatchAnswer):
            if log is not None:
                log.add(
                    Entry(
                        request_id,
                        time.time(),
                        PREDICT_BATCH,
                        cached.variant,
                        cached.version,
                        None,
                        None,
                        None,
                        cached.rounded,
                        cached.source,
                        cached.sources,
                        cached.ranked,
                        body=body,
                    )
                )
            return cached
        big = len(body) > THREAD_BODY_BYTES
        request = await self._maybe_in_thread(big, self.decode_batch, body)
        users = self.user_views
        variant, models = self.models.lineup.pick(request.user_id)
        telemetry = self.telemetry
        if telemetry is not None and (drift := telemetry.drift(models)) is not None:
            drift.add(request.x)
        inputs = None
        personal = models.personalized
        if request.user_id is not None and users is not None and personal is not None:
            inputs = await self._personal_inputs(users, personal, request.user_id)
        answer = await self._maybe_in_thread(big, self._answer_batch, request, models, variant, inputs)
        await self._store(body, answer, answer.cacheable, len(answer.order))
        if log is not None:
            log.add(
                Entry(
                    request_id,
                    time.time(),
                    PREDICT_BATCH,
                    variant,
                    models.version,
                    request.user_id,
                    request.ids,
                    request.x,
                    answer.rounded,
                    answer.source,
                    answer.sources,
                    answer.ranked,
                    request.top_k,
                )
            )
        return answer

    async def _maybe_in_thread(self, big: bool, call: Callable[..., T], *args: object) -> T:
        if not big:
            return call(*args)
        # One big body at a time: several interleaved on one core only add GIL hand-offs and cache misses.
        return await anyio.to_thread.run_sync(call, *args, limiter=self._limiter("big", 1))

    def _answer_batch(self, request: BatchRequest, models: Models, variant: str, inputs: Inputs | None) -> BatchAnswer:
        x, ids = request.x, request.ids
        six = models.six
        personal = models.personalized
        source = six.source
        sources: list[str] | None = None
        answered = None
        telemetry = self.telemetry
        if personal is not None and inputs is not None and self.user_views is not None:
            start = perf_counter() if telemetry is not None else 0.0
            answered = self.user_views.answer(personal, inputs, ids, x)
            if answered is not None and telemetry is not None:
                telemetry.inference[PERSONALIZED].observe(perf_counter() - start)
        start = perf_counter() if telemetry is not None else 0.0
        if personal is None or answered is None:
            y = six.predict(x)
        else:
            ratings, mask = answered
            if mask.all():
                y = ratings  # only read below (np.round makes a new array)
                source = PERSONALIZED  # every row: one source for all, no per-row list
            else:  # only the rows the personalised model did not answer need the six-feature model
                y = np.array(ratings, dtype=np.float64)
                rest = ~mask
                y[rest] = six.predict(x[rest])
                sources = [PERSONALIZED if m else six.source for m in mask.tolist()]
        if telemetry is not None and source != PERSONALIZED:  # the six-feature model answered rows
            telemetry.inference[six.source].observe(perf_counter() - start)
        rounded: list[float] = np.round(y, 3).tolist()

        ranked = request.rank or request.top_k is not None
        if ranked:
            # Stable sort on the rounded ratings: equal answers keep request order, and the list reads sorted.
            order: list[int] = np.argsort(-np.asarray(rounded), kind="stable").tolist()
            if request.top_k is not None:
                order = order[: request.top_k]
        else:
            order = list(range(len(ids)))
        cacheable = request.user_id is None
        return BatchAnswer(ids, rounded, source, sources, order, ranked, models.version, cacheable, variant)

    async def _personal_inputs(self, users: UserViews, model: PersonalizedModel, user_id: Id) -> Inputs | None:
        """The user's view and the movie table; from memory when there, else read from the store in a worker
        thread for at most ``store_read_timeout`` seconds. None when the user has no view, or the store cannot
        answer in time (the six-feature model answers then)."""
        key = str(user_id)
        found = users.cached(model, key)
        if found is not True:
            return found or None
        return await self._store_read(lambda: _read(users, model, key))

    async def _store_read(self, read: Callable[[], Inputs | None]) -> Inputs | None:
        if time.monotonic() < self._store_down_until:
            return None
        try:
            with anyio.fail_after(self.store_read_timeout):
                return await anyio.to_thread.run_sync(
                    read, limiter=self._limiter("store", self._store_threads), abandon_on_cancel=True
                )
        except (StoreError, TimeoutError) as exc:
            self.store_failures += 1
            if time.monotonic() >= self._store_down_until:  # logged once per outage, not once per request
                log.warning(
                    "user state unavailable, answering with the six-feature model",
                    extra={"reason": str(exc) or f"no answer within {self.store_read_timeout} s"},
                )
            self._store_down_until = time.monotonic() + STORE_BACKOFF_SECONDS
            return None

    async def _cached_answer(self, body: bytes) -> OneAnswer | BatchAnswer | None:
        """The cached answer to ``body`` (answers hold no prediction ids, so a hit still gets fresh ones)."""
        cache = self.cache
        if cache is None or len(body) > CACHE_MAX_BODY_BYTES:
            return None
        champion = self.models.current
        key = (champion.version, champion.six.source, body)
        hit: OneAnswer | BatchAnswer | None
        if isinstance(cache, LRUCache):
            got = cache.get(key)
            hit = OneAnswer(*got) if type(got) is tuple else got
        else:
            hit = await cache.aget(key)
        if self.telemetry is not None:
            (self._misses if hit is None else self._hits).inc()
        return hit

    async def _store(self, body: bytes, answer: OneAnswer | BatchAnswer, cacheable: bool, rows: int) -> None:
        cache = self.cache
        if cache is None or not cacheable or len(body) > CACHE_MAX_BODY_BYTES:
            return
        champion = self.models.current
        key = (champion.version, champion.six.source, body)
        if isinstance(cache, LRUCache):
            # A /predict answer is kept packed: thousands of them live there for seconds, each walked by every
            # collection of the garbage collector's older generations as an object, and not at all as a tuple.
            cache.put(key, answer.packed() if isinstance(answer, OneAnswer) else answer, rows)
        else:
            cache.aput(key, answer, rows)


@dataclass(frozen=True)
class Services:
    """The service's core without HTTP: what /predict, /predict-batch and /feedback call, and the users' views
    between them."""

    predictions: PredictionService
    feedback: FeedbackService
    user_views: UserViews


def wire_services(
    settings: Settings,
    models: ModelSet,
    store: FeedbackStore,
    *,
    cache: AsyncAnswerCache | None = None,
    telemetry: Telemetry | None = None,
    log: PredictionLog | None = None,
    health: StoreHealth | None = None,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], float] = time.time,
) -> Services:
    """The services the app serves (``api/app.py`` adds HTTP around them), wired as the settings say. ``clock``
    (what the users' views' TTLs are measured on) and ``now`` (unix time: a rating without a timestamp, the
    recency inputs) are the machine's; the replay protocol (``offline/replay.py``) passes the ratings' time."""
    user_views = UserViews(
        store, ttl=settings.state_ttl_seconds, max_users=settings.state_cache_users, clock=clock, now=now
    )
    predictions = PredictionService(
        models,
        max_batch_size=settings.max_batch_size,
        cache_size=settings.prediction_cache_size,
        cache=cache,
        user_views=user_views,
        store_read_timeout=settings.store_read_timeout,
        telemetry=telemetry,
        log=log,
    )
    feedback = FeedbackService(
        store,
        user_views.forget,
        write_timeout=settings.store_write_timeout,
        health=health,
        telemetry=telemetry,
        clock=now,
    )
    return Services(predictions, feedback, user_views)
