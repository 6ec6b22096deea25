"""The caches of the service: answers by request body (in process or in Redis), and users' state by time.

``LRUCache`` keeps answers in each process; ``RedisCache`` (``PREDICTION_CACHE_BACKEND=redis``) shares them
between replicas. Both are keyed on (model version, source, request body): a swapped model never answers from
its predecessor's entries. Only answers that depend on the body alone are stored (never personalised ones, which
change with feedback). ``TTLCache`` holds the users' views.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any, Final, Generic, Protocol, TypeVar

import orjson

from moviematch_ml.errors import MissingExtraError
from moviematch_ml.online.counters import NO_CALLS, CallTimer

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

KEY_PREFIX: Final[str] = "mm:answer:"
# Only bodies up to this size are cached (a /predict body or a batch of ~100 movies): the key is the body itself, and
# entries of big batches would make the cache's memory unbounded in practice.
CACHE_MAX_BODY_BYTES: Final[int] = 16 * 1024
# Memory budget of the in-process cache (approximate bytes), on top of its entry count.
CACHE_MAX_BYTES: Final[int] = 32 * 1024 * 1024
AnswerKey = tuple[str, str, bytes]


class AsyncAnswerCache(Protocol):
    """An answer cache outside the process (Redis): asked with ``await``, written without waiting."""

    async def aget(self, key: AnswerKey) -> Any: ...

    def aput(self, key: AnswerKey, value: Any, rows: int = 1) -> None: ...


class LRUCache:
    """Answers by (model version, source, request body): a bounded, least-recently-used map."""

    def __init__(self, max_entries: int, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[str, str, bytes], tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str, bytes]) -> Any:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        with suppress(KeyError):  # evicted meanwhile by a thread-pool request: the value is still right
            self._data.move_to_end(key)
        return entry[0]

    def put(self, key: tuple[str, str, bytes], value: Any, rows: int = 1) -> None:
        """Store ``value``; ``rows`` (predictions in it) sizes the entry for the memory budget."""
        data = self._data
        if key in data:
            return
        # Rough bytes held: the body (the key) plus ~100 bytes of Python objects per prediction.
        size = len(key[2]) + 100 * rows
        data[key] = (value, size)
        self.bytes += size
        while len(data) > self.max_entries or self.bytes > self.max_bytes:
            try:
                _, (_, old_size) = data.popitem(last=False)
            except KeyError:  # emptied meanwhile by another thread
                break
            self.bytes -= old_size

    def __len__(self) -> int:
        return len(self._data)


def cache_key(key: tuple[str, str, bytes]) -> str:
    """Redis key of (model version, source, body): the body is hashed, so keys stay short whatever its size."""
    version, source, body = key
    digest = hashlib.sha256(body).hexdigest()
    return f"{KEY_PREFIX}{version}:{source}:{digest}"


class RedisCache:
    """Answers in Redis, shared by every replica, through the asyncio client: a get is awaited for at most the
    client's timeout, a put is not waited for at all. A Redis that fails or hangs is a miss, and opens a circuit
    breaker: for ``breaker_seconds`` Redis is not asked at all, so a sick cache never costs a request more than one
    timeout per breaker period. Logged once per outage."""

    def __init__(
        self,
        client: Any,
        *,
        ttl_seconds: int = 3600,
        encode: Callable[[Any], object] = lambda v: v,
        decode: Callable[[Any], Any] = lambda v: v,
        timeout: float = 0.05,
        breaker_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        calls: CallTimer = NO_CALLS,
    ) -> None:
        self._client = client
        self.calls = calls  # each call's latency and failures (the service's metrics)
        self.ttl_seconds = ttl_seconds
        self._encode = encode
        self._decode = decode
        self.timeout = timeout
        self.breaker_seconds = breaker_seconds
        self._clock = clock
        self._open_until = -1.0
        self._writes: set[asyncio.Task[None]] = set()  # puts in flight (referenced until done)
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.skipped = 0

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.05, **kwargs: Any) -> RedisCache:
        MissingExtraError.require("redis", extra="redis", setting="PREDICTION_CACHE_BACKEND=redis")
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return cls(client, timeout=timeout, **kwargs)

    @property
    def open(self) -> bool:
        """Whether the breaker is open (Redis not asked)."""
        return self._clock() < self._open_until

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.open:
            log.warning("redis cache unavailable, answering without it", extra={"reason": repr(exc)})
        self._open_until = self._clock() + self.breaker_seconds

    async def aget(self, key: AnswerKey) -> Any:
        if self.open:
            self.skipped += 1
            return None
        try:
            with self.calls.time("get"):
                raw = await asyncio.wait_for(self._client.get(cache_key(key)), self.timeout)
        except Exception as exc:  # any client error (connection, timeout, protocol) is a miss
            self._failed(exc)
            self.misses += 1
            return None
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return self._decode(orjson.loads(raw))

    def aput(self, key: AnswerKey, value: Any, rows: int = 1) -> None:
        if self.open:
            self.skipped += 1
            return
        task = asyncio.get_running_loop().create_task(self._put(cache_key(key), orjson.dumps(self._encode(value))))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, name: str, raw: bytes) -> None:
        try:
            with self.calls.time("put"):
                await asyncio.wait_for(self._client.set(name, raw, ex=self.ttl_seconds), self.timeout)
        except Exception as exc:
            self._failed(exc)

    async def settle(self) -> None:
        """Wait for the puts in flight."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def aclose(self) -> None:
        """Wait for the puts in flight, then close the client's connections."""
        await self.settle()
        await self._client.aclose()


class TTLCache(Generic[K, V]):
    """A bounded, thread-safe mapping whose entries expire ``ttl`` seconds after they were stored."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> tuple[bool, V | None]:
        """(hit, value); an expired entry is a miss."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None or entry[0] < self._clock():
                return False, None
            return True, entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._data[key] = (self._clock() + self.ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def keys(self) -> list[K]:
        """The keys held, least recently stored first (expired ones included)."""
        with self._lock:
            return list(self._data)

    def items(self) -> list[tuple[K, V]]:
        """The entries held, least recently stored first (expired ones included)."""
        with self._lock:
            return [(k, v) for k, (_, v) in self._data.items()]

    def discard(self, keys: Iterable[K]) -> None:
        with self._lock:
            for k in keys:
                self._data.pop(k, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
