"""Signals to the real server (one worker, the default): SIGTERM under keep-alive load drains without dropping a
request, SIGHUP does not kill it."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from moviematch_ml.features import EXAMPLE
from probes import LOOPBACK, call, wait_until
from realserver import Server, start, stop

DRAIN_SECONDS = 1.0
CLIENTS = 4


@pytest.fixture
def server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Server]:
    s = start(
        tmp_path,
        MODEL_PATH=str(tiny_model_dir),
        DATABASE_URL=f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
        DRAIN_SECONDS=str(DRAIN_SECONDS),
    )
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            stop(s)


@dataclass
class KeepAliveClient:
    """Sends /predict requests one after the other on a kept-alive connection (a new one when the server says
    ``Connection: close``), as a load balancer's pool does, until ``stopped`` is set (the load balancer has taken
    the server out of its rotation) or a connection is refused (the listener is closed: nothing was sent)."""

    port: int
    stopped: threading.Event
    answered: list[tuple[float, bool]] = field(default_factory=list)  # (when, whether it said Connection: close)
    dropped: list[str] = field(default_factory=list)  # requests sent that got no answer

    def run(self) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        body = orjson.dumps(EXAMPLE)
        try:
            while not self.stopped.is_set():
                if conn.sock is None:
                    try:
                        conn.connect()
                    except ConnectionRefusedError:
                        return
                try:
                    conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.dropped.append(repr(exc))
                    conn.close()
                    continue
                assert response.status == 200, response.status
                self.answered.append((time.monotonic(), response.getheader("connection") == "close"))
        finally:
            conn.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
def test_sigterm_under_keep_alive_load_drops_nothing(server: Server) -> None:
    """Defect 8, SIGTERM: under load, about one kept-alive request per run was dropped, and readiness never turned
    503 before the listener closed. Four clients send requests without pause on kept-alive connections through
    the SIGTERM, as a load balancer does until it sees the server not ready (it reacts here half of DRAIN_SECONDS
    after its probe's first 503). /health/ready turns 503 while requests are still served, each answer from then on
    says ``Connection: close``, every request sent is answered (none reset or left unanswered), and the process
    exits 0. A fifth connection, kept alive and left idle through the drain, sends a request the moment the
    listener closes: it is answered too (uvicorn closed such a connection at once, its request unread)."""
    stopped = threading.Event()
    clients = [KeepAliveClient(server.port, stopped) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=c.run) for c in clients]
    readiness: list[tuple[float, int | None]] = []  # (when, status; None: refused)

    def probe() -> None:
        while True:
            try:
                status = call(server.port, "GET", "/health/ready").status
            except ConnectionRefusedError:
                readiness.append((time.monotonic(), None))
                return
            readiness.append((time.monotonic(), status))
            if status == 503 and not stopped.is_set():
                threading.Timer(DRAIN_SECONDS / 2, stopped.set).start()
            time.sleep(0.05)  # a probe's period

    idle = http.client.HTTPConnection(LOOPBACK, server.port, timeout=30)
    prober = threading.Thread(target=probe)
    try:
        idle.request("POST", "/predict", orjson.dumps(EXAMPLE), {"Content-Type": "application/json"})
        first = idle.getresponse()
        assert (first.status, first.getheader("connection"), len(first.read()) > 0) == (200, None, True)
        for t in [*threads, prober]:
            t.start()
        wait_until(lambda: all(len(c.answered) >= 5 for c in clients), 15, "every client answered")
        sigterm = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(server.port), 15, "the listener closed", every=0.002)
        idle.request("POST", "/predict", orjson.dumps(EXAMPLE), {"Content-Type": "application/json"})
        last = idle.getresponse()
        assert (last.status, last.getheader("connection")) == (200, "close")
        assert orjson.loads(last.read())["source"] == "model"
        assert server.proc.wait(timeout=30) == 0
    finally:
        stopped.set()
        idle.close()
        for t in [*threads, prober]:
            t.join(30)
    assert [c.dropped for c in clients] == [[]] * CLIENTS
    for c in clients:
        during = [close for when, close in c.answered if when > sigterm]
        assert during, "no request answered while draining"
        assert during[-1] is True  # the last answers told the client to close its connection
    statuses = [status for _, status in readiness]
    assert statuses[-1] is None  # the probe ran until the listener closed
    first_503 = statuses.index(503)
    assert set(statuses[:first_503]) == {200}
    assert set(statuses[first_503:-1]) == {503}  # not ready from the SIGTERM until the listener closed
    assert readiness[first_503][0] > sigterm
    assert readiness[-1][0] - readiness[first_503][0] >= DRAIN_SECONDS - 0.2
    server.wait_for_log("draining: not ready any more, closing the listener soon")


def test_sighup_with_one_worker_reloads_and_keeps_serving(server: Server) -> None:
    """Defect 8, SIGHUP: with one worker (the default) it killed the process at once, with no drain and no log line.
    Now SIGHUP reloads the models (issue 15): the process logs it, goes on serving, and still stops cleanly."""
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_log("SIGHUP received: reloading the models")
    server.wait_for_log("models reloaded")
    assert server.proc.poll() is None
    assert call(server.port, "POST", "/predict", EXAMPLE).status == 200
    assert call(server.port, "GET", "/health/ready").status == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
