"""POST /feedback over HTTP: stored once, retries deduplicated, strict validation, failures never acknowledged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moviematch_ml.api.app import create_app
from moviematch_ml.online.store import FeedbackStore, make_engine
from moviematch_ml.settings import Settings


@pytest.fixture
def fb_store(db_url: str) -> FeedbackStore:
    """The app's store (migrated by its lifespan, closed at shutdown), for the tests to read what was written."""
    return FeedbackStore(make_engine(db_url))


@pytest.fixture
def fb_client(tmp_path: Path, db_url: str, fb_store: FeedbackStore) -> Iterator[TestClient]:
    settings = Settings(model_path=tmp_path / "none", database_url=db_url)
    with TestClient(create_app(settings, store=fb_store)) as c:
        yield c


def test_one_rating_is_stored_then_a_retry_is_a_duplicate(fb_client: TestClient, fb_store: FeedbackStore) -> None:
    body = {"user_id": 42, "movie_id": 7, "rating": 8, "timestamp": 1_700_000_000}
    first = fb_client.post("/feedback", json=body)
    assert first.status_code == 201
    answer = first.json()
    assert (answer["accepted"], answer["duplicates"]) == (1, 0)
    assert answer["results"][0]["status"] == "stored"
    retry = fb_client.post("/feedback", json=body)
    assert retry.status_code == 200
    assert retry.json()["results"] == [{"feedback_id": answer["results"][0]["feedback_id"], "status": "duplicate"}]
    assert fb_store.user_ratings("42") == [("7", 8.0, 1_700_000_000.0)]  # stored once, on the 0-10 scale


def test_batch_with_idempotency_key(fb_client: TestClient) -> None:
    body = {"ratings": [{"user_id": "u", "movie_id": m, "rating": 5} for m in range(3)]}
    headers = {"Idempotency-Key": "req-1"}
    assert fb_client.post("/feedback", json=body, headers=headers).json()["accepted"] == 3
    again = fb_client.post("/feedback", json=body, headers=headers)
    assert (again.status_code, again.json()["duplicates"]) == (200, 3)
    # The same ratings under another request key are new ratings (the user rated again).
    assert fb_client.post("/feedback", json=body, headers={"Idempotency-Key": "req-2"}).json()["accepted"] == 3


def test_validation_names_the_field(fb_client: TestClient) -> None:
    r = fb_client.post("/feedback", json={"ratings": [{"user_id": 1, "movie_id": 2, "rating": 12}]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "ratings[0].rating"
    assert r.json()["error"] == "validation_error"


def test_invalid_json_and_media_type(fb_client: TestClient) -> None:
    r = fb_client.post("/feedback", content=b"{nope", headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_json")
    r = fb_client.post("/feedback", content=b"user_id=1", headers={"Content-Type": "text/plain"})
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")


def test_unwritable_store_answers_503_and_predictions_still_work(tmp_path: Path) -> None:
    # A SQLite file inside a directory that does not exist: the engine is created, every write fails.
    settings = Settings(model_path=tmp_path / "none", database_url=f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with TestClient(create_app(settings)) as c:
        r = c.post("/feedback", json={"user_id": 1, "movie_id": 2, "rating": 5})
        assert (r.status_code, r.json()["error"]) == (503, "store_unavailable")
        assert c.post("/predict", json={**_FEATURES}).status_code == 200


_FEATURES = {
    "n_shared_genres": 2,
    "vote_average": 7.5,
    "vote_count": 1000,
    "is_favorite_genre": 1,
    "years_since_release": 3,
    "popularity": 50.0,
}


def test_openapi_documents_feedback(fb_client: TestClient) -> None:
    spec = fb_client.get("/openapi.json").json()
    op = spec["paths"]["/feedback"]["post"]
    refs = op["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {r["$ref"].rsplit("/", 1)[1] for r in refs} == {"FeedbackRating", "FeedbackBatch"}
    assert {"FeedbackRating", "FeedbackBatch"} <= set(spec["components"]["schemas"])
