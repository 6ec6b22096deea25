"""GET /metrics and GET /models through the app: the text format, request labels, the setting that turns metrics
off, the cards without paths, and Redis calls that fail."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.runtime.cards import content_versioned, read_card, write_card
from moviematch_ml.settings import Settings
from realserver import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


@pytest.fixture(params=[True, False], ids=["fast path", "FastAPI routes"])
def bundled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'm.sqlite3'}", fast_path=request.param)
    with TestClient(create_app(settings)) as client:
        yield client


def test_requests_and_predictions_after_a_known_sequence(bundled: TestClient) -> None:
    for popularity in (1.0, 2.0, 3.0):
        assert bundled.post("/predict", json={**EXAMPLE, "popularity": popularity}).status_code == 200
    assert bundled.post("/predict", json={**EXAMPLE, "vote_average": 11}).status_code == 422
    assert bundled.post("/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert bundled.post("/predict-batch", json={"movies": [{"movie_id": 1, **EXAMPLE}] * 4}).status_code == 200
    assert bundled.get("/health").status_code == 200
    assert bundled.get("/nope").status_code == 404
    got = samples(bundled)
    requests = "moviematch_http_requests_total"
    assert got[(requests, labels(route="/predict", method="POST", status="2xx"))] == 3
    assert got[(requests, labels(route="/predict", method="POST", status="4xx"))] == 2
    assert got[(requests, labels(route="/predict-batch", method="POST", status="2xx"))] == 1
    assert got[(requests, labels(route="/health", method="GET", status="2xx"))] == 1
    assert got[(requests, labels(route="other", method="other", status="4xx"))] == 1
    version = bundled.get("/").json()["model"]["version"]
    predictions = "moviematch_predictions_total"
    assert got[(predictions, labels(endpoint="predict", variant="champion", version=version, source="model"))] == 3
    assert (
        got[(predictions, labels(endpoint="predict_batch", variant="champion", version=version, source="model"))] == 4
    )
    errors = "moviematch_prediction_errors_total"
    assert got[(errors, labels(endpoint="predict", reason="validation_error"))] == 1
    assert got[(errors, labels(endpoint="predict", reason="invalid_json"))] == 1
    six = bundled.get("/health").json()["models"]["six_features"]["version"]
    assert got[("moviematch_model_info", labels(model="six_features", version=six, status="ok"))] == 1
    assert got[("moviematch_model_ready", labels(model="personalized"))] == 1
    assert got[("moviematch_workers", ())] == 1
    assert got[("process_resident_memory_bytes", ())] > 10e6
    assert got[("process_cpu_seconds_total", ())] > 0
    # The scrape itself is a request of its own, counted once it is answered.
    assert (requests, labels(route="/metrics", method="GET", status="2xx")) not in got
    assert samples(bundled)[(requests, labels(route="/metrics", method="GET", status="2xx"))] == 1


def test_the_series_rates_are_taken_of_exist_before_their_first_event(client: TestClient) -> None:
    # rate() starts from a series' first sample: a series born with its first request would not count it.
    got = samples(client)
    for route in ("/predict", "/predict-batch", "/feedback"):
        for status in ("2xx", "4xx", "5xx"):
            assert got[("moviematch_http_requests_total", labels(route=route, method="POST", status=status))] == 0
    for endpoint in ("predict", "predict_batch"):
        answered = labels(endpoint=endpoint, variant="champion", version="fallback-1", source="fallback")
        assert got[("moviematch_predictions_total", answered)] == 0
        assert got[("moviematch_prediction_errors_total", labels(endpoint=endpoint, reason="validation_error"))] == 0
    assert got[("moviematch_feedback_rejected_total", labels(reason="store_unavailable"))] == 0


def test_metrics_off_means_no_route_and_nothing_counted(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'm.sqlite3'}", metrics_enabled=False)
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.post("/predict", json=EXAMPLE).status_code == 200
        response = client.get("/metrics")
        assert (response.status_code, response.json()["error"]) == (404, "not_found")
    assert app.state.telemetry is None


def test_models_lists_the_cards_and_drift_bins(bundled: TestClient) -> None:
    body = bundled.get("/models").json()
    six, personal = body["six_features"], body["personalized"]
    assert (six["status"], personal["status"]) == ("ok", "ok")
    assert six["card"]["version"] == six["version"]
    assert six["card"]["feature_stats"]["vote_average"]["quantiles"]["p50"] == 7.2
    assert six["drift_shares_exact"] is True
    flag = {b["bin"]: b["training_share"] for b in six["drift_bins"]["is_favorite_genre"]}
    assert flag == {"below": 0.0, "[0,1)": 0.899254, "[1,1]": 0.100746, "above": 0.0}
    assert personal["drift_bins"] is None  # its inputs' drift is the six-feature model's bins


def test_models_shows_file_names_not_paths(tmp_path: Path, tiny_model_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    card = read_card(model)
    data = {"dataset": "ratings", "metadata_join": {"source": "/home/someone/data/tmdb.csv", "note": "a / b"}}
    write_card(model, content_versioned(card.model_copy(update={"data": data})))
    with TestClient(create_app(Settings(model_path=model, database_url=f"sqlite:///{tmp_path / 'm.db'}"))) as client:
        body = client.get("/models").json()
    assert body["six_features"]["card"]["data"]["metadata_join"] == {"source": "tmdb.csv", "note": "a / b"}
    assert body["six_features"]["drift_bins"] is None  # the tiny card has no feature statistics
    assert body["personalized"] == {
        "status": "absent",
        "version": None,
        "card": None,
        "drift_bins": None,
        "drift_shares_exact": None,
    }


def test_a_fallback_service_lists_no_card(client: TestClient) -> None:
    six = client.get("/models").json()["six_features"]
    assert (six["status"], six["version"], six["card"], six["drift_bins"]) == ("fallback", "fallback-1", None, None)
    got = samples(client)
    assert got[("moviematch_model_info", labels(model="six_features", version="fallback-1", status="fallback"))] == 1
    assert got[("moviematch_model_ready", labels(model="six_features"))] == 0


def test_redis_that_does_not_answer_is_counted_as_failed_calls(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'm.sqlite3'}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        prediction_cache_backend="redis",
    )
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            assert client.post("/predict", json=EXAMPLE).json()["source"] == "model"
        got = samples(client)
    # The first get fails and opens the circuit breaker: the put and the second request do not ask Redis at all.
    assert got[("moviematch_redis_failures_total", labels(operation="get"))] == 1
    assert got[("moviematch_redis_failures_total", labels(operation="put"))] == 0
    assert got[("moviematch_redis_call_duration_seconds_count", labels(operation="get"))] == 1
    assert got[("moviematch_answer_cache_lookups_total", labels(backend="redis", result="miss"))] == 2


@pytest.mark.redis
def test_redis_calls_are_timed(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'm.sqlite3'}",
        redis_url="redis://127.0.0.1:6379/0",
        prediction_cache_backend="redis",
    )
    body = {**EXAMPLE, "popularity": 12.345678}  # a body of this test's own
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            client.post("/predict", json=body)
        got = samples(client)
    assert got[("moviematch_redis_failures_total", labels(operation="get"))] == 0
    assert got[("moviematch_redis_call_duration_seconds_count", labels(operation="get"))] == 2
    assert got[("moviematch_answer_cache_lookups_total", labels(backend="redis", result="hit"))] >= 1
