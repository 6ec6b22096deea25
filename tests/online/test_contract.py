"""The request contract: the vectorised, msgspec and exact decoders accept and refuse the same bodies; answers to
bytes."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import orjson
import pytest

from moviematch_ml.errors import MISSING, FieldError, InputError, InvalidJSONError
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.contract import (
    BatchAnswer,
    BatchDecoder,
    BatchRequest,
    OneAnswer,
    decode_answer,
    decode_one,
    encode_answer,
    matrix_from_mappings,
    new_id,
    render_batch,
    render_one,
    rows_one_by_one,
)

HEX32 = re.compile(r"[0-9a-f]{32}")
MOVIE = {"movie_id": 1, **EXAMPLE}
EXAMPLE_ROW = [2.0, 7.5, 1000.0, 1.0, 3.0, 50.0]  # EXAMPLE in FEATURES order

# One movie of a batch changed in one way: valid, invalid, and valid in a spelling the fast decoders may not take.
VARIANTS: list[Any] = [
    {},  # unchanged: valid
    {"vote_average": 10},
    {"vote_average": 10.000001},
    {"vote_average": -0.0},
    {"vote_count": 1e9},
    {"vote_count": 1_000_000_001},
    {"vote_count": 2.0},
    {"vote_count": 2.5},
    {"vote_count": 10**30},
    {"n_shared_genres": True},
    {"is_favorite_genre": True},
    {"is_favorite_genre": 1.0},
    {"is_favorite_genre": 0.5},
    {"is_favorite_genre": 2},
    {"popularity": "5"},
    {"popularity": None},
    {"movie_id": "tt-1"},
    {"movie_id": ""},
    {"movie_id": -1},
    {"movie_id": 2**63},
    {"movie_id": 1.0},
    {"movie_id": "bad\n"},
    {"extra": 1},
]


# --- the vectorised batch validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_vectorised_validation_accepts_exactly_what_the_loop_accepts(variant: dict[str, Any]) -> None:
    movies: list[object] = [dict(MOVIE), {**MOVIE, **variant}, {**MOVIE, "movie_id": 3, "vote_average": 0}]
    fast = matrix_from_mappings(movies, "movie_id")
    try:
        x, ids = rows_one_by_one(movies)
    except FieldError:
        assert fast is None
        return
    assert fast is not None
    np.testing.assert_array_equal(fast[0], x)
    assert fast[1] == ids


def test_vectorised_validation_gives_up_on_shapes_it_does_not_cover() -> None:
    missing = {k: v for k, v in MOVIE.items() if k != "vote_count"}
    for movies in ([MOVIE, [1, 2]], [MOVIE, "movie"], [MOVIE, missing], [MOVIE, {**missing, "other": 1}]):
        assert matrix_from_mappings(list(movies), "movie_id") is None
    checked = matrix_from_mappings([MOVIE, {**MOVIE, "movie_id": 2, "is_favorite_genre": False}], "movie_id")
    assert checked is not None
    x, ids = checked
    assert ids == [1, 2]
    assert x.tolist() == [[2.0, 7.5, 1000.0, 1.0, 3.0, 50.0], [2.0, 7.5, 1000.0, 0.0, 3.0, 50.0]]


def test_the_loop_names_the_first_broken_rule() -> None:
    movies: list[object] = [MOVIE, {**MOVIE, "vote_count": 2.5, "popularity": -1}, {"movie_id": 3}]
    with pytest.raises(FieldError) as info:
        rows_one_by_one(movies)
    assert (info.value.loc, info.value.value) == ("movies[1].vote_count", 2.5)
    with pytest.raises(FieldError) as info:
        rows_one_by_one([MOVIE, {k: v for k, v in MOVIE.items() if k != "movie_id"}])
    assert (info.value.loc, info.value.rule) == ("movies[1].movie_id", "is required")


# --- the msgspec batch decoder against the exact one -----------------------------------------------------------

ENVELOPES: list[Any] = [
    {},
    {"user_id": 7},
    {"user_id": "u-7"},
    {"user_id": ""},
    {"user_id": "tab\t"},
    {"user_id": None},
    {"user_id": -1},
    {"rank": True},
    {"rank": None},
    {"rank": 1},
    {"top_k": 2},
    {"top_k": None},
    {"top_k": 0},
    {"top_k": True},
    {"top_k": 2.0},
    {"colour": 1},
]


def _both(decoder: BatchDecoder, body: bytes) -> tuple[BatchRequest | None, BatchRequest | InputError]:
    """(the fast decoder's answer, the exact decoder's answer or error)."""
    try:
        exact: BatchRequest | InputError = decoder.decode_exact(body)
    except InputError as exc:
        exact = exc
    return decoder.decode_fast(body), exact


def _same(fast: BatchRequest, exact: BatchRequest) -> None:
    np.testing.assert_array_equal(fast.x, exact.x)
    assert (fast.ids, fast.user_id, fast.rank, fast.top_k) == (exact.ids, exact.user_id, exact.rank, exact.top_k)
    assert [type(i) for i in fast.ids] == [type(i) for i in exact.ids]
    assert type(fast.user_id) is type(exact.user_id)


@pytest.mark.parametrize("envelope", ENVELOPES, ids=[str(e) for e in ENVELOPES])
@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_msgspec_decoder_never_accepts_what_the_rules_refuse(envelope: dict[str, Any], variant: dict[str, Any]) -> None:
    decoder = BatchDecoder(3)
    # The standard library's json, which (unlike orjson) writes integers beyond 64 bits.
    body = json.dumps({"movies": [MOVIE, {**MOVIE, **variant}], **envelope}).encode()
    fast, exact = _both(decoder, body)
    if isinstance(exact, InputError):
        assert fast is None
        with pytest.raises(type(exact)):
            decoder(body)  # the decoder as the service calls it raises the exact error
        return
    assert decoder(body).ids == exact.ids
    if fast is None:  # allowed (the exact path then serves it), but not for plain, common bodies
        assert variant or envelope.get("top_k", 1) is None or envelope.get("user_id") == "tab\t"
        return
    _same(fast, exact)


@pytest.mark.parametrize(
    "body",
    [
        b'{"movies": [{"movie_id": 1}]}',
        b'{"movies": "x"}',
        b"{}",
        b"[]",
        b'{"movies": [NaN]}',
        b'{"movies": [' + orjson.dumps(MOVIE) + b"]" + b"}" + b" trailing",
        b'{"movies": [' + b",".join([orjson.dumps(MOVIE)] * 4) + b"]}",  # over max_batch_size
        orjson.dumps({"movies": [{**MOVIE, "vote_average": 1e300}]}),
        b'{"movies": [' + orjson.dumps(MOVIE)[:-1] + b', "vote_average": 11}]}',  # duplicate key, last wins
        b'{"movies": [' + orjson.dumps({**MOVIE, "vote_average": 11})[:-1] + b', "vote_average": 5}]}',
    ],
)
def test_msgspec_decoder_on_odd_bodies(body: bytes) -> None:
    fast, exact = _both(BatchDecoder(3), body)
    if isinstance(exact, InputError):
        assert fast is None
    elif fast is not None:
        _same(fast, exact)


def test_msgspec_decoder_serves_plain_batches() -> None:
    fast = BatchDecoder(3).decode_fast(orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": "m2"}], "top_k": 1}))
    assert fast is not None
    assert fast.x.tolist() == [EXAMPLE_ROW] * 2
    assert (fast.ids, fast.user_id, fast.rank, fast.top_k) == ([1, "m2"], None, False, 1)


def test_the_exact_decoder_names_the_broken_rule() -> None:
    decoder = BatchDecoder(2)
    cases: list[tuple[bytes, str, object]] = [
        (b"[]", "body", []),
        (orjson.dumps({"movies": [MOVIE], "colour": "red"}), "colour", "red"),
        (b'{"rank": true}', "movies", MISSING),  # not sent: no value (not None, which JSON null would be)
        (orjson.dumps({"movies": [MOVIE] * 3}), "movies", 3),  # the count, not the list
        (orjson.dumps({"movies": [MOVIE], "rank": 1}), "rank", 1),
        (orjson.dumps({"movies": [MOVIE], "top_k": 0}), "top_k", 0),
        (orjson.dumps({"movies": [MOVIE, {**MOVIE, "popularity": "5"}]}), "movies[1].popularity", "5"),
    ]
    for body, loc, value in cases:
        with pytest.raises(FieldError) as info:
            decoder.decode_exact(body)
        assert (info.value.loc, info.value.value) == (loc, value), body
    assert decoder.movies_rule == "must be a list of 1 to 2 movies"
    with pytest.raises(InvalidJSONError):
        decoder(b"{")


# --- /predict bodies -----------------------------------------------------------------------------------------------


def test_decode_one_reads_the_features_and_the_optional_ids() -> None:
    plain = decode_one(orjson.dumps(EXAMPLE))
    assert (plain.x.tolist(), plain.user_id, plain.movie_id) == ([EXAMPLE_ROW], None, None)
    named = decode_one(orjson.dumps({**EXAMPLE, "user_id": "u-1", "movie_id": 9}))
    assert (named.user_id, named.movie_id) == ("u-1", 9)
    for body, loc in (
        ({**EXAMPLE, "colour": "red"}, "colour"),
        ({**EXAMPLE, "vote_average": 11}, "vote_average"),
        ({**EXAMPLE, "user_id": -1}, "user_id"),
        ([1, 2], "body"),
    ):
        with pytest.raises(FieldError) as info:
            decode_one(orjson.dumps(body))
        assert info.value.loc == loc
    with pytest.raises(InvalidJSONError):
        decode_one(b'{"vote_average": NaN}')


# --- answers -------------------------------------------------------------------------------------------------------


def test_render_one_says_which_model_and_variant_answered() -> None:
    answer = OneAnswer(7.912, "model", True, "v1", "b")
    first = orjson.loads(render_one(answer, "0123456789abcdef0123456789abcdef"))
    assert first == {
        "predicted_rating": 7.912,
        "model_version": "v1",
        "variant": "b",
        "source": "model",
        "prediction_id": "0123456789abcdef0123456789abcdef",
    }
    assert list(first) == ["predicted_rating", "model_version", "variant", "source", "prediction_id"]
    assert orjson.loads(render_one(OneAnswer(1.0, "model", True, "v1"), new_id()))["variant"] == "champion"


def test_new_ids_are_fresh_32_hex() -> None:
    first, second = new_id(), new_id()
    assert HEX32.fullmatch(first)
    assert HEX32.fullmatch(second)
    assert first != second


def test_render_batch_ranked_and_in_request_order() -> None:
    ranked = BatchAnswer([1, "m2", 3], [5.0, 9.5, 7.25], "model", None, [1, 2], True, "v1", True)
    out = orjson.loads(render_batch(ranked, "0123456789abcdef0123456789abcdef"))
    assert [(p["movie_id"], p["predicted_rating"], p["source"]) for p in out["predictions"]] == [
        ("m2", 9.5, "model"),
        (3, 7.25, "model"),
    ]
    assert {k: v for k, v in out.items() if k != "predictions"} == {
        "model_version": "v1",
        "variant": "champion",
        "count": 2,
        "ranked": True,
    }
    # The request's id, then the movie's place in the request.
    prefix = "0123456789abcdef0123456789abcdef"
    assert [p["prediction_id"] for p in out["predictions"]] == [f"{prefix}-1", f"{prefix}-2"]
    # Unranked: request order, whatever ``order`` says; per-row sources, one model version and variant.
    mixed = BatchAnswer([1, 2], [4.0, 6.0], "model", ["personalized", "model"], [1, 0], False, "v1", False, "b")
    out = orjson.loads(render_batch(mixed, prefix))
    assert [(p["movie_id"], p["source"]) for p in out["predictions"]] == [(1, "personalized"), (2, "model")]
    assert (out["ranked"], out["count"], out["model_version"], out["variant"]) == (False, 2, "v1", "b")
    assert "personalized_model_version" not in out


def test_answers_survive_a_trip_through_json() -> None:
    # What the Redis cache stores: plain JSON data, no pickle.
    one = OneAnswer(7.912, "fallback", True, "fallback-1")
    batch = BatchAnswer([1, "m2"], [5.0, 9.5], "model", None, [1, 0], True, "v1", True)
    mixed = BatchAnswer([1, 2], [4.0, 6.0], "model", ["personalized", "model"], [0, 1], False, "v1", False, "b")
    for answer in (one, batch, mixed):
        assert decode_answer(orjson.loads(orjson.dumps(encode_answer(answer)))) == answer


@pytest.mark.parametrize(
    "answer",
    [
        OneAnswer(7.912, "model", True, "v1"),
        BatchAnswer([1, "b"], [7.5, 6.25], "model", None, [1, 0], True, "v1", True),
        BatchAnswer(["a", 2], [9.5, 7.909], "model", ["personalized", "fallback"], [0, 1], False, "v1", False, "b"),
    ],
)
def test_answers_survive_the_json_codec(answer: OneAnswer | BatchAnswer) -> None:
    # As Redis keeps them: JSON bytes.
    assert decode_answer(orjson.loads(orjson.dumps(encode_answer(answer)))) == answer
