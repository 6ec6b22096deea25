"""POST /predict-batch: order, ranking, top_k, sizes, per-movie ids and the validation of the envelope."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import TinyVersions
from moviematch_ml.api.app import create_app
from moviematch_ml.errors import MISSING
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES, ID_RULE
from moviematch_ml.runtime.fallback import fallback_rating
from moviematch_ml.settings import Settings


def movie(movie_id: Any, **overrides: Any) -> dict[str, Any]:
    return {"movie_id": movie_id, **EXAMPLE, **overrides}


# Fallback ratings by hand (vote_count 0 makes base the prior 6.5; see runtime/fallback.py):
#   a: 6.5 + 0.3 * 0 + 0.1 * 0 = 6.5    b: 6.5 + 0.3 + 0.1 * 3 = 7.1    c: 6.5 + 0.1 * 1 = 6.6    d: same as c
MOVIES = [
    movie("a", vote_count=0, is_favorite_genre=0, n_shared_genres=0),
    movie(2, vote_count=0, is_favorite_genre=1, n_shared_genres=3),
    movie("c", vote_count=0, is_favorite_genre=0, n_shared_genres=1),
    movie(4, vote_count=0, is_favorite_genre=0, n_shared_genres=1),
]


def assert_field_error(r: Any, field: str, rule: str, value: Any = MISSING) -> None:
    """A 422 naming the field and the rule; a missing field has no value, in ``detail`` or in the message."""
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "validation_error"
    expected = {"field": field, "rule": rule} if value is MISSING else {"field": field, "rule": rule, "value": value}
    assert r.json()["detail"] == [expected]
    if value is MISSING:
        assert r.json()["message"] == f"{field}: {rule}"


def test_request_order_is_kept(client: TestClient) -> None:
    r = client.post("/predict-batch", json={"movies": MOVIES})
    assert r.status_code == 200
    body = r.json()
    assert body["ranked"] is False
    assert body["count"] == 4
    assert body["model_version"] == "fallback-1"
    preds = body["predictions"]
    assert [p["movie_id"] for p in preds] == ["a", 2, "c", 4]  # ids echoed with their JSON type
    assert [p["predicted_rating"] for p in preds] == [6.5, 7.1, 6.6, 6.6]
    assert {p["source"] for p in preds} == {"fallback"}
    batch_ids = {p["prediction_id"].rsplit("-", 1)[0] for p in preds}
    assert len(batch_ids) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", batch_ids.pop())
    assert [p["prediction_id"].rsplit("-", 1)[1] for p in preds] == ["0", "1", "2", "3"]


def test_the_example_request_in_a_batch(client: TestClient) -> None:
    body = client.post("/predict-batch", json={"movies": [movie(1)]}).json()
    assert body["predictions"][0]["movie_id"] == 1
    assert body["predictions"][0]["predicted_rating"] == 7.909  # same as the /predict example


def test_rank_sorts_best_first_and_ties_keep_request_order(client: TestClient) -> None:
    body = client.post("/predict-batch", json={"movies": MOVIES, "rank": True}).json()
    assert body["ranked"] is True
    assert [p["movie_id"] for p in body["predictions"]] == [2, "c", 4, "a"]
    # The prediction id still names the movie's index in the request.
    assert [p["prediction_id"].rsplit("-", 1)[1] for p in body["predictions"]] == ["1", "2", "3", "0"]


def test_top_k_implies_rank_and_keeps_the_best(client: TestClient) -> None:
    body = client.post("/predict-batch", json={"movies": MOVIES, "top_k": 2}).json()
    assert body["ranked"] is True
    assert body["count"] == 2
    assert [(p["movie_id"], p["predicted_rating"]) for p in body["predictions"]] == [(2, 7.1), ("c", 6.6)]


def test_top_k_larger_than_the_batch_returns_all(client: TestClient) -> None:
    body = client.post("/predict-batch", json={"movies": MOVIES, "top_k": 10, "rank": False}).json()
    assert body["count"] == 4
    assert body["ranked"] is True


def test_user_id_is_accepted(client: TestClient) -> None:
    for uid in (7, "user-7"):
        assert client.post("/predict-batch", json={"movies": MOVIES, "user_id": uid}).status_code == 200


def test_large_batch_matches_the_rule_row_by_row(client: TestClient) -> None:
    # Over 64 KiB of body: this also exercises the worker-thread path.
    rng = np.random.default_rng(1)
    n = 600
    movies = [
        movie(i, vote_average=round(float(rng.uniform(0, 10)), 2), vote_count=int(rng.integers(0, 3000)),
              n_shared_genres=int(rng.integers(0, 6)), is_favorite_genre=int(rng.integers(0, 2)))
        for i in range(n)
    ]  # fmt: skip
    r = client.post("/predict-batch", json={"movies": movies})
    assert r.status_code == 200
    assert int(r.request.headers["content-length"]) > 64 * 1024
    x = np.array([[float(m[name]) for name in FEATURE_NAMES] for m in movies])
    expected = np.round(fallback_rating(x), 3).tolist()
    preds = r.json()["predictions"]
    assert [p["movie_id"] for p in preds] == list(range(n))
    assert [p["predicted_rating"] for p in preds] == expected


def test_the_model_answers_batches_like_single_predictions(model_client: TestClient, tiny: TinyVersions) -> None:
    movies = [movie(1), movie(2, vote_average=3.0), movie(3, vote_average=9.0, n_shared_genres=4)]
    batch = model_client.post("/predict-batch", json={"movies": movies}).json()
    assert (batch["model_version"], batch["variant"]) == (tiny.model, "champion")
    for m, p in zip(movies, batch["predictions"], strict=True):
        single = model_client.post("/predict", json={k: v for k, v in m.items() if k != "movie_id"}).json()
        assert p["source"] == "model"
        assert p["predicted_rating"] == single["predicted_rating"]


def test_empty_batch(client: TestClient) -> None:
    assert_field_error(client.post("/predict-batch", json={"movies": []}), "movies",
                       "must be a list of 1 to 10000 movies", 0)  # fmt: skip


def test_too_many_movies(tmp_path: Path) -> None:
    settings = Settings(model_path=tmp_path / "none", max_batch_size=3)
    with TestClient(create_app(settings)) as c:
        assert c.post("/predict-batch", json={"movies": MOVIES[:3]}).status_code == 200
        r = c.post("/predict-batch", json={"movies": MOVIES})
        assert_field_error(r, "movies", "must be a list of 1 to 3 movies", 4)
        assert r.json()["message"] == "movies: must be a list of 1 to 3 movies (got 4)"


@pytest.mark.parametrize("bad", [None, "x", {"movie_id": 1}, 3])
def test_movies_must_be_a_list(client: TestClient, bad: Any) -> None:
    assert_field_error(client.post("/predict-batch", json={"movies": bad}), "movies",
                       "must be a list of 1 to 10000 movies", bad)  # fmt: skip


def test_movies_are_required(client: TestClient) -> None:
    assert_field_error(client.post("/predict-batch", json={"user_id": 1}), "movies", "is required")


def test_missing_movie_id(client: TestClient) -> None:
    movies = [movie(1), {**EXAMPLE}]
    assert_field_error(client.post("/predict-batch", json={"movies": movies}), "movies[1].movie_id", "is required")


@pytest.mark.parametrize("bad", [-5, "", 1.5, None, True])
def test_bad_movie_id(client: TestClient, bad: Any) -> None:
    movies = [movie(1), movie(2), movie(bad)]
    assert_field_error(client.post("/predict-batch", json={"movies": movies}), "movies[2].movie_id", ID_RULE, bad)


def test_contract_example_of_a_nested_error(client: TestClient) -> None:
    movies = [movie(i) for i in range(3)] + [movie(3, vote_average=11)]
    r = client.post("/predict-batch", json={"movies": movies})
    assert r.status_code == 422
    assert r.json() == {
        "error": "validation_error",
        "message": "movies[3].vote_average: must be a finite number between 0 and 10 (got 11)",
        "detail": [
            {"field": "movies[3].vote_average", "rule": "must be a finite number between 0 and 10", "value": 11}
        ],
    }


def test_nested_missing_and_unknown_fields(client: TestClient) -> None:
    no_pop = {k: v for k, v in movie(1).items() if k != "popularity"}
    r = client.post("/predict-batch", json={"movies": [movie(0), no_pop]})
    assert_field_error(r, "movies[1].popularity", "is required")
    r = client.post("/predict-batch", json={"movies": [movie(0, title="Heat")]})
    assert_field_error(r, "movies[0].title", "unknown field", "Heat")
    r = client.post("/predict-batch", json={"movies": [movie(0), 5]})
    assert_field_error(r, "movies[1]", "must be a JSON object", 5)


def test_user_id_inside_a_movie_is_unknown(client: TestClient) -> None:
    r = client.post("/predict-batch", json={"movies": [movie(0, user_id=1)]})
    assert_field_error(r, "movies[0].user_id", "unknown field", 1)


def test_unknown_top_level_field(client: TestClient) -> None:
    assert_field_error(client.post("/predict-batch", json={"movies": MOVIES, "topk": 2}), "topk", "unknown field", 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, 2.0])
def test_bad_top_k(client: TestClient, bad: Any) -> None:
    r = client.post("/predict-batch", json={"movies": MOVIES, "top_k": bad})
    assert_field_error(r, "top_k", "must be an integer >= 1", bad)


@pytest.mark.parametrize("bad", [1, 0, "true", None])
def test_bad_rank(client: TestClient, bad: Any) -> None:
    assert_field_error(client.post("/predict-batch", json={"movies": MOVIES, "rank": bad}), "rank",
                       "must be true or false", bad)  # fmt: skip


@pytest.mark.parametrize("bad", [-1, "", 2.5])
def test_bad_batch_user_id(client: TestClient, bad: Any) -> None:
    assert_field_error(client.post("/predict-batch", json={"movies": MOVIES, "user_id": bad}), "user_id", ID_RULE, bad)


def test_batch_body_must_be_an_object(client: TestClient) -> None:
    assert_field_error(client.post("/predict-batch", json=MOVIES[:1]), "body", "must be a JSON object", MOVIES[:1])


def test_batch_invalid_json(client: TestClient) -> None:
    r = client.post("/predict-batch", content=b'{"movies": [NaN]}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_json"
