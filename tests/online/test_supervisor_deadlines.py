"""Request deadlines of the real server (supervisor.DeadlineProtocol): clients that trickle their headers or body,
or promise more body than they send, are disconnected; those that leave are logged as 499, never as errors."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from moviematch_ml.features import EXAMPLE
from probes import LOOPBACK, call, closed_by_server, read_response, request_head, wait_until
from realserver import Server, start, stop

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MARGIN = 1.5  # seconds past a deadline that a busy machine may take to close the connection


@pytest.fixture(scope="module")
def strict_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server with a second for a request's headers and a second for its body."""
    tmp_path = tmp_path_factory.mktemp("server")
    server = start(
        tmp_path,
        MODEL_PATH=str(tiny_model_dir),
        DATABASE_URL=f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
        HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        BODY_TIMEOUT=str(BODY_TIMEOUT),
    )
    try:
        yield server
    finally:
        stop(server)


def _trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Send ``data`` a byte at a time, one every ``every`` seconds, until sent, stopped or refused."""
    for i in range(len(data)):
        if stop.wait(every):
            return
        try:
            sock.send(data[i : i + 1])
        except OSError:  # the server closed the connection: what the test waits for
            return


def _time_to_close(port: int, opening: bytes, trickled: bytes) -> float:
    """Seconds from sending ``opening`` on a new connection, then trickling ``trickled`` (a byte every 0.1 s,
    never all of it in time), until the server closes the connection."""
    stop = threading.Event()
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(opening)
        sender = threading.Thread(target=_trickle, args=(sock, trickled, 0.1, stop))
        sender.start()
        try:
            closed_by_server(sock, HEADER_TIMEOUT + BODY_TIMEOUT + 10)
            return time.monotonic() - started
        finally:
            stop.set()
            sender.join()


def _in_threads(*calls: Callable[[], float]) -> list[float]:
    """Run the calls at once (each in a thread); their results in order."""
    results: list[float] = [0.0] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_slow_and_lying_clients_are_disconnected(strict_server: Server) -> None:
    """Defect 5, deadlines: 4,000 connections trickling their headers or body for 25 s were never closed, and a
    Content-Length that promised more than was sent held its connection forever. With HEADER_TIMEOUT=1 and
    BODY_TIMEOUT=1: headers trickled a byte every 0.1 s, a body trickled the same way, and a body that stops short of
    its Content-Length each have their connection closed about a second in; the requests the clients left are logged
    at info as 499, and nothing at error level (defect 6: leaving clients were logged as server errors, with a 500)."""
    port = strict_server.port
    body = orjson.dumps(EXAMPLE)
    head = request_head("POST", "/predict", len(body), "X-Request-ID: cut-short\r\n")
    headers_trickled, body_trickled, body_promised = _in_threads(
        lambda: _time_to_close(port, b"", head),
        lambda: _time_to_close(port, head, body),
        lambda: _time_to_close(port, head + body[:10], b""),
    )
    assert HEADER_TIMEOUT - 0.1 < headers_trickled < HEADER_TIMEOUT + MARGIN
    assert BODY_TIMEOUT - 0.1 < body_trickled < HEADER_TIMEOUT + BODY_TIMEOUT + MARGIN
    assert BODY_TIMEOUT - 0.1 < body_promised < BODY_TIMEOUT + MARGIN
    assert call(port, "POST", "/predict", EXAMPLE).status == 200  # the worker serves on

    # The two requests whose headers came in are the clients'; the first never became a request.
    def cut() -> list[tuple[int, str]]:
        return [(e["status"], e["level"]) for e in strict_server.log_entries() if e.get("request_id") == "cut-short"]

    wait_until(lambda: len(cut()) == 2, 5, "the access lines of the two cut requests")
    assert cut() == [(499, "info"), (499, "info")]
    assert [e for e in strict_server.log_entries() if e["level"] in ("error", "critical")] == []


def test_a_client_that_leaves_mid_body_is_a_499_not_an_error(strict_server: Server) -> None:
    """Defect 6: a client that left in the middle of its /feedback body produced an error-level "unhandled error"
    with a traceback and a 500 in the access log. It is the client's doing: one info line, status 499."""
    body = orjson.dumps({"user_id": 1, "movie_id": 2, "rating": 5})
    with socket.create_connection((LOOPBACK, strict_server.port), timeout=10) as sock:
        sock.sendall(request_head("POST", "/feedback", len(body), "X-Request-ID: left\r\n") + body[:5])
    wait_until(lambda: any(e.get("request_id") == "left" for e in strict_server.log_entries()), 5, "the access line")
    lines = [e for e in strict_server.log_entries() if e.get("request_id") == "left"]
    assert [(e.get("status"), e["level"]) for e in lines] == [(499, "info")]
    assert [e for e in strict_server.log_entries() if e["level"] in ("error", "critical")] == []


def test_a_body_that_never_ends_gets_its_413_then_is_cut_off(strict_server: Server) -> None:
    """An oversized body keeps coming after its 413 (the server reads it to a bound, answers, then throws the rest
    away on a connection kept open, so that the client can read the answer): the connection is closed
    HEADER_TIMEOUT after the answer, however much is still to come."""
    stop = threading.Event()
    with socket.create_connection((LOOPBACK, strict_server.port), timeout=10) as sock:
        sock.sendall(request_head("POST", "/predict-batch", 1 << 40))  # a terabyte promised, zeros sent for ever

        def flood() -> None:
            chunk = b"0" * 65536
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    sock.sendall(chunk)

        sender = threading.Thread(target=flood)
        sender.start()
        try:
            status, _, payload = read_response(sock)
            answered = time.monotonic()
            assert (status, orjson.loads(payload)["error"]) == (413, "body_too_large")
            closed_by_server(sock, HEADER_TIMEOUT + 10)
            assert time.monotonic() - answered < HEADER_TIMEOUT + MARGIN
        finally:
            stop.set()
            sender.join(10)


def test_an_answer_before_the_body_keeps_the_header_deadline(strict_server: Server) -> None:
    """A request answered before its body arrives (here a 415: the Content-Type is refused first; an overloaded
    503, a 401 or an oversized 413 answer early the same way), then its body, then silence: the connection is still
    closed HEADER_TIMEOUT after the answer. (The body's arrival used to cancel that deadline, and uvicorn's
    keep-alive timer with it: the connection stayed open for ever.)"""
    body = orjson.dumps(EXAMPLE)
    head = request_head("POST", "/predict", len(body)).replace(b"application/json", b"text/plain")
    with socket.create_connection((LOOPBACK, strict_server.port), timeout=10) as sock:
        sock.sendall(head)
        status, _, payload = read_response(sock)
        assert (status, orjson.loads(payload)["error"]) == (415, "unsupported_media_type")
        answered = time.monotonic()
        sock.sendall(body)
        closed_by_server(sock, HEADER_TIMEOUT + 10)
        assert time.monotonic() - answered < HEADER_TIMEOUT + MARGIN
