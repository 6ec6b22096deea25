"""POST /predict: answers from the fallback rule and from a real model, ids, the response shape, and how the body's
validation reaches the client (the rules themselves: tests/test_features.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from moviematch_ml.errors import MISSING
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES, FEATURES, ID_RULE, Feature
from moviematch_ml.runtime.cards import model_version, read_card
from moviematch_ml.runtime.fallback import fallback_rating


def test_the_example_request_uses_the_fallback_rule(client: TestClient) -> None:
    r = client.post("/predict", json=EXAMPLE)
    assert r.status_code == 200
    body = r.json()
    # base = (1000 * 7.5 + 100 * 6.5) / (1000 + 100) = 7.40909..., taste = 0.3 * 1 + 0.1 * 2 = 0.5
    assert body["predicted_rating"] == 7.909
    assert body["source"] == "fallback"
    assert body["model_version"] == "fallback-1"
    assert re.fullmatch(r"[0-9a-f]{32}", body["prediction_id"])
    assert body["variant"] == "champion"
    assert set(body) == {"predicted_rating", "model_version", "variant", "source", "prediction_id"}
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
        assert body["model_version"] == model_version(read_card(tiny_model_dir).version, None)
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


# --- validation over HTTP: 422 names the field, the rule and the value --------------------------------------------


def assert_field_error(r: Any, field: str, rule: str, value: Any = MISSING) -> None:
    """A 422 naming the field and the rule, with the value sent; a missing field has none (no "(got None)")."""
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "validation_error"
    if value is MISSING:
        assert body["detail"] == [{"field": field, "rule": rule}]
        assert body["message"] == f"{field}: {rule}"
        return
    assert body["detail"] == [{"field": field, "rule": rule, "value": value}]
    assert body["message"].startswith(f"{field}: {rule} (got ")


BROKEN: dict[str, list[Any]] = {
    "n_shared_genres": [2.5, 31, True, "2"],
    "vote_average": [10.5, -0.5, True, None],
    "vote_count": [-1, 2.5, 1_000_000_001, [1]],
    "is_favorite_genre": [2, 0.5, "true", {"v": 1}],
    "years_since_release": [150.5, False, ""],
    "popularity": [-0.5, 1_000_000.5, "7"],
}


@pytest.mark.parametrize("feature", FEATURES, ids=[f.name for f in FEATURES])
def test_a_broken_rule_is_a_422_naming_it(client: TestClient, feature: Feature) -> None:
    for bad in BROKEN[feature.name]:
        r = client.post("/predict", json={**EXAMPLE, feature.name: bad})
        assert_field_error(r, feature.name, feature.rule, bad)


@pytest.mark.parametrize("field", ["user_id", "movie_id"])
@pytest.mark.parametrize("bad", [-1, 2**63, "", "a" * 129, "tab\there", "nul\x00", 1.5, 3.0, True, None, [1], {}])
def test_a_broken_identifier_is_a_422_naming_it(client: TestClient, field: str, bad: Any) -> None:
    assert_field_error(client.post("/predict", json={**EXAMPLE, field: bad}), field, ID_RULE, bad)


@pytest.mark.parametrize("feature", FEATURES, ids=[f.name for f in FEATURES])
def test_bounds_integral_floats_and_flag_booleans_are_answered(client: TestClient, feature: Feature) -> None:
    ok: list[Any] = [feature.minimum, float(feature.maximum)]
    if feature.kind == "flag":
        ok += [True, False]
    for value in ok:
        assert client.post("/predict", json={**EXAMPLE, feature.name: value}).status_code == 200, value


def test_vote_count_contract_example(client: TestClient) -> None:
    r = client.post("/predict", json={**EXAMPLE, "vote_count": -1})
    assert_field_error(r, "vote_count", "must be an integer between 0 and 1000000000", -1)
    assert r.json()["message"] == "vote_count: must be an integer between 0 and 1000000000 (got -1)"


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_missing_feature(client: TestClient, name: str) -> None:
    body = {k: v for k, v in EXAMPLE.items() if k != name}
    assert_field_error(client.post("/predict", json=body), name, "is required")


def test_flag_value_changes_the_answer(client: TestClient) -> None:
    yes = client.post("/predict", json={**EXAMPLE, "is_favorite_genre": True}).json()["predicted_rating"]
    no = client.post("/predict", json={**EXAMPLE, "is_favorite_genre": False}).json()["predicted_rating"]
    assert round(yes - no, 3) == 0.3  # FAVOURITE_BONUS


@pytest.mark.parametrize("name", FEATURE_NAMES)
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
def test_non_finite_numbers_are_not_json(client: TestClient, name: str, literal: bytes) -> None:
    # JSON has no NaN or infinity; orjson refuses the literals and numbers that overflow a double.
    body = orjson.dumps({**EXAMPLE, name: 0}).replace(f'"{name}":0'.encode(), f'"{name}":'.encode() + literal)
    assert literal in body
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_json"


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"a": 1,}', b"\xff\xfe"])
def test_invalid_json(client: TestClient, body: bytes) -> None:
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_json"
    assert r.json()["message"].startswith("request body is not valid JSON")


@pytest.mark.parametrize("bad", [[EXAMPLE], "text", 3, None])
def test_body_must_be_an_object(client: TestClient, bad: Any) -> None:
    r = client.post("/predict", content=orjson.dumps(bad), headers={"content-type": "application/json"})
    assert_field_error(r, "body", "must be a JSON object", bad)


@pytest.mark.parametrize("unknown", ["voteAverage", "rank", "n_shared_genre", "extra"])
def test_unknown_fields_are_refused(client: TestClient, unknown: str) -> None:
    assert_field_error(client.post("/predict", json={**EXAMPLE, unknown: 1}), unknown, "unknown field", 1)
