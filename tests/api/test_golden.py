"""The API's exact answers: every endpoint, for a fixed set of requests (errors included), against a recorded file.

The recording (``golden_api.json``) pins the bytes the backend sees. Fields that are fresh on every request
(prediction ids, request ids, uptime) are replaced by placeholders of the same shape before comparing, so what is
compared is everything else, byte for byte. Regenerate deliberately with ``pytest tests/api/test_golden.py
--update-golden`` and review the diff: a change here is a change of the contract.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.settings import Settings

GOLDEN = Path(__file__).with_name("golden_api.json")

# Fresh on every request: normalised before comparing.
_PREDICTION_ID = re.compile(rb'"prediction_id":"[0-9a-f]{32}(-[0-9]+)?"')
_UPTIME = re.compile(rb'"uptime_seconds":[0-9.e+-]+')


def _normalise(body: bytes) -> str:
    body = _PREDICTION_ID.sub(lambda m: b'"prediction_id":"<id>' + (m.group(1) or b"") + b'"', body)
    body = _UPTIME.sub(b'"uptime_seconds":0', body)
    return body.decode("utf-8")


def _movie(movie_id: int | str, k: int) -> dict[str, Any]:
    """A deterministic, varied movie: the k-th of a fixed sequence."""
    return {
        "movie_id": movie_id,
        "n_shared_genres": k % 4,
        "vote_average": round(2.0 + (k * 37 % 75) / 10, 1),
        "vote_count": (k * 7919) % 20000,
        "is_favorite_genre": k % 2,
        "years_since_release": (k * 13) % 60,
        "popularity": round((k * 104729 % 100000) / 100, 2),
    }


# (name, method, path, body as JSON, raw body, extra headers). A raw body is sent as it is.
Request = tuple[str, str, str, Any, bytes | None, dict[str, str]]

_MOVIES3 = [_movie(1, 1), _movie(2, 2), _movie(3, 3)]

PREDICTION_REQUESTS: list[Request] = [
    ("root", "GET", "/", None, None, {}),
    ("health", "GET", "/health", None, None, {}),
    ("live", "GET", "/health/live", None, None, {}),
    ("ready", "GET", "/health/ready", None, None, {}),
    ("predict example", "POST", "/predict", EXAMPLE, None, {}),
    ("predict with ids", "POST", "/predict", {**EXAMPLE, "user_id": "nobody", "movie_id": 318}, None, {}),
    ("predict flag as bool", "POST", "/predict", {**EXAMPLE, "is_favorite_genre": True}, None, {}),
    ("predict count as float", "POST", "/predict", {**EXAMPLE, "vote_count": 1000.0}, None, {}),
    ("predict varied", "POST", "/predict", {k: v for k, v in _movie(0, 11).items() if k != "movie_id"}, None, {}),
    ("predict missing field", "POST", "/predict", {k: v for k, v in EXAMPLE.items() if k != "popularity"}, None, {}),
    ("predict unknown field", "POST", "/predict", {**EXAMPLE, "popularty": 3}, None, {}),
    ("predict out of range", "POST", "/predict", {**EXAMPLE, "vote_average": 11}, None, {}),
    ("predict wrong type", "POST", "/predict", {**EXAMPLE, "vote_count": "1000"}, None, {}),
    ("predict bool count", "POST", "/predict", {**EXAMPLE, "n_shared_genres": True}, None, {}),
    ("predict fractional count", "POST", "/predict", {**EXAMPLE, "n_shared_genres": 2.5}, None, {}),
    ("predict bad user id", "POST", "/predict", {**EXAMPLE, "user_id": -1}, None, {}),
    ("predict null user id", "POST", "/predict", {**EXAMPLE, "user_id": None}, None, {}),
    ("predict list body", "POST", "/predict", [EXAMPLE], None, {}),
    ("predict invalid json", "POST", "/predict", None, b'{"vote_average": ', {}),
    ("predict NaN", "POST", "/predict", None, b'{"vote_average": NaN}', {}),
    ("predict text/plain", "POST", "/predict", EXAMPLE, None, {"content-type": "text/plain"}),
    ("predict too large", "POST", "/predict", None, b" " * 300_000, {}),
    ("predict GET", "GET", "/predict", None, None, {}),
    ("batch", "POST", "/predict-batch", {"movies": _MOVIES3}, None, {}),
    ("batch ranked", "POST", "/predict-batch", {"movies": _MOVIES3, "rank": True}, None, {}),
    ("batch top_k", "POST", "/predict-batch", {"movies": _MOVIES3, "top_k": 2}, None, {}),
    ("batch string ids", "POST", "/predict-batch", {"movies": [_movie("tt01", 4), _movie("tt02", 5)]}, None, {}),
    ("batch mixed ids", "POST", "/predict-batch", {"movies": [_movie(7, 6), _movie("x", 7)], "top_k": 5}, None, {}),
    ("batch 300", "POST", "/predict-batch", {"movies": [_movie(k, k) for k in range(300)]}, None, {}),
    ("batch unknown user", "POST", "/predict-batch", {"movies": _MOVIES3, "user_id": 123456}, None, {}),
    ("batch empty", "POST", "/predict-batch", {"movies": []}, None, {}),
    ("batch not a list", "POST", "/predict-batch", {"movies": {"a": 1}}, None, {}),
    ("batch too many", "POST", "/predict-batch", {"movies": [_movie(k, k) for k in range(501)]}, None, {}),
    ("batch missing movie id", "POST", "/predict-batch", {"movies": [EXAMPLE]}, None, {}),
    (
        "batch bad movie",
        "POST",
        "/predict-batch",
        {"movies": [_movie(1, 1), {**_movie(2, 2), "popularity": -1}]},
        None,
        {},
    ),
    ("batch unknown field", "POST", "/predict-batch", {"movies": _MOVIES3, "limit": 3}, None, {}),
    ("batch rank not bool", "POST", "/predict-batch", {"movies": _MOVIES3, "rank": 1}, None, {}),
    ("batch top_k zero", "POST", "/predict-batch", {"movies": _MOVIES3, "top_k": 0}, None, {}),
    ("batch missing movies", "POST", "/predict-batch", {}, None, {}),
    ("not found", "GET", "/nope", None, None, {}),
    ("health POST", "POST", "/health", None, None, {}),
]

_RATED = [_movie(k, k) for k in (1, 2, 3, 4, 5)]

FEEDBACK_REQUESTS: list[Request] = [
    ("feedback one", "POST", "/feedback", {"user_id": 7, "movie_id": 1, "rating": 9}, None, {"Idempotency-Key": "g1"}),
    (
        "feedback retry",
        "POST",
        "/feedback",
        {"user_id": 7, "movie_id": 1, "rating": 9},
        None,
        {"Idempotency-Key": "g1"},
    ),
    (
        "feedback batch",
        "POST",
        "/feedback",
        {"ratings": [{"user_id": 7, "movie_id": m, "rating": r} for m, r in ((2, 8), (3, 3), (4, 6), (5, 10))]},
        None,
        {},
    ),
    (
        "feedback with extras",
        "POST",
        "/feedback",
        {"user_id": "u-8", "movie_id": "m-1", "rating": 6.5, "timestamp": "2026-01-02T03:04:05Z", "feedback_id": "f-1"},
        None,
        {},
    ),
    ("feedback bad rating", "POST", "/feedback", {"user_id": 7, "movie_id": 1, "rating": 11}, None, {}),
    ("feedback missing user", "POST", "/feedback", {"movie_id": 1, "rating": 5}, None, {}),
    ("feedback unknown field", "POST", "/feedback", {"user_id": 7, "movie_id": 1, "rating": 5, "stars": 3}, None, {}),
    ("feedback empty batch", "POST", "/feedback", {"ratings": []}, None, {}),
    (
        "feedback bad timestamp",
        "POST",
        "/feedback",
        {"user_id": 7, "movie_id": 1, "rating": 5, "timestamp": "x"},
        None,
        {},
    ),
    ("feedback invalid json", "POST", "/feedback", None, b"{", {}),
    ("predict personalised", "POST", "/predict", {**EXAMPLE, "user_id": 7, "movie_id": 1}, None, {}),
    ("predict personalised no movie", "POST", "/predict", {**EXAMPLE, "user_id": 7}, None, {}),
    ("batch personalised", "POST", "/predict-batch", {"movies": _RATED, "user_id": 7, "rank": True}, None, {}),
    ("batch personalised str user", "POST", "/predict-batch", {"movies": _MOVIES3, "user_id": "7"}, None, {}),
]

FALLBACK_REQUESTS: list[Request] = [
    ("root", "GET", "/", None, None, {}),
    ("health", "GET", "/health", None, None, {}),
    ("ready", "GET", "/health/ready", None, None, {}),
    ("predict", "POST", "/predict", EXAMPLE, None, {}),
    ("batch", "POST", "/predict-batch", {"movies": _MOVIES3, "top_k": 2}, None, {}),
]


def _answers(client: TestClient, requests: list[Request]) -> list[dict[str, Any]]:
    out = []
    for name, method, path, body, raw, headers in requests:
        content = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        all_headers = {"content-type": "application/json", **headers} if content is not None else dict(headers)
        r = client.request(method, path, content=content, headers=all_headers)
        assert len(r.headers["x-request-id"]) == 32
        out.append(
            {
                "request": name,
                "status": r.status_code,
                "content_type": r.headers.get("content-type"),
                "body": _normalise(r.content),
            }
        )
    return out


def _record(tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    answers: dict[str, list[dict[str, Any]]] = {}
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'golden.sqlite3'}",
        max_body_bytes=256 * 1024,
        max_batch_size=500,
        state_warm_share=0,
        # Every request reads the store: no background task, so the movie totals are read when the first
        # personalised request asks (after the feedback of the recording), not at start-up.
        state_ttl_seconds=0,
    )
    for fast_path in (True, False):
        with TestClient(create_app(settings.model_copy(update={"fast_path": fast_path}))) as client:
            key = "bundled model" if fast_path else "bundled model, FastAPI routes"
            answers[key] = _answers(client, PREDICTION_REQUESTS)
    with TestClient(create_app(settings)) as client:
        answers["feedback and personalised"] = _answers(client, FEEDBACK_REQUESTS)
        answers["openapi"] = _answers(client, [("openapi", "GET", "/openapi.json", None, None, {})])
    fallback = Settings(model_path=Path("no-such-model"), database_url=f"sqlite:///{tmp_path / 'fb.sqlite3'}")
    with TestClient(create_app(fallback)) as client:
        answers["fallback"] = _answers(client, FALLBACK_REQUESTS)
    return answers


@pytest.fixture
def recorded(tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    return _record(tmp_path)


def test_every_answer_is_the_recorded_one(recorded: dict[str, list[dict[str, Any]]], update_golden: bool) -> None:
    if update_golden:
        GOLDEN.write_text(json.dumps(recorded, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert list(recorded) == list(expected)
    for group, answers in recorded.items():
        assert [a["request"] for a in answers] == [e["request"] for e in expected[group]], group
        for got, want in zip(answers, expected[group], strict=True):
            assert got == want, f"{group} / {want['request']}"
