"""POST /predict: answers from the fallback rule and from a real model, ids, and the response shape."""

from __future__ import annotations

import re
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from fastapi.testclient import TestClient

from moviematch_ml.fallback import fallback_rating
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from moviematch_ml.model import read_card


def test_example_from_the_design_document_uses_the_fallback_rule(client: TestClient) -> None:
    r = client.post("/predict", json=EXAMPLE)
    assert r.status_code == 200
    body = r.json()
    # base = (1000 * 7.5 + 100 * 6.5) / (1000 + 100) = 7.40909..., taste = 0.3 * 1 + 0.1 * 2 = 0.5
    assert body["predicted_rating"] == 7.909
    assert body["source"] == "fallback"
    assert body["model_version"] == "fallback-1"
    assert re.fullmatch(r"[0-9a-f]{32}", body["prediction_id"])
    assert set(body) == {"predicted_rating", "model_version", "source", "prediction_id"}
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        # base = (100 * 9 + 100 * 6.5) / 200 = 7.75; taste = 0.1 * min(5, 3) = 0.3
        ({"n_shared_genres": 5, "vote_average": 9, "vote_count": 100, "is_favorite_genre": 0}, 8.05),
        # no votes: base is the prior 6.5; favourite genre adds 0.3
        ({"n_shared_genres": 0, "vote_average": 10, "vote_count": 0, "is_favorite_genre": True}, 6.8),
        # 10 + 0.3 + 0.3 is clipped to the top of the scale
        ({"n_shared_genres": 3, "vote_average": 10.0, "vote_count": 1_000_000_000, "is_favorite_genre": 1}, 10.0),
        # base = (1 * 0 + 650) / 101 = 6.43564...
        ({"n_shared_genres": 0, "vote_average": 0, "vote_count": 1, "is_favorite_genre": False}, 6.436),
    ],
)
def test_fallback_ratings_computed_by_hand(client: TestClient, features: dict[str, object], expected: float) -> None:
    body = client.post("/predict", json={**EXAMPLE, **features}).json()
    assert body["predicted_rating"] == expected
    assert body["source"] == "fallback"


def test_fallback_answer_equals_the_library_rule(client: TestClient) -> None:
    row = {"n_shared_genres": 1, "vote_average": 6.3, "vote_count": 37, "is_favorite_genre": 1,
           "years_since_release": 12.5, "popularity": 3.25}  # fmt: skip
    x = np.array([[float(row[n]) for n in FEATURE_NAMES]])
    assert client.post("/predict", json=row).json()["predicted_rating"] == round(float(fallback_rating(x)[0]), 3)


def test_model_answers_on_the_0_to_10_scale(model_client: TestClient, tiny_model_dir: Path) -> None:
    booster = lgb.Booster(model_file=str(tiny_model_dir / "model.txt"))
    rows = [EXAMPLE, {**EXAMPLE, "vote_average": 2.0, "n_shared_genres": 0, "is_favorite_genre": 0}]
    for row in rows:
        body = model_client.post("/predict", json=row).json()
        assert body["source"] == "model"
        assert body["model_version"] == read_card(tiny_model_dir).version == "tiny-1"
        # The tiny model predicts stars (max 5): the API doubles them onto 0-10.
        stars = float(booster.predict(np.array([[float(row[n]) for n in FEATURE_NAMES]]))[0])
        assert body["predicted_rating"] == pytest.approx(round(stars * 2.0, 3), abs=1e-9)
    high, low = (model_client.post("/predict", json=row).json()["predicted_rating"] for row in rows)
    assert high > low  # the synthetic ratings rise with vote_average: the model learnt that


@pytest.mark.parametrize("user_id", [0, 42, "u-42", "a" * 128, "usér ünïcode"])
def test_valid_user_and_movie_ids_are_accepted(client: TestClient, user_id: object) -> None:
    r = client.post("/predict", json={**EXAMPLE, "user_id": user_id, "movie_id": user_id})
    assert r.status_code == 200, r.text


def test_prediction_ids_are_unique(client: TestClient) -> None:
    ids = {client.post("/predict", json=EXAMPLE).json()["prediction_id"] for _ in range(20)}
    assert len(ids) == 20
