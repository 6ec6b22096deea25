"""The feedback store: the app's ratings and per-movie totals in SQLite (default) or PostgreSQL, via SQLAlchemy.

The database is the one place replicas share: every replica writes ratings and reads them here, so two service
processes behind Railway's load balancer see the same users. Writes are one transaction each (the ratings and
the totals they change commit together), so a 2xx from /feedback means the rating is on disk.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast

import anyio
import anyio.to_thread
from sqlalchemy import Connection, Engine, Table, bindparam, create_engine, event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from moviematch_ml.errors import ConfigError, MissingExtraError, StoreError
from moviematch_ml.online import migrations
from moviematch_ml.online.counters import NO_CALLS, CallTimer
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.tables import (
    PREDICTION_LOG_COLUMNS,
    feedback_table,
    movie_state_table,
    prediction_log_table,
)


@dataclass(frozen=True, slots=True)
class Counts:
    """Running totals of ratings (0-10 scale) for one user or movie."""

    n: int
    rating_sum: float
    rating_sumsq: float

    @property
    def mean(self) -> float:
        return self.rating_sum / self.n if self.n else 0.0


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What one write did: for each submitted rating, whether it was newly stored or a duplicate."""

    stored: tuple[bool, ...]

    @property
    def accepted(self) -> int:
        return sum(self.stored)

    @property
    def duplicates(self) -> int:
        return len(self.stored) - self.accepted


def engine_url(url: str) -> str:
    """Normalise a DATABASE_URL: Railway and Heroku hand out ``postgres://``; we drive PostgreSQL with psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith(("sqlite://", "postgresql+psycopg://")):
        return url
    raise ConfigError(f"DATABASE_URL must start with sqlite:// or postgresql:// (got {url.split(':', 1)[0]}://...)")


def _failures() -> tuple[type[BaseException], ...]:
    """What a store call raises when the database cannot answer: SQLAlchemy's errors, and the drivers' own, which
    the connection pool lets through unwrapped when it cannot open a connection."""
    failures: list[type[BaseException]] = [SQLAlchemyError, sqlite3.Error, OSError]
    try:
        import psycopg

        failures.append(psycopg.Error)
    except ImportError:  # pragma: no cover - PostgreSQL is optional
        pass
    return tuple(failures)


FAILURES: Final[tuple[type[BaseException], ...]] = _failures()


def make_engine(url: str, *, connect_timeout: float = 3.0, statement_timeout: float = 5.0) -> Engine:
    """Create the engine; SQLite gets WAL with synchronous=FULL so a commit survives a power cut. PostgreSQL gets a
    connect timeout (also the wait for a pooled connection) and a statement timeout, so that a database that hangs
    fails calls instead of holding them forever."""
    real = engine_url(url)
    if real.startswith("sqlite"):
        engine = create_engine(real, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # SQLAlchemy would import the driver here and fail with a bare ModuleNotFoundError.
    MissingExtraError.require("psycopg", extra="postgres", setting="DATABASE_URL=postgresql://...")
    # connect_args replace the URL's own parameters of the same name: the statement timeout joins its options.
    options = " ".join(
        filter(
            None,
            [str(make_url(real).query.get("options", "")), f"-c statement_timeout={round(statement_timeout * 1000)}"],
        )
    )
    return create_engine(
        real,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=connect_timeout,
        connect_args={"connect_timeout": max(1, math.ceil(connect_timeout)), "options": options},  # libpq: whole s
    )


def _insert(conn: Connection, table: Table) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


P = ParamSpec("P")
R = TypeVar("R")


Method = Callable[Concatenate["FeedbackStore", P], R]


def _timed(operation: str) -> Callable[[Method[P, R]], Method[P, R]]:
    """Time the store method as ``operation`` (its latency, and a failure when it raises) with the store's ``calls``."""

    def wrap(method: Method[P, R]) -> Method[P, R]:
        @functools.wraps(method)
        def timed(self: FeedbackStore, *args: P.args, **kwargs: P.kwargs) -> R:
            with self.calls.time(operation):
                return method(self, *args, **kwargs)

        return cast(Method[P, R], timed)

    return wrap


class FeedbackStore:
    """Durable, idempotent storage of feedback ratings and the running per-movie totals."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Each call's latency and failures, by operation (the service's metrics set this; none by default).
        self.calls: CallTimer = NO_CALLS
        # The one read on the prediction path (a user's ratings, on a cache miss), compiled once for the dialect and
        # run on the driver's cursor: SQLAlchemy's per-execution work costs several times the query itself on
        # SQLite; on PostgreSQL the round trip dominates either way.
        q = (
            select(feedback_table.c.movie_id, feedback_table.c.rating, feedback_table.c.rated_at)
            .where(feedback_table.c.user_id == bindparam("user_id"))
            .order_by(feedback_table.c.id)
        )
        compiled = q.compile(dialect=engine.dialect)
        self._user_ratings_sql = str(compiled)
        self._positional = compiled.positional
        # The prediction log's insert, for the driver's executemany with rows of values (log_predictions).
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"  # sqlite3; psycopg
        columns = ", ".join(PREDICTION_LOG_COLUMNS)
        marks = ", ".join([mark] * len(PREDICTION_LOG_COLUMNS))
        self._log_insert = f"INSERT INTO {prediction_log_table.name} ({columns}) VALUES ({marks})"
        # On a SQLite file that read runs on connections of its own, taken out of the engine's pool (with their
        # pragmas) and kept in a list: checking one out of SQLAlchemy's pool and resetting it on return costs as
        # much as the read of a few ratings. list.pop and list.append are atomic, so each thread of anyio's pool
        # gets a connection nobody else uses; the list grows to the number of concurrent reads. A SELECT in
        # sqlite3's default mode opens no transaction, so every read sees the latest commit. (In-memory SQLite,
        # which SQLAlchemy keeps in another kind of pool, is one database per connection, and PostgreSQL needs the
        # pool's pre-ping: both keep the pool.)
        self._own_readers = engine.dialect.name == "sqlite" and isinstance(engine.pool, QueuePool)  # a file
        self._readers: list[Any] = []
        self._autocommit_reads = engine.dialect.name == "postgresql"  # psycopg: see user_ratings
        # Whether ``migrate`` has succeeded: a database that was down at start-up is migrated by the first write or
        # health probe that reaches it, not never (it would answer every /feedback with "no such table").
        self.migrated = False

    @classmethod
    def from_url(cls, url: str, *, migrate: bool = True) -> FeedbackStore:
        store = cls(make_engine(url))
        if migrate:
            store.migrate()
        return store

    @_timed("migrate")
    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to run from several replicas at once)."""
        try:
            migrations.upgrade(self.engine)
        except FAILURES as exc:
            # The class only: the driver's message names hosts, roles and files, and this reason reaches /health.
            raise StoreError(f"could not migrate the feedback store: {exc.__class__.__name__}") from exc
        self.migrated = True

    def _ensure_migrated(self) -> None:
        if not self.migrated:
            self.migrate()

    @property
    def idle_readers(self) -> tuple[Any, ...]:
        """The SQLite connections of its own that ``user_ratings`` keeps between reads (see ``__init__``), idle at
        this moment; always empty for PostgreSQL and in-memory SQLite (read-only: for tests and diagnostics)."""
        return tuple(self._readers)

    def close(self) -> None:
        self._own_readers = False  # a read after close goes through the (disposed, reopening) pool
        while self._readers:
            self._readers.pop().close()
        self.engine.dispose()

    @_timed("add")
    def add(self, ratings: Sequence[Feedback], *, received_at: float | None = None) -> StoreResult:
        """Store ratings not seen before (by ``feedback_id``) and the movie totals they change, in one transaction."""
        if not ratings:
            return StoreResult(())
        self._ensure_migrated()
        now = time.time() if received_at is None else received_at
        rows = [
            {
                "feedback_id": r.feedback_id,
                "user_id": r.user_id,
                "movie_id": r.movie_id,
                "rating": r.rating,
                "rated_at": r.rated_at,
                "received_at": now,
                "prediction_id": r.prediction_id,
            }
            for r in ratings
        ]
        try:
            with self.engine.begin() as conn:
                # One single-row statement executed with many parameter sets (SQLAlchemy batches them into multi-row
                # INSERTs itself, and compiles the statement once), not .values(rows): a statement with the rows
                # inlined is compiled anew on every request (SQLAlchemy does not cache those), thousands of
                # bind-parameter objects each time, ten times slower and four times the memory kept.
                stmt = (
                    _insert(conn, feedback_table)
                    .on_conflict_do_nothing(index_elements=["feedback_id"])
                    .returning(feedback_table.c.feedback_id)
                )
                new_ids = {row[0] for row in conn.execute(stmt, rows)}
                stored: list[bool] = []
                seen: set[str] = set()
                for r in ratings:
                    # A key repeated inside one request is stored once: its first occurrence.
                    is_new = r.feedback_id in new_ids and r.feedback_id not in seen
                    seen.add(r.feedback_id)
                    stored.append(is_new)
                fresh = [r for r, s in zip(ratings, stored, strict=True) if s]
                self._bump(conn, movie_state_table, "movie_id", ((r.movie_id, r.rating) for r in fresh), now)
        except FAILURES as exc:
            raise StoreError(f"could not store feedback: {exc.__class__.__name__}") from exc
        return StoreResult(tuple(stored))

    @_timed("log_predictions")
    def log_predictions(self, rows: Sequence[Sequence[object]]) -> None:
        """Append rows (their values in ``tables.PREDICTION_LOG_COLUMNS`` order) to the prediction log in one
        transaction. Straight to the driver's executemany: SQLAlchemy's insert processes every row's parameters in
        Python, which held the GIL for most of the writer's time, away from the event loop."""
        if not rows:
            return
        self._ensure_migrated()
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(self._log_insert, list(rows))
        except FAILURES as exc:
            raise StoreError(f"could not write the prediction log: {exc.__class__.__name__}") from exc

    @_timed("prune_predictions")
    def prune_predictions(self, before: float, *, limit: int = 10_000) -> int:
        """Delete up to ``limit`` prediction-log rows logged before ``before`` (unix seconds), oldest first; how many
        were deleted. Small chunks keep each transaction (and the lock it holds) short: call it until it returns 0."""
        t = prediction_log_table
        oldest = select(t.c.id).where(t.c.logged_at < before).order_by(t.c.id).limit(limit)
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(t.delete().where(t.c.id.in_(oldest))).rowcount or 0)
        except FAILURES as exc:
            raise StoreError(f"could not prune the prediction log: {exc.__class__.__name__}") from exc

    @staticmethod
    def _bump(conn: Connection, table: Table, key: str, pairs: Iterable[tuple[str, float]], now: float) -> None:
        totals: dict[str, list[float]] = {}
        for k, rating in pairs:
            t = totals.setdefault(k, [0.0, 0.0, 0.0])
            t[0] += 1
            t[1] += rating
            t[2] += rating * rating
        if not totals:
            return
        values = [
            {key: k, "n": int(t[0]), "rating_sum": t[1], "rating_sumsq": t[2], "updated_at": now}
            for k, t in sorted(totals.items())  # sorted: a fixed lock order, so two writers cannot deadlock
        ]
        stmt = _insert(conn, table)
        # Increments, not overwrites: two replicas adding ratings for the same user at once both count.
        stmt = stmt.on_conflict_do_update(
            index_elements=[key],
            set_={
                "n": table.c.n + stmt.excluded.n,
                "rating_sum": table.c.rating_sum + stmt.excluded.rating_sum,
                "rating_sumsq": table.c.rating_sumsq + stmt.excluded.rating_sumsq,
                "updated_at": stmt.excluded.updated_at,
            },
        )
        conn.execute(stmt, values)  # executemany, in the sorted order (see add())

    @_timed("ping")
    def ping(self) -> None:
        """Raise StoreError unless the database takes a write (migrating it first if that has not succeeded yet).

        The probe is a DELETE that matches no row, rolled back: a read-only store (SQLite opened read-only, a
        PostgreSQL standby or read-only role) refuses it as it would refuse a rating, where ``SELECT 1`` answers. It
        writes no page, so a full disk shows only when a real write fails (``StoreHealth.failed(write=True)``)."""
        self._ensure_migrated()
        try:
            with self.engine.connect() as conn, conn.begin() as tx:
                conn.execute(feedback_table.delete().where(feedback_table.c.id < 0))
                tx.rollback()
        except FAILURES as exc:
            raise StoreError(f"the feedback store cannot write: {exc.__class__.__name__}") from exc

    @_timed("last_row_id")
    def last_row_id(self) -> int:
        """The highest feedback row id stored so far (0 when empty): where a change feed starts."""
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(select(func.max(feedback_table.c.id))).scalar_one() or 0)
        except FAILURES as exc:
            raise StoreError(f"could not read feedback: {exc.__class__.__name__}") from exc

    @_timed("changed_rows")
    def changed_rows(self, after_id: int) -> list[tuple[int, str]]:
        """(row id, user id) of every rating stored after row ``after_id``, by row id: the change feed replicas
        poll to drop (and rebuild) the cached state of users whose ratings another replica stored. Row ids rather
        than one line per user, so that a poller can tell the rows it has already seen from new ones."""
        t = feedback_table
        q = select(t.c.id, t.c.user_id).where(t.c.id > after_id).order_by(t.c.id)
        try:
            with self.engine.connect() as conn:
                return [(int(i), str(u)) for i, u in conn.execute(q)]
        except FAILURES as exc:
            raise StoreError(f"could not read feedback: {exc.__class__.__name__}") from exc

    @_timed("movie_counts")
    def all_movie_counts(self) -> dict[str, Counts]:
        """Every rated movie's totals in one query (one row per movie the app's users rated)."""
        t = movie_state_table
        q = select(t.c.movie_id, t.c.n, t.c.rating_sum, t.c.rating_sumsq)
        try:
            with self.engine.connect() as conn:
                return {k: Counts(int(n), float(s), float(ss)) for k, n, s, ss in conn.execute(q)}
        except FAILURES as exc:
            raise StoreError(f"could not read {t.name}: {exc.__class__.__name__}") from exc

    @_timed("user_ratings")
    def user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
        """The user's ratings in arrival order (movie_id, rating, rated_at): what the collaborative fold-in needs."""
        if self._own_readers:
            return self._sqlite_user_ratings(user_id)
        params: Any = (user_id,) if self._positional else {"user_id": user_id}
        try:
            conn = self.engine.raw_connection()
        except FAILURES as exc:
            raise StoreError(f"could not read feedback: {exc.__class__.__name__}") from exc
        try:
            if self._autocommit_reads:
                # In autocommit the read is one round trip: no BEGIN before it, no COMMIT after it (four round trips
                # with the pool's pre-ping became two; what a user's first request waits on a distant database). Set
                # back before the connection returns to the pool: a write must run in a transaction. Should that
                # fail, the connection is invalidated below, never reused.
                driver: Any = conn.driver_connection
                driver.autocommit = True
                try:
                    rows = self._fetch_user_ratings(conn, params)
                finally:
                    driver.autocommit = False
            else:
                rows = self._fetch_user_ratings(conn, params)
                conn.commit()  # ends the read transaction the driver may have opened, as SQLAlchemy would
        except FAILURES as exc:
            conn.invalidate()  # a broken connection must not go back to the pool
            raise StoreError(f"could not read feedback: {exc.__class__.__name__}") from exc
        finally:
            conn.close()
        return [(m, float(r), float(t)) for m, r, t in rows]

    def _fetch_user_ratings(self, conn: Any, params: Any) -> list[tuple[str, float, float]]:
        cur = conn.cursor()
        cur.execute(self._user_ratings_sql, params)
        rows: list[tuple[str, float, float]] = cur.fetchall()
        cur.close()
        return rows

    def _sqlite_user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
        """``user_ratings`` on one of the store's own SQLite connections (see ``__init__``)."""
        try:
            conn = self._readers.pop()
        except IndexError:
            try:
                fairy = self.engine.raw_connection()  # a new connection, with the engine's connect-time pragmas
                fairy.detach()  # ... which leaves the pool: closing it closes it, the pool opens another if needed
            except FAILURES as exc:
                raise StoreError(f"could not read feedback: {exc.__class__.__name__}") from exc
            conn = fairy.dbapi_connection
        try:
            rows: list[tuple[str, float, float]] = conn.execute(self._user_ratings_sql, (user_id,)).fetchall()
            if conn.in_transaction:  # not in sqlite3's default mode; never keep a snapshot open if it ever is
                conn.rollback()
        except FAILURES as exc:
            conn.close()  # a connection that failed is not reused
            raise StoreError(f"could not read feedback: {exc.__class__.__name__}") from exc
        self._readers.append(conn)
        # Already (str, float, float): rating and rated_at have REAL affinity, so SQLite stores even an integer
        # as a float (no conversion needed).
        return rows

    def iter_ratings(self, batch: int = 10_000) -> Iterator[tuple[int, str, str, float, float]]:
        """Every stored rating (row id, user_id, movie_id, rating 0-10, rated_at) in arrival order, for retraining.

        Reads up to the highest row id present when reading starts: a consistent cut, so ratings stored meanwhile
        are left for the next read instead of half-appearing.
        """
        t = feedback_table
        cols = (t.c.id, t.c.user_id, t.c.movie_id, t.c.rating, t.c.rated_at)
        try:
            with self.engine.connect() as conn:
                top = conn.execute(select(func.max(t.c.id))).scalar_one()
                last = 0
                while top is not None and last < top:
                    q = select(*cols).where(t.c.id > last, t.c.id <= top).order_by(t.c.id).limit(batch)
                    rows = conn.execute(q).all()
                    if not rows:
                        return
                    for row_id, u, m, r, ts in rows:
                        yield int(row_id), u, m, float(r), float(ts)
                    last = int(rows[-1][0])
        except FAILURES as exc:
            raise StoreError(
                f"could not read feedback ({exc.__class__.__name__}): is this the service's database?"
            ) from exc

    def iter_feedback(
        self, *, since: float | None = None, until: float | None = None, batch: int = 10_000
    ) -> Iterator[tuple[int, str, str, float, float, str | None]]:
        """Every stored rating (row id, user_id, movie_id, rating 0-10, rated_at, prediction_id) whose ``rated_at``
        is in [since, until], in arrival order, up to the highest row id present when reading starts (what
        ``ab-report`` and ``train --from-feedback`` join to the prediction log)."""
        t = feedback_table
        cols = (t.c.id, t.c.user_id, t.c.movie_id, t.c.rating, t.c.rated_at, t.c.prediction_id)
        window = []
        if since is not None:
            window.append(t.c.rated_at >= since)
        if until is not None:
            window.append(t.c.rated_at <= until)
        try:
            with self.engine.connect() as conn:
                top = conn.execute(select(func.max(t.c.id))).scalar_one()
                last = 0
                while top is not None and last < top:
                    q = select(*cols).where(t.c.id > last, t.c.id <= top, *window).order_by(t.c.id).limit(batch)
                    rows = conn.execute(q).all()
                    if not rows:
                        return
                    for row_id, u, m, r, ts, pid in rows:
                        yield int(row_id), u, m, float(r), float(ts), pid
                    last = int(rows[-1][0])
        except FAILURES as exc:
            raise StoreError(
                f"could not read feedback ({exc.__class__.__name__}): is this the service's database?"
            ) from exc

    def iter_prediction_log(self, *, until: float | None = None, batch: int = 1_000) -> Iterator[dict[str, Any]]:
        """Every prediction-log row (``tables.prediction_log_table``'s columns but ``id``) logged at or before
        ``until``, oldest first (``journal.served`` unpacks one)."""
        t = prediction_log_table
        cols = [c for c in t.c if c.name != "id"]
        window = [] if until is None else [t.c.logged_at <= until]
        try:
            with self.engine.connect() as conn:
                last = 0
                while True:
                    q = select(t.c.id, *cols).where(t.c.id > last, *window).order_by(t.c.id).limit(batch)
                    rows = conn.execute(q).all()
                    if not rows:
                        return
                    for row in rows:
                        yield {c.name: v for c, v in zip(cols, row[1:], strict=True)}
                    last = int(rows[-1][0])
        except FAILURES as exc:
            raise StoreError(
                f"could not read the prediction log ({exc.__class__.__name__}): is this the service's database?"
            ) from exc


@dataclass
class StoreHealth:
    """What ``/health`` says of the store: its kind and whether it answered its last call.

    Updated by the calls the service makes (a /feedback write, a read) and by ``watch``'s periodic ping, so that a
    store that cannot write shows as soon as a write fails, and one that does not answer at all within a ping.
    """

    kind: str  # "sqlite", "sqlite (ephemeral)" or "postgresql"
    status: str = "unknown"  # "ok", "unavailable" or "unknown" (not asked yet)
    reason: str | None = None
    checked_at: float | None = None

    @classmethod
    def of(cls, url: str, *, ephemeral: bool = False) -> StoreHealth:
        """The health of the store at ``url``; ``ephemeral``: its disk does not outlive the process's container."""
        sqlite_store = engine_url(url).startswith("sqlite")
        return cls("postgresql" if not sqlite_store else "sqlite (ephemeral)" if ephemeral else "sqlite")

    # Whether the last failure was a real write's (a rating not stored): only a real write clears it, since the
    # probe writes no page and would call a full disk "ok" again five seconds later.
    write_failed: bool = False

    def ok(self, *, probe: bool = False) -> None:
        """A call succeeded; ``probe``: it was ``watch``'s probe, which does not clear a real write's failure."""
        if probe and self.write_failed:
            self.checked_at = time.time()
            return
        self.status, self.reason, self.checked_at, self.write_failed = "ok", None, time.time(), False

    def failed(self, reason: str, *, write: bool = False) -> None:
        self.status, self.reason, self.checked_at, self.write_failed = "unavailable", reason, time.time(), write


async def watch(store: FeedbackStore, health: StoreHealth, *, interval: float, timeout: float) -> None:
    """Ping the store every ``interval`` seconds in a worker thread (``timeout`` at most, one at a time) and keep
    ``health`` up to date. Runs until cancelled."""
    limiter = anyio.CapacityLimiter(1)
    while True:
        try:
            with anyio.fail_after(timeout):
                await anyio.to_thread.run_sync(store.ping, limiter=limiter, abandon_on_cancel=True)
            health.ok(probe=True)
        except StoreError as exc:
            health.failed(str(exc))
        except TimeoutError:
            health.failed(f"no answer within {timeout} s")
        await asyncio.sleep(interval)
