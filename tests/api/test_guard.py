"""Access keys through the app: 401 and 403 that name no key, each route's scope, open health probes, the admin
routes, rate limits with Retry-After, what the access log says of a key, and the OpenAPI bearer scheme."""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.settings import Settings
from realserver import free_port

PREDICT = "s3cr3t-backend-predict-0001"
FEEDBACK = "s3cr3t-backend-feedback-001"
METRICS = "s3cr3t-ops-metrics-000001"
ADMIN = "s3cr3t-ops-admin-00000001"
BOTH = "s3cr3t-backend-both-000001"
API_KEYS = f"{PREDICT}:predict,{FEEDBACK}:feedback,{METRICS}:metrics,{ADMIN}:admin,{BOTH}:predict+feedback"
SECRETS = (PREDICT, FEEDBACK, METRICS, ADMIN, BOTH)
BATCH = {"movies": [{"movie_id": 1, **EXAMPLE}]}
RATING = {"user_id": 42, "movie_id": 1, "rating": 8}
PROBES = ("/health", "/health/live", "/health/ready")
UNAUTHORIZED = {"error": "unauthorized", "message": "a valid API key is required: Authorization: Bearer <key>"}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def name_of(secret: str) -> str:
    """The name the service gives a key in its logs: the first 4 hex digits of its sha256."""
    return hashlib.sha256(secret.encode()).hexdigest()[:4]


def keyed_app(tmp_path: Path, **settings: Any) -> FastAPI:
    values: dict[str, Any] = {"model_path": tmp_path / "no-model", "api_keys": API_KEYS, **settings}
    return create_app(Settings(**values))


@pytest.fixture(params=[True, False], ids=["fast-path", "fastapi"])
def keyed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    """A started service with the five keys above, with the fast path on and off."""
    with TestClient(keyed_app(tmp_path, fast_path=request.param)) as c:
        yield c


# --- 401 --------------------------------------------------------------------------------------------------------------


NO_VALID_KEY: list[dict[str, str]] = [
    {},
    bearer("s3cr3t-not-a-key-000000001"),
    bearer(PREDICT[:-1]),
    bearer(""),
    {"Authorization": PREDICT},  # no scheme
    {"Authorization": f"Basic {PREDICT}"},
    {"X-API-Key": PREDICT},
]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/predict", EXAMPLE),
        ("POST", "/predict-batch", BATCH),
        ("POST", "/feedback", RATING),
        ("GET", "/metrics", None),
        ("GET", "/", None),
        ("GET", "/docs", None),
        ("GET", "/openapi.json", None),
        ("GET", "/models", None),
        ("GET", "/admin/reload", None),
        ("GET", "/no-such-route", None),
    ],
)
def test_without_a_valid_key_every_route_is_401_with_one_message(
    keyed: TestClient, method: str, path: str, body: Any
) -> None:
    for headers in NO_VALID_KEY:
        r = keyed.request(method, path, json=body, headers=headers)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED), headers
        assert r.headers["www-authenticate"] == 'Bearer realm="moviematch-ml"'
        for secret in SECRETS:
            assert secret not in r.text
            assert name_of(secret) not in r.text


def test_the_scheme_is_case_insensitive(keyed: TestClient) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert keyed.post("/predict", json=EXAMPLE, headers={"Authorization": f"{scheme} {PREDICT}"}).status_code == 200


def test_unknown_routes_say_nothing_before_a_key(keyed: TestClient) -> None:
    # Without a key a client cannot tell a route that exists from one that does not: both are 401.
    assert keyed.get("/no-such-route").status_code == 401
    assert keyed.get("/no-such-route", headers=bearer(PREDICT)).status_code == 404


# --- 403 and the scopes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "method", "path", "body"),
    [
        (FEEDBACK, "POST", "/predict", EXAMPLE),
        (METRICS, "POST", "/predict", EXAMPLE),
        (FEEDBACK, "POST", "/predict-batch", BATCH),
        (METRICS, "POST", "/predict-batch", BATCH),
        (PREDICT, "POST", "/feedback", RATING),
        (METRICS, "POST", "/feedback", RATING),
        (PREDICT, "GET", "/metrics", None),
        (BOTH, "GET", "/metrics", None),
        (PREDICT, "GET", "/admin/reload", None),
        (METRICS, "POST", "/admin/anything", None),
    ],
)
def test_a_key_without_the_route_s_scope_is_403_naming_no_key(
    keyed: TestClient, secret: str, method: str, path: str, body: Any
) -> None:
    r = keyed.request(method, path, json=body, headers=bearer(secret))
    assert r.status_code == 403
    assert r.json() == {"error": "forbidden", "message": f"this key may not call {path}"}
    assert "www-authenticate" not in r.headers
    for other in SECRETS:
        assert other not in r.text
        assert name_of(other) not in r.text


@pytest.mark.parametrize("secret", [PREDICT, BOTH, ADMIN])
def test_predictions_need_the_predict_scope(keyed: TestClient, secret: str) -> None:
    one = keyed.post("/predict", json=EXAMPLE, headers=bearer(secret))
    assert (one.status_code, one.json()["source"], one.json()["predicted_rating"]) == (200, "fallback", 7.909)
    batch = keyed.post("/predict-batch", json=BATCH, headers=bearer(secret))
    assert (batch.status_code, batch.json()["count"]) == (200, 1)


@pytest.mark.parametrize("secret", [FEEDBACK, BOTH, ADMIN])
def test_feedback_needs_the_feedback_scope(keyed: TestClient, secret: str) -> None:
    r = keyed.post("/feedback", json={**RATING, "feedback_id": f"fb-{secret}"}, headers=bearer(secret))
    assert (r.status_code, r.json()["accepted"]) == (201, 1)


@pytest.mark.parametrize("secret", [METRICS, ADMIN])
def test_metrics_need_the_metrics_scope(keyed: TestClient, secret: str) -> None:
    r = keyed.get("/metrics", headers=bearer(secret))
    assert r.status_code == 200
    assert "moviematch_http_requests_total" in r.text


@pytest.mark.parametrize("path", ["/", "/docs", "/openapi.json", "/models", "/docs/assets/swagger-ui.css"])
def test_any_valid_key_reads_the_service_s_description(keyed: TestClient, path: str) -> None:
    assert [keyed.get(path, headers=bearer(secret)).status_code for secret in SECRETS] == [200] * len(SECRETS)


@pytest.mark.parametrize("path", PROBES)
def test_health_probes_are_open(keyed: TestClient, path: str) -> None:
    # The platform's probes carry no key; a wrong one does not close them either.
    for headers in ({}, bearer("s3cr3t-not-a-key-000000001"), bearer(PREDICT)):
        assert keyed.get(path, headers=headers).status_code == 200


def test_under_a_root_path_the_route_s_scope_still_applies(tmp_path: Path) -> None:
    """Served under a prefix (``uvicorn --root-path /ml``, or a proxy that sets it), the router and the fast path
    match the path without the prefix: the guard must too, or ``/ml/predict`` would be served to a key of any scope
    (and ``/ml/admin/...`` would not count as an admin route), while the probes would need a key."""
    for fast_path in (True, False):
        with TestClient(keyed_app(tmp_path, fast_path=fast_path), root_path="/ml") as c:
            assert c.post("/ml/predict", json=EXAMPLE, headers=bearer(METRICS)).status_code == 403
            assert c.post("/ml/predict-batch", json=BATCH, headers=bearer(FEEDBACK)).status_code == 403
            assert c.post("/ml/feedback", json=RATING, headers=bearer(PREDICT)).status_code == 403
            assert c.get("/ml/metrics", headers=bearer(PREDICT)).status_code == 403
            assert c.get("/ml/admin/reload", headers=bearer(PREDICT)).status_code == 403
            assert c.post("/ml/predict", json=EXAMPLE, headers=bearer(PREDICT)).status_code == 200
            assert c.get("/ml/metrics", headers=bearer(METRICS)).status_code == 200
            assert c.get("/ml/health/ready").status_code == 200
            assert c.get("/ml/").status_code == 401


# --- admin routes -----------------------------------------------------------------------------------------------------


def _with_admin_route(app: FastAPI) -> FastAPI:
    """The app with one more admin route, as a later feature would add one: the guard matches the prefix."""

    @app.post("/admin/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return app


def test_admin_routes_need_the_admin_scope(tmp_path: Path) -> None:
    with TestClient(_with_admin_route(keyed_app(tmp_path))) as c:
        for path in ("/admin/reload", "/admin/ping"):
            assert c.post(path).status_code == 401
            for secret in (PREDICT, FEEDBACK, METRICS, BOTH):
                assert c.post(path, headers=bearer(secret)).status_code == 403
        r = c.post("/admin/ping", headers=bearer(ADMIN))
        assert (r.status_code, r.json()) == (200, {"pong": "yes"})
        # The real one: this app's model does not load (no model at MODEL_PATH), so a reload is refused (409).
        r = c.post("/admin/reload", headers=bearer(ADMIN))
        assert (r.status_code, r.json()["reloaded"]) == (409, False)


def test_without_keys_an_admin_route_refuses_everyone(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_path=tmp_path / "no-model"))) as c:
        for headers in ({}, bearer(ADMIN)):
            r = c.post("/admin/reload", headers=headers)
            assert (r.status_code, r.json()["error"]) == (403, "forbidden")
            assert "API_KEYS" in r.json()["message"]
        assert c.get("/admin/reload").status_code == 405  # the route exists; nothing else is there
        assert c.get("/admin/nothing").status_code == 404


# --- rate limits ------------------------------------------------------------------------------------------------------


def test_past_the_rate_limit_429_with_retry_after_per_key(tmp_path: Path) -> None:
    with TestClient(keyed_app(tmp_path, rate_limit="3/hour")) as c:
        statuses = [c.post("/predict", json=EXAMPLE, headers=bearer(PREDICT)).status_code for _ in range(3)]
        refused = c.post("/predict-batch", json=BATCH, headers=bearer(PREDICT))  # one count per key, any route
        other = c.post("/predict", json=EXAMPLE, headers=bearer(BOTH))
        probes = [c.get(path).status_code for path in PROBES for _ in range(2)]
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    body = refused.json()
    retry = int(refused.headers["retry-after"])
    assert 1 <= retry <= 3600
    assert body == {"error": "rate_limited", "message": f"too many requests for this key; retry in {retry} s"}
    assert other.status_code == 200  # another key has its own count
    assert probes == [200] * 6  # the probes carry no key and are never limited


def test_two_keys_whose_log_names_match_have_their_own_limits(tmp_path: Path) -> None:
    """A key's name in the logs is 4 hex digits of its sha256, so two keys can share one (1 in 65,536 per pair);
    the rate limiter counts each key apart all the same."""
    seen: dict[str, str] = {}
    for i in itertools.count():
        secret = f"s3cr3t-colliding-{i:06d}"
        if (first := seen.setdefault(name_of(secret), secret)) != secret:
            break
    assert name_of(first) == name_of(secret)
    with TestClient(keyed_app(tmp_path, api_keys=f"{first}:predict,{secret}:predict", rate_limit="2/hour")) as c:
        statuses = [c.post("/predict", json=EXAMPLE, headers=bearer(s)).status_code for s in (first, first, secret)]
    assert statuses == [200, 200, 200]


def test_refusals_do_not_count_against_a_key(tmp_path: Path) -> None:
    with TestClient(keyed_app(tmp_path, rate_limit="2/hour")) as c:
        assert c.post("/feedback", json=RATING, headers=bearer(PREDICT)).status_code == 403
        assert c.post("/predict", json=EXAMPLE, headers=bearer("s3cr3t-not-a-key-000000001")).status_code == 401
        statuses = [c.post("/predict", json=EXAMPLE, headers=bearer(PREDICT)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


@pytest.mark.redis
def test_the_rate_limit_is_shared_by_replicas_through_redis(tmp_path: Path) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    settings = {"api_keys": f"{secret}:predict", "rate_limit": "3/hour", "redis_url": "redis://127.0.0.1:6379/0"}
    try:
        with (
            TestClient(keyed_app(tmp_path, **settings)) as one,
            TestClient(keyed_app(tmp_path, **settings, database_url=f"sqlite:///{tmp_path / 'two.sqlite3'}")) as two,
        ):
            statuses = [
                c.post("/predict", json=EXAMPLE, headers=bearer(secret)).status_code for c in (one, two, one, two)
            ]
        assert statuses == [200, 200, 200, 429]
    finally:
        client = redis.Redis(host="127.0.0.1", port=6379)
        keys = list(client.scan_iter(f"mm:rate:{hashlib.sha256(secret.encode()).hexdigest()[:32]}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.mark.redis
def test_with_redis_down_the_rate_limit_lets_requests_through(tmp_path: Path, logs: Any) -> None:
    """REDIS_URL names a port where nothing listens: requests are answered (the limit falls back to the worker's own
    count), and the outage is logged as a warning."""
    settings = {"rate_limit": "3/hour", "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    with TestClient(keyed_app(tmp_path, **settings)) as c:
        statuses = [c.post("/predict", json=EXAMPLE, headers=bearer(PREDICT)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    warnings = [r for r in logs.records() if r["message"] == "rate limiter unavailable, letting requests through"]
    assert [w["level"] for w in warnings] == ["warning"]  # then the breaker spares Redis for 5 s


# --- what the logs and GET / say --------------------------------------------------------------------------------------


def test_the_access_log_names_the_key_by_its_short_hash_never_the_secret(tmp_path: Path, logs: Any) -> None:
    with TestClient(keyed_app(tmp_path)) as c:
        c.post("/predict", json=EXAMPLE, headers={**bearer(PREDICT), "x-request-id": "k-1"})
        c.post("/feedback", json=RATING, headers={**bearer(PREDICT), "x-request-id": "k-2"})
        c.get("/metrics", headers={**bearer(METRICS), "x-request-id": "k-3"})
        c.post("/predict", json=EXAMPLE, headers={**bearer("s3cr3t-not-a-key-000000001"), "x-request-id": "k-4"})
        c.get("/health", headers={"x-request-id": "k-5"})
    lines = {line["request_id"]: line for line in logs.access()}
    assert [(lines[r]["status"], lines[r].get("key")) for r in ("k-1", "k-2", "k-3", "k-4", "k-5")] == [
        (200, name_of(PREDICT)),
        (403, None),  # refused before the key was accepted for the route
        (200, name_of(METRICS)),
        (401, None),
        (200, None),
    ]
    everything = "\n".join(str(r) for r in logs.records())
    for secret in (*SECRETS, "s3cr3t-not-a-key-000000001"):
        assert secret not in everything


def test_without_keys_a_warning_at_start_up_and_auth_off(tmp_path: Path, logs: Any) -> None:
    with TestClient(create_app(Settings(model_path=tmp_path / "no-model"))) as c:
        root = c.get("/").json()
        spec = c.get("/openapi.json").json()
        assert c.post("/predict", json=EXAMPLE).status_code == 200
    assert root["auth"] == "off"
    [started] = [r for r in logs.records() if r["message"] == "service started"]
    assert started["auth"] == "off"
    warnings = [r for r in logs.records() if r["message"].startswith("no API_KEYS")]
    assert [(w["level"], w["message"]) for w in warnings] == [
        ("warning", "no API_KEYS: every endpoint but /admin is open to anyone who can reach the service")
    ]
    assert "securitySchemes" not in spec["components"]
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())


def test_with_keys_no_warning_and_auth_on(tmp_path: Path, logs: Any) -> None:
    with TestClient(keyed_app(tmp_path)) as c:
        root = c.get("/", headers=bearer(PREDICT)).json()
    assert root["auth"] == "on"
    [started] = [r for r in logs.records() if r["message"] == "service started"]
    assert started["auth"] == "on"
    assert not [r for r in logs.records() if r["message"].startswith("no API_KEYS")]
    assert not [r for r in logs.records() if any(s in str(r) for s in SECRETS)]


def test_openapi_declares_the_bearer_scheme_on_every_route_but_the_probes(tmp_path: Path) -> None:
    with TestClient(keyed_app(tmp_path)) as c:
        spec = c.get("/openapi.json", headers=bearer(PREDICT)).json()
    assert spec["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "An access key of API_KEYS."}
    }
    secured = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if op.get("security") == [{"bearer": []}]
    }
    open_ = {(method.upper(), path) for path, ops in spec["paths"].items() for method, op in ops.items()} - secured
    assert open_ == {("GET", p) for p in PROBES}
    assert {("POST", "/predict"), ("POST", "/predict-batch"), ("POST", "/feedback"), ("GET", "/metrics")} <= secured
    assert {("GET", "/"), ("GET", "/models")} <= secured


# --- CORS -------------------------------------------------------------------------------------------------------------


def test_a_cors_preflight_needs_no_key_and_a_refusal_is_readable_by_the_page(tmp_path: Path) -> None:
    """Browsers send no Authorization header on a preflight: it is answered before the guard. The 401 of the real
    request still carries the CORS headers, so the page's script can read why it was refused."""
    origin = "https://app.example"
    with TestClient(keyed_app(tmp_path, cors_origins=[origin])) as c:
        preflight = c.options(
            "/predict",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        refused = c.post("/predict", json=EXAMPLE, headers={"Origin": origin})
        allowed = c.post("/predict", json=EXAMPLE, headers={"Origin": origin, **bearer(PREDICT)})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert (refused.status_code, refused.headers["access-control-allow-origin"]) == (401, origin)
    assert (allowed.status_code, allowed.headers["access-control-allow-origin"]) == (200, origin)
