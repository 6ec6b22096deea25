"""The shared answer cache in Redis, through the app: same answers, fresh ids, shared by two app instances."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.caches import RedisCache
from moviematch_ml.settings import Settings

pytestmark = pytest.mark.redis


def test_redis_backend_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="REDIS_URL"):
        Settings(prediction_cache_backend="redis")


def test_two_apps_share_answers_through_redis(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        model_path=tiny_model_dir,
        database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}",
        prediction_cache_backend="redis",
        redis_url="redis://127.0.0.1:6379/0",
    )
    # A body no earlier run has sent, so the first answer is a miss on any Redis.
    body = {**EXAMPLE, "popularity": 1.0 + uuid.uuid4().int % 10_000 / 100}
    batch = {"movies": [{"movie_id": 1, **body}, {"movie_id": 2, **EXAMPLE}], "rank": True}
    app_a, app_b = create_app(settings), create_app(settings)
    with TestClient(app_a) as a, TestClient(app_b) as b:
        cache_a, cache_b = app_a.state.service.cache, app_b.state.service.cache
        assert isinstance(cache_a, RedisCache)
        assert isinstance(cache_b, RedisCache)
        first = a.post("/predict", json=body).json()
        second = b.post("/predict", json=body).json()
        assert (cache_a.misses, cache_b.hits) == (1, 1)
        assert {k: v for k, v in first.items() if k != "prediction_id"} == {
            k: v for k, v in second.items() if k != "prediction_id"
        }
        assert first["prediction_id"] != second["prediction_id"]
        ranked = a.post("/predict-batch", json=batch).json()
        again = b.post("/predict-batch", json=batch).json()
        assert cache_b.hits == 2
        assert [p["movie_id"] for p in again["predictions"]] == [p["movie_id"] for p in ranked["predictions"]]
        assert [p["predicted_rating"] for p in again["predictions"]] == [
            p["predicted_rating"] for p in ranked["predictions"]
        ]


def test_two_different_models_never_share_an_entry(tiny_model_dir: Path, other_model_dir: Path, tmp_path: Path) -> None:
    # The cache is keyed on the model's version and the body: a model that differs in any file has another version,
    # so it never answers with another model's cached answer (the same body, sent to both through one Redis).
    def settings(model: Path) -> Settings:
        return Settings(
            model_path=model,
            database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}",
            prediction_cache_backend="redis",
            redis_url="redis://127.0.0.1:6379/0",
        )

    body = {**EXAMPLE, "popularity": 1.0 + uuid.uuid4().int % 10_000 / 100}
    app_a, app_b = create_app(settings(tiny_model_dir)), create_app(settings(other_model_dir))
    with TestClient(app_a) as a, TestClient(app_b) as b:
        first = a.post("/predict", json=body).json()
        assert a.post("/predict", json=body).json()["predicted_rating"] == first["predicted_rating"]  # a's own hit
        other = b.post("/predict", json=body).json()
        cache_b = app_b.state.service.cache
        assert isinstance(cache_b, RedisCache)
        assert (cache_b.hits, cache_b.misses) == (0, 1)
    assert first["model_version"] != other["model_version"]
    assert other["predicted_rating"] < first["predicted_rating"] - 1.0  # b's own answer: a star lower
