"""The feedback store against real SQLite files and the real PostgreSQL server, and its migrations."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, inspect
from sqlalchemy.engine.default import CACHE_HIT

from moviematch_ml.errors import ConfigError, MissingExtraError, StoreError
from moviematch_ml.online import migrations
from moviematch_ml.online.feedback import Feedback, parse_feedback
from moviematch_ml.online.store import FeedbackStore, StoreHealth, engine_url, make_engine
from moviematch_ml.online.tables import metadata


@pytest.fixture
def store(db_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore.from_url(db_url)
    yield s
    s.close()


def _fb(fid: str, user: str, movie: str, rating: float, t: float = 100.0) -> Feedback:
    return Feedback(fid, user, movie, rating, t, None)


def _count(store: FeedbackStore) -> int:
    return sum(1 for _ in store.iter_ratings())


def test_ratings_are_stored_once_and_totals_follow(store: FeedbackStore) -> None:
    first = store.add([_fb("a", "u1", "m1", 8.0), _fb("b", "u1", "m2", 6.0), _fb("c", "u2", "m1", 4.0)])
    assert first.stored == (True, True, True)
    again = store.add([_fb("a", "u1", "m1", 8.0), _fb("d", "u2", "m2", 10.0)])
    assert again.stored == (False, True)
    assert (again.accepted, again.duplicates) == (1, 1)
    assert _count(store) == 4
    movies = store.all_movie_counts()
    assert set(movies) == {"m1", "m2"}  # every rated movie, and only those
    assert (movies["m1"].n, movies["m1"].rating_sum, movies["m1"].rating_sumsq) == (2, 12.0, 80.0)
    assert (movies["m1"].mean, movies["m2"].mean) == (6.0, 8.0)  # (8 + 4) / 2, (6 + 10) / 2
    assert store.user_ratings("u1") == [("m1", 8.0, 100.0), ("m2", 6.0, 100.0)]
    assert store.user_ratings("u2") == [("m1", 4.0, 100.0), ("m2", 10.0, 100.0)]
    assert store.user_ratings("nobody") == []


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
    assert store.user_ratings("u") == [("m", 5.0, 100.0)]
    assert store.all_movie_counts()["m"].n == 1


def test_retried_keyed_request_stores_nothing_new(store: FeedbackStore) -> None:
    body = {"ratings": [{"user_id": 3, "movie_id": 9, "rating": 7}, {"user_id": 3, "movie_id": 10, "rating": 2}]}
    assert store.add(parse_feedback(body, "req-42", 1.0)).accepted == 2
    assert store.add(parse_feedback(body, "req-42", 2.0)).accepted == 0
    assert store.user_ratings("3") == [("9", 7.0, 1.0), ("10", 2.0, 1.0)]


def test_every_movie_s_totals_in_one_read(store: FeedbackStore) -> None:
    store.add([_fb(f"f{i}", "u", f"m{i}", float(i % 11)) for i in range(2000)])
    got = store.all_movie_counts()
    assert len(got) == 2000
    assert (got["m1999"].n, got["m1999"].rating_sum) == (1, float(1999 % 11))


def test_iter_ratings_returns_everything_in_arrival_order(store: FeedbackStore) -> None:
    store.add([_fb(f"f{i}", f"u{i % 3}", f"m{i}", 5.0, t=float(i)) for i in range(25)])
    rows = list(store.iter_ratings(batch=7))
    assert [r[4] for r in rows] == [float(i) for i in range(25)]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert rows[4][1:] == ("u1", "m4", 5.0, 4.0)


def test_concurrent_writers_lose_no_increment(db_url: str) -> None:
    # Two stores (as two replicas would have) add ratings of the same movies at the same time.
    a, b = FeedbackStore.from_url(db_url), FeedbackStore.from_url(db_url)

    def write(s: FeedbackStore, tag: str) -> None:
        for i in range(20):
            s.add([_fb(f"{tag}{i}", "shared", f"m{i}", 1.0)])

    threads = [threading.Thread(target=write, args=(s, t)) for s, t in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = a.all_movie_counts()
    assert {m: (c.n, c.rating_sum) for m, c in totals.items()} == {f"m{i}": (2, 2.0) for i in range(20)}
    assert len(a.user_ratings("shared")) == 40
    a.close()
    b.close()


def test_migrations_are_idempotent(db_url: str) -> None:
    FeedbackStore.from_url(db_url).close()
    s = FeedbackStore.from_url(db_url)  # second upgrade to head is a no-op
    assert s.last_row_id() == 0
    assert migrations.current_revision(s.engine) == migrations.HEAD_REVISION
    s.close()


def test_head_revision_is_alembics_head() -> None:
    # A new migration must move HEAD_REVISION too, or a store at the old head would skip it.
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(migrations.alembic_config()).get_current_head() == migrations.HEAD_REVISION


def _schema_differences(engine: Engine) -> list[Any]:
    """What Alembic's autogenerate would change to make the database's schema that of ``tables.py``."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        diff: list[Any] = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        return diff


def test_the_migrations_create_exactly_the_schema_of_tables(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrations.upgrade(engine)
        assert _schema_differences(engine) == []
        tables = {"alembic_version", "feedback", "movie_state", "prediction_log"}
        assert set(inspect(engine).get_table_names()) == tables
    finally:
        engine.dispose()


def test_0002_drops_user_state_from_a_store_at_0001(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrations.upgrade(engine, "0001")
        assert migrations.current_revision(engine) == "0001"
        assert "user_state" in inspect(engine).get_table_names()
        # At 0001 the schema is not the one the code writes to: the comparison sees the table to drop (and the
        # prediction log to add, with its three indexes: 0003).
        diffs = [d for d in _schema_differences(engine) if isinstance(d, tuple)]
        assert {d[0] for d in diffs} == {"remove_table", "add_table", "add_index"}
        assert {d[1].name for d in diffs if d[0] == "remove_table"} == {"user_state"}
        assert {d[1].name for d in diffs if d[0] == "add_table"} == {"prediction_log"}
        with engine.begin() as conn:  # a row written by the old code, in a table that goes
            conn.exec_driver_sql(
                "INSERT INTO user_state (user_id, n, rating_sum, rating_sumsq, updated_at) VALUES ('u', 1, 5, 25, 1)"
            )
        s = FeedbackStore(engine)
        s.migrate()
        assert migrations.current_revision(engine) == migrations.HEAD_REVISION
        assert "user_state" not in inspect(engine).get_table_names()
        assert _schema_differences(engine) == []
        s.add([_fb("a", "u", "m", 5.0)])
        assert s.user_ratings("u") == [("m", 5.0, 100.0)]
    finally:
        engine.dispose()


def test_a_store_at_head_opens_without_alembic(db_url: str) -> None:
    # Each worker checks the schema at start: a store already at head is one read, no Alembic import (11 MB).
    probe = (
        "import sys; from moviematch_ml.online.store import FeedbackStore; "
        f"s = FeedbackStore.from_url({db_url!r}); s.last_row_id(); print('alembic' in sys.modules)"
    )

    def alembic_imported() -> bool:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        return done.stdout.strip() == "True"

    assert alembic_imported()  # a new database: Alembic creates the schema
    s = FeedbackStore.from_url(db_url)
    assert migrations.current_revision(s.engine) == migrations.HEAD_REVISION
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
    with pytest.raises(StoreError, match="could not read feedback"):
        store.changed_rows(0)
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
    assert len(hits) >= 2 * 38  # the ratings and the movies' totals, for every batch
    assert all(hits)
    assert _count(store) == 2 + sum(range(2, 40))


def test_a_reused_sqlite_reader_sees_every_later_commit(tmp_path: Path) -> None:
    s = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}")
    other = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}")  # another replica on the same file
    try:
        s.add([_fb("a", "u1", "m1", 8.0)])
        assert s.user_ratings("u1") == [("m1", 8.0, 100.0)]
        assert len(s.idle_readers) == 1  # the read's connection is kept for the next one
        reader = s.idle_readers[0]
        other.add([_fb("b", "u1", "m2", 6.0, 200.0)])
        # The same connection, holding no snapshot of the first read: the other writer's commit is seen.
        assert s.user_ratings("u1") == [("m1", 8.0, 100.0), ("m2", 6.0, 200.0)]
        assert s.idle_readers == (reader,)
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
    assert len(s.idle_readers) == 0  # closed with the store


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
    readers = s.idle_readers
    assert 1 <= len(readers) <= 4  # at most one per concurrent reader, each back in the list
    assert len({id(c) for c in readers}) == len(readers)
    s.close()


def test_only_a_sqlite_file_gets_readers_of_its_own(db_url: str) -> None:
    # In-memory SQLite is one database per connection (a connection of its own would see no tables), and
    # PostgreSQL's connections need the pool's pre-ping: both read through the engine's pool as before.
    for url in ("sqlite://", db_url):
        s = FeedbackStore.from_url(url)
        s.add([_fb("a", "u1", "m1", 8.0)])
        assert s.user_ratings("u1") == [("m1", 8.0, 100.0)]
        assert len(s.idle_readers) == (1 if url.startswith("sqlite:///") else 0)
        s.close()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_postgresql_read_hands_its_connection_back_for_transactions(store: FeedbackStore) -> None:
    # user_ratings reads in autocommit (no BEGIN before the query, no COMMIT after it: half the round trips of a
    # user's first request); the connection must leave autocommit before it goes back to the pool, or the next
    # write's ratings and movie totals would each commit on their own.
    store.add([_fb("a", "u1", "m1", 8.0)])
    assert store.user_ratings("u1") == [("m1", 8.0, 100.0)]
    assert store.engine.pool.checkedin() == 1  # type: ignore[attr-defined]  # the read's, and the only one
    conn = store.engine.raw_connection()
    try:
        assert conn.driver_connection is not None
        assert conn.driver_connection.autocommit is False
    finally:
        conn.close()
    assert store.add([_fb("b", "u1", "m2", 6.0)]).stored == (True,)


def test_postgresql_without_its_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if installed without [postgres]: importing psycopg fails (None in sys.modules makes it unfindable).
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingExtraError) as caught:
        make_engine("postgresql://postgres@127.0.0.1:5432/test")
    assert isinstance(caught.value, ConfigError)
    assert str(caught.value) == (
        "DATABASE_URL=postgresql://... needs psycopg, which is not installed: pip install 'moviematch-ml[postgres]' "
        "(the Docker image has it)"
    )
    assert (caught.value.extra, caught.value.module) == ("postgres", "psycopg")
    make_engine("sqlite://").dispose()  # SQLite, the default, needs no extra


def test_a_probe_does_not_clear_a_failed_write_but_a_write_does() -> None:
    health = StoreHealth("sqlite")
    health.ok(probe=True)
    assert (health.status, health.reason) == ("ok", None)
    health.failed("the feedback store does not answer: OperationalError")  # a probe's failure: the next probe clears it
    health.ok(probe=True)
    assert (health.status, health.reason) == ("ok", None)
    health.failed("could not store feedback: OperationalError", write=True)  # a full disk: the probe writes no page
    health.ok(probe=True)
    assert (health.status, health.reason) == ("unavailable", "could not store feedback: OperationalError")
    health.ok()  # a rating stored
    assert (health.status, health.reason, health.write_failed) == ("ok", None, False)


def test_a_store_not_migrated_at_start_is_migrated_by_its_first_write_or_probe(tmp_path: Path) -> None:
    for first in ("add", "ping"):
        store = FeedbackStore.from_url(f"sqlite:///{tmp_path / f'{first}.sqlite3'}", migrate=False)
        try:
            assert (store.migrated, inspect(store.engine).get_table_names()) == (False, [])
            if first == "add":
                rating = parse_feedback({"user_id": 1, "movie_id": 2, "rating": 8}, None, now=1.0)
                assert store.add(rating).accepted == 1
            else:
                store.ping()
            assert store.migrated
            assert {"feedback", "prediction_log"} <= set(inspect(store.engine).get_table_names())
        finally:
            store.close()


def test_the_probe_refuses_a_read_only_store(tmp_path: Path) -> None:
    path = tmp_path / "ro.sqlite3"
    FeedbackStore.from_url(f"sqlite:///{path}").close()
    store = FeedbackStore(make_engine(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"))
    store.migrated = True  # at head already: only the probe is under test
    try:
        assert store.user_ratings("1") == []  # it reads
        with pytest.raises(StoreError, match=r"^the feedback store cannot write: OperationalError$"):
            store.ping()
    finally:
        store.close()
