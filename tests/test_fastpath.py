"""The pure-ASGI fast path answers exactly what the FastAPI routes answer: same bodies, same errors, same headers."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from moviematch_ml.api.app import create_app
from moviematch_ml.api.fastpath import FastPathMiddleware
from moviematch_ml.errors import FieldError, InputError
from moviematch_ml.features import EXAMPLE
from moviematch_ml.logs import JsonFormatter
from moviematch_ml.serving import LRUCache, ModelHolder, PredictionService
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
    holder = ModelHolder(Settings(model_path=tmp_path / "missing"))
    holder.load()
    app = FastPathMiddleware(_teapot, service=PredictionService(holder, max_batch_size=10))
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


# --- the vectorised batch validation -----------------------------------------------------------------------------

VARIANTS: list[Any] = [
    {},  # unchanged: valid
    {"vote_average": 10},
    {"vote_average": 10.000001},
    {"vote_average": -0.0},
    {"vote_count": 1e9},
    {"vote_count": 1_000_000_001},
    {"vote_count": 2.0},
    {"vote_count": 2.5},
    {"vote_count": 10**30},
    {"n_shared_genres": True},
    {"is_favorite_genre": True},
    {"is_favorite_genre": 1.0},
    {"is_favorite_genre": 0.5},
    {"is_favorite_genre": 2},
    {"popularity": "5"},
    {"popularity": None},
    {"movie_id": "tt-1"},
    {"movie_id": ""},
    {"movie_id": -1},
    {"movie_id": 2**63},
    {"movie_id": 1.0},
    {"movie_id": "bad\n"},
    {"extra": 1},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_vectorised_validation_accepts_exactly_what_the_loop_accepts(variant: dict[str, Any]) -> None:
    from moviematch_ml.features import matrix_from_mappings
    from moviematch_ml.serving import _rows_one_by_one

    movies: list[object] = [dict(MOVIE), {**MOVIE, **variant}, {**MOVIE, "movie_id": 3, "vote_average": 0}]
    fast = matrix_from_mappings(movies, "movie_id")
    try:
        x, ids = _rows_one_by_one(movies)
    except FieldError:
        assert fast is None
        return
    assert fast is not None
    np.testing.assert_array_equal(fast[0], x)
    assert fast[1] == ids


def test_vectorised_validation_gives_up_on_shapes_it_does_not_cover() -> None:
    from moviematch_ml.features import matrix_from_mappings

    missing = {k: v for k, v in MOVIE.items() if k != "vote_count"}
    for movies in ([MOVIE, [1, 2]], [MOVIE, "movie"], [MOVIE, missing], [MOVIE, {**missing, "other": 1}]):
        assert matrix_from_mappings(list(movies), "movie_id") is None
    checked = matrix_from_mappings([MOVIE, {**MOVIE, "movie_id": 2, "is_favorite_genre": False}], "movie_id")
    assert checked is not None
    x, ids = checked
    assert ids == [1, 2]
    assert x.tolist() == [[2.0, 7.5, 1000.0, 1.0, 3.0, 50.0], [2.0, 7.5, 1000.0, 0.0, 3.0, 50.0]]


# --- the answer cache ----------------------------------------------------------------------------------------------


class _Fixed:
    def __init__(self, version: str, rating: float) -> None:
        self.version = version
        self.source = "model"
        self.rating = rating
        self.calls = 0

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        self.calls += 1
        return np.full(x.shape[0], self.rating)


class _AlwaysKnows:
    version = "personal-1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, user_id: Any, movie_ids: Any, x: npt.NDArray[np.float64]) -> Any:
        self.calls += 1
        return np.full(x.shape[0], 1.25), np.ones(x.shape[0], dtype=bool)


def test_cache_hits_keep_fresh_ids_and_follow_the_model_version(tmp_path: Path) -> None:
    holder = ModelHolder(Settings(model_path=tmp_path / "missing"))
    first = _Fixed("v1", 6.0)
    holder.swap(first)
    service = PredictionService(holder, max_batch_size=10, cache_size=2)
    assert service.cache is not None
    body = orjson.dumps(EXAMPLE)
    a, b = orjson.loads(service.predict_one(body)), orjson.loads(service.predict_one(body))
    assert first.calls == 1  # the second answer came from the cache
    assert (a["predicted_rating"], b["predicted_rating"], b["model_version"]) == (6.0, 6.0, "v1")
    assert a["prediction_id"] != b["prediction_id"]
    batch = orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": 2}], "top_k": 1})
    c, d = orjson.loads(service.predict_batch(batch)), orjson.loads(service.predict_batch(batch))
    assert first.calls == 2
    assert c["predictions"][0]["movie_id"] == d["predictions"][0]["movie_id"] == 1
    assert c["predictions"][0]["prediction_id"] != d["predictions"][0]["prediction_id"]
    second = _Fixed("v2", 3.0)
    holder.swap(second)
    assert orjson.loads(service.predict_one(body))["predicted_rating"] == 3.0  # new version: not the old entry
    assert isinstance(service.cache, LRUCache)
    assert (second.calls, len(service.cache)) == (1, 2)  # bounded: the oldest entry was evicted


def test_personalised_answers_are_not_cached(tmp_path: Path) -> None:
    holder = ModelHolder(Settings(model_path=tmp_path / "missing"))
    model = _Fixed("v1", 6.0)
    holder.swap(model)
    personal = _AlwaysKnows()
    service = PredictionService(holder, max_batch_size=10, cache_size=10, personalizer=personal)
    body = orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 1})
    for _ in range(2):
        out = orjson.loads(service.predict_one(body))
        assert (out["predicted_rating"], out["source"], out["model_version"]) == (1.25, "personalized", "personal-1")
    assert personal.calls == 2
    assert model.calls == 0  # a personalised answer does not need the six-feature model at all
    assert isinstance(service.cache, LRUCache)
    assert len(service.cache) == 0


def test_cache_stays_within_its_memory_budget() -> None:
    from moviematch_ml.serving import LRUCache

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


# --- the msgspec batch decoder ---------------------------------------------------------------------------------

ENVELOPES: list[Any] = [
    {},
    {"user_id": 7},
    {"user_id": "u-7"},
    {"user_id": ""},
    {"user_id": "tab\t"},
    {"user_id": None},
    {"user_id": -1},
    {"rank": True},
    {"rank": None},
    {"rank": 1},
    {"top_k": 2},
    {"top_k": None},
    {"top_k": 0},
    {"top_k": True},
    {"top_k": 2.0},
    {"colour": 1},
]


def _both(service: PredictionService, body: bytes) -> tuple[Any, Any]:
    try:
        slow: Any = service._decode_batch(body)
    except InputError as exc:
        slow = exc
    return service._decode_batch_fast(body), slow


@pytest.mark.parametrize("envelope", ENVELOPES, ids=[str(e) for e in ENVELOPES])
@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_msgspec_decoder_never_accepts_what_the_rules_refuse(
    tmp_path: Path, envelope: dict[str, Any], variant: dict[str, Any]
) -> None:
    holder = ModelHolder(Settings(model_path=tmp_path / "missing"))
    service = PredictionService(holder, max_batch_size=3)
    # The standard library's json, which (unlike orjson) writes integers beyond 64 bits.
    body = json.dumps({"movies": [MOVIE, {**MOVIE, **variant}], **envelope}).encode()
    fast, slow = _both(service, body)
    if isinstance(slow, InputError):
        assert fast is None
        return
    if fast is None:  # allowed (the slow path then serves it), but not for plain, common bodies
        assert variant or envelope.get("top_k", 1) is None or envelope.get("user_id") == "tab\t"
        return
    np.testing.assert_array_equal(fast[0], slow[0])
    assert fast[1:] == slow[1:]
    assert [type(i) for i in fast[1]] == [type(i) for i in slow[1]]


@pytest.mark.parametrize(
    "body",
    [
        b'{"movies": [{"movie_id": 1}]}',
        b'{"movies": "x"}',
        b"{}",
        b"[]",
        b'{"movies": [NaN]}',
        b'{"movies": [' + orjson.dumps(MOVIE) + b"]" + b"}" + b" trailing",
        b'{"movies": [' + b",".join([orjson.dumps(MOVIE)] * 4) + b"]}",  # over max_batch_size
        orjson.dumps({"movies": [{**MOVIE, "vote_average": 1e300}]}),
        b'{"movies": [' + orjson.dumps(MOVIE)[:-1] + b', "vote_average": 11}]}',  # duplicate key, last wins
        b'{"movies": [' + orjson.dumps({**MOVIE, "vote_average": 11})[:-1] + b', "vote_average": 5}]}',
    ],
)
def test_msgspec_decoder_on_odd_bodies(tmp_path: Path, body: bytes) -> None:
    holder = ModelHolder(Settings(model_path=tmp_path / "missing"))
    service = PredictionService(holder, max_batch_size=3)
    fast, slow = _both(service, body)
    if isinstance(slow, InputError):
        assert fast is None
    elif fast is not None:
        np.testing.assert_array_equal(fast[0], slow[0])
        assert fast[1:] == slow[1:]


def test_msgspec_decoder_serves_plain_batches(tmp_path: Path) -> None:
    holder = ModelHolder(Settings(model_path=tmp_path / "missing"))
    service = PredictionService(holder, max_batch_size=3)
    fast = service._decode_batch_fast(orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": "m2"}], "top_k": 1}))
    assert fast is not None
    assert fast[0].tolist() == [[2.0, 7.5, 1000.0, 1.0, 3.0, 50.0]] * 2
    assert fast[1:] == ([1, "m2"], None, False, 1)


def test_served_under_a_root_path(tmp_path: Path) -> None:
    holder = ModelHolder(Settings(model_path=tmp_path / "missing"))
    holder.load()
    app = FastPathMiddleware(_teapot, service=PredictionService(holder, max_batch_size=10))
    c = TestClient(app, root_path="/ml")
    r = c.post("/ml/predict", json=EXAMPLE)
    assert r.status_code == 200, r.text  # not 418: the fast path matched the route under the prefix
    assert r.json()["source"] == "fallback"
    assert c.post("/ml/predict-batch", json={"movies": [MOVIE]}).json()["count"] == 1
    assert c.post("/ml/feedback", json={}).status_code == 418


def test_big_bodies_are_answered_in_a_worker_thread(tmp_path: Path) -> None:
    from moviematch_ml.api import fastpath

    movies = [{**MOVIE, "movie_id": i} for i in range(8000)]
    body = orjson.dumps({"movies": movies})
    assert len(body) > fastpath.THREADPOOL_BYTES  # so this request takes the thread path
    with TestClient(create_app(Settings(model_path=tmp_path / "missing"))) as c:
        for _ in range(2):  # the second call reuses the limiter made by the first
            r = c.post("/predict-batch", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200
            assert r.json()["count"] == 8000
