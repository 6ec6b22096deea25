"""The fault-injection tools (tests/faults.py) do what they say, seen through psycopg, redis-py and sqlite3."""

from __future__ import annotations

import concurrent.futures
import http.client
import http.server
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from faults import (
    PostgresServer,
    RedisServer,
    RoundRobinProxy,
    SmallDisk,
    TcpProxy,
    child_pids,
    is_running,
    sqlite_read_only_url,
    start_redis,
    with_port,
)
from realserver import free_port

MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def redis_client(port: int, timeout: float = 2.0) -> redis.Redis:
    """A client that fails at its first timeout or refusal (redis-py retries three times with backoff by default)."""
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# --- with_port ------------------------------------------------------------------------------------------------------


def test_with_port_replaces_only_the_port() -> None:
    url = "postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dt_1"
    assert with_port(url, 40001) == "postgresql://postgres@127.0.0.1:40001/test?options=-csearch_path%3Dt_1"
    assert with_port("redis://127.0.0.1:6379/0", 40002) == "redis://127.0.0.1:40002/0"
    assert with_port("redis://localhost/0", 7) == "redis://localhost:7/0"
    assert with_port("postgresql://u:secret@db:5432/x", 9) == "postgresql://u:secret@db:9/x"


# --- TcpProxy in front of the machine's Redis -----------------------------------------------------------------------


@pytest.mark.redis
def test_paused_redis_times_out_and_resume_recovers(redis_proxy: TcpProxy) -> None:
    client = redis_client(redis_proxy.port, timeout=0.5)
    assert client.ping() is True
    assert redis_proxy.connections == 1
    redis_proxy.pause()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    assert time.monotonic() - started >= 0.5  # the client's timeout, not a refusal
    assert redis_proxy.connections >= 1  # a hung link is not a closed one
    redis_proxy.resume()
    assert client.ping() is True  # redis-py reconnects after its timeout
    client.close()


@pytest.mark.redis
def test_killed_redis_refuses_and_restart_recovers(redis_proxy: TcpProxy) -> None:
    client = redis_client(redis_proxy.port)
    client.set("faults:proxy", b"1", ex=60)
    redis_proxy.kill()
    assert redis_proxy.connections == 0
    assert refuses(redis_proxy.port)
    with pytest.raises(redis.ConnectionError):
        client.get("faults:proxy")
    assert redis_client(6379).ping() is True  # the machine's Redis itself never stopped
    redis_proxy.restart()
    assert client.get("faults:proxy") == b"1"
    assert redis_proxy.accepted == 2  # the first connection, then the one after the restart
    client.close()


@pytest.mark.redis
def test_delay_holds_each_chunk(redis_proxy: TcpProxy) -> None:
    client = redis_client(redis_proxy.port)
    assert client.ping() is True  # connected, before timing
    redis_proxy.delay(0.3)
    started = time.monotonic()
    assert client.ping() is True
    delayed = time.monotonic() - started
    redis_proxy.delay(0)
    started = time.monotonic()
    assert client.ping() is True
    undelayed = time.monotonic() - started
    # PING and its PONG are one chunk each, and the PONG cannot leave before the PING arrived: 2 x 0.3 s at least.
    assert delayed >= 0.6
    assert undelayed < 0.3
    with pytest.raises(ValueError, match="delay must be >= 0"):
        redis_proxy.delay(-1)
    client.close()


# --- TcpProxy in front of the machine's PostgreSQL ------------------------------------------------------------------


@pytest.mark.postgres
def test_paused_postgres_stalls_a_query_until_resumed(postgres_proxy: TcpProxy) -> None:
    with (
        psycopg.connect(with_port(MACHINE_POSTGRES, postgres_proxy.port), autocommit=True) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        assert conn.execute("SELECT 1").fetchone() == (1,)
        postgres_proxy.pause()
        query = pool.submit(lambda: conn.execute("SELECT 2").fetchone())
        with pytest.raises(concurrent.futures.TimeoutError):
            query.result(timeout=0.5)  # the client-side timeout: no answer while paused
        assert not query.done()
        assert postgres_proxy.connections == 1
        postgres_proxy.resume()
        assert query.result(timeout=5) == (2,)  # the held query went through on the same connection


@pytest.mark.postgres
def test_killed_postgres_fails_and_restart_recovers(postgres_proxy: TcpProxy) -> None:
    url = with_port(MACHINE_POSTGRES, postgres_proxy.port)
    conn = psycopg.connect(url, autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    postgres_proxy.kill()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg.connect(url, connect_timeout=2)
    with psycopg.connect(MACHINE_POSTGRES) as direct:  # the machine's PostgreSQL itself never stopped
        assert direct.execute("SELECT 1").fetchone() == (1,)
    postgres_proxy.restart()
    with psycopg.connect(url, connect_timeout=2) as again:
        assert again.execute("SELECT 3").fetchone() == (3,)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.postgres
def test_paused_postgres_holds_an_answer_until_resumed(postgres_proxy: TcpProxy) -> None:
    # The query reaches the server before the pause: what is held is the answer, on its way back.
    marker = f"faults-{uuid.uuid4().hex}"
    sql = f"SELECT '{marker}' FROM pg_sleep(0.5)"
    running = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s"
    with (
        psycopg.connect(with_port(MACHINE_POSTGRES, postgres_proxy.port), autocommit=True) as conn,
        psycopg.connect(MACHINE_POSTGRES, autocommit=True) as observer,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        query = pool.submit(lambda: conn.execute(sql.encode()).fetchone())
        wait_until(lambda: observer.execute(running, (sql,)).fetchone() == (1,))
        postgres_proxy.pause()
        wait_until(lambda: observer.execute(running, (sql,)).fetchone() == (0,))  # the server has answered
        with pytest.raises(concurrent.futures.TimeoutError):
            query.result(timeout=0.5)
        postgres_proxy.resume()
        assert query.result(timeout=5) == (marker,)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_new_connection_hangs_while_paused(postgres_proxy: TcpProxy) -> None:
    url = with_port(MACHINE_POSTGRES, postgres_proxy.port)
    postgres_proxy.pause()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)  # TCP connects; the server's greeting never comes
    assert time.monotonic() - started >= 1.9
    postgres_proxy.resume()
    with psycopg.connect(url, connect_timeout=2) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_proxy_must_be_started_first() -> None:
    proxy = TcpProxy(free_port())
    with pytest.raises(RuntimeError, match="not started"):
        proxy.pause()
    proxy.close()  # closing a proxy never started does nothing
    with pytest.raises(ValueError, match="at least one upstream"):
        RoundRobinProxy([])


# --- RoundRobinProxy ------------------------------------------------------------------------------------------------


class NamedHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def named_servers() -> Iterator[list[http.server.ThreadingHTTPServer]]:
    """Two HTTP servers on free ports, each answering its own name ("a", "b")."""
    servers = []
    for name in ("a", "b"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NamedHandler)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def get(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_round_robin_alternates_and_skips_a_dead_server(named_servers: list[http.server.ThreadingHTTPServer]) -> None:
    a, b = named_servers
    with RoundRobinProxy([a.server_address[1], b.server_address[1]]) as proxy:
        assert [get(proxy.port) for _ in range(5)] == ["a", "b", "a", "b", "a"]
        assert proxy.forwarded == [3, 2]
        b.shutdown()
        b.server_close()
        assert [get(proxy.port) for _ in range(3)] == ["a", "a", "a"]  # b refuses: skipped, no request fails
        assert proxy.forwarded == [6, 2]


# --- servers of the test's own --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dedicated_postgres_stop_kill_start(dedicated_postgres: PostgresServer) -> None:
    pg = dedicated_postgres
    assert pg.port != 5432
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2), (3)")
    with psycopg.connect(pg.url, autocommit=True) as held:
        postmaster = pg.pid
        assert postmaster is not None
        backend = held.info.backend_pid
        assert backend in child_pids(postmaster)
        pg.kill()
        assert not pg.running
        assert pg.pid is None
        assert not is_running(backend)  # the connection's backend died with the postmaster
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    assert refuses(pg.port)
    pg.start()  # crash recovery: what was committed before the SIGKILL is there
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,), (3,)]
    pg.stop()
    assert refuses(pg.port)
    pg.start()
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (3,)
    with psycopg.connect(MACHINE_POSTGRES) as direct:  # the machine's PostgreSQL is another server, untouched
        assert direct.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.slow
def test_dedicated_redis_stop_kill_start(dedicated_redis: RedisServer) -> None:
    server = dedicated_redis
    assert server.port != 6379
    client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    client.set("k", b"v")
    assert client.get("k") == b"v"
    server.kill()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    server.start()
    assert client.get("k") is None  # no persistence: a restarted Redis is empty
    client.set("k", b"w")
    server.stop()
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    server.start()
    assert client.ping() is True
    client.close()


@pytest.mark.slow
def test_a_server_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: Redis cannot bind it, and connecting is refused
        port = taken.getsockname()[1]
        with pytest.raises(AssertionError, match=r"(?s)did not answer within 1\.0 s.*Address already in use"):
            start_redis(tmp_path, port=port, timeout=1.0)


# --- a small disk and a read-only store -----------------------------------------------------------------------------


def wal_store(path: Path) -> None:
    """A SQLite file in WAL mode, like the feedback store, with one table and one row."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.execute("INSERT INTO t VALUES ('a')")
    conn.commit()
    conn.close()


def sqlite_code(exc: OperationalError) -> str:
    assert isinstance(exc.orig, sqlite3.Error)
    return exc.orig.sqlite_errorname


def test_a_full_disk_refuses_writes_and_free_recovers(small_disk: SmallDisk) -> None:
    wal_store(small_disk.path / "store.sqlite3")
    engine = create_engine(f"sqlite:///{small_disk.path / 'store.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES ('b')"))
    written = small_disk.fill()
    assert small_disk.free_bytes == 0
    assert 0 < written <= 1 << 20
    with pytest.raises(OperationalError, match="database or disk is full") as refused, engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES ('c')"))
    assert sqlite_code(refused.value) == "SQLITE_FULL"
    small_disk.free()
    assert small_disk.free_bytes >= written
    with engine.begin() as conn:  # the same engine writes again: no restart needed
        conn.execute(text("INSERT INTO t VALUES ('d')"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT x FROM t ORDER BY x")).scalars().all() == ["a", "b", "d"]
    engine.dispose()


def test_a_read_only_mount_refuses_the_store(small_disk: SmallDisk) -> None:
    path = small_disk.path / "store.sqlite3"
    wal_store(path)
    with path.open("ab"), pytest.raises(AssertionError, match="busy"):
        small_disk.read_only()  # Linux refuses while a file on it is open for writing
    small_disk.read_only()
    with pytest.raises(OSError, match="Read-only file system"):
        (small_disk.path / "new").touch()
    engine = create_engine(f"sqlite:///{path}")
    # A WAL database needs its -shm file even to be read: on a read-only mount it cannot be opened at all.
    with pytest.raises(OperationalError, match="unable to open database file") as refused, engine.connect() as conn:
        conn.execute(text("SELECT count(*) FROM t"))
    assert sqlite_code(refused.value) == "SQLITE_CANTOPEN"
    small_disk.writable()
    # SQLite opened the file read-only and the pool kept that connection: it stays read-only on a writable mount.
    with pytest.raises(OperationalError, match="attempt to write a readonly database"), engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES ('b')"))
    engine.dispose()  # new connections write again
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES ('b')"))
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 2
    engine.dispose()


def test_a_read_only_url_reads_but_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    wal_store(path)
    engine = create_engine(sqlite_read_only_url(path))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT x FROM t")).scalars().all() == ["a"]
    with (
        pytest.raises(OperationalError, match="attempt to write a readonly database") as refused,
        engine.begin() as conn,
    ):
        conn.execute(text("INSERT INTO t VALUES ('b')"))
    assert sqlite_code(refused.value) == "SQLITE_READONLY"
    engine.dispose()
    writer = sqlite3.connect(path)  # the file itself is as writable as before
    writer.execute("INSERT INTO t VALUES ('c')")
    writer.commit()
    writer.close()
