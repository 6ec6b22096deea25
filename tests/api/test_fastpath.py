"""The pure-ASGI fast path answers exactly what the FastAPI routes answer: same bodies, same errors, same headers;
it takes only POST to the two prediction routes, and leaves everything else to FastAPI."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from moviematch_ml.api.app import create_app
from moviematch_ml.api.fastpath import FastPathMiddleware
from moviematch_ml.features import EXAMPLE
from moviematch_ml.logs import JsonFormatter
from moviematch_ml.online.contract import BatchRequest
from moviematch_ml.online.models import ModelSet
from moviematch_ml.online.service import THREAD_BODY_BYTES, PredictionService
from moviematch_ml.settings import Settings

HEX32 = re.compile(r"[0-9a-f]{32}")
MOVIE = {"movie_id": 1, **EXAMPLE}

# (path, body bytes, content type): valid requests and one of every kind of refusal.
CASES: list[tuple[str, bytes, str | None]] = [
    ("/predict", orjson.dumps(EXAMPLE), "application/json"),
    ("/predict", orjson.dumps({**EXAMPLE, "user_id": "u-1", "movie_id": 9}), None),
    ("/predict", orjson.dumps({**EXAMPLE, "vote_average": 11}), "application/json"),
    ("/predict", orjson.dumps({**EXAMPLE, "vote_count": 1.5}), "application/json"),
    ("/predict", orjson.dumps({**EXAMPLE, "colour": "red"}), "application/json"),
    ("/predict", orjson.dumps({k: v for k, v in EXAMPLE.items() if k != "popularity"}), "application/json"),
    ("/predict", orjson.dumps({**EXAMPLE, "user_id": -1}), "application/json"),
    ("/predict", b"[1, 2]", "application/json"),
    ("/predict", b"{", "application/json"),
    ("/predict", b'{"vote_average": NaN}', "application/json"),
    ("/predict", orjson.dumps(EXAMPLE), "text/plain; charset=utf-8"),
    ("/predict", orjson.dumps(EXAMPLE), "application/vnd.api+json"),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": "m2", "vote_average": 9.5}]}), None),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": 2}], "top_k": 1}), "application/json"),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE, {**MOVIE, "is_favorite_genre": 2}]}), "application/json"),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE, {k: v for k, v in MOVIE.items() if k != "movie_id"}]}), None),
    ("/predict-batch", orjson.dumps({"movies": []}), "application/json"),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE] * 6}), "application/json"),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE], "rank": "yes"}), "application/json"),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE], "top_k": 0}), "application/json"),
    ("/predict-batch", orjson.dumps({"films": [MOVIE]}), "application/json"),
    ("/predict-batch", orjson.dumps({"movies": [MOVIE] * 40}), "application/json"),  # over max_body_bytes: 413
    ("/predict-batch", b"", "application/json"),
]


def _settings(tmp_path: Path, model_dir: Path | None, fast: bool) -> Settings:
    return Settings(
        model_path=model_dir if model_dir is not None else tmp_path / "missing",
        max_batch_size=5,
        max_body_bytes=4096,
        fast_path=fast,
    )


@pytest.fixture(params=["fallback", "model"])
def clients(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path) -> Iterator[dict[bool, TestClient]]:
    """One service with the fast path and one without, for the fallback and for the tiny LightGBM model."""
    model_dir = tiny_model_dir if request.param == "model" else None
    with (
        TestClient(create_app(_settings(tmp_path, model_dir, True))) as fast,
        TestClient(create_app(_settings(tmp_path, model_dir, False))) as slow,
    ):
        yield {True: fast, False: slow}


def _without_ids(body: Any) -> Any:
    """Prediction ids are random per request; everything else must be equal."""
    if isinstance(body, dict):
        return {k: _without_ids(v) for k, v in body.items() if k != "prediction_id"}
    if isinstance(body, list):
        return [_without_ids(v) for v in body]
    return body


@pytest.mark.parametrize(("path", "body", "content_type"), CASES)
def test_fast_path_answers_like_fastapi(
    clients: dict[bool, TestClient], path: str, body: bytes, content_type: str | None
) -> None:
    headers = {"x-request-id": "same-id"}
    if content_type is not None:
        headers["content-type"] = content_type
    fast = clients[True].post(path, content=body, headers=headers)
    slow = clients[False].post(path, content=body, headers=headers)
    assert fast.status_code == slow.status_code
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    assert fast.headers["content-length"] == slow.headers["content-length"]
    assert fast.headers["x-request-id"] == slow.headers["x-request-id"] == "same-id"
    if fast.status_code == 200:
        assert _without_ids(fast.json()) == _without_ids(slow.json())
        assert "prediction_id" in fast.text
    else:
        assert fast.content == slow.content  # errors: byte for byte


def test_the_status_codes_of_the_cases(clients: dict[bool, TestClient]) -> None:
    # Written out so that the comparison above cannot pass by both paths failing the same way.
    codes = [
        clients[True].post(p, content=b, headers={"content-type": c} if c else {}).status_code for p, b, c in CASES
    ]
    predict = [200, 200, 422, 422, 422, 422, 422, 422, 400, 400, 415, 200]
    batch = [200, 200, 422, 422, 422, 422, 422, 422, 422, 413, 400]
    assert codes == predict + batch


async def _teapot(scope: Scope, receive: Receive, send: Send) -> None:
    await PlainTextResponse("downstream", status_code=418)(scope, receive, send)


def test_only_post_to_the_two_routes_is_taken(tmp_path: Path) -> None:
    models = ModelSet(tmp_path / "missing")
    models.load()
    app = FastPathMiddleware(_teapot, service=PredictionService(models, max_batch_size=10))
    c = TestClient(app)
    r = c.post("/predict", json=EXAMPLE)
    assert r.status_code == 200
    assert r.json()["source"] == "fallback"
    assert HEX32.fullmatch(r.json()["prediction_id"])
    assert r.headers["content-type"] == "application/json"
    assert c.post("/predict-batch", json={"movies": [MOVIE]}).json()["count"] == 1
    for method, path in (("GET", "/predict"), ("POST", "/predict/"), ("POST", "/feedback"), ("GET", "/health")):
        assert c.request(method, path).status_code == 418, (method, path)


def test_chunked_body_is_read_whole(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_path=tmp_path / "missing"))) as c:
        body = orjson.dumps({"movies": [{**MOVIE, "movie_id": i} for i in range(50)]})

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 97):
                yield body[i : i + 97]

        r = c.post("/predict-batch", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 200
        assert [p["movie_id"] for p in r.json()["predictions"]] == list(range(50))


def test_openapi_still_documents_the_fast_routes(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_path=tmp_path / "missing", fast_path=True))) as c:
        spec = c.get("/openapi.json").json()
    for path, request_schema in (("/predict", "PredictRequest"), ("/predict-batch", "BatchRequest")):
        post = spec["paths"][path]["post"]
        assert request_schema in orjson.dumps(post["requestBody"]).decode()
        assert {"200", "422"} <= set(post["responses"])


def test_access_log_and_request_id_stay_on(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("moviematch_ml.access")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with TestClient(create_app(Settings(model_path=tmp_path / "missing"))) as c:
            r = c.post("/predict", json=EXAMPLE)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert HEX32.fullmatch(r.headers["x-request-id"])
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    [line] = [a for a in lines if a["path"] == "/predict"]
    assert (line["method"], line["status"], line["request_id"]) == ("POST", 200, r.headers["x-request-id"])


def test_served_under_a_root_path(tmp_path: Path) -> None:
    models = ModelSet(tmp_path / "missing")
    models.load()
    app = FastPathMiddleware(_teapot, service=PredictionService(models, max_batch_size=10))
    c = TestClient(app, root_path="/ml")
    r = c.post("/ml/predict", json=EXAMPLE)
    assert r.status_code == 200, r.text  # not 418: the fast path matched the route under the prefix
    assert r.json()["source"] == "fallback"
    assert c.post("/ml/predict-batch", json={"movies": [MOVIE]}).json()["count"] == 1
    assert c.post("/ml/feedback", json={}).status_code == 418


def test_big_bodies_are_answered_in_a_worker_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    movies = [{**MOVIE, "movie_id": i} for i in range(8000)]
    body = orjson.dumps({"movies": movies})
    assert len(body) > THREAD_BODY_BYTES  # so this request takes the thread path
    with TestClient(create_app(Settings(model_path=tmp_path / "missing"))) as c:
        for _ in range(2):  # the second call reuses the limiter made by the first
            r = c.post("/predict-batch", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200
            assert r.json()["count"] == 8000
    # Where each body is answered: a small one on the event loop, a big one off it.
    models = ModelSet(tmp_path / "missing")
    models.load()
    service = PredictionService(models, max_batch_size=10_000)
    on_loop: list[bool] = []
    decode = service.decode_batch

    def recording(request_body: bytes) -> BatchRequest:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop in this thread
            on_loop.append(False)
        return decode(request_body)

    monkeypatch.setattr(service, "decode_batch", recording)
    c = TestClient(FastPathMiddleware(_teapot, service=service))
    small = orjson.dumps({"movies": movies[:10]})
    for content in (small, body, body):
        assert (
            c.post("/predict-batch", content=content, headers={"content-type": "application/json"}).status_code == 200
        )
    assert on_loop == [True, False, False]
