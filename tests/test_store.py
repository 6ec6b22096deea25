"""The feedback store against real SQLite files and the real PostgreSQL server."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine.default import CACHE_HIT

from moviematch_ml.errors import ConfigError, StoreError
from moviematch_ml.feedback import Feedback, parse_feedback
from moviematch_ml.store import FeedbackStore, engine_url


@pytest.fixture
def store(db_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore.from_url(db_url)
    yield s
    s.close()


def _fb(fid: str, user: str, movie: str, rating: float, t: float = 100.0) -> Feedback:
    return Feedback(fid, user, movie, rating, t, None)


def test_ratings_are_stored_once_and_totals_follow(store: FeedbackStore) -> None:
    first = store.add([_fb("a", "u1", "m1", 8.0), _fb("b", "u1", "m2", 6.0), _fb("c", "u2", "m1", 4.0)])
    assert first.stored == (True, True, True)
    again = store.add([_fb("a", "u1", "m1", 8.0), _fb("d", "u2", "m2", 10.0)])
    assert again.stored == (False, True)
    assert (again.accepted, again.duplicates) == (1, 1)
    assert store.count() == 4
    users = store.user_counts(["u1", "u2", "nobody"])
    assert set(users) == {"u1", "u2"}
    assert (users["u1"].n, users["u1"].rating_sum, users["u1"].rating_sumsq) == (2, 14.0, 100.0)
    assert users["u2"].mean == 7.0  # (4 + 10) / 2
    movies = store.movie_counts(["m1", "m2"])
    assert (movies["m1"].n, movies["m1"].mean) == (2, 6.0)
    assert store.all_movie_counts() == movies  # every rated movie, and only those
    assert store.user_ratings("u1") == [("m1", 8.0, 100.0), ("m2", 6.0, 100.0)]


def test_change_feed_gives_the_new_rows_and_their_users(store: FeedbackStore) -> None:
    assert store.last_row_id() == 0
    assert store.changed_rows(0) == []
    store.add([_fb("a", "u1", "m1", 8.0), _fb("b", "u2", "m1", 6.0)])
    mark = store.last_row_id()
    assert mark == 2
    assert store.changed_rows(0) == [(1, "u1"), (2, "u2")]
    store.add([_fb("c", "u2", "m2", 4.0), _fb("d", "u3", "m2", 4.0), _fb("a", "u1", "m1", 8.0)])  # "a" is a repeat
    assert store.changed_rows(mark) == [(3, "u2"), (4, "u3")]
    assert store.changed_rows(4) == []


def test_a_key_repeated_inside_one_request_counts_once(store: FeedbackStore) -> None:
    result = store.add([_fb("same", "u", "m", 5.0), _fb("same", "u", "m", 5.0)])
    assert result.stored == (True, False)
    assert store.user_counts(["u"])["u"].n == 1


def test_retried_keyed_request_stores_nothing_new(store: FeedbackStore) -> None:
    body = {"ratings": [{"user_id": 3, "movie_id": 9, "rating": 7}, {"user_id": 3, "movie_id": 10, "rating": 2}]}
    assert store.add(parse_feedback(body, "req-42", 1.0)).accepted == 2
    assert store.add(parse_feedback(body, "req-42", 2.0)).accepted == 0
    assert store.user_counts(["3"])["3"].n == 2


def test_bulk_lookup_beyond_one_in_list_chunk(store: FeedbackStore) -> None:
    store.add([_fb(f"f{i}", "u", f"m{i}", float(i % 11)) for i in range(2000)])
    got = store.movie_counts([f"m{i}" for i in range(2100)])
    assert len(got) == 2000
    assert got["m1999"].rating_sum == float(1999 % 11)


def test_iter_ratings_returns_everything_in_arrival_order(store: FeedbackStore) -> None:
    store.add([_fb(f"f{i}", f"u{i % 3}", f"m{i}", 5.0, t=float(i)) for i in range(25)])
    rows = list(store.iter_ratings(batch=7))
    assert [r[4] for r in rows] == [float(i) for i in range(25)]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_concurrent_writers_lose_no_increment(db_url: str) -> None:
    # Two stores (as two replicas would have) add ratings for the same user at the same time.
    a, b = FeedbackStore.from_url(db_url), FeedbackStore.from_url(db_url)

    def write(s: FeedbackStore, tag: str) -> None:
        for i in range(20):
            s.add([_fb(f"{tag}{i}", "shared", f"m{i}", 1.0)])

    threads = [threading.Thread(target=write, args=(s, t)) for s, t in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = a.user_counts(["shared"])["shared"]
    assert (counts.n, counts.rating_sum) == (40, 40.0)
    a.close()
    b.close()


def test_migrations_are_idempotent(db_url: str) -> None:
    FeedbackStore.from_url(db_url).close()
    s = FeedbackStore.from_url(db_url)  # second upgrade to head is a no-op
    assert s.count() == 0
    s.close()


def test_head_revision_is_alembics_head() -> None:
    # A new migration must move HEAD_REVISION too, or a store at the old head would skip it.
    from alembic.script import ScriptDirectory

    from moviematch_ml.migrations import HEAD_REVISION, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION


def test_a_store_at_head_opens_without_alembic(db_url: str) -> None:
    # Each worker checks the schema at start: a store already at head is one read, no Alembic import (11 MB).
    from moviematch_ml.migrations import HEAD_REVISION, current_revision

    probe = (
        "import sys; from moviematch_ml.store import FeedbackStore; "
        f"s = FeedbackStore.from_url({db_url!r}); s.count(); print('alembic' in sys.modules)"
    )

    def alembic_imported() -> bool:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        return done.stdout.strip() == "True"

    assert alembic_imported()  # a new database: Alembic creates the schema
    s = FeedbackStore.from_url(db_url)
    assert current_revision(s.engine) == HEAD_REVISION
    s.close()
    assert not alembic_imported()  # at head: nothing to do


def test_database_url_normalisation() -> None:
    assert engine_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="mysql"):
        engine_url("mysql://u@h/db")


def test_a_failed_read_is_a_store_error_and_the_pool_recovers(store: FeedbackStore) -> None:
    store.add([_fb("a", "u1", "m1", 8.0)])
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE feedback RENAME TO feedback_away")
    with pytest.raises(StoreError, match="could not read feedback"):
        store.user_ratings("u1")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE feedback_away RENAME TO feedback")
    assert store.user_ratings("u1") == [("m1", 8.0, 100.0)]  # the same store answers again


def test_batches_of_any_size_share_their_compiled_statements(store: FeedbackStore) -> None:
    # Rows inlined with .values(rows) made a new statement to compile on every request (SQLAlchemy does not cache
    # multi-row VALUES: 129 ms for 1,000 ratings on SQLite); executemany compiles each statement once.
    store.add([_fb("warm-a", "u", "m", 5.0), _fb("warm-b", "v", "n", 5.0)])
    hits: list[bool] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            hits.append(context.cache_hit is CACHE_HIT)

    event.listen(store.engine, "after_cursor_execute", record)
    try:
        for size in range(2, 40):
            store.add([_fb(f"{size}-{k}", f"u{k}", f"m{k % 7}", 5.0) for k in range(size)])
    finally:
        event.remove(store.engine, "after_cursor_execute", record)
    assert len(hits) >= 3 * 38  # the ratings, the users' and the movies' totals, for every batch
    assert all(hits)
    assert store.count() == 2 + sum(range(2, 40))


def test_a_reused_sqlite_reader_sees_every_later_commit(tmp_path: Path) -> None:
    s = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}")
    other = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}")  # another replica on the same file
    try:
        s.add([_fb("a", "u1", "m1", 8.0)])
        assert s.user_ratings("u1") == [("m1", 8.0, 100.0)]
        assert len(s._readers) == 1  # the read's connection is kept for the next one
        reader = s._readers[0]
        other.add([_fb("b", "u1", "m2", 6.0, 200.0)])
        # The same connection, holding no snapshot of the first read: the other writer's commit is seen.
        assert s.user_ratings("u1") == [("m1", 8.0, 100.0), ("m2", 6.0, 200.0)]
        assert s._readers == [reader]
        # Even a rating stored as an integer comes back a float (the columns' REAL affinity).
        with s.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO feedback (feedback_id, user_id, movie_id, rating, rated_at, received_at)"
                " VALUES ('c', 'u2', 'm3', 7, 300, 300)"
            )
        assert [type(v) for v in s.user_ratings("u2")[0]] == [str, float, float]
        assert not reader.in_transaction
        # It was opened by the engine, so it has the store's pragmas (WAL, durable commits, the busy timeout).
        pragmas = [reader.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous", "busy_timeout")]
        assert pragmas == ["wal", 2, 30000]
    finally:
        s.close()
        other.close()
    assert s._readers == []  # closed with the store


def test_concurrent_sqlite_readers_each_get_their_own_connection(tmp_path: Path) -> None:
    s = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}")
    s.add([_fb(f"{u}-{k}", f"u{u}", f"m{k}", float(u + 1), float(k)) for u in range(4) for k in range(3)])
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def read(u: int) -> None:
        try:
            start.wait()
            for _ in range(200):
                assert s.user_ratings(f"u{u}") == [(f"m{k}", float(u + 1), float(k)) for k in range(3)]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(u,)) for u in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 1 <= len(s._readers) <= 4  # at most one per concurrent reader, each back in the list
    assert len({id(c) for c in s._readers}) == len(s._readers)
    s.close()


def test_only_a_sqlite_file_gets_readers_of_its_own(db_url: str) -> None:
    # In-memory SQLite is one database per connection (a connection of its own would see no tables), and
    # PostgreSQL's connections need the pool's pre-ping: both read through the engine's pool as before.
    for url in ("sqlite://", db_url):
        s = FeedbackStore.from_url(url)
        s.add([_fb("a", "u1", "m1", 8.0)])
        assert s.user_ratings("u1") == [("m1", 8.0, 100.0)]
        assert len(s._readers) == (1 if url.startswith("sqlite:///") else 0)
        s.close()
