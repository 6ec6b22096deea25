"""The shared answer cache in Redis: answers keyed on (model version, source, request body), for all replicas.

The in-process cache (``serving.LRUCache``) is the default; this one is chosen with ``PREDICTION_CACHE=redis`` and
``REDIS_URL``. It has the same ``get``/``put`` as the in-process one, so the serving code does not care which it
has. Values are stored as JSON (never pickle), with a TTL so that Redis never fills up with answers of old models.
A Redis that is down or slow costs a cache miss, never a failed prediction.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any, Final

import orjson

log = logging.getLogger(__name__)

KEY_PREFIX: Final[str] = "mm:answer:"


def cache_key(key: tuple[str, str, bytes]) -> str:
    """Redis key of (model version, source, body): the body is hashed, so keys stay short whatever its size."""
    version, source, body = key
    digest = hashlib.sha256(body).hexdigest()
    return f"{KEY_PREFIX}{version}:{source}:{digest}"


class RedisCache:
    """Answers in Redis, shared by every replica; a failure of Redis is a miss, logged once per failure streak."""

    def __init__(
        self,
        client: Any,
        *,
        ttl_seconds: int = 3600,
        encode: Callable[[Any], object] = lambda v: v,
        decode: Callable[[Any], Any] = lambda v: v,
    ) -> None:
        self._client = client
        self.ttl_seconds = ttl_seconds
        self._encode = encode
        self._decode = decode
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self._failing = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisCache:
        import redis

        # Short timeouts: a prediction must not wait on a sick cache longer than it takes to compute the answer.
        client = redis.Redis.from_url(url, socket_timeout=0.05, socket_connect_timeout=0.2)
        return cls(client, **kwargs)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if not self._failing:
            log.warning("redis cache unavailable, answering without it", extra={"reason": repr(exc)})
        self._failing = True

    def get(self, key: tuple[str, str, bytes]) -> Any:
        try:
            raw = self._client.get(cache_key(key))
        except Exception as exc:  # any client error (connection, timeout, protocol) is a miss
            self._failed(exc)
            self.misses += 1
            return None
        self._failing = False
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return self._decode(orjson.loads(raw))

    def put(self, key: tuple[str, str, bytes], value: Any, rows: int = 1) -> None:
        try:
            self._client.set(cache_key(key), orjson.dumps(self._encode(value)), ex=self.ttl_seconds)
        except Exception as exc:
            self._failed(exc)
            return
        self._failing = False
