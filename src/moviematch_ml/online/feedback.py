"""Feedback: the ratings the app sends, validated and keyed for idempotency, then stored."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread
import orjson

from moviematch_ml.errors import FieldError, InvalidJSONError, StoreError
from moviematch_ml.features import MAX_ID_LENGTH, parse_id

if TYPE_CHECKING:  # the store imports Feedback from here
    from moviematch_ml.online.store import FeedbackStore, StoreHealth, StoreResult
    from moviematch_ml.online.telemetry import Telemetry

MAX_FEEDBACK_BATCH: Final[int] = 1000
RATING_RULE: Final[str] = "must be a finite number between 0 and 10"
# What _timestamp accepts, said whole: 1e11 s is the year 5138, so a millisecond timestamp (1.7e12) is refused.
TIMESTAMP_RULE: Final[str] = (
    "must be unix seconds (a number from 0 to 1e11, not milliseconds) or an ISO-8601 date-time with a time zone"
)
KEY_RULE: Final[str] = f"must be a string of 1-{MAX_ID_LENGTH} printable characters"
_FIELDS: Final[frozenset[str]] = frozenset(
    {"user_id", "movie_id", "rating", "timestamp", "prediction_id", "feedback_id"}
)


@dataclass(frozen=True, slots=True)
class Feedback:
    """One rating a user gave a movie, on the API's 0-10 scale, with the key that makes storing it idempotent."""

    feedback_id: str
    user_id: str
    movie_id: str
    rating: float
    rated_at: float
    prediction_id: str | None


def _key(value: object, loc: str) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable():
        return value
    raise FieldError(loc, KEY_RULE, value)


def _timestamp(value: object, loc: str) -> float:
    if type(value) in (int, float):
        x = float(value)  # type: ignore[arg-type]
        if math.isfinite(x) and 0 <= x < 1e11:
            return x
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed.timestamp()
    raise FieldError(loc, TIMESTAMP_RULE, value)


def _rating(value: object, loc: str) -> float:
    if type(value) in (int, float):
        x = float(value)  # type: ignore[arg-type]
        if math.isfinite(x) and 0.0 <= x <= 10.0:
            return x
    raise FieldError(loc, RATING_RULE, value)


def _content_key(user_id: str, movie_id: str, rating: float, ts: object, prediction_id: str | None) -> str:
    # Without an explicit key, the content itself is the key: an identical retry is the same rating. The
    # timestamp is the one the client sent (not the server's clock), so a retry hashes to the same key.
    canon = orjson.dumps([user_id, movie_id, rating, ts, prediction_id])
    return "c-" + hashlib.sha256(canon).hexdigest()[:40]


def parse_feedback(body: object, idempotency_key: str | None, now: float) -> list[Feedback]:
    """Validate a /feedback body (one rating, or ``{"ratings": [...]}``) and give each rating its key.

    Key of a rating: its ``feedback_id`` if sent; else, with an ``Idempotency-Key`` header, that key and the
    rating's index in the request; else a hash of its content. A retried request therefore stores nothing new.
    """
    if idempotency_key is not None:
        _key(idempotency_key, "Idempotency-Key")
    if isinstance(body, dict) and "ratings" in body:
        extra = set(body) - {"ratings"}
        if extra:
            name = sorted(extra)[0]
            raise FieldError(name, "unknown field", body[name])
        items = body["ratings"]
        if not isinstance(items, list) or not items:
            raise FieldError("ratings", f"must be a list of 1-{MAX_FEEDBACK_BATCH} ratings", items)
        if len(items) > MAX_FEEDBACK_BATCH:
            raise FieldError("ratings", f"must be a list of 1-{MAX_FEEDBACK_BATCH} ratings", f"{len(items)} ratings")
        prefix = "ratings"
    elif isinstance(body, dict):
        items = [body]
        prefix = ""
    else:
        raise FieldError("body", "must be a JSON object", body)

    out: list[Feedback] = []
    for i, item in enumerate(items):
        loc = f"{prefix}[{i}]." if prefix else ""
        if not isinstance(item, dict):
            raise FieldError(f"{prefix}[{i}]", "must be a JSON object", item)
        for name in item:
            if name not in _FIELDS:
                raise FieldError(loc + str(name), "unknown field", item[name])
        for name in ("user_id", "movie_id", "rating"):
            if name not in item:
                raise FieldError(loc + name, "is required")
        user_id = str(parse_id(item["user_id"], loc + "user_id"))
        movie_id = str(parse_id(item["movie_id"], loc + "movie_id"))
        rating = _rating(item["rating"], loc + "rating")
        raw_ts = item.get("timestamp")
        rated_at = now if raw_ts is None else _timestamp(raw_ts, loc + "timestamp")
        raw_pid = item.get("prediction_id")
        prediction_id = None if raw_pid is None else _key(raw_pid, loc + "prediction_id")
        if "feedback_id" in item:
            feedback_id = _key(item["feedback_id"], loc + "feedback_id")
        elif idempotency_key is not None:
            feedback_id = "k-" + hashlib.sha256(f"{idempotency_key}\x00{i}".encode()).hexdigest()[:40]
        else:
            feedback_id = _content_key(user_id, movie_id, rating, raw_ts, prediction_id)
        out.append(Feedback(feedback_id, user_id, movie_id, rating, rated_at, prediction_id))
    return out


class FeedbackService:
    """``POST /feedback`` without HTTP: validates the body, stores its new ratings in one transaction in a worker
    thread (at most ``write_timeout`` seconds, then StoreError: the client retries with the same keys, and a rating
    that did commit meanwhile is then a duplicate), and tells ``on_stored`` which users got new ratings (their views
    are dropped)."""

    def __init__(
        self,
        store: FeedbackStore,
        on_stored: Callable[[Iterable[str]], None] | None = None,
        *,
        write_timeout: float = 10.0,
        health: StoreHealth | None = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.on_stored = on_stored
        self.clock = clock  # "now" of a rating sent without a timestamp, and of its arrival: a replay's own time
        self.write_timeout = write_timeout
        self.health = health
        self.telemetry = telemetry

    async def record(self, body: bytes, idempotency_key: str | None) -> tuple[bool, bytes]:
        """(whether any rating was new, the JSON answer). Raises InputError for a refused body and StoreError when
        the store could not write in time."""
        try:
            with anyio.fail_after(self.write_timeout):
                return await anyio.to_thread.run_sync(self.record_now, body, idempotency_key, abandon_on_cancel=True)
        except TimeoutError:
            error = StoreError(f"the store did not commit within {self.write_timeout} s")
            if self.health is not None:
                self.health.failed(str(error), write=True)
            if self.telemetry is not None:
                self.telemetry.feedback_rejected(error)
            raise error from None

    def record_now(self, body: bytes, idempotency_key: str | None) -> tuple[bool, bytes]:
        """``record``, blocking, without the timeout."""
        try:
            ratings, result = self._store(body, idempotency_key)
        except Exception as exc:
            if self.telemetry is not None:
                self.telemetry.feedback_rejected(exc)
            if isinstance(exc, StoreError) and self.health is not None:
                self.health.failed(str(exc), write=True)
            raise
        if self.health is not None:
            self.health.ok()
        if self.telemetry is not None:
            self.telemetry.feedback_stored(result.accepted, result.duplicates)
        if self.on_stored is not None and result.accepted:
            self.on_stored({r.user_id for r, s in zip(ratings, result.stored, strict=True) if s})
        answer = {
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "results": [
                {"feedback_id": r.feedback_id, "status": "stored" if s else "duplicate"}
                for r, s in zip(ratings, result.stored, strict=True)
            ],
        }
        return result.accepted > 0, orjson.dumps(answer)

    def _store(self, body: bytes, idempotency_key: str | None) -> tuple[list[Feedback], StoreResult]:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSONError(f"request body is not valid JSON: {exc}") from None
        now = self.clock()
        ratings = parse_feedback(obj, idempotency_key, now)
        return ratings, self.store.add(ratings, received_at=now)
