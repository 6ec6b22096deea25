"""The prediction service without HTTP: the bytes of a /predict or /predict-batch request to the bytes of its answer.

The model set is read once per request, so one answer never mixes two models. Validation writes straight into a
feature matrix and each model is called once per request, never row by row: this is the hot path, so no pydantic
objects and no pandas here.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Final, TypeVar

import numpy as np

from moviematch_ml.online.caches import CACHE_MAX_BODY_BYTES, AnswerCache, LRUCache
from moviematch_ml.online.contract import (
    BatchAnswer,
    BatchDecoder,
    OneAnswer,
    decode_one,
    render_batch,
    render_one,
)
from moviematch_ml.online.models import ModelSet
from moviematch_ml.online.telemetry import ENDPOINTS, Telemetry
from moviematch_ml.online.user_views import UserViews

A = TypeVar("A", OneAnswer, BatchAnswer)

PREDICT, PREDICT_BATCH = ENDPOINTS  # the endpoint label of the prediction metrics
PERSONALIZED: Final[str] = "personalized"


def _one_rows(answer: OneAnswer) -> tuple[bool, int]:
    return answer.cacheable, 1


def _batch_rows(answer: BatchAnswer) -> tuple[bool, int]:
    return answer.cacheable, len(answer.order)


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
        cache: AnswerCache | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.models = models
        self.user_views = user_views
        self.decode_batch = BatchDecoder(max_batch_size)
        # An explicit cache (say, the shared Redis one) wins; else an in-process LRU of cache_size entries.
        self.cache: AnswerCache | None = cache if cache is not None else LRUCache(cache_size) if cache_size else None
        self.telemetry = telemetry
        if telemetry is not None and self.cache is not None:
            backend = "memory" if isinstance(self.cache, LRUCache) else "redis"
            self._hits, self._misses = telemetry.cache_lookups(backend)

    def predict_one(self, body: bytes) -> bytes:
        """``POST /predict``: six features, optional ``user_id`` and ``movie_id``."""
        telemetry = self.telemetry
        if telemetry is None:
            return render_one(self._cached(body, self._predict_one, _one_rows))
        try:
            answer = self._cached(body, self._predict_one, _one_rows)
        except Exception as exc:
            telemetry.prediction_failed(PREDICT, exc)
            raise
        telemetry.predicted(PREDICT, answer.source, answer.version, 1)
        return render_one(answer)

    def predict_batch(self, body: bytes) -> bytes:
        """``POST /predict-batch``: one prediction per movie, in request order or ranked best-first."""
        telemetry = self.telemetry
        if telemetry is None:
            return render_batch(self._cached(body, self._predict_batch, _batch_rows))
        try:
            answer = self._cached(body, self._predict_batch, _batch_rows)
        except Exception as exc:
            telemetry.prediction_failed(PREDICT_BATCH, exc)
            raise
        n = len(answer.ids)
        telemetry.batch_size.observe(n)
        if answer.sources is None:  # one source for every row
            version = answer.personalized_version if answer.source == PERSONALIZED else answer.version
            telemetry.predicted(PREDICT_BATCH, answer.source, version, n)
        else:
            personal = answer.sources.count(PERSONALIZED)
            telemetry.predicted(PREDICT_BATCH, PERSONALIZED, answer.personalized_version, personal)
            telemetry.predicted(PREDICT_BATCH, answer.source, answer.version, n - personal)
        return render_batch(answer)

    def _cached(self, body: bytes, compute: Callable[[bytes], A], rows: Callable[[A], tuple[bool, int]]) -> A:
        """The answer to ``body`` from the cache, else computed (and stored when ``rows`` says it may be:
        (cacheable, number of predictions)). Answers hold no prediction ids, so a hit still gets fresh ones."""
        cache = self.cache
        if cache is None or len(body) > CACHE_MAX_BODY_BYTES:
            return compute(body)
        six = self.models.current.six
        key = (six.version, six.source, body)
        hit: A | None = cache.get(key)
        if self.telemetry is not None:
            (self._misses if hit is None else self._hits).inc()
        if hit is not None:
            return hit
        answer = compute(body)
        cacheable, n = rows(answer)
        if cacheable:
            cache.put(key, answer, n)
        return answer

    def _predict_one(self, body: bytes) -> OneAnswer:
        request = decode_one(body)
        models = self.models.current
        telemetry = self.telemetry
        if telemetry is not None and (drift := telemetry.drift(models)) is not None:
            drift.add(request.x)
        users = self.user_views
        personal = models.personalized
        if request.user_id is not None and users is not None and personal is not None:
            start = perf_counter() if telemetry is not None else 0.0
            answer = users.predict(personal, request.user_id, [request.movie_id], request.x)
            if answer is not None:
                if telemetry is not None:
                    telemetry.inference[PERSONALIZED].observe(perf_counter() - start)
                # The six-feature model is not needed at all. A personalised answer changes with the user's
                # feedback: it is never cached.
                return OneAnswer(round(float(answer[0][0]), 3), PERSONALIZED, False, personal.version)
        six = models.six
        if telemetry is None:
            y = float(six.predict(request.x)[0])
        else:
            start = perf_counter()
            y = float(six.predict(request.x)[0])
            telemetry.inference[six.source].observe(perf_counter() - start)
        cacheable = request.user_id is None or users is None
        return OneAnswer(round(y, 3), six.source, cacheable, six.version)

    def _predict_batch(self, body: bytes) -> BatchAnswer:
        request = self.decode_batch(body)
        x, ids, user_id = request.x, request.ids, request.user_id
        models = self.models.current
        telemetry = self.telemetry
        if telemetry is not None and (drift := telemetry.drift(models)) is not None:
            drift.add(x)
        six = models.six
        source = six.source
        sources: list[str] | None = None
        personalized_version: str | None = None
        users = self.user_views
        personal = models.personalized
        answer = None
        if user_id is not None and users is not None and personal is not None:
            start = perf_counter() if telemetry is not None else 0.0
            answer = users.predict(personal, user_id, ids, x)
            if answer is not None and telemetry is not None:
                telemetry.inference[PERSONALIZED].observe(perf_counter() - start)
        start = perf_counter() if telemetry is not None else 0.0
        if answer is None or personal is None:
            y = six.predict(x)
        else:
            ratings, mask = answer
            if mask.all():
                y = ratings  # only read below (np.round makes a new array)
                source = PERSONALIZED  # every row: one source for all, no per-row list
            else:  # only the rows the personalised model did not answer need the six-feature model
                y = np.array(ratings, dtype=np.float64)
                rest = ~mask
                y[rest] = six.predict(x[rest])
                sources = [PERSONALIZED if m else six.source for m in mask.tolist()]
            personalized_version = personal.version
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
        cacheable = user_id is None or users is None
        return BatchAnswer(ids, rounded, source, sources, order, ranked, six.version, cacheable, personalized_version)
