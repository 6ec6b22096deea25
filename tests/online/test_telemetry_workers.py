"""The metrics of a real server (``moviematch-ml serve``), one worker and two: a known sequence of requests, then
scrapes of /metrics, whichever worker answers them, that count every request of every worker."""

from __future__ import annotations

import http.client
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import TinyVersions
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.counters import ProcessValues, aggregate, read_directory
from moviematch_ml.online.telemetry import FAMILIES, HTTP_SECONDS
from realserver import Server, request, start, stop

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a worker's environment in /proc")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """One GET /metrics on a connection of its own (so that either worker may answer it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not come true within {timeout} s"
        time.sleep(0.05)


def send_the_sequence(port: int, user: str = "u") -> None:
    """40 predictions, 10 refused, 5 batches of 3 movies, 3 new ratings of ``user``: each on a new connection."""
    for k in range(40):
        assert request(port, "POST", "/predict", {**EXAMPLE, "popularity": float(k)})[0] == 200
    for _ in range(10):
        assert request(port, "POST", "/predict", {**EXAMPLE, "vote_average": 11})[0] == 422
    for k in range(5):
        movies = [{"movie_id": m, **EXAMPLE, "vote_count": k} for m in range(3)]
        assert request(port, "POST", "/predict-batch", {"movies": movies})[0] == 200
    for m in range(3):
        assert request(port, "POST", "/feedback", {"user_id": user, "movie_id": m, "rating": 7})[0] == 201


def check_the_sequence(got: Samples, tiny: TinyVersions, times: int = 1) -> None:
    requests = "moviematch_http_requests_total"
    assert got[(requests, labels(route="/predict", method="POST", status="2xx"))] == 40 * times
    assert got[(requests, labels(route="/predict", method="POST", status="4xx"))] == 10 * times
    assert got[(requests, labels(route="/predict-batch", method="POST", status="2xx"))] == 5 * times
    one = labels(endpoint="predict", variant="champion", version=tiny.model, source="model")
    batch = labels(endpoint="predict_batch", variant="champion", version=tiny.model, source="model")
    assert got[("moviematch_predictions_total", one)] == 40 * times
    assert got[("moviematch_predictions_total", batch)] == 15 * times
    refused = labels(endpoint="predict", reason="validation_error")
    assert got[("moviematch_prediction_errors_total", refused)] == 10 * times
    assert got[("moviematch_batch_size_count", ())] == 5 * times
    assert got[("moviematch_feedback_ratings_total", labels(outcome="accepted"))] == 3 * times
    assert got[("moviematch_model_info", labels(model="six_features", version=tiny.six, status="ok"))] == 1


def predictions_of(process: ProcessValues) -> float:
    """How many /predict requests one worker answered with a 2xx (from its own file)."""
    totals = aggregate(FAMILIES, [process])
    values = totals.get((HTTP_SECONDS.name, ("/predict", "POST", "2xx")))
    return 0.0 if values is None else float(values[:-1].sum())


def metrics_dir_of(pid: int) -> Path:
    """The METRICS_DIR the server handed its workers (read from a worker's environment)."""
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                    continue
                environ = (child / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"METRICS_DIR="):
                    return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError(f"no worker of {pid} has METRICS_DIR")


def stop_gracefully(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0


def test_one_worker_counts_in_memory(tmp_path: Path, tiny_model_dir: Path, tiny: TinyVersions) -> None:
    s = start(tmp_path, MODEL_PATH=str(tiny_model_dir), DATABASE_URL=f"sqlite:///{tmp_path / 'f.db'}")
    try:
        send_the_sequence(s.port)
        got = scrape(s.port)
        check_the_sequence(got, tiny)
        assert got[("moviematch_workers", ())] == 1
        stop_gracefully(s)
    finally:
        if s.proc.poll() is None:
            stop(s)


@linux_only
def test_two_workers_every_scrape_counts_both(tmp_path: Path, tiny_model_dir: Path, tiny: TinyVersions) -> None:
    s = start(tmp_path, WORKERS="2", MODEL_PATH=str(tiny_model_dir), DATABASE_URL=f"sqlite:///{tmp_path / 'f.db'}")
    try:
        s.wait_for_log("service started", count=2)
        directory = metrics_dir_of(s.proc.pid)  # made by the server: no METRICS_DIR was set
        send_the_sequence(s.port)
        for _ in range(6):  # each on a new connection: both workers answer some of them
            got = scrape(s.port)
            check_the_sequence(got, tiny)
            assert got[("moviematch_workers", ())] == 2
        processes = read_directory(directory)
        assert len(processes) == 2
        # The kernel spread the 40 connections over both workers (all on one: a chance of 2 in 2^40).
        assert sorted(predictions_of(p) > 0 for p in processes) == [True, True]
        assert sum(predictions_of(p) for p in processes) == 40
        stop_gracefully(s)
        assert not directory.exists()  # the server's own temporary directory is removed at exit
    finally:
        if s.proc.poll() is None:
            stop(s)


@linux_only
def test_a_worker_replaced_after_a_crash_loses_no_count(
    tmp_path: Path, tiny_model_dir: Path, tiny: TinyVersions
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "0-0.slots.jsonl").write_text('{"pid": 1}\n')  # a previous run's leftovers: removed at start
    env = {"WORKERS": "2", "MODEL_PATH": str(tiny_model_dir), "METRICS_DIR": str(directory)}
    s = start(tmp_path, **env, DATABASE_URL=f"sqlite:///{tmp_path / 'f.db'}")
    try:
        s.wait_for_log("service started", count=2)
        send_the_sequence(s.port)
        check_the_sequence(scrape(s.port), tiny)
        victim = max(read_directory(directory), key=predictions_of)
        os.kill(victim.pid, signal.SIGKILL)  # as the OOM killer would
        s.wait_for_log("service started", count=3)  # uvicorn's supervisor starts a new worker
        wait_until(lambda: scrape(s.port)[("moviematch_workers", ())] == 2, 15, "two live workers again")
        got = scrape(s.port)
        check_the_sequence(got, tiny)  # the dead worker's counts are still there
        assert len(read_directory(directory)) == 3  # two live workers and the dead one's file
        send_the_sequence(s.port, user="v")
        check_the_sequence(scrape(s.port), tiny, times=2)
        stop_gracefully(s)
    finally:
        if s.proc.poll() is None:
            stop(s)
