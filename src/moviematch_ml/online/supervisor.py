"""Running the service under uvicorn: several worker processes, each with its own listening socket.

uvicorn's workers share one listening socket, and whichever worker wakes first accepts every connection waiting
on it. A client that opens a few keep-alive connections at once (a load balancer's pool, a benchmark's 8
connections) can so land them all on one worker while the others idle, at half the throughput
(docs/performance-history.md). Here every worker binds its own socket to the same port with SO_REUSEPORT, and the
kernel spreads new connections over the workers' sockets. Everything else (health checks of the workers,
restarts, graceful SIGTERM) is uvicorn's own supervisor, unchanged.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Coroutine, Generator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any, ClassVar, Final

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess, multiprocess

from moviematch_ml.errors import ConfigError
from moviematch_ml.online.lifecycle import HEALTH_PROBES, LIVE_PROBE, OVERLOADED, PROCESS, route_path

log = logging.getLogger(__name__)

PARENT_CHECK_SECONDS: Final[float] = 1.0
# At shutdown, how long a connection without a request in progress stays open for one that is already on its way.
SHUTDOWN_GRACE_SECONDS: Final[float] = 0.5
# How long a connection is not read after a 503 overloaded: its Retry-After.
REFUSED_HOLD_SECONDS: Final[float] = 1.0
# How many admitted requests, and how many refusals (503 overloaded), a worker starts in one turn of its event loop;
# the others wait for the next turns, in order. A burst of requests started in one turn runs to its end in the next
# one (each request runs in one go), and every connection waits for that whole turn: /health/live, whose accept, read
# and answer take a turn each, waited for 3 turns of 64 requests' work, and one turn refused the whole first burst
# of 1,000 connections. The work is the same in more, shorter turns: at 8 a turn, throughput was no lower
# (docs/operations.md, Overload); a refusal costs about a quarter of an answer, and still goes out well within a
# second.
ADMIT_PER_TURN: Final[int] = 8
REFUSE_PER_TURN: Final[int] = 32


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with deadlines on reading a request: ``header_timeout`` seconds for its headers (from
    the connection's start, or the end of the previous response), then ``body_timeout`` seconds for its body. A
    client that trickles its request, or whose Content-Length promises more than it sends, is disconnected rather
    than holding a connection (and its memory) forever. (uvicorn has a keep-alive timeout for idle connections,
    none for these.)"""

    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0
    # MAX_CONCURRENCY, counted where a request starts: the worker's admitted requests that have not finished. Under
    # a burst the event loop parses every ready connection's request before it runs any of them, so they queue
    # here, each waiting for all those before it, while the middleware's own count (requests inside the app) stays
    # at 1 or 2: each runs to its end in one go. A request past the bound is marked, and the middleware answers it
    # 503 at once without running the app (with its usual log line, headers and metrics). Refusals are not counted:
    # clients that retry at once would otherwise keep the count up with refusals alone, and admit nothing. The
    # health probes are neither counted nor refused.
    max_tasks: ClassVar[int | None] = None
    admitted: ClassVar[int] = 0  # one server per worker process: its connections share the count

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        path = route_path(cycle.scope)
        if path == LIVE_PROBE and cycle.scope["method"] in ("GET", "HEAD"):
            self._run_now(cycle, app)
        elif self.max_tasks is None or path in HEALTH_PROBES:
            super()._start_asgi_task(cycle, app)
        elif DeadlineProtocol.admitted >= self.max_tasks:
            cycle.scope.setdefault("state", {})[OVERLOADED] = True
            self._refused = True
            _REFUSALS.start(self, cycle, app)
        else:
            DeadlineProtocol.admitted += 1
            _ADMISSIONS.start(self, cycle, _counted(app))

    def _run_now(self, cycle: Any, app: Any) -> None:
        """Run the request through the whole app (middleware, guard, route: the same answer, log line and metrics)
        here, in the loop's callback that parsed it, instead of in a task that would wait for every task scheduled
        before it: /health/live is answered in the turn that reads it, which is still a turn of this loop (a loop
        that does not turn answers nothing). If the app waits on something, the rest runs as a task."""
        context = contextvars.copy_context()  # as a task would: the app's context variables stay its own
        coroutine = cycle.run_asgi(app)
        try:
            waited = context.run(coroutine.send, None)
        except StopIteration:
            return
        task = self.loop.create_task(_resume(coroutine, waited), context=context)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._too_slow)
        self._shutting_down = False
        self._refused = False  # the request in progress was refused (503 overloaded)
        self._resume: asyncio.TimerHandle | None = None

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed
        if self.cycle is None or not self.cycle.response_complete:
            # (Answered already, as /health/live is: the deadline running is the next request's headers'.)
            self._deadline = self.loop.call_later(self.body_timeout, self._too_slow)

    def on_message_complete(self) -> None:
        # The body is in: the app answers in its own time. Unless it has already answered (a 413, 415 or 503 sent
        # before the body came): the deadline running then is the next request's headers', which the arriving body
        # must not cancel (it cancels uvicorn's keep-alive timer too, so nothing else would ever close the
        # connection).
        if self.cycle is None or not self.cycle.response_complete:
            self._cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._cancel_deadline()
            self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)
            if self._refused:
                self._hold()

    def _hold(self) -> None:
        """After a 503 overloaded, stop reading this connection for the Retry-After second. A client that honours it
        loses nothing; one that sends at once waits in the kernel's buffer, not in the worker's event loop, whose
        every turn would otherwise parse, refuse and log each such client's next request (at 1,000 connections a
        turn, and so /health/live, took most of a second). The header deadline restarts when reading does."""
        self._refused = False
        if self._resume is None and not self.flow.read_paused:
            self.transport.pause_reading()
            self._cancel_deadline()
            # Spread over a second around Retry-After: held connections released together would come back as one
            # burst, in one turn of the loop.
            hold = REFUSED_HOLD_SECONDS * (0.5 + random.random())
            self._resume = self.loop.call_later(hold, self._release)

    def _release(self) -> None:
        self._resume = None
        if not self.transport.is_closing() and not self.flow.read_paused:
            self.transport.resume_reading()
            self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def shutdown(self) -> None:
        """The server stops (its listener is closed already): a request in progress is finished, then the connection
        closed. uvicorn closes a connection without one at once, but a request may be on its way there (on a
        connection just accepted, or sent by a client that has not read the last answer's ``Connection: close``):
        closing with its bytes unread resets the connection under the client, which loses the request. So such a
        connection gets SHUTDOWN_GRACE_SECONDS for a request, which is answered, before it is closed."""
        self._shutting_down = True
        if self._resume is not None:  # a held connection is read again: a request waiting there is answered
            self._resume.cancel()
            self._release()
        if self.cycle is not None and not self.cycle.response_complete:
            super().shutdown()
            return
        self._cancel_deadline()
        self._deadline = self.loop.call_later(SHUTDOWN_GRACE_SECONDS, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        super().connection_lost(exc)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
            return  # the request is in, the app is answering: not the client's delay
        if not self.transport.is_closing():
            log.info("request not received in time; connection closed", extra={"client": str(self.client)})
            self.transport.close()


class _Turns:
    """Requests started at most ``budget`` a turn of the event loop, in the order they came; the others wait for the
    next turns. (One worker, one loop: an instance serves the process's connections.)"""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.started = 0  # in this turn
        self.waiting: deque[tuple[DeadlineProtocol, Any, Any]] = deque()
        self.scheduled = False

    def start(self, protocol: DeadlineProtocol, cycle: Any, app: Any) -> None:
        if self.started < self.budget and not self.waiting:
            self.started += 1
            HttpToolsProtocol._start_asgi_task(protocol, cycle, app)
        else:
            self.waiting.append((protocol, cycle, app))
        if not self.scheduled:
            self.scheduled = True
            protocol.loop.call_soon(self.next_turn, protocol.loop)

    def next_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """A new turn (a callback scheduled now runs in the next one): the next requests that wait are started."""
        self.started = 0
        self.scheduled = False
        while self.waiting and self.started < self.budget:
            protocol, cycle, app = self.waiting.popleft()
            self.started += 1
            # Started even if the client has left meanwhile: the app sees the disconnect (a 499) and an admitted
            # request's count goes down when it ends, as for any request.
            HttpToolsProtocol._start_asgi_task(protocol, cycle, app)
        if self.started:
            self.scheduled = True
            loop.call_soon(self.next_turn, loop)


_ADMISSIONS = _Turns(ADMIT_PER_TURN)
_REFUSALS = _Turns(REFUSE_PER_TURN)


async def _resume(coroutine: Coroutine[Any, Any, None], waited: Any) -> None:
    """Go on with ``coroutine``, stepped by hand until it ``waited`` on something (``DeadlineProtocol._run_now``),
    as its own task would: wait for what it waits on (cancelled with this task), then step it again."""
    while True:
        if waited is None:
            await asyncio.sleep(0)  # a bare yield: give the loop a turn
        else:
            # What a task does with a future its coroutine yields: taken over (else awaiting it again is an error)
            # and waited for. The coroutine reads the outcome itself (result, exception, cancellation) when stepped.
            waited._asyncio_future_blocking = False
            with suppress(BaseException):
                await waited
        try:
            waited = coroutine.send(None)
        except StopIteration:
            return


def _counted(app: Any) -> Any:
    """``app``, its request uncounted from ``DeadlineProtocol.admitted`` when it ends, however it ends."""

    async def run(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            DeadlineProtocol.admitted -= 1

    return run


def reuse_port_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, listening unless ``listen`` is False."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Worker(uvicorn.Server):
    """A worker's uvicorn server: SIGTERM drains (readiness turns 503 for ``drain_seconds`` while requests are still
    served, then uvicorn closes the listener and finishes what is in flight); SIGHUP reloads (or is ignored with a
    log line) instead of killing the process; request deadlines come from the config (``DeadlineProtocol``)."""

    drain_seconds: ClassVar[float] = 0.0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        DeadlineProtocol.header_timeout = getattr(self.config, "header_timeout", DeadlineProtocol.header_timeout)
        DeadlineProtocol.body_timeout = getattr(self.config, "body_timeout", DeadlineProtocol.body_timeout)
        DeadlineProtocol.max_tasks = getattr(self.config, "max_concurrency", DeadlineProtocol.max_tasks)
        _Worker.drain_seconds = getattr(self.config, "drain_seconds", 0.0)
        await super().startup(sockets=sockets)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGHUP, self._handle_hup)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    def _handle_hup(self, sig: int, frame: FrameType | None) -> None:
        PROCESS.reload()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_seconds > 0 and not PROCESS.draining and not self.should_exit:
            PROCESS.drain()
            log.info("draining: not ready any more, closing the listener soon", extra={"seconds": self.drain_seconds})
            timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
            return
        PROCESS.drain()
        super().handle_exit(sig, frame)


class _OwnSocketServer(_Worker):
    """A worker that, given no socket, opens its own SO_REUSEPORT one on the configured host and port, and shuts
    down gracefully if its supervisor dies."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not sockets:
            sockets = [reuse_port_socket(self.config.host, self.config.port)]
        # A worker's own socket keeps the port open after its supervisor is gone (killed by SIGKILL, or by the
        # OOM killer): without a watch it would go on serving, unsupervised, until the machine restarts.
        threading.Thread(target=self._watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
        await super().startup(sockets=sockets)

    def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        self.should_exit = True  # uvicorn's main loop drains the requests in flight and stops


class _OwnSocketProcess(multiprocess.Process):
    """uvicorn's worker process, running ``_OwnSocketServer`` (pickled by reference to this module)."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = _OwnSocketServer(config=self.config)
        return self._server


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of several workers, but SIGHUP reloads each worker's models in place (each gets the
    signal: ``_Worker``) instead of restarting every worker process."""

    def handle_hup(self) -> None:
        log.info("SIGHUP received: every worker reloads its models")
        for process in self.processes:
            pid = process.pid
            if pid is not None and process.process.exitcode is None:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)


def run(
    *,
    app: str,
    host: str,
    port: int,
    workers: int,
    factory: bool = True,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
    drain_seconds: float = 0.0,
    max_concurrency: int | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` (an import string; ``factory``: a function that builds it) on host:port with ``workers``
    processes; requests get ``header_timeout`` and ``body_timeout``, SIGTERM ``drain_seconds``, and past
    ``max_concurrency`` unfinished requests a worker refuses new ones (see ``DeadlineProtocol``)."""
    if options.get("http", "auto") == "auto":
        options["http"] = DeadlineProtocol
    if workers == 1 or not hasattr(socket, "SO_REUSEPORT"):
        config = uvicorn.Config(app, factory=factory, host=host, port=port, workers=1, **options)
        _settle(config, header_timeout, body_timeout, drain_seconds, max_concurrency)
        _Worker(config).run()
        return
    # Bound but not listening, it receives no connection; it holds the port for the workers' sockets (which
    # only other SO_REUSEPORT sockets of this user can share) and turns a port in use into a clear error.
    try:
        guard = reuse_port_socket(host, port, listen=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    port = guard.getsockname()[1]  # port 0: the one the system picked, for every worker
    config = uvicorn.Config(app, factory=factory, host=host, port=port, workers=workers, **options)
    _settle(config, header_timeout, body_timeout, drain_seconds, max_concurrency)
    # uvicorn's supervisor builds its workers from the module's Process class; this process is only the
    # supervisor, so swapping the class here changes nothing else.
    multiprocess.Process = _OwnSocketProcess  # type: ignore[misc]
    try:
        _Supervisor(config, sockets=[]).run()
    finally:
        guard.close()


def _settle(
    config: uvicorn.Config,
    header_timeout: float,
    body_timeout: float,
    drain_seconds: float,
    max_concurrency: int | None,
) -> None:
    """Carry the deadlines and the bound to the workers with their config (what uvicorn hands each worker process)."""
    config.max_concurrency = max_concurrency  # type: ignore[attr-defined]
    config.header_timeout = header_timeout  # type: ignore[attr-defined]
    config.body_timeout = body_timeout  # type: ignore[attr-defined]
    config.drain_seconds = drain_seconds  # type: ignore[attr-defined]
