"""The caches: answers in process (LRU, bounded in entries and bytes) and in Redis (the real server, and one that
dies), and the personaliser's per-user TTL cache."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from moviematch_ml.errors import MissingExtraError
from moviematch_ml.online.caches import KEY_PREFIX, LRUCache, RedisCache, TTLCache, cache_key
from moviematch_ml.online.contract import BatchAnswer, OneAnswer, decode_answer, encode_answer

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- TTLCache --------------------------------------------------------------------------------------------------------


def test_ttl_cache_expires_bounds_and_forgets() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(ttl=2.0, max_entries=2, clock=clock)
    cache.put("a", 1)
    assert cache.get("a") == (True, 1)
    clock.now = 2.5
    assert cache.get("a") == (False, None)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)  # over the bound: the oldest entry goes
    assert cache.get("a") == (False, None)
    assert cache.get("c") == (True, 3)
    assert cache.keys() == ["b", "c"]
    cache.discard(["c", "never-there"])
    assert cache.get("c") == (False, None)
    cache.clear()
    assert cache.keys() == []


def test_ttl_cache_keeps_none_as_a_value_and_moves_a_stored_key_to_the_back() -> None:
    cache: TTLCache[str, int | None] = TTLCache(ttl=10.0, max_entries=2, clock=FakeClock())
    cache.put("nobody", None)  # "this user has no view" is worth caching too
    assert cache.get("nobody") == (True, None)
    cache.put("b", 2)
    cache.put("nobody", None)  # stored again: now the newest
    cache.put("c", 3)
    assert cache.keys() == ["nobody", "c"]


def test_zero_ttl_never_caches() -> None:
    cache: TTLCache[str, int] = TTLCache(ttl=0.0, max_entries=10)
    cache.put("a", 1)
    assert cache.get("a") == (False, None)


# --- LRUCache ------------------------------------------------------------------------------------------------------


def test_lru_cache_counts_hits_and_evicts_the_least_recently_used() -> None:
    cache = LRUCache(max_entries=2)
    assert cache.get(("v", "model", b"a")) is None
    cache.put(("v", "model", b"a"), "A")
    cache.put(("v", "model", b"b"), "B")
    assert cache.get(("v", "model", b"a")) == "A"  # now the most recently used
    cache.put(("v", "model", b"c"), "C")  # "b" goes
    assert cache.get(("v", "model", b"b")) is None
    assert (cache.get(("v", "model", b"a")), cache.get(("v", "model", b"c"))) == ("A", "C")
    cache.put(("v", "model", b"a"), "other")  # a key already held keeps its value
    assert cache.get(("v", "model", b"a")) == "A"
    assert cache.get(("v2", "model", b"a")) is None  # the model version is part of the key
    assert (len(cache), cache.hits, cache.misses) == (2, 4, 3)


def test_cache_stays_within_its_memory_budget() -> None:
    cache = LRUCache(max_entries=100, max_bytes=1000)
    cache.put(("v", "model", b"a" * 300), "A")  # 300 + 100 = 400 bytes
    cache.put(("v", "model", b"b" * 300), "B")  # 800
    cache.put(("v", "model", b"c" * 300), "C")  # 1200 > 1000: "A", the least recently used, goes
    assert (len(cache), cache.bytes) == (2, 800)
    assert cache.get(("v", "model", b"a" * 300)) is None
    assert cache.get(("v", "model", b"b" * 300)) == "B"  # now the most recently used
    cache.put(("v", "model", b"d" * 100), "D", rows=5)  # 600 more: "C" goes, not "B"
    assert cache.get(("v", "model", b"c" * 300)) is None
    assert (cache.get(("v", "model", b"b" * 300)), len(cache), cache.bytes) == ("B", 2, 1000)


# --- RedisCache ------------------------------------------------------------------------------------------------------


def test_cache_key_hashes_the_body_after_version_and_source() -> None:
    body = b'{"vote_average": 7.5}'
    # sha256 of the body (sha256sum of those 21 bytes), written out: the key must not change between releases (a
    # rolling deploy shares the cache between the old and the new replicas).
    digest = "ce9f8e1b91963b2cbec66ceb9e808f20a3c5411119857dcb46421e48dba9953e"
    assert cache_key(("v1", "model", body)) == f"{KEY_PREFIX}v1:model:{digest}"
    assert KEY_PREFIX == "mm:answer:"
    assert cache_key(("v", "model", body)) != cache_key(("v", "model", body + b" "))
    assert cache_key(("v", "model", body)) != cache_key(("v", "fallback", body))


@pytest.fixture
def inspect() -> Iterator[redis.Redis]:
    """A client of its own on the real Redis server (to look at what the cache wrote, and to clean up)."""
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    leftovers = client.keys(KEY_PREFIX + "test-*")
    if leftovers:
        client.delete(*leftovers)
    client.close()


def _cache(**kwargs: Any) -> RedisCache:
    return RedisCache.from_url(REDIS_URL, ttl_seconds=30, encode=lambda v: list(v), decode=lambda v: tuple(v), **kwargs)


def _key(body: bytes, version: str = "") -> tuple[str, str, bytes]:
    return (version or "test-" + uuid.uuid4().hex, "model", body)


@pytest.mark.redis
def test_round_trip_with_ttl(inspect: redis.Redis) -> None:
    key = _key(b'{"vote_average": 7.5}')

    async def scenario() -> tuple[Any, Any, tuple[int, int, int]]:
        cache = _cache()
        missing = await cache.aget(key)
        cache.aput(key, (7.912, "model", True, key[0]))  # not waited for...
        await cache.settle()  # ...until here
        found = await cache.aget(key)
        await cache.aclose()
        return missing, found, (cache.hits, cache.misses, cache.errors)

    assert asyncio.run(scenario()) == (None, (7.912, "model", True, key[0]), (1, 1, 0))
    ttl: Any = inspect.ttl(cache_key(key))
    assert 0 < ttl <= 30


@pytest.mark.redis
def test_the_model_version_is_part_of_the_key(inspect: redis.Redis) -> None:
    body = b'{"vote_average": 7.5}'

    async def scenario() -> tuple[Any, Any]:
        cache = _cache()
        cache.aput(_key(body, "test-v1"), (1.0, "model", True, "test-v1"))
        await cache.settle()
        answers = await cache.aget(_key(body, "test-v2")), await cache.aget(_key(body, "test-v1"))
        await cache.aclose()
        return answers

    assert asyncio.run(scenario()) == (None, (1.0, "model", True, "test-v1"))


@pytest.mark.redis
def test_answers_are_stored_as_json_and_come_back_equal(inspect: redis.Redis) -> None:
    # The service's own encoding (no pickle): what one replica stored, another reads.
    one = OneAnswer(7.912, "model", True, "test-v1")
    batch = BatchAnswer([1, "m2"], [5.0, 9.5], "model", None, [1, 0], True, "test-v1", True)

    async def scenario() -> list[Any]:
        writer = RedisCache.from_url(REDIS_URL, encode=encode_answer, decode=decode_answer)
        reader = RedisCache.from_url(REDIS_URL, encode=encode_answer, decode=decode_answer)
        found = []
        for answer in (one, batch):
            key = _key(b"body of %d" % id(answer), "test-v1")
            writer.aput(key, answer)
            await writer.settle()
            found.append(await reader.aget(key))
            raw: Any = inspect.get(cache_key(key))
            assert raw.startswith(b'{"one":' if answer is one else b'{"batch":')
        await writer.aclose()
        await reader.aclose()
        return found

    assert asyncio.run(scenario()) == [one, batch]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_until_up(client: redis.Redis, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


@pytest.mark.redis
def test_a_redis_that_dies_is_a_miss_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    key = ("test-dies", "model", b"{}")
    caplog.set_level(logging.WARNING, logger="moviematch_ml")

    async def scenario() -> tuple[Any, Any, Any, RedisCache]:
        cache = RedisCache.from_url(url, ttl_seconds=30, breaker_seconds=60.0)
        cache.aput(key, [1.0])
        await cache.settle()
        alive = await cache.aget(key)
        proc.kill()
        proc.wait(timeout=10)
        missed = await cache.aget(key)  # the server is gone: a miss, and the breaker opens...
        cache.aput(key, [2.0])  # ...so that neither this put...
        again = await cache.aget(key)  # ...nor this get asks Redis at all
        await cache.settle()
        with contextlib.suppress(Exception):
            await cache.aclose()
        return alive, missed, again, cache

    try:
        probe = redis.Redis.from_url(url)
        _wait_until_up(probe)
        probe.close()
        alive, missed, again, cache = asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert (alive, missed, again) == ([1.0], None, None)
    assert (cache.errors, cache.misses, cache.skipped, cache.open) == (1, 1, 2, True)
    # Logged once for the outage, not once per request.
    assert [r.getMessage() for r in caplog.records] == ["redis cache unavailable, answering without it"]


def test_the_redis_cache_without_its_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if installed without [redis]
    with pytest.raises(MissingExtraError, match=r"^PREDICTION_CACHE_BACKEND=redis needs redis, which is not installed"):
        RedisCache.from_url("redis://127.0.0.1:6379/0")
