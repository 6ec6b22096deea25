"""Clients for the fault, overload and signal tests: timed requests, a liveness sampler, raw HTTP on a socket, and a
ledger of ratings that proves no acknowledged one was lost."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import orjson

from moviematch_ml.online.store import FeedbackStore, make_engine

LOOPBACK: Final[str] = "127.0.0.1"
# The target: /health/live answers within this, whatever the dependencies or the load are doing.
LIVE_BUDGET: Final[float] = 0.05


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers (lower-case names), the body (parsed when JSON, else text), and the seconds
    the exchange took."""

    status: int
    headers: dict[str, str]
    body: Any
    seconds: float


def call(
    port: int,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One request on a new connection, timed from the connect to the last byte of the answer."""
    data = None if body is None else orjson.dumps(body)
    all_headers = {**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
    start = time.perf_counter()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
        seconds = time.perf_counter() - start
        got = {k.lower(): v for k, v in response.getheaders()}
        json = got.get("content-type", "").startswith("application/json")
        return Answer(response.status, got, orjson.loads(raw) if json else raw.decode(), seconds)
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll ``condition`` until it holds; the seconds it took (AssertionError naming ``what`` after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(every)
    return time.monotonic() - start


class LiveProbe:
    """GET /health/live every ``interval`` seconds in a thread of its own, as a platform's liveness probe: the
    latency of each answer, and what went wrong when one did not come (as a liveness check would see it)."""

    def __init__(self, port: int, interval: float = 0.1, timeout: float = 5.0) -> None:
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = call(self.port, "GET", "/health/live", timeout=self.timeout)
            except OSError as exc:
                self.failures.append(repr(exc))
            else:
                if answer.status == 200:
                    self.latencies.append(answer.seconds)
                else:
                    self.failures.append(f"status {answer.status}")
            self._stop.wait(self.interval)

    def wait_for(self, samples: int, timeout: float = 30.0) -> None:
        """Until ``samples`` answers have been timed."""
        wait_until(lambda: len(self.latencies) + len(self.failures) >= samples, timeout, f"{samples} live probes")

    def check(self, at_least: int) -> None:
        """Every probe answered 200 within LIVE_BUDGET, and there were ``at_least`` of them."""
        assert not self.failures, self.failures
        assert len(self.latencies) >= at_least, self.latencies
        slow = [round(s * 1000, 1) for s in self.latencies if s >= LIVE_BUDGET]
        assert not slow, f"/health/live over {LIVE_BUDGET * 1000:.0f} ms (ms): {slow} of {len(self.latencies)}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 1)


class Ratings:
    """Ratings sent to /feedback, one request each with an Idempotency-Key of its own, as the app's backend sends
    them: which were acknowledged (201, or 200 for a duplicate), which refused (503, with Retry-After), every refused
    one retried with its key once the store is back, and the store checked to hold each exactly once."""

    def __init__(self, port: int, user: str = "ledger") -> None:
        self.port = port
        self.user = user
        self.sent: dict[str, int] = {}  # Idempotency-Key -> movie id of the rating
        self.acknowledged: set[str] = set()
        self.refused: list[str] = []
        self.answers: list[Answer] = []

    def send(self, count: int = 1) -> list[Answer]:
        """``count`` new ratings, one request each; their answers."""
        out = []
        for _ in range(count):
            movie = len(self.sent)
            key = f"{self.user}-{movie}"
            self.sent[key] = movie
            out.append(self._post(key))
        return out

    def _post(self, key: str) -> Answer:
        body = {"user_id": self.user, "movie_id": self.sent[key], "rating": 1 + self.sent[key] % 10}
        answer = call(self.port, "POST", "/feedback", body, {"Idempotency-Key": key})
        self.answers.append(answer)
        if answer.status in (200, 201):
            self.acknowledged.add(key)
        else:
            assert answer.status == 503, answer
            assert answer.body["error"] == "store_unavailable", answer.body
            assert answer.headers.get("retry-after") == "1", answer.headers
            self.refused.append(key)
        return answer

    def retry(self) -> None:
        """Send every refused rating again with its key: each must now be acknowledged (201, or 200 when the refused
        attempt committed after all, which the key makes a duplicate)."""
        refused, self.refused = self.refused, []
        for key in refused:
            answer = self._post(key)
            assert answer.status in (200, 201), answer

    def check_stored(self, database_url: str) -> None:
        """Every rating sent is acknowledged and in the store, once."""
        assert not self.refused
        assert self.acknowledged == set(self.sent)
        store = FeedbackStore(make_engine(database_url))
        try:
            movies = [int(m) for _, u, m, _, _ in store.iter_ratings() if u == self.user]
        finally:
            store.close()
        assert sorted(movies) == sorted(self.sent.values())


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response read from ``sock`` (with a Content-Length): status, headers (lower-case), body.
    ConnectionError when the server closes the connection before a whole response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {len(data)} bytes of a response")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server in the middle of a response body")
        rest += chunk
    return int(status_line.split()[1]), headers, rest[:length]


def request_head(method: str, path: str, length: int, extra: str = "") -> bytes:
    """The head of a JSON request with a Content-Length, for a raw socket."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode("latin-1")


def closed_by_server(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes ``sock`` (reads and discards anything it sends first); AssertionError if it
    is still open after ``timeout``."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout} s") from None
    return time.monotonic() - start
