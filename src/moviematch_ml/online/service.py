"""The prediction service without HTTP: the bytes of a /predict or /predict-batch request to the bytes of its answer.

The model set is read once per request, so one answer never mixes two models. Validation writes straight into a
feature matrix and each model is called once per request, never row by row: this is the hot path, so no pydantic
objects and no pandas here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

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
from moviematch_ml.online.user_views import UserViews

A = TypeVar("A", OneAnswer, BatchAnswer)


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
    ) -> None:
        self.models = models
        self.user_views = user_views
        self.decode_batch = BatchDecoder(max_batch_size)
        # An explicit cache (say, the shared Redis one) wins; else an in-process LRU of cache_size entries.
        self.cache: AnswerCache | None = cache if cache is not None else LRUCache(cache_size) if cache_size else None

    def predict_one(self, body: bytes) -> bytes:
        """``POST /predict``: six features, optional ``user_id`` and ``movie_id``."""
        return render_one(self._cached(body, self._predict_one, lambda a: (a.cacheable, 1)))

    def predict_batch(self, body: bytes) -> bytes:
        """``POST /predict-batch``: one prediction per movie, in request order or ranked best-first."""
        return render_batch(self._cached(body, self._predict_batch, lambda a: (a.cacheable, len(a.order))))

    def _cached(self, body: bytes, compute: Callable[[bytes], A], rows: Callable[[A], tuple[bool, int]]) -> A:
        """The answer to ``body`` from the cache, else computed (and stored when ``rows`` says it may be:
        (cacheable, number of predictions)). Answers hold no prediction ids, so a hit still gets fresh ones."""
        cache = self.cache
        if cache is None or len(body) > CACHE_MAX_BODY_BYTES:
            return compute(body)
        six = self.models.current.six
        key = (six.version, six.source, body)
        hit: A | None = cache.get(key)
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
        users = self.user_views
        personal = models.personalized
        if request.user_id is not None and users is not None and personal is not None:
            answer = users.predict(personal, request.user_id, [request.movie_id], request.x)
            if answer is not None:
                # The six-feature model is not needed at all. A personalised answer changes with the user's
                # feedback: it is never cached.
                return OneAnswer(round(float(answer[0][0]), 3), "personalized", False, personal.version)
        y = float(models.six.predict(request.x)[0])
        cacheable = request.user_id is None or users is None
        return OneAnswer(round(y, 3), models.six.source, cacheable, models.six.version)

    def _predict_batch(self, body: bytes) -> BatchAnswer:
        request = self.decode_batch(body)
        x, ids, user_id = request.x, request.ids, request.user_id
        models = self.models.current
        six = models.six
        source = six.source
        sources: list[str] | None = None
        personalized_version: str | None = None
        users = self.user_views
        personal = models.personalized
        answer = None
        if user_id is not None and users is not None and personal is not None:
            answer = users.predict(personal, user_id, ids, x)
        if answer is None or personal is None:
            y = six.predict(x)
        else:
            ratings, mask = answer
            if mask.all():
                y = ratings  # only read below (np.round makes a new array)
                source = "personalized"  # every row: one source for all, no per-row list
            else:  # only the rows the personalised model did not answer need the six-feature model
                y = np.array(ratings, dtype=np.float64)
                rest = ~mask
                y[rest] = six.predict(x[rest])
                sources = ["personalized" if m else six.source for m in mask.tolist()]
            personalized_version = personal.version
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
