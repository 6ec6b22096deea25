"""The Redis answer cache against the real Redis server, and against one that dies."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from moviematch_ml.cache import KEY_PREFIX, RedisCache, cache_key

pytestmark = pytest.mark.redis


@pytest.fixture
def cache() -> Iterator[RedisCache]:
    c = RedisCache.from_url(
        "redis://127.0.0.1:6379/0", ttl_seconds=30, encode=lambda v: list(v), decode=lambda v: tuple(v)
    )
    yield c
    leftovers = c._client.keys(KEY_PREFIX + "test-*")
    if leftovers:
        c._client.delete(*leftovers)


def _key(body: bytes, version: str = "") -> tuple[str, str, bytes]:
    return (version or "test-" + uuid.uuid4().hex, "model", body)


def test_round_trip_with_ttl(cache: RedisCache) -> None:
    key = _key(b'{"vote_average": 7.5}')
    assert cache.get(key) is None
    cache.put(key, (7.912, "model", True, key[0]))
    assert cache.get(key) == (7.912, "model", True, key[0])
    assert (cache.hits, cache.misses) == (1, 1)
    assert 0 < cache._client.ttl(cache_key(key)) <= 30


def test_the_model_version_is_part_of_the_key(cache: RedisCache) -> None:
    body = b'{"vote_average": 7.5}'
    cache.put(_key(body, "test-v1"), (1.0, "model", True, "test-v1"))
    assert cache.get(_key(body, "test-v2")) is None
    assert cache_key(("v", "model", body)) != cache_key(("v", "model", body + b" "))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_redis_that_dies_is_a_miss_not_an_error() -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cache = RedisCache.from_url(f"redis://127.0.0.1:{port}/0", ttl_seconds=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                cache._client.ping()
                break
            except Exception:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        key = ("test-dies", "model", b"{}")
        cache.put(key, [1.0])
        assert cache.get(key) == [1.0]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert cache.get(key) is None  # the server is gone: a miss...
    cache.put(key, [2.0])  # ...and a put that does nothing
    assert cache.errors == 2
