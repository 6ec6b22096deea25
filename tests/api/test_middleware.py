"""The request middleware of the real server: bounded concurrency (503 overloaded, at once) and the 413 of an
oversized body that the client reads instead of a reset connection."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from moviematch_ml.features import EXAMPLE
from probes import LOOPBACK, LiveProbe, call, read_response, request_head, wait_until
from realserver import Server, start, stop

MAX_CONCURRENCY = 4
MAX_BODY_BYTES = 4096


@pytest.fixture(scope="module")
def small_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server that handles 4 requests at once per worker and bodies of 4 KiB at most."""
    tmp_path = tmp_path_factory.mktemp("server")
    server = start(
        tmp_path,
        MODEL_PATH=str(tiny_model_dir),
        DATABASE_URL=f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
        MAX_CONCURRENCY=str(MAX_CONCURRENCY),
        MAX_BODY_BYTES=str(MAX_BODY_BYTES),
    )
    try:
        yield server
    finally:
        stop(server)


def test_past_max_concurrency_requests_get_503_at_once(small_server: Server) -> None:
    """Defect 5, overload: with 1,000 connections requests queued for up to 10 s, /health/live took over 5 s, and
    none got a 503 or Retry-After. Four requests whose bodies arrive slowly fill MAX_CONCURRENCY=4: every other
    request gets 503 ``overloaded`` with Retry-After in well under a second, /health/live answers in under 50 ms
    meanwhile, the four slow ones get their 200 once their bodies are in, and the worker takes requests again."""
    port = small_server.port
    body = orjson.dumps(EXAMPLE)
    with contextlib.ExitStack() as stack:
        slow = [stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=10)) for _ in range(4)]
        for sock in slow:  # the headers and half the body: each request is in the app, waiting for the rest
            sock.sendall(request_head("POST", "/predict", len(body)) + body[:10])
        wait_until(lambda: call(port, "POST", "/predict", EXAMPLE).status == 503, 10, "the worker at MAX_CONCURRENCY")
        with LiveProbe(port, interval=0.05) as probe:
            refused = [call(port, "POST", "/predict", EXAMPLE) for _ in range(20)]
            refused += [call(port, "POST", "/feedback", {"user_id": 1, "movie_id": 2, "rating": 5}) for _ in range(5)]
            probe.wait_for(10)
        probe.check(10)
        for answer in refused:
            assert (answer.status, answer.body["error"]) == (503, "overloaded"), answer
            assert answer.headers["retry-after"] == "1"
            assert answer.seconds < 0.5, answer
        for sock in slow:
            sock.sendall(body[10:])
        for sock in slow:
            status, _, payload = read_response(sock)
            assert status == 200
            assert orjson.loads(payload)["source"] == "model"
    assert call(port, "POST", "/predict", EXAMPLE).status == 200


def test_a_burst_past_max_concurrency_is_refused_at_once_not_queued(small_server: Server) -> None:
    """Defect 5, overload: with 1,000 connections no request ever got a 503, since the middleware's count (requests
    inside the app) stays at 1 or 2 however many wait: the event loop parses every ready request before it runs
    any, so they queue unseen. The server counts them where they start. Twenty requests that arrive at once (the
    server stopped while they are sent, then resumed): MAX_CONCURRENCY=4 of them are answered, the others get 503
    ``overloaded`` with Retry-After, and a health probe sent in the same burst is answered, never refused."""
    port = small_server.port
    body = orjson.dumps(EXAMPLE)
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=10)) for _ in range(21)]
        for sock in socks:  # each connection accepted and idle: nothing in flight
            sock.sendall(request_head("GET", "/health/live", 0))
            assert read_response(sock)[0] == 200
        small_server.proc.send_signal(signal.SIGSTOP)
        try:
            for sock in socks[:20]:
                sock.sendall(request_head("POST", "/predict", len(body)) + body)
            socks[20].sendall(request_head("GET", "/health/live", 0))
            time.sleep(0.2)  # every request in the kernel's buffers before the server reads any
        finally:
            small_server.proc.send_signal(signal.SIGCONT)
        answers = [read_response(sock) for sock in socks]
        statuses = Counter(status for status, _, _ in answers[:20])
        assert answers[20][0] == 200
        assert statuses[200] >= MAX_CONCURRENCY
        assert statuses[503] >= 20 - 2 * MAX_CONCURRENCY  # read in one pass, or two at most
        assert statuses[200] + statuses[503] == 20
        for status, headers, payload in answers[:20]:
            if status == 503:
                assert (orjson.loads(payload)["error"], headers["retry-after"]) == ("overloaded", "1")
        # A refused connection is not read for its Retry-After (0.5-1.5 s): a request sent at once waits that out in
        # the kernel, then is answered.
        held = socks[[status for status, _, _ in answers[:20]].index(503)]
        start = time.monotonic()
        held.sendall(request_head("POST", "/predict", len(body)) + body)
        assert read_response(held)[0] == 200
        assert time.monotonic() - start >= 0.4
    assert call(port, "POST", "/predict", EXAMPLE).status == 200  # and it takes requests again


def _responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` responses read from ``sock`` (pipelined: one read may hold several)."""
    data = b""
    answers: list[tuple[int, dict[str, str], bytes]] = []
    while len(answers) < count:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            length = int(headers.get("content-length", "0"))
            if len(rest) >= length:
                answers.append((int(status_line.split()[1]), headers, rest[:length]))
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed by the server after {len(answers)} answers"
        data += chunk
    return answers


def test_a_live_probe_at_capacity_gets_the_apps_whole_answer(small_server: Server) -> None:
    """/health/live is run through the app in the server's callback that parses it, without a task (supervisor):
    at MAX_CONCURRENCY, with predictions refused, it still gets the app's whole answer (body, JSON, the client's
    request id, the security headers), also pipelined behind another probe and before a prediction on one kept-alive
    connection, each answer in order, and the connection then serves a prediction once the worker has room."""
    port = small_server.port
    body = orjson.dumps(EXAMPLE)
    with contextlib.ExitStack() as stack:
        slow = [stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=10)) for _ in range(4)]
        for sock in slow:  # MAX_CONCURRENCY requests in the app, each waiting for the rest of its body
            sock.sendall(request_head("POST", "/predict", len(body)) + body[:10])
        wait_until(lambda: call(port, "POST", "/predict", EXAMPLE).status == 503, 10, "the worker at MAX_CONCURRENCY")
        probe = stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=10))
        probe.sendall(
            request_head("GET", "/health/live", 0, "X-Request-ID: probe-1\r\n")
            + request_head("GET", "/health/live", 0, "X-Request-ID: probe-2\r\n")
            + request_head("POST", "/predict", len(body))
            + body
        )
        first, second, refused = _responses(probe, 3)
        for (status, headers, payload), request_id in ((first, "probe-1"), (second, "probe-2")):
            assert (status, orjson.loads(payload)) == (200, {"status": "alive"})
            assert headers["content-type"] == "application/json"
            assert headers["x-request-id"] == request_id
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["x-frame-options"] == "DENY"
            assert headers["cache-control"] == "no-store"
            assert "connection" not in headers  # kept alive
        assert (refused[0], orjson.loads(refused[2])["error"]) == (503, "overloaded")
        for sock in slow:
            sock.sendall(body[10:])
        for sock in slow:
            assert read_response(sock)[0] == 200
        # Refused, this connection is not read for its Retry-After; then it serves a prediction and a probe again.
        probe.sendall(request_head("POST", "/predict", len(body)) + body + request_head("GET", "/health/live", 0))
        (status, _, payload), (live, _, _) = _responses(probe, 2)
        assert (status, orjson.loads(payload)["source"], live) == (200, "model", 200)


@pytest.mark.parametrize("size", [10_000, 5_000_000], ids=["within-the-drain-bound", "1000-times-the-limit"])
def test_an_oversized_body_sent_whole_gets_its_413(small_server: Server, size: int) -> None:
    """Defect 5, the oversized body: sent whole, without ``Expect: 100-continue``, a body over MAX_BODY_BYTES got a
    reset connection instead of its 413, which the Node client saw as a network error (and, once the server read
    4 x MAX_BODY_BYTES of it and then closed the connection, so did any bigger body). The client reads the 413 JSON
    whatever the size, and the connection stays usable."""
    padding = size - len(b'{"movies":[]}')
    big = b'{"movies":[' + b" " * padding + b"]}"
    assert len(big) == size > MAX_BODY_BYTES
    small = orjson.dumps(EXAMPLE)
    with socket.create_connection((LOOPBACK, small_server.port), timeout=10) as sock:
        sock.sendall(request_head("POST", "/predict-batch", len(big)) + big)
        status, headers, payload = read_response(sock)
        assert status == 413
        assert headers["content-type"] == "application/json"
        assert "connection" not in headers  # kept alive
        assert orjson.loads(payload)["error"] == "body_too_large"
        sock.sendall(request_head("POST", "/predict", len(small)) + small)  # the same connection, read to its end
        status, _, payload = read_response(sock)
        assert (status, orjson.loads(payload)["source"]) == (200, "model")


@pytest.mark.parametrize("root_path", ["", "/ml"])
def test_the_probes_skip_the_concurrency_limit_behind_a_prefix_too(root_path: str) -> None:
    """At capacity the health probes still reach the app, also when a proxy serves the service under a prefix (the
    ASGI path then starts with the root path, which the limit's exemption once compared raw), and a prediction is
    refused with 503 overloaded."""
    import asyncio

    from starlette.types import Message, Receive, Scope, Send

    from moviematch_ml.api.middleware import RequestContextMiddleware
    from moviematch_ml.online.lifecycle import Lifecycle

    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = RequestContextMiddleware(app, max_body_bytes=1024, max_concurrency=1, lifecycle=Lifecycle())
    middleware.in_flight = 1  # one request in progress: the worker is at capacity

    async def status_of(path: str) -> int:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": root_path + path, "root_path": root_path, "headers": []}
        await middleware(scope, receive, send)
        return int(sent[0]["status"])

    statuses = {p: asyncio.run(status_of(p)) for p in ("/health/live", "/health/ready", "/health", "/predict")}
    assert statuses == {"/health/live": 200, "/health/ready": 200, "/health": 200, "/predict": 503}
    assert reached == [root_path + p for p in ("/health/live", "/health/ready", "/health")]
