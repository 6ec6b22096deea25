"""Personalised answers through the HTTP API: known users get the personalised model, others the six features."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.settings import Settings


@pytest.fixture
def pclient(tiny_personalized_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_path=tiny_personalized_dir,
        database_url=f"sqlite:///{tmp_path / 'p.sqlite3'}",
        state_ttl_seconds=60,  # long on purpose: this replica must forget a user it just stored ratings for
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_third_prediction_reflects_the_first_two_ratings(pclient: TestClient) -> None:
    body = {**EXAMPLE, "user_id": 77, "movie_id": 5}
    first = pclient.post("/predict", json=body).json()
    assert first["source"] == "model"
    pclient.post("/feedback", json={"user_id": 77, "movie_id": 1, "rating": 10})
    second = pclient.post("/predict", json=body).json()
    pclient.post("/feedback", json={"user_id": 77, "movie_id": 2, "rating": 10})
    third = pclient.post("/predict", json=body).json()
    assert second["source"] == third["source"] == "personalized"
    assert first["model_version"] == "tiny-1"
    assert third["model_version"] == "tiny-personalized-1"
    # Two ratings of 10 pull the prediction up further than one.
    assert third["predicted_rating"] > second["predicted_rating"]


def test_batch_mixes_sources_and_keeps_order(pclient: TestClient) -> None:
    pclient.post("/feedback", json={"ratings": [{"user_id": "u1", "movie_id": m, "rating": 2} for m in range(5)]})
    movies = [{"movie_id": m, **EXAMPLE} for m in (3, 4, 5)]
    known = pclient.post("/predict-batch", json={"user_id": "u1", "movies": movies}).json()
    assert [p["movie_id"] for p in known["predictions"]] == [3, 4, 5]
    assert {p["source"] for p in known["predictions"]} == {"personalized"}
    assert (known["model_version"], known["personalized_model_version"]) == ("tiny-1", "tiny-personalized-1")
    anonymous = pclient.post("/predict-batch", json={"movies": movies}).json()
    assert {p["source"] for p in anonymous["predictions"]} == {"model"}
    assert "personalized_model_version" not in anonymous
    # A harsh user is predicted below what the six features alone say.
    for k, a in zip(known["predictions"], anonymous["predictions"], strict=True):
        assert k["predicted_rating"] < a["predicted_rating"]


def test_root_reports_the_personalised_model(pclient: TestClient) -> None:
    assert pclient.app.state.personalizer.version == "tiny-personalized-1"  # type: ignore[attr-defined]
