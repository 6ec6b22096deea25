"""Online per-user and per-movie state read from the feedback store: the service's personalizer.

Where the state lives: the database (the feedback store) is the source of truth and the only thing replicas
share; a replica keeps what it read in a small in-process cache for ``ttl`` seconds, and forgets a user as soon
as it stores a rating of theirs. So a user's next prediction on the replica that took their rating reflects it at
once, and on any other replica within ``ttl`` seconds (default 1 s; 0 reads the database every time). A movie's
totals (count and mean of its ratings) are kept for at least MOVIE_TTL_SECONDS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from moviematch_ml.errors import ModelError, StoreError
from moviematch_ml.personalized import PersonalizedModel, UserState, user_state
from moviematch_ml.store import FeedbackStore

log = logging.getLogger(__name__)

PERSONALIZED_DIR: Final[str] = "personalized"
MOVIE_TTL_SECONDS: Final[float] = 30.0

Id = str | int
K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A bounded, thread-safe mapping whose entries expire ``ttl`` seconds after they were stored."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> tuple[bool, V | None]:
        """(hit, value); an expired entry is a miss."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None or entry[0] < self._clock():
                return False, None
            return True, entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._data[key] = (self._clock() + self.ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def discard(self, keys: Iterable[K]) -> None:
        with self._lock:
            for k in keys:
                self._data.pop(k, None)


def load_personalized(model_path: Path) -> PersonalizedModel | None:
    """The personalised model stored next to the six-feature one (``<model dir>/personalized``), or None.

    A missing directory is normal (the six-feature model answers everyone); a present but refused one is logged.
    """
    directory = (model_path if model_path.is_dir() else model_path.parent) / PERSONALIZED_DIR
    if not directory.is_dir():
        return None
    try:
        return PersonalizedModel.load(directory)
    except ModelError as exc:
        log.error("personalised model not loaded", extra={"model_path": str(directory), "reason": str(exc)})
        return None


class StatePersonalizer:
    """Answers for users the store knows: their ratings folded into the personalised model, in one model call.

    Implements ``serving.Personalizer``. Movie ids are matched with the model's ids as strings or integers
    (``"42"`` and ``42`` are the same movie), since the store keeps ids as text.
    """

    def __init__(
        self,
        store: FeedbackStore,
        *,
        ttl: float = 1.0,
        max_users: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.model: PersonalizedModel | None = None
        self._users: TTLCache[str, UserState | None] = TTLCache(ttl, max_users, clock)
        # A movie's totals move slowly (one more rating among many): they are kept longer than a user's state, which
        # is what a user's own next prediction must reflect; a bulk query per request cost a fifth of its time.
        self._movies: TTLCache[str, tuple[float, float, float]] = TTLCache(
            max(ttl, MOVIE_TTL_SECONDS), 20 * max_users, clock
        )
        self._int_ids = False
        self._use_movie_extra = True

    @property
    def version(self) -> str | None:
        model = self.model
        return None if model is None else model.version

    def set_model(self, model: PersonalizedModel | None) -> None:
        """Install a (new) personalised model; cached state was built against the old one, so it is dropped."""
        self._users = TTLCache(self._users.ttl, self._users.max_entries)
        self._movies = TTLCache(self._movies.ttl, self._movies.max_entries)
        if model is not None:
            keys = list(model.mf.item_index)
            self._int_ids = bool(keys) and all(isinstance(k, int) for k in keys[:100])
            # A model trained from the store already counts every stored rating in its movie moments: adding the
            # store's totals again would count them twice.
            self._use_movie_extra = model.card is None or model.card.data.get("dataset") != "feedback"
        self.model = model

    def forget(self, user_ids: Iterable[str]) -> None:
        """Called after this replica stored ratings of these users: their next prediction re-reads the store."""
        self._users.discard(user_ids)

    def _key(self, movie_id: Id | None) -> Id:
        # No movie id (a /predict without one) is an id no model knows: the movie-side features are missing.
        if movie_id is None:
            return ""
        if self._int_ids and isinstance(movie_id, str) and movie_id.isdigit():
            return int(movie_id)
        if not self._int_ids and isinstance(movie_id, int):
            return str(movie_id)
        return movie_id

    def user_state(self, model: PersonalizedModel, user_id: str) -> UserState | None:
        """The user's state from their stored ratings (cached for ``ttl``); None for a user with no ratings."""
        hit, state = self._users.get(user_id)
        if hit:
            return state
        rows = self.store.user_ratings(user_id)
        if rows:
            ids = [self._key(m) for m, _, _ in rows]
            ratings = [model.from_api(r) for _, r, _ in rows]
            times = [t for _, _, t in rows]
            state = user_state(model.mf, ids, ratings, times)
        else:
            state = None
        self._users.put(user_id, state)
        return state

    def movie_extra(self, model: PersonalizedModel, movie_ids: Sequence[Id | None]) -> npt.NDArray[np.float64]:
        """(n, 3) count, sum, sum of squares (data scale) of what each movie got through /feedback, in bulk."""
        keys = ["" if m is None else str(m) for m in movie_ids]
        out = np.zeros((len(keys), 3))
        missing: list[str] = []
        found: dict[str, tuple[float, float, float]] = {}
        for k in set(keys):
            if not k:
                continue
            hit, value = self._movies.get(k)
            if hit and value is not None:
                found[k] = value
            else:
                missing.append(k)
        if missing:
            scale = model.from_api(1.0)
            counts = self.store.movie_counts(missing)
            for k in missing:
                c = counts.get(k)
                value = (0.0, 0.0, 0.0) if c is None else (float(c.n), c.rating_sum * scale, c.rating_sumsq * scale**2)
                found[k] = value
                self._movies.put(k, value)
        for i, k in enumerate(keys):
            if k:
                out[i] = found[k]
        return out

    def __call__(
        self, user_id: Id, movie_ids: Sequence[Id | None], x: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None:
        model = self.model  # read once: a concurrent set_model must not mix two models in one answer
        if model is None:
            return None
        try:
            state = self.user_state(model, str(user_id))
            if state is None:
                return None
            extra = self.movie_extra(model, movie_ids) if self._use_movie_extra else None
        except StoreError as exc:
            # The store is down: answer with the six-feature model rather than fail the prediction.
            log.warning("user state unavailable", extra={"reason": str(exc)})
            return None
        keys = [self._key(m) for m in movie_ids]
        pred, mask = model.predict_user(state, keys, x, movie_extra=extra)
        if not mask.any():
            return None
        return model.to_api(np.where(mask, pred, 0.0)), mask
