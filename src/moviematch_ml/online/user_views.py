"""Users' views: each user's stored ratings folded into the personalised model, kept fresh by the change feed.

Where the state lives: the feedback store is the source of truth and the only thing replicas share. A replica
keeps each user's view (their ratings folded in) in an in-process cache, forgets a user as soon as it stores a
rating of theirs, and every ``ttl`` seconds reads the store's change feed (the rows stored since it last looked)
to forget the users other replicas took ratings from. So a user's next prediction on the replica that took their
rating reflects it at once, and on any other replica within ``ttl`` seconds (0: read the store on every request).
The feed costs one query per ``ttl`` per replica, whatever the number of users. What the movies received through
``/feedback`` moves slowly: it is read in one query and kept for at least MOVIE_TTL_SECONDS.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt

from moviematch_ml.errors import StoreError
from moviematch_ml.online.caches import TTLCache
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.runtime.personalized import MovieTable, PersonalizedModel, UserView

log = logging.getLogger(__name__)

MOVIE_TTL_SECONDS: Final[float] = 30.0
# Movie tables kept at once: one per personalised model served (the champion and challengers), and a reloaded one.
MAX_MODELS: Final[int] = 8
# A backstop: a cached user view is read again after this long even if the change feed never named the user.
USER_MAX_AGE_SECONDS: Final[float] = 300.0
# The feed is read from the highest row id seen this many polls ago: a rating whose row id was taken before a
# poll but committed after it (concurrent PostgreSQL transactions) is still seen by the next polls.
FEED_OVERLAP_POLLS: Final[int] = 5
# maintain builds views in slices this long: the worker thread then gives the GIL back to the event loop.
WARM_SLICE_SECONDS: Final[float] = 0.001

Id = str | int
FloatArray = npt.NDArray[np.float64]
# What a prediction for one user needs: their view and the movie table.
Inputs = tuple[UserView, MovieTable]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class _Movies:
    """A model's movie table with what the store's movies received, and until when it is fresh."""

    model: PersonalizedModel
    table: MovieTable
    expires: float


class UserViews:
    """The views of the users the store knows, and their answers from the personalised model it is handed (one
    model call a request).

    Each cached view remembers the model it was built against: a request handed another model (a reload, or the
    user's A/B variant changed) builds it again. Several models can be served at once (A/B variants): each user's
    view, and each model's movie table, is kept for the model that asked for it.
    """

    def __init__(
        self,
        store: FeedbackStore,
        *,
        ttl: float = 1.0,
        max_users: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self._clock = clock  # what the TTLs are measured on
        # The unix time the recency inputs are measured from: the wall clock, or the ratings' time in a replay.
        self._now = now
        self._users: TTLCache[str, tuple[PersonalizedModel, UserView | None]] = TTLCache(
            max(ttl, USER_MAX_AGE_SECONDS) if ttl > 0 else 0.0, max_users, clock
        )
        self._views_of: PersonalizedModel | None = None  # the model ``warm`` last built views against
        self._model_lock = threading.Lock()
        self._feed_marks: deque[int] = deque(maxlen=FEED_OVERLAP_POLLS)
        self._feed_seen: set[int] = set()  # the row ids of the last poll: a row seen before is not news again
        self._feed_checked = -math.inf
        self._feed_lock = threading.Lock()
        # Users the feed named, whose views ``warm`` builds ahead of their next request (oldest first), while
        # ``warm_ahead`` is set (by maintain): a user who rates movies usually asks for recommendations next.
        # maintain polls the feed then, so requests leave the polls to it.
        self.warm_ahead = False
        self._to_warm: dict[str, None] = {}
        self._warm_lock = threading.Lock()
        self._movie_ttl = max(ttl, MOVIE_TTL_SECONDS)
        self._movies: dict[PersonalizedModel, _Movies] = {}  # a few at most: the models of the lineup
        self._movies_lock = threading.Lock()

    def _views_for(self, model: PersonalizedModel) -> None:
        """When the champion's model changes (a reload), queue the users whose views were built against another model
        (with ``warm_ahead``: they were being asked for); their views are built again when asked for or warmed."""
        if model is self._views_of:
            return
        with self._model_lock:
            if model is self._views_of:
                return
            if self.warm_ahead:
                self._queue([user for user, (built_for, _) in self._users.items() if built_for is not model])
            self._views_of = model

    def forget(self, user_ids: Iterable[str]) -> None:
        """Called after this replica stored ratings of these users: their next prediction reads the store again."""
        self._users.discard(user_ids)

    def sync(self) -> None:
        """Forget the users the store got ratings for since the last look, at most once per ``ttl`` seconds (and,
        with ``warm_ahead``, queue them for ``warm``).

        Each poll reads the rows stored after the highest row id seen FEED_OVERLAP_POLLS polls ago, so a row
        committed late is still seen; a user is forgotten for rows the previous poll did not return, not again
        for every poll of the overlap.

        Raises StoreError when the store cannot be read; the cached views are then dropped (they may be stale).
        """
        if self.ttl <= 0 or self._clock() - self._feed_checked < self.ttl:
            return
        with self._feed_lock:  # one poll at a time; the others go on with the cache meanwhile
            now = self._clock()
            if now - self._feed_checked < self.ttl:
                return
            self._feed_checked = now
            try:
                if not self._feed_marks:
                    # The first look: nothing is cached yet, so only the starting point of the feed is needed; with
                    # warm_ahead, the users of the latest rows (as many rows as the cache holds users) are queued
                    # too, so that a worker that starts (a deploy, a restart) does not start cold for them.
                    last = self.store.last_row_id()
                    recent = self.store.changed_rows(max(last - self._users.max_entries, 0)) if self.warm_ahead else []
                    self._feed_marks.append(last)
                    self._feed_seen = set()
                    if recent:
                        self._queue(_by_latest_row(recent))
                    return
                rows = self.store.changed_rows(self._feed_marks[0])
            except StoreError:
                self._users.clear()
                self._feed_marks.clear()
                self.forget_queue()
                raise
            seen = self._feed_seen
            users = _by_latest_row([(row, user) for row, user in rows if row not in seen])
            self._feed_seen = {row for row, _ in rows}  # every row above the window's start: the older ones leave
            self._feed_marks.append(max(rows[-1][0] if rows else 0, self._feed_marks[-1]))
            if users:
                self._users.discard(users)
                if self.warm_ahead:
                    self._queue(users)

    def _queue(self, users: Iterable[str]) -> None:
        with self._warm_lock:
            queue = self._to_warm
            for user in users:
                queue.pop(user, None)  # to the back: the newest change is the likeliest request
                queue[user] = None
            # No more than the cache holds: building views that would evict each other is wasted work.
            while len(queue) > self._users.max_entries:
                del queue[next(iter(queue))]

    def forget_queue(self) -> None:
        """Build nothing ahead of what is queued now."""
        with self._warm_lock:
            self._to_warm.clear()

    @property
    def to_warm(self) -> int:
        """How many users ``warm`` has yet to build."""
        return len(self._to_warm)

    def warm(
        self,
        model: PersonalizedModel,
        budget: float,
        model_of: Callable[[str], PersonalizedModel | None] | None = None,
    ) -> int:
        """Build the views of users the change feed named (``sync`` with ``warm_ahead``), oldest first, for about
        ``budget`` seconds at most (at least one user); returns how many are left. Their next request then finds
        its view cached instead of reading and folding in the user's ratings on the request path. ``model`` is the
        champion's personalised model; ``model_of`` the one a user's requests go to (their A/B variant's), if
        there are several (None: that user has none, nothing to build).

        Reads the store: raises StoreError when it cannot (the user stays queued).
        """
        self._views_for(model)  # a reload queues the users whose views it drops
        deadline = time.perf_counter() + budget
        while True:
            with self._warm_lock:
                if not self._to_warm:
                    return 0
                user = next(iter(self._to_warm))
                del self._to_warm[user]
            try:
                users_model = model if model_of is None else model_of(user)
                if users_model is not None:
                    self.user_view(users_model, user)  # a user already cached (asked for meanwhile): one look-up
            except StoreError:
                self._queue([user])
                raise
            with self._warm_lock:
                if user in self._to_warm:
                    # A poll named the user again while their ratings were read: the view just cached may predate
                    # that rating. Drop it; the queue builds it again.
                    self._users.discard([user])
                if time.perf_counter() >= deadline:
                    return len(self._to_warm)

    def user_view(self, model: PersonalizedModel, user_id: str) -> UserView | None:
        """The user's view from their stored ratings (cached); None when the model does not answer for them (no
        ratings, or fewer than its ``min_user_ratings``). Raises StoreError when the store cannot be read."""
        hit, entry = self._users.get(user_id)
        if hit and entry is not None and entry[0] is model:
            return entry[1]
        rows = self.store.user_ratings(user_id)
        if rows:
            movie_ids, api_ratings, times = zip(*rows, strict=True)
            keys = model.store_keys(list(movie_ids))
            to_api = model.scale.to_api
            view = model.user_view_of_ratings(keys, [r / to_api for r in api_ratings], list(times))
        else:
            view = None
        self._users.put(user_id, (model, view))
        return view

    def movie_table(self, model: PersonalizedModel) -> MovieTable:
        """The model's movie table with what the movies received through /feedback, read from the store at most
        every MOVIE_TTL_SECONDS. Raises StoreError when the store cannot be read."""
        cached = self._movies.get(model)
        if cached is not None and cached.expires >= self._clock():
            return cached.table
        with self._movies_lock:  # one reader refreshes; the others wait for its result rather than query too
            cached = self._movies.get(model)
            if cached is not None and cached.expires >= self._clock():
                return cached.table
            # A model trained from the store already counts its ratings: nothing to read then.
            counts = {} if model.counts_store_ratings else self.store.all_movie_counts()
            received = {k: (float(c.n), c.rating_sum, c.rating_sumsq) for k, c in counts.items()}
            table = model.movie_table(received)
            tables = {m: t for m, t in self._movies.items() if m is not model}
            while len(tables) >= MAX_MODELS:  # models no longer served (reloaded away) leave
                del tables[next(iter(tables))]
            tables[model] = _Movies(model, table, self._clock() + self._movie_ttl)
            self._movies = tables  # replaced whole: readers without the lock see the old dict or the new one
            return table

    def cached(self, model: PersonalizedModel, user_id: str) -> Inputs | bool:
        """What a prediction for the user needs, from memory alone (no store call: this is for the event loop):
        their view and the movie table; False when the user is known to have no view; True when the store must be
        read first (``load``). A movie table due for a refresh still serves: ``refresh_movies`` renews it."""
        hit, entry = self._users.get(user_id)
        movies = self._movies.get(model)
        if not hit or entry is None or movies is None or entry[0] is not model:
            return True
        view = entry[1]
        return False if view is None else (view, movies.table)

    def load(self, model: PersonalizedModel, user_id: str) -> Inputs | None:
        """``cached`` after reading what is missing from the store (blocking: run it in a thread); None when the
        user has no view. Raises StoreError when the store cannot be read."""
        view = self.user_view(model, user_id)
        if view is None:
            return None
        movies = self._movies.get(model)
        table = movies.table if movies is not None else self.movie_table(model)
        return view, table

    def refresh_movies(self, model: PersonalizedModel) -> None:
        """Read the movie table again if it is older than MOVIE_TTL_SECONDS (blocking: run it in a thread)."""
        self.movie_table(model)

    def answer(
        self, model: PersonalizedModel, inputs: Inputs, movie_ids: Sequence[Id | None], x: FloatArray
    ) -> tuple[FloatArray, BoolArray] | None:
        """The user's ratings (0-10) of the movies of ``x`` from their inputs (``cached`` or ``load``), and the mask
        of those the model answered; None when it answered none."""
        pred, mask = model.predict(inputs[0], x, movie_ids, inputs[1], self._now())
        if model.config.personalize == "known_user":
            return pred, mask  # every movie: no need to look
        return (pred, mask) if mask.any() else None

    def predict(
        self, model: PersonalizedModel, user_id: Id, movie_ids: Sequence[Id | None], x: FloatArray
    ) -> tuple[FloatArray, BoolArray] | None:
        """``answer`` with the user's inputs from memory or, blocking, from the store (the service itself reads the
        store in a worker thread: online/service.py); None when the user has no view, or the store cannot be read
        (logged: the six-feature model answers instead)."""
        key = str(user_id)
        try:
            if not self.warm_ahead:  # else maintain polls
                self.sync()
            found = self.cached(model, key)
            inputs = self.load(model, key) if found is True else found or None
        except StoreError as exc:
            log.warning("user state unavailable", extra={"reason": str(exc)})
            return None
        return None if inputs is None else self.answer(model, inputs, movie_ids, x)


def _by_latest_row(rows: Iterable[tuple[int, str]]) -> dict[str, None]:
    """The users of (row id, user) rows in row order, each placed by their latest row (oldest first)."""
    users: dict[str, None] = {}
    for _, user in rows:
        users.pop(user, None)
        users[user] = None
    return users


async def maintain(
    views: UserViews,
    models: Callable[[], Sequence[PersonalizedModel]],
    *,
    warm_share: float,
    timeout: float,
    model_of: Callable[[str], PersonalizedModel | None] | None = None,
) -> None:
    """A worker's background task (the app's lifespan runs it), every ``views.ttl`` seconds: poll the change feed
    (forget the users other replicas took ratings from), renew the movie table when it is due, and build the views of
    the users the feed named before their next request asks for them (for at most ``warm_share`` of the period, in
    slices of WARM_SLICE_SECONDS). ``models()`` are the personalised models served at the time, the champion's
    first; ``model_of(user)`` the one of the user's A/B variant (``UserViews.warm``).

    Every store call runs in a worker thread, at most one at a time and ``timeout`` seconds at most: a database
    that hangs holds one thread of this task, never the event loop, and the task goes on at the next period. With
    this task running (``warm_ahead``), requests never poll the feed themselves. Runs until cancelled.
    """
    views.warm_ahead = True
    period = views.ttl
    limiter = anyio.CapacityLimiter(1)
    try:
        while True:
            try:
                served = models()
                if not served:  # without a personalised model there is no state to keep, no feed to read
                    views.forget_queue()
                else:
                    current = served[0]
                    await _blocking(views.sync, limiter, timeout)
                    for one in served:
                        await _blocking(functools.partial(views.refresh_movies, one), limiter, timeout)
                    spent = 0.0
                    while views.to_warm and spent < warm_share * period:
                        started = time.perf_counter()
                        warm = functools.partial(views.warm, current, WARM_SLICE_SECONDS, model_of)
                        await _blocking(warm, limiter, timeout)
                        spent += time.perf_counter() - started
            except (StoreError, TimeoutError) as exc:
                log.warning("user states not kept up to date", extra={"reason": str(exc) or type(exc).__name__})
            except Exception:  # a bug here must not end the task: requests still read what they need themselves
                log.exception("user states not kept up to date")
            await asyncio.sleep(period)
    finally:  # as without this task: requests poll again, and nothing is built ahead
        views.warm_ahead = False
        views.forget_queue()


async def _blocking(call: Callable[[], object], limiter: anyio.CapacityLimiter, timeout: float) -> None:
    """``call()`` in a worker thread, abandoned (left to finish on its own) after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        await anyio.to_thread.run_sync(call, limiter=limiter, abandon_on_cancel=True)
