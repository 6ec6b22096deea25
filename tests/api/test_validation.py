"""Every validation rule of every feature and identifier, through POST /predict: 422 names the field and rule."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from moviematch_ml.features import EXAMPLE, FEATURES, ID_RULE, Feature

COUNTS = [f for f in FEATURES if f.kind == "count"]
NUMBERS = [f for f in FEATURES if f.kind == "number"]
FLAGS = [f for f in FEATURES if f.kind == "flag"]
NOT_FLAGS = COUNTS + NUMBERS


def _names(features: list[Feature]) -> list[str]:
    return [f.name for f in features]


def assert_field_error(r: Any, field: str, rule: str, value: Any) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "validation_error"
    assert body["detail"] == [{"field": field, "rule": rule, "value": value}]
    assert body["message"].startswith(f"{field}: {rule} (got ")


def test_the_rules_in_words() -> None:
    # Written out by hand: these strings are part of the contract the clients see.
    rules = {f.name: f.rule for f in FEATURES}
    assert rules == {
        "n_shared_genres": "must be an integer between 0 and 30",
        "vote_average": "must be a finite number between 0 and 10",
        "vote_count": "must be an integer between 0 and 1000000000",
        "is_favorite_genre": "must be 0, 1, true or false",
        "years_since_release": "must be a finite number between 0 and 150",
        "popularity": "must be a finite number between 0 and 1000000",
    }


@pytest.mark.parametrize("name", _names(list(FEATURES)))
def test_missing_feature(client: TestClient, name: str) -> None:
    body = {k: v for k, v in EXAMPLE.items() if k != name}
    assert_field_error(client.post("/predict", json=body), name, "is required", None)


@pytest.mark.parametrize("feature", FEATURES, ids=_names(list(FEATURES)))
@pytest.mark.parametrize("bad", ["7", None, [1], {"v": 1}, ""])
def test_wrong_type(client: TestClient, feature: Feature, bad: Any) -> None:
    assert_field_error(client.post("/predict", json={**EXAMPLE, feature.name: bad}), feature.name, feature.rule, bad)


@pytest.mark.parametrize("feature", NOT_FLAGS, ids=_names(NOT_FLAGS))
@pytest.mark.parametrize("bad", [True, False])
def test_bool_only_for_the_flag(client: TestClient, feature: Feature, bad: bool) -> None:
    assert_field_error(client.post("/predict", json={**EXAMPLE, feature.name: bad}), feature.name, feature.rule, bad)


@pytest.mark.parametrize("feature", NOT_FLAGS, ids=_names(NOT_FLAGS))
def test_out_of_range(client: TestClient, feature: Feature) -> None:
    step = 1 if feature.kind == "count" else 0.5
    for bad in (feature.minimum - step, feature.maximum + step):
        value = int(bad) if feature.kind == "count" else bad
        r = client.post("/predict", json={**EXAMPLE, feature.name: value})
        assert_field_error(r, feature.name, feature.rule, value)


@pytest.mark.parametrize("feature", NOT_FLAGS, ids=_names(NOT_FLAGS))
def test_range_bounds_are_inclusive(client: TestClient, feature: Feature) -> None:
    for ok in (feature.minimum, feature.maximum):
        value = int(ok) if feature.kind == "count" else float(ok)
        assert client.post("/predict", json={**EXAMPLE, feature.name: value}).status_code == 200


@pytest.mark.parametrize("feature", COUNTS, ids=_names(COUNTS))
def test_counts_must_be_integers(client: TestClient, feature: Feature) -> None:
    assert_field_error(client.post("/predict", json={**EXAMPLE, feature.name: 2.5}), feature.name, feature.rule, 2.5)
    # An integral float is the same count (JavaScript has no separate integer type).
    assert client.post("/predict", json={**EXAMPLE, feature.name: 2.0}).status_code == 200


def test_vote_count_contract_example(client: TestClient) -> None:
    assert_field_error(client.post("/predict", json={**EXAMPLE, "vote_count": -1}), "vote_count",
                       "must be an integer between 0 and 1000000000", -1)  # fmt: skip


@pytest.mark.parametrize("ok", [0, 1, True, False, 0.0, 1.0])
def test_flag_accepts_0_1_true_false(client: TestClient, ok: Any) -> None:
    assert client.post("/predict", json={**EXAMPLE, "is_favorite_genre": ok}).status_code == 200


@pytest.mark.parametrize("bad", [2, -1, 0.5, "true", "1"])
def test_flag_refuses_anything_else(client: TestClient, bad: Any) -> None:
    r = client.post("/predict", json={**EXAMPLE, "is_favorite_genre": bad})
    assert_field_error(r, "is_favorite_genre", "must be 0, 1, true or false", bad)


def test_flag_value_changes_the_answer(client: TestClient) -> None:
    yes = client.post("/predict", json={**EXAMPLE, "is_favorite_genre": True}).json()["predicted_rating"]
    no = client.post("/predict", json={**EXAMPLE, "is_favorite_genre": False}).json()["predicted_rating"]
    assert round(yes - no, 3) == 0.3  # FAVOURITE_BONUS


@pytest.mark.parametrize("name", _names(list(FEATURES)))
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


@pytest.mark.parametrize("field", ["user_id", "movie_id"])
@pytest.mark.parametrize("bad", [-1, 2**63, "", "a" * 129, "tab\there", "nul\x00", 1.5, 3.0, True, None, [1], {}])
def test_identifier_rules(client: TestClient, field: str, bad: Any) -> None:
    assert ID_RULE == "must be a non-negative integer or a string of 1-128 printable characters"
    assert_field_error(client.post("/predict", json={**EXAMPLE, field: bad}), field, ID_RULE, bad)
