"""Reloads and rollbacks under load, on a real server of two workers: no request fails, no answer mixes models."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from faults import child_pids
from moviematch_ml.features import EXAMPLE
from moviematch_ml.runtime.registry import Registry
from realserver import Server, start, stop

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX signals")]
ADMIN = "admin-secret-0123456789"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"}


class Load:
    """Client threads, each on one kept-alive connection, sending /predict for users of their own without pause;
    every answer's status, variant and model version is counted."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.answers: Counter[tuple[int, str, str]] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=30)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.answers.values())

    def _run(self, k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        n = 0
        while not self.stop.is_set():
            n += 1
            body = orjson.dumps({**EXAMPLE, "user_id": f"t{k}-{n % 50}", "movie_id": 1})
            try:
                conn.request("POST", "/predict", body=body, headers=HEADERS)
                response = conn.getresponse()
                answer = orjson.loads(response.read())
                key = (response.status, answer.get("variant", ""), answer.get("model_version", ""))
            except Exception as exc:  # a reset, a timeout: exactly what must not happen
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            with self._lock:
                self.answers[key] += 1
        conn.close()


def _reload(port: int) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
        response = conn.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        conn.close()


def _wait(condition: Callable[[], bool], timeout: float = 30.0, what: object = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"the condition did not come true in time: {what}"
        time.sleep(0.05)


def _settled(count: Callable[[], int], quiet: float = 1.0, timeout: float = 30.0) -> None:
    """Wait until ``count`` has not moved for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the count kept moving"
        time.sleep(0.05)
        if (now := count()) != last:
            last, since = now, time.monotonic()


@pytest.fixture
def served(tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path) -> tuple[Server, Registry, str, str]:
    registry = Registry(tmp_path / "registry")
    a, _ = registry.register(tiny_model_dir)
    b, _ = registry.register(other_model_dir)
    server = start(
        tmp_path,
        WORKERS="2",
        MODEL_REGISTRY=str(registry.root),
        REGISTRY_POLL_SECONDS="0.2",
        API_KEYS=f"{ADMIN}:admin+predict",
        DATABASE_URL=f"sqlite:///{tmp_path / 'r.sqlite3'}",
        LOG_LEVEL="info",
    )
    return server, registry, a, b


def test_reloads_and_rollbacks_under_load_fail_no_request(served: tuple[Server, Registry, str, str]) -> None:
    server, registry, a, b = served
    try:
        with Load(server.port) as load:
            _wait(lambda: load.total > 200)
            # A challenger: every worker picks it up from the registry file.
            registry.challenge("b", b, 0.5)
            _wait(lambda: load.answers[(200, "b", b)] > 100, what=load.answers)
            # Promoted: b answers everyone, as the champion.
            registry.promote("b")
            status, body = _reload(server.port)  # one worker at once; the other within the poll interval
            assert (status, body["reloaded"]) == (200, True)
            _wait(lambda: load.answers[(200, "champion", b)] > 200)
            # And the other worker too: b answers no one as the challenger any more. (A worker that has not polled
            # yet still holds a, and would reuse it from memory in the reload below, its damaged file unread.)
            _settled(lambda: load.answers[(200, "b", b)])
            # A broken model is refused: the registered copy of a is damaged on disk, then a is promoted back.
            model_file = registry.model_dir(a) / "model.txt"
            good = model_file.read_bytes()
            model_file.write_bytes(good + b"\n")
            registry.rollback()
            status, body = _reload(server.port)
            assert (status, body["reloaded"]) == (409, False)
            assert "ModelChecksumError" in str(body["reason"])
            time.sleep(1.0)  # five poll intervals: the other worker refuses it too, and b keeps answering
            refused_at = load.total
            _wait(lambda: load.total > refused_at + 200)
            # Repaired: the rollback goes through.
            model_file.write_bytes(good)
            status, body = _reload(server.port)
            assert (status, body["reloaded"]) == (200, True)
            before = load.answers[(200, "champion", a)]
            _wait(lambda: load.answers[(200, "champion", a)] > before + 200)
        answers = dict(load.answers)
    finally:
        stop(server)
    assert load.failures == []
    # Every answer was 200 and came from one model of a lineup that was in service: variant and version agree.
    assert set(answers) <= {(200, "champion", a), (200, "b", b), (200, "champion", b)}, answers
    refusals = [e for e in server.log_entries() if e["message"] == "reload refused, the models in service are kept"]
    assert len(refusals) >= 2  # both workers refused the damaged model


def test_sighup_reloads_every_worker_in_place(served: tuple[Server, Registry, str, str]) -> None:
    server, registry, _, b = served
    try:
        with Load(server.port, threads=2) as load:
            _wait(lambda: load.total > 100)
            pids = set(child_pids(server.proc.pid))  # the two workers (and multiprocessing's helper)
            assert len(pids) >= 2
            registry.promote(b)  # polling would see it too: SIGHUP must be at least as quick
            server.proc.send_signal(signal.SIGHUP)
            _wait(lambda: load.answers[(200, "champion", b)] > 100)
            server.wait_for_log("models reloaded", count=2)
            # Reloaded in place: the same two worker processes, none restarted.
            assert set(child_pids(server.proc.pid)) == pids
            assert sum(e["message"] == "service started" for e in server.log_entries()) == 2
    finally:
        stop(server)
    assert load.failures == []
    assert {status for status, _, _ in load.answers} == {200}
