"""Access keys and per-key rate limits: who may call what, and how often.

``API_KEYS`` holds comma-separated ``secret:scope+scope`` entries (several at once, so keys can be rotated without
a gap). A request presents its key as ``Authorization: Bearer <secret>``; the key is looked up by the sha256 of
what was sent, so the time a look-up takes says nothing about the keys that exist. Scopes: ``predict``
(``/predict``, ``/predict-batch``), ``feedback`` (``/feedback``), ``metrics``, and ``admin`` (every endpoint).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moviematch_ml.settings import parse_api_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AccessKey:
    """One configured key: its name in logs (the first 4 characters of its sha256), its scopes, and the bucket its
    requests are counted in by the rate limiter (32 hex characters of the sha256: two keys whose 4-character names
    happen to match, 1 chance in 65,536 per pair, must not share a limit)."""

    name: str
    scopes: frozenset[str]
    bucket: str

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class AccessKeys:
    """The configured keys, by the sha256 of their secret."""

    def __init__(self, keys: dict[bytes, AccessKey]) -> None:
        self._by_digest = keys

    @classmethod
    def parse(cls, text: str | None) -> AccessKeys:
        """The keys of ``API_KEYS`` (``settings.parse_api_keys`` checks its format)."""
        return cls(
            {digest: AccessKey(digest.hex()[:4], scopes, digest.hex()[:32]) for digest, scopes in parse_api_keys(text)}
        )

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (without keys, only the admin endpoints are closed)."""
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, secret: bytes) -> AccessKey | None:
        """The key whose secret is ``secret``, or None."""
        return self._by_digest.get(hashlib.sha256(secret).digest())


class RateLimiter:
    """A fixed window per key: at most ``limit`` requests per ``window`` seconds.

    In process by default; with a Redis client (``REDIS_URL``), the count is shared by every replica. Redis is
    asked with a short timeout and behind a circuit breaker: while it fails, requests are let through (fail open)
    and counted in ``failures``, so an outage of the limiter never blocks the service.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        redis: Any = None,
        clock: Callable[[], float] = time.time,
        breaker_seconds: float = 5.0,
    ) -> None:
        self.limit = limit
        self.window = window
        self._redis = redis
        self._clock = clock
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._breaker_until = 0.0
        self._breaker_seconds = breaker_seconds
        self.failures = 0

    def _slot(self, now: float) -> int:
        return int(now // self.window)

    def retry_after(self, now: float | None = None) -> int:
        """Whole seconds until the current window ends (at least 1): the ``Retry-After`` of a 429."""
        t = self._clock() if now is None else now
        return max(1, math.ceil((self._slot(t) + 1) * self.window - t))

    async def allow(self, key: str) -> bool:
        """Count one request of ``key``; False when it is over the limit of its window."""
        now = self._clock()
        slot = self._slot(now)
        if self._redis is not None and now >= self._breaker_until:
            try:
                name = f"mm:rate:{key}:{slot}"
                count = int(await self._redis.incr(name))
                if count == 1:
                    await self._redis.expire(name, math.ceil(self.window) + 1)
                return count <= self.limit
            except Exception as exc:  # any client error: fail open, and stop asking for a while
                self.failures += 1
                self._breaker_until = now + self._breaker_seconds
                log.warning("rate limiter unavailable, letting requests through", extra={"reason": repr(exc)})
        with self._lock:
            counts = self._counts
            if len(counts) > 10_000:  # old windows: dropped wholesale, a window is short
                for old in [k for k in counts if k[1] != slot]:
                    del counts[old]
            count = counts.get((key, slot), 0) + 1
            counts[(key, slot)] = count
        return count <= self.limit
