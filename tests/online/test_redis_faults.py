"""The shared answer cache (PREDICTION_CACHE_BACKEND=redis) failing under a running service: Redis hung, then
killed. A sick cache costs at most one Redis timeout per breaker period, never one per request, and is used again
once Redis answers."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from faults import RedisServer, TcpProxy, with_port
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.caches import cache_key
from probes import LiveProbe, Ratings, call, wait_until
from realserver import Server, start, stop

REDIS_TIMEOUT = 0.2  # REDIS_TIMEOUT of the server here (the default 0.05 s would hide what a timeout costs)
BREAKER_SECONDS = 5.0  # how long a failure keeps Redis out of the request path (online/caches.py)
REQUESTS = 200
_bodies = itertools.count()


def _body() -> dict[str, float | int]:
    """A /predict body no request sent before (so a miss, and a put), with the tiny model's features."""
    return {**EXAMPLE, "popularity": 10.0 + next(_bodies) / 1000}


def _answered_and_cached(port: int, client: redis.Redis, body: dict[str, float | int]) -> bool:
    """Whether ``body`` is answered and Redis then holds the answer (the service put it there: keyed on the answering
    model's version, its source and the bytes it received)."""
    answer = call(port, "POST", "/predict", body)
    if answer.status != 200:
        return False
    version = answer.body["model_version"]
    return bool(client.exists(cache_key((version, "model", orjson.dumps(body)))))


def _redis_hits(port: int) -> float:
    """The Redis answer cache's hits so far, from /metrics."""
    text = call(port, "GET", "/metrics").body
    match = re.search(r'^moviematch_answer_cache_lookups_total\{backend="redis",result="hit"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _timed_requests(port: int) -> list[float]:
    """REQUESTS /predict requests one after the other, each with a new body: each must be 200; their seconds."""
    seconds = []
    for _ in range(REQUESTS):
        answer = call(port, "POST", "/predict", _body())
        assert answer.status == 200, answer
        seconds.append(answer.seconds)
    return seconds


def _check_cache_used_again(port: int, client: redis.Redis) -> float:
    """Seconds until a new answer is put in Redis again, then read back from it (a hit)."""
    probe = _body()
    took = wait_until(
        lambda: _answered_and_cached(port, client, probe),
        BREAKER_SECONDS + 10,
        "an answer cached in Redis again",
        every=0.2,
    )
    hits = _redis_hits(port)
    assert call(port, "POST", "/predict", probe).status == 200
    assert _redis_hits(port) == hits + 1
    return took


@pytest.fixture
def cache_proxy(dedicated_redis: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(dedicated_redis.port) as proxy:
        yield proxy


@pytest.fixture
def redis_server(
    tiny_model_dir: Path, tmp_path: Path, dedicated_redis: RedisServer, cache_proxy: TcpProxy
) -> Iterator[Server]:
    server = start(
        tmp_path,
        MODEL_PATH=str(tiny_model_dir),
        DATABASE_URL=f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
        PREDICTION_CACHE_BACKEND="redis",
        REDIS_URL=with_port(dedicated_redis.url, cache_proxy.port),
        REDIS_TIMEOUT=str(REDIS_TIMEOUT),
    )
    try:
        yield server
    finally:
        stop(server)


@pytest.mark.slow
def test_a_hung_then_dead_redis_costs_one_timeout_per_breaker_period(
    redis_server: Server, dedicated_redis: RedisServer, cache_proxy: TcpProxy, tmp_path: Path
) -> None:
    """Defect 3 (a hung Redis slowed every request: about 420 req/s fell to 11, p99 2.3 s, the timeout paid on every
    get and put) and the faults "Redis paused" and "Redis killed". Hung behind a paused proxy, then SIGKILLed: 200
    requests in a row all answer 200 in far less than 200 timeouts (the breaker keeps Redis out of the path),
    /health/live stays under 50 ms, feedback (which never needs Redis) loses nothing; resumed, then restarted, the
    cache is used again after the breaker period, without a restart of the service."""
    port = redis_server.port
    client = redis.Redis(host="127.0.0.1", port=dedicated_redis.port, socket_timeout=5)
    ledger = Ratings(port)
    try:
        _check_cache_used_again(port, client)  # the cache works to begin with

        cache_proxy.pause()
        with LiveProbe(port) as probe:
            seconds = _timed_requests(port)
            assert [a.status for a in ledger.send(3)] == [201] * 3
            probe.wait_for(10)
        probe.check(10)
        # One timeout per breaker period at most: 200 timeouts would take 40 s.
        assert sum(seconds) < 20 * REDIS_TIMEOUT, f"{sum(seconds):.1f} s for {REQUESTS} requests"
        assert sum(s >= REDIS_TIMEOUT for s in seconds) <= 1 + sum(seconds) / BREAKER_SECONDS
        cache_proxy.resume()
        _check_cache_used_again(port, client)

        dedicated_redis.kill()
        with LiveProbe(port) as probe:
            seconds = _timed_requests(port)
            assert [a.status for a in ledger.send(3)] == [201] * 3
            probe.wait_for(10)
        probe.check(10)
        assert sum(seconds) < 20 * REDIS_TIMEOUT, f"{sum(seconds):.1f} s for {REQUESTS} requests"
        dedicated_redis.start()  # empty: it keeps nothing on disk
        client.close()
        _check_cache_used_again(port, client)
        ledger.check_stored(f"sqlite:///{tmp_path / 'feedback.sqlite3'}")
    finally:
        client.close()
