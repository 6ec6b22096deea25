"""Access keys (API_KEYS: parsing, scopes, rotation, look-up by digest) and the per-key rate limiter (a fixed window,
in process or shared through Redis, open when Redis fails)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio
from pydantic import ValidationError

from faults import TcpProxy
from moviematch_ml.errors import ConfigError
from moviematch_ml.online.access import AccessKeys, RateLimiter
from moviematch_ml.settings import MIN_SECRET_LENGTH, SCOPES, Settings, load_settings, parse_api_keys, parse_rate
from realserver import free_port

BACKEND = "s3cr3t-backend-2026-a"
OPS = "s3cr3t-ops-2026-a-0000"
T = TypeVar("T")


def run(coroutine: Awaitable[T]) -> T:
    async def wrapped() -> T:
        return await coroutine

    return asyncio.run(wrapped())


# --- API_KEYS ---------------------------------------------------------------------------------------------------------


def test_keys_are_found_by_their_secret_with_their_scopes() -> None:
    keys = AccessKeys.parse(f"{BACKEND}:predict+feedback, {OPS}:admin+metrics ,")
    assert keys.enabled
    assert len(keys) == 2
    backend, ops = keys.find(BACKEND.encode()), keys.find(OPS.encode())
    assert backend is not None
    assert ops is not None
    assert backend.scopes == {"predict", "feedback"}
    assert ops.scopes == {"admin", "metrics"}
    # The name the logs show: the first 4 hex digits of the secret's sha256, never the secret.
    assert backend.name == hashlib.sha256(BACKEND.encode()).hexdigest()[:4]
    assert ops.name == hashlib.sha256(OPS.encode()).hexdigest()[:4]
    assert BACKEND not in backend.name


def test_a_key_allows_its_scopes_and_admin_allows_all() -> None:
    keys = AccessKeys.parse(f"{BACKEND}:predict+feedback,{OPS}:admin")
    backend, ops = keys.find(BACKEND.encode()), keys.find(OPS.encode())
    assert backend is not None
    assert ops is not None
    assert [backend.allows(s) for s in ("predict", "feedback", "metrics", "admin")] == [True, True, False, False]
    assert all(ops.allows(s) for s in SCOPES)


def test_a_wrong_or_empty_secret_finds_nothing() -> None:
    keys = AccessKeys.parse(f"{BACKEND}:predict")
    assert keys.find(BACKEND[:-1].encode()) is None
    assert keys.find((BACKEND + "x").encode()) is None
    assert keys.find(BACKEND.upper().encode()) is None
    assert keys.find(b"") is None
    # The look-up is by the sha256 of what was sent: the digest itself is not a key.
    assert keys.find(hashlib.sha256(BACKEND.encode()).digest()) is None


def test_no_keys_means_access_is_off() -> None:
    for text in (None, "", " , ,"):
        keys = AccessKeys.parse(text)
        assert not keys.enabled
        assert len(keys) == 0


def test_rotation_two_keys_with_the_same_scope_both_work_until_one_is_removed() -> None:
    old, new = "backend-key-2026-old", "backend-key-2026-new"
    during = AccessKeys.parse(f"{old}:predict+feedback,{new}:predict+feedback")
    found = [during.find(s.encode()) for s in (old, new)]
    assert all(k is not None and k.allows("predict") and k.allows("feedback") for k in found)
    assert found[0] != found[1]  # two keys, told apart in the logs
    after = AccessKeys.parse(f"{new}:predict+feedback")
    assert after.find(old.encode()) is None
    assert after.find(new.encode()) is not None


def test_a_secret_may_hold_colons_the_scopes_follow_the_last() -> None:
    secret = "user:pass:0123456789abcdef"
    key = AccessKeys.parse(f"{secret}:predict").find(secret.encode())
    assert key is not None
    assert key.scopes == {"predict"}


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("nocolonsecret-0123456789", "must be secret:scope+scope"),
        (":predict", "must be secret:scope+scope"),
        ("shortsecret:predict", f"the secret must be at least {MIN_SECRET_LENGTH} printable characters"),
        ("a secret with spaces in it:predict", "without spaces"),
        ("tab\tin-the-secret-0123456:predict", "printable characters"),
        ("s3cr3t-entry-0123456789:predcit", "scopes must be among ['admin', 'feedback', 'metrics', 'predict']"),
        ("s3cr3t-entry-0123456789:", "(got none)"),
        ("s3cr3t-entry-0123456789:predict,s3cr3t-entry-0123456789:admin", "the same secret twice"),
    ],
)
def test_invalid_entries_name_the_setting_the_entry_and_the_rule_never_the_secret(text: str, rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_api_keys(text)
    message = str(caught.value)
    assert message.startswith("API_KEYS entry ")
    assert rule in message
    for secret in (entry.rpartition(":")[0] for entry in text.split(",")):
        if len(secret) > 3:
            assert secret not in message


def test_the_failing_entry_is_named_by_its_position() -> None:
    with pytest.raises(ConfigError, match=r"^API_KEYS entry 2: "):
        parse_api_keys(f"{BACKEND}:predict,short:predict")


def test_settings_refuse_invalid_keys_without_echoing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic's own message repeats the value it refused (``input_value=...``): with a secret in it, that would
    write the secret into whatever logs the error."""
    entry = "s3cr3t-entry-0123456789:predcit"
    with pytest.raises(ValidationError) as caught:
        Settings(api_keys=entry)
    assert "API_KEYS entry 1: scopes must be among" in str(caught.value)
    assert "s3cr3t-entry" not in str(caught.value)
    # At the edge: what `moviematch-ml serve` prints when it refuses to start.
    monkeypatch.setenv("API_KEYS", entry)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert str(refused.value).startswith("invalid settings: API_KEYS: ")
    assert "s3cr3t-entry" not in str(refused.value)


def test_settings_never_show_the_secret() -> None:
    settings = Settings(api_keys=f"{BACKEND}:predict")
    assert BACKEND not in repr(settings)
    assert BACKEND not in str(settings)
    assert BACKEND not in settings.model_dump_json()


# --- RATE_LIMIT -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("600/minute", (600, 60.0)), (" 5 / second ", (5, 1.0)), ("1/hour", (1, 3600.0)), (None, None), ("", None)],
)
def test_rate_limit_parses(text: str | None, expected: tuple[int, float] | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["0/minute", "-1/minute", "ten/minute", "10/fortnight", "10", "10/"])
def test_rate_limit_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^RATE_LIMIT must be N/second, N/minute or N/hour with N >= 1"):
        parse_rate(text)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_fixed_window_in_process() -> None:
    # 3 per minute; windows are [120, 180), [180, 240)...: at 120.5, 3 allowed, the 4th refused, 59.5 s left.
    clock = Clock(120.5)
    limiter = RateLimiter(3, 60.0, clock=clock)

    async def scenario() -> None:
        assert [await limiter.allow("k1") for _ in range(4)] == [True, True, True, False]
        assert limiter.retry_after() == 60  # ceil(180 - 120.5)
        assert await limiter.allow("k2") is True  # each key has its own count
        clock.now = 179.2
        assert await limiter.allow("k1") is False  # still the same window
        assert limiter.retry_after() == 1  # ceil(0.8)
        clock.now = 180.0
        assert limiter.retry_after() == 60  # a new window starts whole
        assert [await limiter.allow("k1") for _ in range(4)] == [True, True, True, False]

    run(scenario())
    assert limiter.failures == 0


def test_retry_after_is_at_least_one_second() -> None:
    limiter = RateLimiter(1, 1.0, clock=Clock(10.999))
    assert limiter.retry_after() == 1  # ceil(0.001)
    assert limiter.retry_after(now=10.25) == 1
    assert RateLimiter(1, 3600.0).retry_after(now=7200.0) == 3600


def test_old_windows_are_dropped_from_memory_and_counting_goes_on() -> None:
    # More than 10,000 (key, window) counts: the old windows are dropped, the current window's counts kept.
    clock = Clock(0.0)
    limiter = RateLimiter(2, 1.0, clock=clock)

    async def scenario() -> None:
        for i in range(10_001):
            await limiter.allow(f"old-{i}")
        clock.now = 1.0
        assert await limiter.allow("k") is True
        assert await limiter.allow("k") is True
        assert await limiter.allow("k") is False

    run(scenario())


def machine_redis(port: int = 6379, timeout: float = 0.05) -> Any:
    """An asyncio Redis client made as the service makes its own (REDIS_URL, REDIS_TIMEOUT)."""
    return redis.asyncio.Redis.from_url(
        f"redis://127.0.0.1:{port}/0", socket_timeout=timeout, socket_connect_timeout=timeout
    )


async def _with_clients(n: int, body: Callable[..., Awaitable[T]], port: int = 6379) -> T:
    clients = [machine_redis(port) for _ in range(n)]
    try:
        return await body(*clients)
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.redis
def test_two_limiters_share_one_count_through_redis() -> None:
    """Two replicas, one key, 3 per minute: 2 through one and 1 through the other use up the window for both."""
    key = f"test-{uuid.uuid4().hex}"
    clock = Clock(1_000_020.0)  # window [1,000,020, 1,000,080)

    async def scenario(first: Any, second: Any) -> tuple[list[bool], int]:
        a = RateLimiter(3, 60.0, redis=first, clock=clock)
        b = RateLimiter(3, 60.0, redis=second, clock=clock)
        try:
            allowed = [await a.allow(key), await a.allow(key), await b.allow(key), await b.allow(key)]
            allowed.append(await a.allow(key))
            clock.now = 1_000_080.0  # the next window
            allowed.append(await b.allow(key))
            ttl = int(await first.ttl(f"mm:rate:{key}:{1_000_020 // 60}"))
            assert a.failures == b.failures == 0
            return allowed, ttl
        finally:
            await first.delete(*[f"mm:rate:{key}:{slot}" for slot in (16_667, 16_668)])

    allowed, ttl = run(_with_clients(2, scenario))
    assert allowed == [True, True, True, False, False, True]
    assert 0 < ttl <= 61  # the window's key expires after the window (ceil(60) + 1 s)


@pytest.mark.redis
def test_redis_down_lets_requests_through_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the port: each call fails at once; the limiter counts the failure, logs it, and counts the
    request in process (3 per minute still holds, per worker); a circuit breaker spares Redis for 5 s."""
    clock = Clock(500.0)
    port = free_port()

    async def scenario(client: Any) -> list[bool]:
        limiter = RateLimiter(3, 60.0, redis=client, clock=clock)
        allowed = [await limiter.allow("k") for _ in range(4)]
        assert limiter.failures == 1  # then the breaker: not asked again for 5 s
        clock.now = 505.0
        allowed.append(await limiter.allow("k"))
        assert limiter.failures == 2  # asked again, still down
        return allowed

    with caplog.at_level(logging.WARNING, logger="moviematch_ml.online.access"):
        allowed = run(_with_clients(1, scenario, port=port))
    assert allowed == [True, True, True, False, False]
    warnings = [r for r in caplog.records if r.getMessage() == "rate limiter unavailable, letting requests through"]
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)


@pytest.mark.redis
def test_a_hung_redis_costs_one_timeout_then_nothing_and_recovery_needs_no_restart(redis_proxy: TcpProxy) -> None:
    """Redis behind a paused proxy: the first call waits its timeout (0.05 s; without one it would wait for as long as
    Redis hangs), is let through and opens the breaker; calls in the next 5 s do not wait at all. Once the proxy
    flows again and the breaker has closed, the count is Redis's again, without a restart."""
    key = f"test-{uuid.uuid4().hex}"
    clock = Clock(2_000_040.0)  # window [2,000,040, 2,000,100)

    async def scenario(client: Any) -> None:
        limiter = RateLimiter(2, 60.0, redis=client, clock=clock)
        try:
            assert await limiter.allow(key) is True  # through Redis: 1
            redis_proxy.pause()
            started = time.monotonic()
            assert await limiter.allow(key) is True  # Redis times out: let through (and counted in process: 1)
            first = time.monotonic() - started
            assert limiter.failures == 1
            started = time.monotonic()
            assert await limiter.allow(key) is True  # breaker open: in process only (2)
            assert await limiter.allow(key) is False  # in process: 3 > 2
            breaker = time.monotonic() - started
            assert limiter.failures == 1
            redis_proxy.resume()
            # The breaker has closed, in the next window (the paused INCR may or may not have reached Redis).
            clock.now += 60.0
            assert [await limiter.allow(key), await limiter.allow(key), await limiter.allow(key)] == [True, True, False]
            assert await client.get(f"mm:rate:{key}:{2_000_100 // 60}") == b"3"  # counted by Redis
            assert limiter.failures == 1
        finally:
            redis_proxy.resume()
            await client.delete(*[f"mm:rate:{key}:{slot}" for slot in (2_000_040 // 60, 2_000_100 // 60)])
        # Bounds far above the 0.05 s timeout (a loaded machine) and far below a hang.
        assert first < 1.0
        assert breaker < 0.5

    run(_with_clients(1, scenario, port=redis_proxy.port))


@pytest.mark.redis
def test_a_killed_redis_is_let_through_at_once(redis_proxy: TcpProxy) -> None:
    clock = Clock(3_000_000.0)
    key = f"test-{uuid.uuid4().hex}"

    async def scenario(client: Any) -> None:
        limiter = RateLimiter(5, 60.0, redis=client, clock=clock)
        assert await limiter.allow(key) is True
        redis_proxy.kill()
        started = time.monotonic()
        assert await limiter.allow(key) is True
        assert time.monotonic() - started < 1.0
        assert limiter.failures == 1
        redis_proxy.restart()
        clock.now += 5.0
        assert await limiter.allow(key) is True
        assert limiter.failures == 1
        await client.delete(f"mm:rate:{key}:{3_000_000 // 60}")

    run(_with_clients(1, scenario, port=redis_proxy.port))
