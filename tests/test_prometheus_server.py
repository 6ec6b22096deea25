"""A real Prometheus (Debian's server) scraping a real service every second, with deploy/prometheus/rules.yml:
after a known sequence of requests its query API gives the request rate, the error count and the PSI by hand."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from moviematch_ml.features import EXAMPLE
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, read_card
from promtools import DEPLOY, tool
from realserver import Server, free_port, request, start, stop

pytestmark = pytest.mark.slow

# 30 predictions of distinct bodies (no cache hit: every input reaches the drift counters): vote_average 5.0, 7.5
# and 9.9 ten times each; 6 refused.
VOTES = [5.0] * 10 + [7.5] * 10 + [9.9] * 10
REFUSED = 6


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": repr(at)} if at is not None else {})}
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query that gives one series, or None when it gives none."""
        result = self.query(expr, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.2)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Server]:
    s = start(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'f.db'}", METRICS_DRIFT_SHARE="1")
    yield s
    stop(s)


@pytest.fixture
def prometheus(tmp_path: Path, service: Server) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "rules.yml")],
        "scrape_configs": [
            {"job_name": "moviematch-ml", "static_configs": [{"targets": [f"127.0.0.1:{service.port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        server = Prometheus(port)

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return server.value('up{job="moviematch-ml"}') == 1.0
            except OSError:
                return False

        wait_for(ready, 60, "Prometheus scraping the service")
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def expected_psi(shares: dict[str, float], counts: dict[str, int]) -> float:
    """PSI by its definition (runtime/drift.py), the shares floored at 1e-4."""
    n = sum(counts.values())
    total = 0.0
    for label, expected in shares.items():
        actual = max(counts.get(label, 0) / n, 1e-4)
        expected = max(expected, 1e-4)
        total += (actual - expected) * math.log(actual / expected)
    return total


def test_prometheus_reads_rate_errors_and_psi(service: Server, prometheus: Prometheus) -> None:
    card = read_card(BUNDLED_MODEL_DIR)
    stats = card.feature_stats
    shares = {name: s.bin_shares for name, s in stats.items() if s.bin_shares is not None}
    assert set(shares) == set(stats)
    # Every drift series has been scraped at 0 before the first request: increase() then counts them all.
    bins = 'count(moviematch_drift_inputs_total{feature="vote_average"})'
    wait_for(lambda: prometheus.value(bins) == len(shares["vote_average"]), 30, "a scrape of the zeros")
    for k, vote in enumerate(VOTES):
        assert (
            request(service.port, "POST", "/predict", {**EXAMPLE, "vote_average": vote, "popularity": 50 + k})[0] == 200
        )
    for _ in range(REFUSED):
        assert request(service.port, "POST", "/predict", {**EXAMPLE, "vote_average": 11})[0] == 422
    total = 'sum(moviematch_http_requests_total{route="/predict"})'
    wait_for(lambda: prometheus.value(total) == len(VOTES) + REFUSED, 30, "a scrape after the last request")
    # Evaluated at the time of the last scrape: the 5-minute window holds every sample, from the zeros on.
    (last,) = prometheus.query('timestamp(moviematch_http_requests_total{route="/predict", status="2xx"})')
    at = float(last["value"][1])
    rate = prometheus.value('sum(rate(moviematch_http_requests_total{route="/predict"}[5m]))', at)
    assert rate == pytest.approx((len(VOTES) + REFUSED) / 300)
    errors = 'sum(increase(moviematch_http_requests_total{route="/predict", status="4xx"}[5m]))'
    assert prometheus.value(errors, at) == pytest.approx(REFUSED)
    refused = 'sum(moviematch_prediction_errors_total{endpoint="predict", reason="validation_error"})'
    assert prometheus.value(refused, at) == REFUSED

    vote_counts = {"[4,5.2)": 10, "[7.2,7.8)": 10, "above": 10}  # 9.9 is above the training maximum of 9.8
    psi_vote = expected_psi(shares["vote_average"], vote_counts)
    psi_flag = expected_psi(shares["is_favorite_genre"], {"[1,1]": 30})  # EXAMPLE's flag is 1
    # By hand: 2.703 from "above" ((1/3 - 1e-4) ln(3333)), 2.068 from [6.5,7.2) left empty, 1.441 from [7.8,8.5),
    # 1.389 from [5.2,6.5), 0.666 from [4,5.2), and 0.414 from the others: far beyond 0.2, the alert's threshold.
    assert psi_vote == pytest.approx(8.681, abs=0.001)
    # The documented expression, evaluated at that time, and the recording rule Prometheus evaluates every second.
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    (rule,) = [r for g in groups for r in g["rules"] if r.get("record") == "moviematch:drift_psi:1h"]
    psi = {r["metric"]["feature"]: float(r["value"][1]) for r in prometheus.query(rule["expr"], at)}
    assert psi["vote_average"] == pytest.approx(psi_vote, rel=1e-9)
    assert psi["is_favorite_genre"] == pytest.approx(psi_flag, rel=1e-9)
    recorded = f'moviematch:drift_psi:1h{{feature="vote_average", version="{card.version}"}}'
    wait_for(lambda: (v := prometheus.value(recorded)) is not None and abs(v - psi_vote) < 1e-9, 30, "the PSI rule")

    # Prometheus evaluated every rule of rules.yml against the service's real series without an error.
    with urllib.request.urlopen(prometheus.base + "/api/v1/rules", timeout=10) as response:
        loaded = json.loads(response.read())["data"]["groups"]
    evaluated = [r for g in loaded for r in g["rules"]]
    assert len(evaluated) == 13
    assert {r["health"] for r in evaluated} == {"ok"}, [r for r in evaluated if r["health"] != "ok"]
