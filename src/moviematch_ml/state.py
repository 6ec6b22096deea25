"""Online per-user and per-movie state read from the feedback store: the service's personalizer.

Where the state lives: the database (the feedback store) is the source of truth and the only thing replicas
share. A replica keeps what it read in an in-process cache, forgets a user as soon as it stores a rating of
theirs, and every ``ttl`` seconds reads the store's change feed (which users got ratings since it last looked) to
forget the users other replicas took ratings from. So a user's next prediction on the replica that took their
rating reflects it at once, and on any other replica within ``ttl`` seconds (default 1 s; 0 reads the database on
every request). The feed costs one query per ``ttl`` per replica, whatever the number of users, where expiring
each user's entry after ``ttl`` cost a full read of their ratings per user per ``ttl``. A movie's totals (count
and mean of its ratings) are kept for at least MOVIE_TTL_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from moviematch_ml.cf import lookup
from moviematch_ml.errors import ModelError, StoreError
from moviematch_ml.personalized import IntArray, PersonalizedModel, UserView
from moviematch_ml.store import FeedbackStore

_codec: Any
try:  # the C loops (see setup.py); without a compiler, ids are looked up through cf.lookup alone
    from moviematch_ml import _codec
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _codec = None

log = logging.getLogger(__name__)

PERSONALIZED_DIR: Final[str] = "personalized"
MOVIE_TTL_SECONDS: Final[float] = 30.0
# Movie ids below this (4 MB of int32) are looked up in an array rather than a dict (MovieTotals.dense); movielens'
# ids stop at 193,609.
DENSE_IDS_MAX: Final[int] = 1 << 20
# A backstop: a cached user state is re-read after this long even if the change feed never named the user.
USER_MAX_AGE_SECONDS: Final[float] = 300.0
# The feed is read from the highest row id seen this many polls ago: a rating whose row id was taken before a
# poll but committed after it (concurrent PostgreSQL transactions) is still seen by the next polls.
FEED_OVERLAP_POLLS: Final[int] = 5
_NO_RATINGS: Final[tuple[float, float, float]] = (0.0, 0.0, 0.0)
# keep_warm builds views in slices this long, the event loop free between them: a request waits at most this much.
WARM_SLICE_SECONDS: Final[float] = 0.001

Id = str | int
K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


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

    def keys(self) -> list[K]:
        """The keys held, least recently stored first (expired ones included)."""
        with self._lock:
            return list(self._data)

    def discard(self, keys: Iterable[K]) -> None:
        with self._lock:
            for k in keys:
                self._data.pop(k, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


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


@dataclass(frozen=True, slots=True)
class MovieTotals:
    """What the movies received through /feedback (count, sum, sum of squares; data scale), read at once: by the
    store's movie id, and as arrays for batches."""

    expires: float
    model: PersonalizedModel
    by_key: dict[str, tuple[float, float, float]]
    known: npt.NDArray[np.float64]  # (movies of the model, 3), in the model's order
    unknown_values: npt.NDArray[np.float64]  # (k, 3): the rated movies the model does not know, in ``rows`` order
    # Every movie a batch can find, by its id as the model's lookups spell it (see ``StatePersonalizer._key``) ->
    # its row of ``table``: the model's movies at their positions in the model, then the rated movies the model does
    # not know. A batch finds them all with one lookup; any other id takes the last row.
    rows: dict[Id, int]
    # The movie inputs (count, mean, spread, bias) with these totals added, one row per movie of ``rows`` and a last
    # one for a movie nobody rated that the model does not know (``PersonalizedModel.movie_table``): a batch gathers
    # its rows instead of computing means and spreads per request.
    table: npt.NDArray[np.float64]
    # ``rows`` for its int ids as an array (-1 where it has none), when the model's ids are ints below
    # DENSE_IDS_MAX: a batch's int ids are then looked up by position rather than by hashing (_codec.positions).
    # It holds every non-negative int id of ``rows`` (whose other keys are strings), so a higher id is not there.
    dense: npt.NDArray[np.int32] | None


def _dense_rows(rows: dict[Id, int]) -> npt.NDArray[np.int32] | None:
    """``MovieTotals.dense`` of ``rows``: None if it has no int id or one at or above DENSE_IDS_MAX."""
    ints = [k for k in rows if type(k) is int and k >= 0]
    if not ints or max(ints) >= DENSE_IDS_MAX:
        return None
    dense = np.full(max(ints) + 1, -1, dtype=np.int32)
    dense[ints] = [rows[k] for k in ints]
    return dense


def _inputs(totals: MovieTotals, rows: IntArray) -> tuple[IntArray, npt.NDArray[np.float64]]:
    """(positions in the model, -1 for a movie it does not know; (n, 4) movie inputs) of the movies at ``rows`` of
    ``totals.table``."""
    n = len(totals.known)
    index = rows if len(rows) == 0 or rows.max() < n else np.where(rows < n, rows, -1)
    return index, totals.table[rows]


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
        max_users: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.model: PersonalizedModel | None = None
        # A user's view (their state, with the fold-in solve done): built once per read of the store, not per request,
        # and kept until this replica stores a rating of theirs or the change feed names them.
        self.ttl = ttl
        self._users: TTLCache[str, UserView | None] = TTLCache(
            max(ttl, USER_MAX_AGE_SECONDS) if ttl > 0 else 0.0, max_users, clock
        )
        self._feed_marks: deque[int] = deque(maxlen=FEED_OVERLAP_POLLS)
        self._feed_seen: set[int] = set()  # the row ids of the last poll: a row seen before is not news again
        self._feed_checked = -math.inf
        self._feed_lock = threading.Lock()
        # Users the feed named, whose views ``warm`` builds ahead of their next request (oldest first), while
        # ``warm_ahead`` is set (by keep_warm): a user who rates movies usually asks for recommendations next.
        # keep_warm also polls the feed then, so requests leave the polls to it (a poll after a burst of ratings
        # reads every new row: 68 ms for 60,000, which a request would otherwise wait for).
        self.warm_ahead = False
        self._to_warm: dict[str, None] = {}
        self._warm_lock = threading.Lock()
        # A movie's totals move slowly (one more rating among many): they are kept longer than a user's state, which
        # is what a user's own next prediction must reflect. All of them are read in one query and kept as one
        # dict: a query per request cost a fifth of a /predict, and a TTL entry per movie 2 ms of a 1000-movie batch.
        self._movie_ttl = max(ttl, MOVIE_TTL_SECONDS)
        self._clock = clock
        self._movies: MovieTotals | None = None
        self._movies_lock = threading.Lock()
        self._int_ids = False
        self._use_movie_extra = True

    @property
    def version(self) -> str | None:
        model = self.model
        return None if model is None else model.version

    def set_model(self, model: PersonalizedModel | None) -> None:
        """Install a (new) personalised model; cached state was built against the old one, so it is dropped (and,
        with ``warm_ahead``, its users are queued for ``warm``: they were being asked for)."""
        if self.warm_ahead and model is not None:
            self._queue(self._users.keys())
        self._users.clear()
        self._movies = None
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

    def sync(self) -> None:
        """Forget the users the store got ratings for since the last look, at most once per ``ttl`` seconds (and,
        with ``warm_ahead``, queue them for ``warm``).

        Each poll reads the rows stored after the highest row id seen FEED_OVERLAP_POLLS polls ago, so a row
        committed late is still seen; a user is forgotten for rows the previous poll did not return, not again
        for every poll of the overlap (which threw away views built after the rating, five times over).

        Raises StoreError when the store cannot be read; the cached states are then dropped (they may be stale).
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
                self._forget_queue()
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

    def _forget_queue(self) -> None:
        with self._warm_lock:
            self._to_warm.clear()

    @property
    def to_warm(self) -> int:
        """How many users ``warm`` has yet to build."""
        return len(self._to_warm)

    def warm(self, budget: float) -> int:
        """Build the views of users the change feed named (``sync`` with ``warm_ahead``), oldest first, for about
        ``budget`` seconds at most (at least one user); returns how many are left. Their next request then finds
        its view cached instead of reading and folding in the user's ratings on the request path.

        Reads the store: raises StoreError when it cannot (the user stays queued).
        """
        model = self.model
        if model is None:
            self._forget_queue()
            return 0
        deadline = time.perf_counter() + budget
        while True:
            with self._warm_lock:
                if not self._to_warm:
                    return 0
                user = next(iter(self._to_warm))
                del self._to_warm[user]
            try:
                self.user_view(model, user)  # a user already cached (asked for meanwhile) costs one look-up
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

    def _key(self, movie_id: Id | None) -> Id:
        # No movie id (a /predict without one) is an id no model knows: the movie-side features are missing.
        if movie_id is None:
            return ""
        if self._int_ids and isinstance(movie_id, str) and movie_id.isdigit():
            return int(movie_id)
        if not self._int_ids and isinstance(movie_id, int):
            return str(movie_id)
        return movie_id

    def user_view(self, model: PersonalizedModel, user_id: str) -> UserView | None:
        """The user's view from their stored ratings (cached for ``ttl``); None when the model does not answer for
        them (no ratings, or fewer than its ``min_user_ratings``)."""
        hit, view = self._users.get(user_id)
        if hit:
            return view
        rows = self.store.user_ratings(user_id)
        if rows:
            movie_ids, api_ratings, times = zip(*rows, strict=True)
            # _key of a stored id (always text), inline: a call per rating was a tenth of a miss's own work.
            ids = [int(m) if m.isdigit() else m for m in movie_ids] if self._int_ids else list(movie_ids)
            to_api = model.scale.to_api  # model.from_api, inline
            view = model.user_view_of_ratings(ids, [r / to_api for r in api_ratings], times)
        else:
            view = None
        self._users.put(user_id, view)
        return view

    def movie_totals(self, model: PersonalizedModel) -> MovieTotals:
        """Every movie's (count, sum, sum of squares) of ratings received through /feedback, on the data scale;
        read from the store at most every MOVIE_TTL_SECONDS."""
        cached = self._movies
        if cached is not None and cached.expires >= self._clock() and cached.model is model:
            return cached
        with self._movies_lock:  # one reader refreshes; the others wait for its result rather than query too
            cached = self._movies
            if cached is not None and cached.expires >= self._clock() and cached.model is model:
                return cached
            scale = model.from_api(1.0)
            # A model trained from the store already counts its ratings (see set_model): nothing to add then.
            counts = self.store.all_movie_counts() if self._use_movie_extra else {}
            by_key = {k: (float(c.n), c.rating_sum * scale, c.rating_sumsq * scale**2) for k, c in counts.items()}
            known = np.zeros((len(model.mf.item_ids), 3))
            unknown: dict[str, tuple[float, float, float]] = {}  # by the store's id, in the store's order
            index = model.mf.item_index
            for k, value in by_key.items():
                i = index.get(self._key(k), -1)
                if i >= 0:
                    known[i] = value
                else:
                    unknown[k] = value
            unknown_values = np.array(list(unknown.values()), dtype=np.float64).reshape(len(unknown), 3)
            table = model.movie_table(known)
            rows: dict[Id, int] = model.mf.item_index
            if unknown:
                n = len(known)
                rows = dict(rows)  # the model's own index stays as it is: the rated unknown movies go on a copy
                rows.update({self._key(k): n + row for row, k in enumerate(unknown)})
                table = np.vstack([table[:n], model.unknown_movie_columns(unknown_values), table[n:]])
            dense = _dense_rows(rows) if self._int_ids else None
            cached = MovieTotals(
                self._clock() + self._movie_ttl, model, by_key, known, unknown_values, rows, table, dense
            )
            self._movies = cached
            return cached

    def movie_extra(self, model: PersonalizedModel, movie_ids: Sequence[Id | None]) -> npt.NDArray[np.float64]:
        """(n, 3) count, sum, sum of squares (data scale) of what each movie got through /feedback."""
        totals = self.movie_totals(model)
        rows = self._rows(totals, movie_ids)
        n, k = len(totals.known), len(totals.unknown_values)
        out: npt.NDArray[np.float64] = np.zeros((len(rows), 3))
        known = rows < n
        out[known] = totals.known[rows[known]]
        rated = (rows >= n) & (rows < n + k)
        out[rated] = totals.unknown_values[rows[rated] - n]
        return out

    def movie_inputs(
        self, model: PersonalizedModel, movie_ids: Sequence[Id | None]
    ) -> tuple[IntArray, npt.NDArray[np.float64]]:
        """(positions in the model, -1 for a movie it does not know; (n, 4) movie inputs) of a batch's movies: rows
        of ``PersonalizedModel.movie_table`` with /feedback's totals."""
        totals = self.movie_totals(model)
        return _inputs(totals, self._rows(totals, movie_ids))

    def _rows(self, totals: MovieTotals, movie_ids: Sequence[Id | None]) -> IntArray:
        """Each movie's row of ``totals.table`` (its last row for a movie neither the model nor /feedback knows)."""
        default = len(totals.table) - 1
        if _codec is not None and totals.dense is not None and type(movie_ids) is list:
            rows: IntArray = np.empty(len(movie_ids), dtype=np.int64)
            if _codec.positions(movie_ids, totals.rows, default, rows, totals.dense, True) == 0:
                return rows  # every id an int, as the model spells its ids: no other spelling to try
        return lookup(totals.rows, self._keys(movie_ids), default)

    def movie_extra_one(self, model: PersonalizedModel, movie_id: Id | None) -> tuple[float, float, float]:
        """``movie_extra`` of one movie, as a tuple."""
        return self.movie_totals(model).by_key.get("" if movie_id is None else str(movie_id), _NO_RATINGS)

    def _keys(self, movie_ids: Sequence[Id | None]) -> list[Id]:
        """``_key`` of every id; a batch of ids already of the model's type (the usual case) is taken as it is."""
        kinds = set(map(type, movie_ids))
        if kinds == ({int} if self._int_ids else {str}):
            return list(movie_ids)  # type: ignore[arg-type]  # None is not among the types
        return [self._key(m) for m in movie_ids]

    def _read(
        self, user_id: Id, movies: Callable[[PersonalizedModel], T]
    ) -> tuple[PersonalizedModel, UserView, T] | None:
        """The model, the user's view and ``movies(model)`` (what the request needs of the movie totals), read
        together; None when there is no model, the user has no view, or the store is down (logged)."""
        model = self.model  # read once: a concurrent set_model must not mix two models in one answer
        if model is None:
            return None
        try:
            if not self.warm_ahead:  # else keep_warm polls
                self.sync()
            view = self.user_view(model, str(user_id))
            if view is None:
                return None
            return model, view, movies(model)
        except StoreError as exc:
            # The store is down: answer with the six-feature model rather than fail the prediction.
            log.warning("user state unavailable", extra={"reason": str(exc)})
            return None

    def predict_one(self, user_id: Id, movie_id: Id | None, row: list[float]) -> float | None:
        """/predict's answer for a known user (0-10), or None: ``__call__`` of one movie, on Python floats from
        end to end (``row``: the six features). The arrays ``__call__`` returns cost 2 us of a 22 us request."""
        # (No totals for a model trained from the store: movie_totals leaves them empty, see set_model.)
        read = self._read(user_id, lambda model: self.movie_extra_one(model, movie_id))
        if read is None:
            return None
        model, view, extra = read
        one = model.predict_view_one(view, self._key(movie_id), row, movie_extra=extra)
        return None if one is None else min(max(one * model.scale.to_api, 0.0), 10.0)

    def __call__(
        self, user_id: Id, movie_ids: Sequence[Id | None], x: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None:
        if len(movie_ids) == 1:
            one = self.predict_one(user_id, movie_ids[0], x[0].tolist())
            return None if one is None else (np.array([one]), np.ones(1, dtype=bool))
        read = self._read(user_id, self.movie_totals)
        if read is None:
            return None
        model, view, totals = read
        rows = self._rows(totals, movie_ids)
        if model.config.personalize == "known_user":  # every movie answered: the matrix in one pass
            pred = model.predict_table(view, x, rows, totals.table)
            return model.to_api(pred, in_place=True), np.ones(len(rows), dtype=bool)
        index, columns = _inputs(totals, rows)
        pred, mask = model.predict_view(view, self._keys(movie_ids), x, index=index, movie_columns=columns)
        if not mask.any():
            return None
        return model.to_api(np.where(mask, pred, 0.0)), mask


def _by_latest_row(rows: Iterable[tuple[int, str]]) -> dict[str, None]:
    """The users of (row id, user) rows in row order, each placed by their latest row (oldest first)."""
    users: dict[str, None] = {}
    for _, user in rows:
        users.pop(user, None)
        users[user] = None
    return users


async def keep_warm(personalizer: StatePersonalizer, share: float) -> None:
    """A worker's background task (the app's lifespan runs it): every ``personalizer.ttl`` seconds, poll the change
    feed and build the views of the users it names, before their next request asks for them.

    A user who rates movies usually asks for recommendations next, on whichever worker their request lands: without
    this, that request (one per worker) pays the read of their ratings and the fold-in, ~30 us instead of ~1 us for
    a cached view. The views are built in slices of WARM_SLICE_SECONDS with the event loop free between them, and for
    at most ``share`` of each period, so requests keep priority. The task takes the polls off the request path
    (``warm_ahead``). Runs until cancelled; a store that cannot be read is logged and tried again at the
    next period.
    """
    personalizer.warm_ahead = True
    period = personalizer.ttl
    try:
        await _warm_loop(personalizer, share, period)
    finally:  # as without this task: requests poll again, and nothing is built ahead
        personalizer.warm_ahead = False
        personalizer._forget_queue()


async def _warm_loop(personalizer: StatePersonalizer, share: float, period: float) -> None:
    while True:
        spent = 0.0
        try:
            if personalizer.model is None:  # nothing is personalised: no state to keep, no feed to read
                await asyncio.sleep(period)
                continue
            personalizer.sync()
            while personalizer.to_warm and spent < share * period:
                started = time.perf_counter()
                personalizer.warm(WARM_SLICE_SECONDS)
                spent += time.perf_counter() - started
                await asyncio.sleep(0)
        except StoreError as exc:
            log.warning("user states not built ahead", extra={"reason": str(exc)})
        except Exception:  # a bug here must not end the task: requests still build views on their own
            log.exception("user states not built ahead")
        await asyncio.sleep(period)
