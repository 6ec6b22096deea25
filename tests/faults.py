"""Fault injection for tests: proxies that hang or kill a link, servers of the test's own, a disk that fills up."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from realserver import free_port

LOOPBACK: Final[str] = "127.0.0.1"
CHUNK: Final[int] = 65536
READY_TIMEOUT: Final[float] = 20.0  # seconds a server of the test's own gets to answer before the test fails
CONTROL_TIMEOUT: Final[float] = 5.0  # seconds a proxy's thread gets to carry out pause(), kill() and the rest
LOG_TAIL: Final[int] = 4000  # characters of a server's log quoted in a failure

T = TypeVar("T")


def with_port(url: str, port: int) -> str:
    """``url`` (a DATABASE_URL or REDIS_URL) with its port replaced: the same server, reached through a proxy."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    host = f"{parts.hostname or LOOPBACK}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host))


# --- TCP proxies ------------------------------------------------------------------------------------------------------


class Proxy:
    """Forwards TCP connections from a free local port to upstream servers, and hangs, slows or cuts them on demand.

    ``pause()``: no byte moves either way, connections stay open (a hung dependency); ``resume()`` lets them through.
    ``kill()``: every connection is closed and the port refuses new ones (a dead dependency); ``restart()`` listens on
    the same port again and forwards. ``delay(s)``: every chunk waits ``s`` seconds before it is forwarded. The servers
    behind are never touched. Runs an event loop in a thread of its own; use it as a context manager.
    """

    def __init__(self, upstreams: Sequence[tuple[str, int]]) -> None:
        if not upstreams:
            raise ValueError("a proxy needs at least one upstream server")
        self.upstreams: list[tuple[str, int]] = list(upstreams)
        self.port = 0  # the port clients connect to, chosen by the system at start()
        self.accepted = 0  # connections accepted since start()
        self.forwarded = [0] * len(self.upstreams)  # connections handed to each upstream server
        self._next = 0
        self._delay = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._links: set[asyncio.Task[None]] = set()

    # The test's side: each call returns once the proxy's thread has done it.

    def start(self) -> Self:
        """Listen on a free port (``self.port``) and forward."""
        if self._loop is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"proxy->{self.upstreams}", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.close()
            raise
        return self

    def pause(self) -> None:
        """Stop forwarding bytes in both directions; open connections stay open and new ones are accepted."""
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        """Forward again, held bytes first."""
        self._call(self._set_flowing(True))

    def kill(self) -> None:
        """Close every connection and stop listening: connecting is refused until ``restart()``."""
        self._call(self._kill())

    def restart(self) -> None:
        """Listen on the same port again and forward (a restarted dependency is not a hung one)."""
        self._call(self._listen())

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it, in both directions (0: no delay)."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0 seconds (got {seconds})")
        self._delay = seconds

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return self._call(self._count())

    def close(self) -> None:
        """Kill every connection and stop the proxy's thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._kill())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CONTROL_TIMEOUT)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    # The proxy's thread.

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._link, LOOPBACK, self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]
        self._flowing.set()

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _count(self) -> int:
        return len(self._links)

    async def _kill(self) -> None:
        if self._server is not None:
            self._server.close()  # the listening socket closes now: connecting is refused from here on
        links = list(self._links)
        for link in links:
            link.cancel()
        await asyncio.gather(*links, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The next upstream server that accepts, in turn; OSError when none does."""
        error: OSError = ConnectionRefusedError(errno.ECONNREFUSED, "no upstream server accepted")
        for _ in self.upstreams:
            index = self._next
            self._next = (index + 1) % len(self.upstreams)
            host, port = self.upstreams[index]
            try:
                streams = await asyncio.open_connection(host, port)
            except OSError as exc:
                error = exc
                continue
            self.forwarded[index] += 1
            return streams
        raise error

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self.accepted += 1
        writers = [client_w]
        pumps: list[asyncio.Task[bool]] = []
        try:
            # Connect only once bytes may flow: a server closes a connection that stays silent too long.
            await self._flowing.wait()
            connecting = asyncio.ensure_future(self._connect())
            try:
                upstream_r, upstream_w = await connecting
            except asyncio.CancelledError:
                # Cancelled (kill) just as the connection was made: close it, or its socket leaks.
                connecting.add_done_callback(_abort_connected)
                raise
            writers.append(upstream_w)
            pumps = [
                asyncio.create_task(self._pump(client_r, upstream_w)),
                asyncio.create_task(self._pump(upstream_r, client_w)),
            ]
            # Both directions end at EOF (each half-closes the other side); an error in one ends both.
            for finished in asyncio.as_completed(pumps):
                if not await finished:
                    break
        except (OSError, asyncio.CancelledError):
            # Cancelled by kill() or close(): the end of a link like any other (re-raised, the stream server's
            # callback would report it as an error).
            pass
        finally:
            # Sockets first: a cancellation while the pumps are awaited below must not leave them open.
            for writer in writers:
                writer.transport.abort()
            for pump in pumps:
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pumps, return_exceptions=True)
            self._links.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Copy until EOF (then half-close and return True) or a connection error (return False)."""
        try:
            while data := await reader.read(CHUNK):
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            return True
        except OSError:
            return False


def _abort_connected(connecting: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    """Close the upstream connection a cancelled link made after all (a done callback)."""
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result()[1].transport.abort()


class TcpProxy(Proxy):
    """A proxy in front of one server: the machine's PostgreSQL or Redis, or a server of the test's own."""

    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK) -> None:
        super().__init__([(upstream_host, upstream_port)])


class RoundRobinProxy(Proxy):
    """A load balancer for tests: each new connection goes to the next of several servers (one that refuses is
    skipped). It balances connections, not requests: an HTTP client that keeps its connection alive stays on one
    server, so send each request on a new connection (``Connection: close``)."""

    def __init__(self, upstream_ports: Sequence[int], upstream_host: str = LOOPBACK) -> None:
        super().__init__([(upstream_host, port) for port in upstream_ports])


# --- servers of the test's own ----------------------------------------------------------------------------------------


class DedicatedServer:
    """A server process the test owns, on a free port, that it may stop or kill outright.

    ``stop()`` shuts it down cleanly, ``kill()`` sends SIGKILL, ``start()`` starts it again on the same port and data;
    each returns once the server answers or has gone. ``close()`` stops it and removes its files.
    """

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, port: int, log_path: Path, timeout: float) -> None:
        self.port = port
        self.log_path = log_path
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id (PostgreSQL's postmaster) while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start the server and wait until it answers (``self.timeout`` seconds at most, else AssertionError with the
        log). A process that exits while starting is started again, in case what it needs (its port, PostgreSQL's
        shared memory) is still held for a moment by the process it replaces."""
        if self.running:
            raise RuntimeError(f"{self.name} on port {self.port} is already running")
        deadline = time.monotonic() + self.timeout
        while True:
            if not self.running:
                self._proc = self._spawn()
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"{self.name} on port {self.port} did not answer within {self.timeout} s; "
                    f"log {self.log_path}:\n{self.log()[-LOG_TAIL:]}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Shut the server down cleanly and wait for it (SIGKILL if it takes longer than ``self.timeout``)."""
        self._end(self.stop_signal)

    def kill(self) -> None:
        """SIGKILL the server and wait until it is gone."""
        self._end(signal.SIGKILL)

    def close(self) -> None:
        """Stop the server if it runs, and remove what it left on disk (idempotent)."""
        if self.running:
            try:
                self.stop()
            finally:
                self.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(self.timeout)

    def _spawn(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError


class PostgresServer(DedicatedServer):
    """A PostgreSQL cluster of the test's own (trust auth, user ``postgres``, database ``postgres``); as root, its
    binaries run as the ``postgres`` user, which initdb requires, on a data directory that user owns."""

    name = "PostgreSQL"
    stop_signal = signal.SIGINT  # fast shutdown: roll back open transactions, end sessions, checkpoint

    def __init__(self, port: int, log_path: Path, timeout: float) -> None:
        super().__init__(port, log_path, timeout)
        # Not under pytest's tmp_path: it is private to root, and the postgres user must reach its data.
        self.home = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data = self.home / "data"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            shutil.chown(self.home, self._user, self._user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def initdb(self) -> None:
        command = [postgres_binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
        command += ["-E", "UTF8", "--locale=C", "--no-sync"]
        done = subprocess.run(command, capture_output=True, timeout=self.timeout, check=False, **self._as_owner())
        if done.returncode != 0:
            raise AssertionError(f"initdb failed ({done.returncode}):\n{done.stdout.decode()}{done.stderr.decode()}")

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    def _as_owner(self) -> dict[str, Any]:
        """Popen arguments that run a binary as the data directory's owner, in a directory that owner may enter."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        if self._user is None:
            return {"cwd": self.home, "env": env}
        return {"cwd": self.home, "env": env, "user": self._user, "group": self._user, "extra_groups": []}

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started, at once (as when its machine or container dies), and
        wait until they are gone: a postmaster killed alone leaves its backends answering for a moment."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGSTOP)  # stopped, it cannot start a process while its children are listed
        children = child_pids(proc.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(self.timeout)
        deadline = time.monotonic() + self.timeout
        while any(map(is_running, children)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}'s processes {children} outlived SIGKILL by {self.timeout} s")
            time.sleep(0.01)

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [postgres_binary("postgres"), "-D", str(self.data), "-p", str(self.port), "-h", LOOPBACK]
        # No Unix socket (TCP only, nothing shared with the machine's cluster); small, for many short-lived clusters.
        command += ["-k", "", "-c", "shared_buffers=16MB", "-c", "max_connections=50"]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **self._as_owner())

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True


class RedisServer(DedicatedServer):
    """A Redis server of the test's own that keeps nothing on disk: a restart starts empty."""

    name = "Redis"

    def __init__(self, port: int, log_path: Path, timeout: float) -> None:
        super().__init__(port, log_path, timeout)
        self.home = log_path.parent

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", LOOPBACK]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.home)]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _answers(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One try per poll: redis-py's default retries three times with backoff.
        client = redis.Redis(
            host=LOOPBACK, port=self.port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # it ended while we looked
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (which holds no socket and no memory any more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def postgres_binary(name: str) -> str:
    """A PostgreSQL server binary (initdb, postgres): Debian keeps them off PATH, one directory per major version,
    of which the newest is taken."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)],
    )
    found = str(candidates[-1]) if candidates else shutil.which(name)
    if found is None:
        raise AssertionError(f"PostgreSQL's {name} is neither in /usr/lib/postgresql/*/bin nor on PATH")
    return found


def start_postgres(tmp_path: Path, *, port: int | None = None, timeout: float = READY_TIMEOUT) -> PostgresServer:
    """A new PostgreSQL cluster on a free port (``.url``), started and answering; ``close()`` it (or use ``with``)."""
    server = PostgresServer(port or free_port(), tmp_path / "postgres.log", timeout)
    try:
        server.initdb()
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def start_redis(tmp_path: Path, *, port: int | None = None, timeout: float = READY_TIMEOUT) -> RedisServer:
    """A new Redis server on a free port (``.url``), started and answering; ``close()`` it (or use ``with``)."""
    server = RedisServer(port or free_port(), tmp_path / "redis.log", timeout)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


# --- small and read-only file systems ---------------------------------------------------------------------------------


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted on ``path`` (needs root): a disk that ``fill()`` fills up and ``free()``
    frees, and that ``read_only()`` remounts read-only.

    A store on it sees the real errors: SQLite's "database or disk is full" (SQLITE_FULL), and on a read-only mount
    "unable to open database file" (a WAL database cannot even be read without its -shm file). Linux refuses to
    remount read-only while any file on it is open for writing, so turn it read-only before the store is opened.
    """

    FILLER: Final[str] = ".filler"

    def __init__(self, path: Path, size: int = 1 << 20) -> None:
        self.path = path
        self.size = size
        self.mounted = False

    def mount(self) -> Self:
        self.path.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path))
        self.mounted = True
        return self

    @property
    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Write a filler file until the disk is full; the bytes written."""
        written = 0
        fd = os.open(self.path / self.FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (b"\0" * CHUNK, b"\0" * 4096, b"\0"):
                while True:
                    try:
                        written += os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        """Remove the filler: the space it took is free again."""
        (self.path / self.FILLER).unlink(missing_ok=True)

    def read_only(self) -> None:
        """Remount read-only (AssertionError with mount's message when a file on it is open for writing)."""
        _mount("-o", "remount,ro", str(self.path))

    def writable(self) -> None:
        _mount("-o", "remount,rw", str(self.path))

    def unmount(self) -> None:
        """Unmount (lazily if a process still holds a file on it; idempotent)."""
        if not self.mounted:
            return
        if subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode != 0:
            _run(["umount", "-l", str(self.path)])
        self.mounted = False

    def __enter__(self) -> Self:
        return self.mount()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()


def _mount(*args: str) -> None:
    _run(["mount", *args])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=CONTROL_TIMEOUT, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")


def sqlite_read_only_url(path: Path) -> str:
    """A DATABASE_URL that opens the SQLite file at ``path`` read-only (SQLite's ``mode=ro``, any user, no mount):
    reads work, every write fails with "attempt to write a readonly database" (SQLITE_READONLY)."""
    return f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
