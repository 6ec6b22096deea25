"""HTTP-level behaviour: error codes, body limits, request ids, CORS, access-log lines and the OpenAPI docs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from moviematch_ml.api.app import create_app
from moviematch_ml.api.schemas import BatchRequest, PredictRequest
from moviematch_ml.features import EXAMPLE, FEATURES
from moviematch_ml.online.models import ModelReport, Models, ModelSet
from moviematch_ml.settings import Settings

HEX32 = re.compile(r"[0-9a-f]{32}")


# --- error codes -----------------------------------------------------------------------------------------------


def test_unknown_route_is_404_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "message": "no route /nope"}


@pytest.mark.parametrize(("method", "path", "allow"), [("GET", "/predict", "POST"), ("POST", "/health", "GET")])
def test_wrong_method_is_405_json(client: TestClient, method: str, path: str, allow: str) -> None:
    r = client.request(method, path)
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"
    assert allow in r.headers["allow"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_non_json_content_type_is_415(client: TestClient, content_type: str) -> None:
    for path in ("/predict", "/predict-batch"):
        r = client.post(path, content=orjson.dumps(EXAMPLE), headers={"content-type": content_type})
        assert r.status_code == 415
        assert r.json()["error"] == "unsupported_media_type"


def test_json_content_type_variants_are_accepted(client: TestClient) -> None:
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json", None):
        headers = {"content-type": content_type} if content_type else {}
        r = client.post("/predict", content=orjson.dumps(EXAMPLE), headers=headers)
        assert r.status_code == 200, (content_type, r.text)


@pytest.fixture
def small_limit_client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=tmp_path / "none", max_body_bytes=1024))) as c:
        yield c


def test_body_over_the_limit_is_413(small_limit_client: TestClient) -> None:
    small = orjson.dumps({**EXAMPLE, "user_id": "u" * 100})
    assert len(small) <= 1024
    assert small_limit_client.post("/predict", content=small).status_code == 200
    big = orjson.dumps({"movies": [{"movie_id": i, **EXAMPLE} for i in range(20)]})
    assert len(big) > 1024
    r = small_limit_client.post("/predict-batch", content=big)
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"
    assert HEX32.fullmatch(r.headers["x-request-id"])


def test_chunked_body_over_the_limit_is_413(small_limit_client: TestClient) -> None:
    big = orjson.dumps({"movies": [{"movie_id": i, **EXAMPLE} for i in range(20)]})

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    r = small_limit_client.post("/predict-batch", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # sent chunked: only the streaming check can catch it
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"


class ExplodingPredictor:
    version = "boom-1"
    source = "model"

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        raise RuntimeError("secret internal detail /srv/models")


def test_unexpected_error_is_500_without_internals(tmp_path: Path, logs: Any) -> None:
    models = ModelSet(tmp_path / "none")
    models.swap(Models(ExplodingPredictor(), None, ModelReport("ok", "boom-1"), ModelReport("absent", None)))
    c = TestClient(create_app(Settings(model_path=tmp_path / "none"), models=models))  # no lifespan: keep it
    r = c.post("/predict", json=EXAMPLE, headers={"x-request-id": "req-500"})
    assert r.status_code == 500
    assert r.json()["error"] == "internal_error"
    assert "secret" not in r.text
    assert r.headers["x-request-id"] == "req-500"
    [error] = [rec for rec in logs.records() if rec["message"] == "unhandled error"]
    assert error["request_id"] == "req-500"
    assert "secret internal detail" in error["exc_info"]  # the traceback goes to the log only
    [access] = logs.access()
    assert (access["status"], access["request_id"]) == (500, "req-500")


def test_fastapi_validation_errors_use_the_same_shape(fallback_settings: Settings) -> None:
    app = create_app(fallback_settings)

    @app.get("/extra/{item}")
    async def extra(item: int, limit: int = 10) -> dict[str, int]:
        return {"item": item, "limit": limit}

    with TestClient(app) as c:
        assert c.get("/extra/3?limit=4").json() == {"item": 3, "limit": 4}
        r = c.get("/extra/3?limit=many")
        assert r.status_code == 422
        body = r.json()
        assert body["error"] == "validation_error"
        assert [(d["field"], d["value"]) for d in body["detail"]] == [("limit", "many")]
        assert body["message"].startswith("limit: ")


# --- request ids -----------------------------------------------------------------------------------------------


def test_request_id_is_echoed(client: TestClient) -> None:
    for path in ("/", "/health", "/nope"):
        r = client.get(path, headers={"X-Request-ID": "abc-123 xyz"})
        assert r.headers["x-request-id"] == "abc-123 xyz"
    r = client.post("/predict", json={**EXAMPLE, "vote_average": 99}, headers={"X-Request-ID": "r1"})
    assert (r.status_code, r.headers["x-request-id"]) == (422, "r1")


def test_request_id_is_generated_when_absent(client: TestClient) -> None:
    ids = {client.get("/health/live").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(HEX32.fullmatch(i) for i in ids)


@pytest.mark.parametrize("bad", [b"x" * 129, b"caf\xe9", b"tab\there", b""])
def test_invalid_request_id_is_replaced(client: TestClient, bad: bytes) -> None:
    r = client.get("/health/live", headers=[(b"x-request-id", bad)])
    assert HEX32.fullmatch(r.headers["x-request-id"])


def test_longest_valid_request_id_is_kept(client: TestClient) -> None:
    rid = "a" * 128
    assert client.get("/health/live", headers={"x-request-id": rid}).headers["x-request-id"] == rid


# --- access log ------------------------------------------------------------------------------------------------


def test_one_json_access_line_per_request(client: TestClient, logs: Any) -> None:
    client.post("/predict", json=EXAMPLE, headers={"x-request-id": "log-1"})
    client.get("/nope", headers={"x-request-id": "log-2"})
    client.post("/predict", json={}, headers={"x-request-id": "log-3"})
    lines = logs.access()
    assert [(a["method"], a["path"], a["status"], a["request_id"]) for a in lines] == [
        ("POST", "/predict", 200, "log-1"),
        ("GET", "/nope", 404, "log-2"),
        ("POST", "/predict", 422, "log-3"),
    ]
    for line in lines:
        assert line["level"] == "info"
        assert line["message"] == "request"
        assert isinstance(line["latency_ms"], float)
        assert 0 <= line["latency_ms"] < 10_000
        assert line["ts"].endswith("+00:00")


# --- CORS ------------------------------------------------------------------------------------------------------


def _cors_client(tmp_path: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(model_path=tmp_path / "none", **settings)))


def test_cors_preflight_for_a_listed_origin(tmp_path: Path) -> None:
    c = _cors_client(tmp_path, cors_origins=["https://app.example"])
    r = c.options(
        "/predict",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-request-id",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-request-id" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers
    assert HEX32.fullmatch(r.headers["x-request-id"])  # preflights pass through the request-id layer too


def test_cors_preflight_for_another_origin_is_refused(tmp_path: Path) -> None:
    c = _cors_client(tmp_path, cors_origins=["https://app.example"])
    r = c.options("/predict", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


def test_cors_simple_request(tmp_path: Path) -> None:
    c = _cors_client(tmp_path, cors_origins=["https://app.example"])
    r = c.post("/predict", json=EXAMPLE, headers={"Origin": "https://app.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = c.post("/predict", json=EXAMPLE, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200  # CORS is enforced by browsers; the server just does not vouch for the origin
    assert "access-control-allow-origin" not in r.headers


def test_cors_wildcard_without_credentials(tmp_path: Path) -> None:
    c = _cors_client(tmp_path, cors_origins=["*"])
    r = c.get("/health", headers={"Origin": "https://anything.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers


def test_cors_credentials_with_listed_origins(tmp_path: Path) -> None:
    c = _cors_client(tmp_path, cors_origins=["https://app.example"], cors_allow_credentials=True)
    r = c.get("/health", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-allow-credentials"] == "true"


def test_cors_wildcard_with_credentials_is_refused_by_settings() -> None:
    with pytest.raises(ValidationError, match="CORS_ALLOW_CREDENTIALS"):
        Settings(cors_origins=["*"], cors_allow_credentials=True)


def test_no_cors_headers_when_no_origins_configured(client: TestClient) -> None:
    r = client.get("/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers


# --- OpenAPI ---------------------------------------------------------------------------------------------------


def test_openapi_documents_the_request_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/PredictRequest"}
    assert body["examples"]["example"]["value"] == EXAMPLE
    batch = spec["paths"]["/predict-batch"]["post"]["requestBody"]["content"]["application/json"]
    assert batch["examples"]["example"]["value"] == {"movies": [{"movie_id": 1, **EXAMPLE}]}
    props = schemas["PredictRequest"]["properties"]
    assert set(props) == {f.name for f in FEATURES} | {"user_id", "movie_id"}
    assert schemas["PredictRequest"]["additionalProperties"] is False
    for f in FEATURES:
        if f.kind != "flag":
            assert (props[f.name]["minimum"], props[f.name]["maximum"]) == (f.minimum, f.maximum)
    assert set(schemas["PredictRequest"]["required"]) == {f.name for f in FEATURES}
    assert "movie_id" in schemas["BatchMovie"]["required"]
    for path in ("/predict", "/predict-batch"):
        assert "422" in spec["paths"][path]["post"]["responses"]
    assert {"/", "/health", "/health/live", "/health/ready"} <= set(spec["paths"])


def test_docs_page(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    assert "swagger" in r.text.lower()


@pytest.mark.parametrize(
    "body",
    [
        {**EXAMPLE, "vote_average": 11},
        {**EXAMPLE, "vote_count": 2.5},
        {**EXAMPLE, "n_shared_genres": 31},
        {**EXAMPLE, "is_favorite_genre": 2},
        {**EXAMPLE, "years_since_release": -1},
        {**EXAMPLE, "popularity": -0.5},
        {**EXAMPLE, "unknown": 1},
        {**EXAMPLE, "user_id": -1},
        {**EXAMPLE, "user_id": "x" * 129},
        {k: v for k, v in EXAMPLE.items() if k != "popularity"},
    ],
)
def test_docs_schema_and_service_refuse_the_same_requests(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/predict", json=body).status_code == 422
    with pytest.raises(ValidationError):
        PredictRequest.model_validate(body)


def test_docs_schema_and_service_accept_the_examples(client: TestClient) -> None:
    for body in ({**EXAMPLE}, {**EXAMPLE, "is_favorite_genre": True, "user_id": "u", "movie_id": 3}):
        assert client.post("/predict", json=body).status_code == 200
        PredictRequest.model_validate(body)
    batch = {"movies": [{"movie_id": 1, **EXAMPLE}], "top_k": 1, "user_id": 5}
    assert client.post("/predict-batch", json=batch).status_code == 200
    BatchRequest.model_validate(batch)
