"""The /feedback contract (validation, the idempotency key each rating gets) and FeedbackService."""

from __future__ import annotations

import orjson
import pytest

from moviematch_ml.errors import FieldError, InputError, InvalidJSONError
from moviematch_ml.online.feedback import FeedbackService, parse_feedback
from moviematch_ml.online.store import FeedbackStore

NOW = 1_700_000_000.0


def test_single_rating_gets_server_time_and_a_content_key() -> None:
    [fb] = parse_feedback({"user_id": 7, "movie_id": "tt1", "rating": 8}, None, NOW)
    assert (fb.user_id, fb.movie_id, fb.rating, fb.rated_at, fb.prediction_id) == ("7", "tt1", 8.0, NOW, None)
    # The content key ignores the server clock, so the same body sent later is the same rating.
    [again] = parse_feedback({"user_id": 7, "movie_id": "tt1", "rating": 8}, None, NOW + 60)
    assert fb.feedback_id == again.feedback_id
    [other] = parse_feedback({"user_id": 7, "movie_id": "tt1", "rating": 9}, None, NOW)
    assert other.feedback_id != fb.feedback_id


def test_explicit_feedback_id_wins_over_the_header() -> None:
    [fb] = parse_feedback({"user_id": 1, "movie_id": 2, "rating": 5, "feedback_id": "abc"}, "key", NOW)
    assert fb.feedback_id == "abc"


def test_idempotency_key_and_index_make_the_key() -> None:
    body = {"ratings": [{"user_id": 1, "movie_id": 2, "rating": 5}, {"user_id": 1, "movie_id": 2, "rating": 5}]}
    a, b = parse_feedback(body, "req-1", NOW)
    # Two identical ratings in one keyed request are two ratings (index differs)...
    assert a.feedback_id != b.feedback_id
    # ...and the retried request maps to the same two keys; another request key does not.
    assert [f.feedback_id for f in parse_feedback(body, "req-1", NOW)] == [a.feedback_id, b.feedback_id]
    assert parse_feedback(body, "req-2", NOW)[0].feedback_id != a.feedback_id


def test_timestamps_unix_and_iso() -> None:
    [a] = parse_feedback({"user_id": 1, "movie_id": 2, "rating": 5, "timestamp": 86400}, None, NOW)
    [b] = parse_feedback(
        {"user_id": 1, "movie_id": 2, "rating": 5, "timestamp": "1970-01-02T00:00:00+00:00"}, None, NOW
    )
    assert a.rated_at == b.rated_at == 86400.0


@pytest.mark.parametrize(
    ("body", "field", "rule_part"),
    [
        ({"movie_id": 2, "rating": 5}, "user_id", "is required"),
        ({"user_id": 1, "rating": 5}, "movie_id", "is required"),
        ({"user_id": 1, "movie_id": 2}, "rating", "is required"),
        ({"user_id": 1, "movie_id": 2, "rating": 10.5}, "rating", "between 0 and 10"),
        ({"user_id": 1, "movie_id": 2, "rating": -1}, "rating", "between 0 and 10"),
        ({"user_id": 1, "movie_id": 2, "rating": True}, "rating", "between 0 and 10"),
        ({"user_id": 1, "movie_id": 2, "rating": "5"}, "rating", "between 0 and 10"),
        ({"user_id": -1, "movie_id": 2, "rating": 5}, "user_id", "non-negative integer"),
        ({"user_id": "", "movie_id": 2, "rating": 5}, "user_id", "non-negative integer"),
        ({"user_id": 1, "movie_id": 2.5, "rating": 5}, "movie_id", "non-negative integer"),
        ({"user_id": 1, "movie_id": 2, "rating": 5, "timestamp": "yesterday"}, "timestamp", "ISO-8601"),
        ({"user_id": 1, "movie_id": 2, "rating": 5, "timestamp": "2024-01-01T00:00:00"}, "timestamp", "time zone"),
        ({"user_id": 1, "movie_id": 2, "rating": 5, "timestamp": -5}, "timestamp", "unix seconds"),
        ({"user_id": 1, "movie_id": 2, "rating": 5, "prediction_id": 12}, "prediction_id", "string"),
        ({"user_id": 1, "movie_id": 2, "rating": 5, "stars": 3}, "stars", "unknown field"),
        ({"ratings": []}, "ratings", "1-1000"),
        ({"ratings": [{"user_id": 1, "movie_id": 2, "rating": 5}] * 1001}, "ratings", "1-1000"),
        ({"ratings": [{"user_id": 1, "movie_id": 2, "rating": 11}]}, "ratings[0].rating", "between 0 and 10"),
        ({"ratings": [5]}, "ratings[0]", "JSON object"),
        ({"ratings": [], "extra": 1}, "extra", "unknown field"),
    ],
)
def test_invalid_bodies_name_the_field_and_rule(body: object, field: str, rule_part: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_feedback(body, None, NOW)
    assert info.value.loc == field
    assert rule_part in info.value.rule


def test_body_must_be_an_object() -> None:
    with pytest.raises(InputError):
        parse_feedback([1, 2], None, NOW)


def test_bad_idempotency_key_is_refused() -> None:
    with pytest.raises(FieldError) as info:
        parse_feedback({"user_id": 1, "movie_id": 2, "rating": 5}, "x" * 200, NOW)
    assert info.value.loc == "Idempotency-Key"


# --- FeedbackService: the route without HTTP -----------------------------------------------------------------------


def test_record_stores_new_ratings_and_names_their_users(store: FeedbackStore) -> None:
    told: list[set[str]] = []
    service = FeedbackService(store, lambda users: told.append(set(users)))
    body = {"ratings": [{"user_id": 1, "movie_id": 2, "rating": 5}, {"user_id": "u", "movie_id": 3, "rating": 9.5}]}
    new, answer = service.record_now(orjson.dumps(body), "req-1")
    keys = [f.feedback_id for f in parse_feedback(body, "req-1", NOW)]
    assert new
    assert orjson.loads(answer) == {
        "accepted": 2,
        "duplicates": 0,
        "results": [{"feedback_id": k, "status": "stored"} for k in keys],
    }
    assert told == [{"1", "u"}]
    assert store.user_ratings("u")[0][:2] == ("3", 9.5)
    # The retry stores nothing, and tells nobody: no cached view is dropped for nothing.
    new, answer = service.record_now(orjson.dumps(body), "req-1")
    assert not new
    assert orjson.loads(answer)["results"] == [{"feedback_id": k, "status": "duplicate"} for k in keys]
    assert told == [{"1", "u"}]
    # Only the users of the new ratings are named.
    mixed = {"ratings": [*body["ratings"], {"user_id": 7, "movie_id": 2, "rating": 1}]}
    new, answer = service.record_now(orjson.dumps(mixed), "req-1")
    assert (new, orjson.loads(answer)["accepted"], orjson.loads(answer)["duplicates"]) == (True, 1, 2)
    assert told == [{"1", "u"}, {"7"}]


def test_record_refuses_a_bad_body_and_stores_nothing(store: FeedbackStore) -> None:
    service = FeedbackService(store)  # nobody to tell: fine
    with pytest.raises(InvalidJSONError):
        service.record_now(b"{", None)
    bad = orjson.dumps({"ratings": [{"user_id": 1, "movie_id": 2, "rating": 5}, {"user_id": 1}]})
    with pytest.raises(FieldError) as info:
        service.record_now(bad, None)
    assert info.value.loc == "ratings[1].movie_id"
    assert store.last_row_id() == 0  # the valid first rating was not stored either
    assert service.record_now(orjson.dumps({"user_id": 1, "movie_id": 2, "rating": 5}), None)[0]
