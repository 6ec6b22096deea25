"""The journal of predictions: every answer served, queued in memory and written to the store in bulk, off the
request path.

A request adds one entry to a bounded in-memory queue (an append: the answer does not wait for any I/O); a
background task (``run``) takes what is queued every ``interval`` seconds and writes it in one transaction, in a
worker thread, one row per request (``tables.prediction_log_table``). It spends at most ``share`` of the worker's
time doing so: a worker answering at full speed logs what that share allows and counts the rest as dropped, rather
than slowing every answer down. When the queue is full (``max_rows`` predictions), new entries are dropped and
counted; the answers never wait.

What a crash can lose: what is queued (at most ``interval`` seconds of answers, and what a store outage held back,
up to ``max_rows``); a clean stop (SIGTERM) writes the queue before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
import orjson

from moviematch_ml.errors import InputError, StoreError
from moviematch_ml.features import N_FEATURES

if TYPE_CHECKING:
    from moviematch_ml.online.store import FeedbackStore

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Id = str | int
MIXED: Final[str] = "mixed"
PRUNE_EVERY_SECONDS: Final[float] = 3600.0
PRUNE_CHUNK: Final[int] = 10_000


@dataclass(slots=True)
class Entry:
    """One answered request, as the request path hands it over: its arrays are kept, not copied.

    ``x`` (and ``movie_ids``) are None for an answer served from the cache (its body was not decoded): ``body``
    then holds the request, decoded when the entry is written.
    """

    request_id: str
    logged_at: float
    endpoint: str  # "predict" or "predict_batch"
    variant: str
    model_version: str
    user_id: Id | None
    movie_ids: Sequence[Id | None] | None
    x: FloatArray | None
    predictions: Sequence[float]
    source: str
    row_sources: list[str] | None
    ranked: bool = False
    top_k: int | None = None
    body: bytes | None = None

    def packed(self) -> Packed:
        """The fields as a plain tuple, in declaration order: what the queue holds (see ``PredictionLog.add``)."""
        return (
            self.request_id,
            self.logged_at,
            self.endpoint,
            self.variant,
            self.model_version,
            self.user_id,
            self.movie_ids,
            self.x,
            self.predictions,
            self.source,
            self.row_sources,
            self.ranked,
            self.top_k,
            self.body,
        )


PREDICTIONS: Final = 8  # Packed's index of the predictions

# An entry as the queue holds it: Entry's fields, in order, in a plain tuple.
Packed = tuple[
    str,
    float,
    str,
    str,
    str,
    Id | None,
    Sequence[Id | None] | None,
    FloatArray | None,
    Sequence[float],
    str,
    list[str] | None,
    bool,
    int | None,
    bytes | None,
]


class PredictionLog:
    """The queue and its writer (see the module). ``decode`` turns a cached answer's body back into its features and
    movie ids (when it is written, off the request path)."""

    def __init__(
        self,
        *,
        max_rows: int,
        share: float = 0.05,
        decode: Callable[[bytes], tuple[FloatArray, Sequence[Id | None]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_rows = max_rows
        self.share = share
        self._decode = decode
        self._clock = clock
        self._queue: deque[Packed] = deque()
        self._rows = 0
        self.written = 0  # predictions written
        self.dropped = 0  # predictions not logged: the queue was full, or they could not be written
        self.on_dropped: Callable[[int], None] | None = None  # the metrics' counters
        self.on_written: Callable[[int], None] | None = None
        self.on_queued: Callable[[float], None] | None = None  # the queue's depth, at each write
        self._busy_until = 0.0

    @property
    def paused_until(self) -> float:
        """Until when (its clock) new entries are dropped: the writer spent its share of the worker's time."""
        return self._busy_until

    @property
    def queued(self) -> int:
        """Predictions waiting to be written."""
        return self._rows

    def add(self, entry: Entry) -> None:
        """Queue an answered request (the request path: no I/O, no copy of its arrays).

        The queue holds the entry's fields in a plain tuple, not the Entry. Under load thousands of entries wait
        there for up to ``interval`` seconds: long enough for the garbage collector to move them into its older
        generations, whose every collection walks each object still in them. A tuple of atomic values (strings,
        numbers, bytes, None, tuples of those, arrays) is dropped from the collector's sight the first time it is
        seen, so a /predict's entry, whose ids and prediction the request path passes as tuples, costs the
        collections nothing: with Entry objects queued, a saturated worker's collections paused it for 20-60 ms
        (docs/operations.md, Overload)."""
        n = len(entry.predictions)
        if self._rows + n > self.max_rows or self._clock() < self._busy_until:
            self._drop(n)
            return
        self._queue.append(entry.packed())
        self._rows += n

    def take(self) -> list[Packed]:
        """Everything queued, oldest first (``Entry(*packed)`` is the entry)."""
        out = []
        while self._queue:
            out.append(self._queue.popleft())
        self._rows = 0
        return out

    def _drop(self, n: int) -> None:
        self.dropped += n
        if self.on_dropped is not None:
            self.on_dropped(n)

    def rows(self, entries: Sequence[Entry | Packed]) -> list[tuple[object, ...]]:
        """The table rows of entries, their values in ``PREDICTION_LOG_COLUMNS`` order (in a worker thread:
        serialising a big batch takes a while)."""
        out: list[tuple[object, ...]] = []
        for e in entries:
            (request_id, logged_at, endpoint, variant, version, user_id, movie_ids, x, predictions, source,
             row_sources, ranked, top_k, body) = e.packed() if isinstance(e, Entry) else e  # fmt: skip
            n = len(predictions)
            if x is None or movie_ids is None:
                x, movie_ids = self._decoded(body, n)
            out.append(
                (
                    request_id,
                    logged_at,
                    endpoint,
                    variant,
                    version,
                    None if user_id is None else str(user_id),
                    n,
                    orjson.dumps(list(movie_ids)).decode(),
                    np.ascontiguousarray(x, dtype="<f8").tobytes(),
                    np.asarray(predictions, dtype="<f8").tobytes(),
                    source,
                    None if row_sources is None else orjson.dumps(row_sources).decode(),
                    ranked,
                    top_k,
                )
            )
        return out

    def _decoded(self, body: bytes | None, n: int) -> tuple[FloatArray, Sequence[Id | None]]:
        if self._decode is not None and body is not None:
            try:
                x, ids = self._decode(body)
                if x.shape == (n, N_FEATURES) and len(ids) == n:
                    return x, ids
            except (InputError, ValueError):  # a body that no longer decodes: its row keeps NaN features
                pass
        return np.full((n, N_FEATURES), np.nan), [None] * n

    def write(self, store: FeedbackStore, entries: Sequence[Packed]) -> None:
        """Write entries, as ``take`` gives them (blocking); on a store failure they are counted as dropped and the
        error re-raised."""
        n = sum(len(e[PREDICTIONS]) for e in entries)
        try:
            store.log_predictions(self.rows(entries))
        except StoreError:
            self._drop(n)
            raise
        self.written += n
        if self.on_written is not None:
            self.on_written(n)

    async def run(
        self,
        store: FeedbackStore,
        *,
        interval: float = 1.0,
        retention_seconds: float | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Write what is queued every ``interval`` seconds, for ever (cancel it to stop; ``flush`` then), and delete
        rows older than ``retention_seconds`` once an hour."""
        next_prune = self._clock()
        while True:
            await asyncio.sleep(interval)
            if self.on_queued is not None:
                self.on_queued(self._rows)
            entries = self.take()
            if entries:
                started = self._clock()
                try:
                    with anyio.fail_after(timeout):
                        await anyio.to_thread.run_sync(self.write, store, entries, abandon_on_cancel=True)
                except (StoreError, TimeoutError) as exc:
                    log.warning(
                        "prediction log not written", extra={"reason": str(exc) or "timeout", "rows": len(entries)}
                    )
                spent = self._clock() - started
                # Within its share of the worker's time: after spending `spent`, stay away for spent * (1-s)/s,
                # refusing entries meanwhile (what a saturated worker cannot afford to log is counted, not queued).
                if self.share < 1.0:
                    self._busy_until = self._clock() + max(0.0, spent * (1.0 - self.share) / self.share - interval)
            if retention_seconds is not None and self._clock() >= next_prune:
                next_prune = self._clock() + PRUNE_EVERY_SECONDS
                await self._prune(store, retention_seconds, timeout)

    async def _prune(self, store: FeedbackStore, retention_seconds: float, timeout: float) -> None:
        before = time.time() - retention_seconds
        try:
            with anyio.fail_after(timeout):
                deleted = await anyio.to_thread.run_sync(prune, store, before, abandon_on_cancel=True)
        except (StoreError, TimeoutError) as exc:
            log.warning("prediction log not pruned", extra={"reason": str(exc) or "timeout"})
            return
        if deleted:
            log.info("prediction log pruned", extra={"rows": deleted, "before": before})

    async def flush(self, store: FeedbackStore, *, timeout: float = 5.0) -> None:
        """Write what is queued now (at shutdown), for at most ``timeout`` seconds."""
        entries = self.take()
        if not entries:
            return
        try:
            with anyio.fail_after(timeout):
                await anyio.to_thread.run_sync(self.write, store, entries, abandon_on_cancel=True)
        except (StoreError, TimeoutError) as exc:
            log.warning("prediction log not written at shutdown", extra={"reason": str(exc) or "timeout"})


@dataclass(frozen=True, slots=True)
class Served:
    """One logged prediction, unpacked from its request's row: what ``ab-report`` and ``train --from-feedback``
    join the ratings to. ``features`` are the six the backend sent (NaN when the row could not be decoded)."""

    prediction_id: str
    logged_at: float
    variant: str
    model_version: str
    user_id: str | None
    movie_id: str | None
    features: tuple[float, ...]
    prediction: float
    source: str


def served(row: Mapping[str, Any]) -> list[Served]:
    """The predictions of one prediction-log row (the inverse of ``PredictionLog.rows``), in request order, with
    their prediction ids: ``request_id`` for /predict, ``<request_id>-<i>`` for row i of a batch."""
    n = int(row["n"])
    movie_ids = orjson.loads(row["movie_ids"])
    x = np.frombuffer(row["features"], dtype="<f8").reshape(n, N_FEATURES)
    predictions = np.frombuffer(row["predictions"], dtype="<f8")
    sources = orjson.loads(row["row_sources"]) if row["row_sources"] else [row["source"]] * n
    request_id = str(row["request_id"])
    batch = row["endpoint"] != "predict"
    user = row["user_id"]
    return [
        Served(
            f"{request_id}-{i}" if batch else request_id,
            float(row["logged_at"]),
            str(row["variant"]),
            str(row["model_version"]),
            None if user is None else str(user),
            None if movie_ids[i] is None else str(movie_ids[i]),
            tuple(x[i].tolist()),
            float(predictions[i]),
            str(sources[i]),
        )
        for i in range(n)
    ]


def read(store: FeedbackStore, *, until: float | None = None) -> Iterator[Served]:
    """Every prediction logged at or before ``until``, oldest first (what ``offline.joins`` joins ratings to)."""
    for row in store.iter_prediction_log(until=until):
        yield from served(row)


def prune(store: FeedbackStore, before: float, *, chunk: int = PRUNE_CHUNK) -> int:
    """Delete every prediction-log row logged before ``before`` (unix seconds), chunk by chunk; how many."""
    total = 0
    while True:
        deleted = store.prune_predictions(before, limit=chunk)
        total += deleted
        if deleted < chunk:
            return total
