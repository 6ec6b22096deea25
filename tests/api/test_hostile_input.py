"""Hostile and random request bodies through the app, with the fast path on and off: deeply nested JSON, and a
property test of the request contract (200 or the documented 4xx, naming the broken field; never a 5xx)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE, FEATURES, MAX_ID_LENGTH, MAX_INT_ID, Feature
from moviematch_ml.settings import Settings

ROUTES: Final[tuple[str, ...]] = ("/predict", "/predict-batch", "/feedback")
_PREDICTION_ID = re.compile(rb'"prediction_id":"[0-9a-f]{32}(-[0-9]+)?"')


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, TestClient]]:
    """Two started services, by FAST_PATH: the fast path on (True) and off (False)."""
    directory = tmp_path_factory.mktemp("hostile")
    apps = {
        fast: create_app(
            Settings(
                model_path=directory / "no-model",
                fast_path=fast,
                database_url=f"sqlite:///{directory / f'feedback-{fast}.sqlite3'}",
            )
        )
        for fast in (True, False)
    }
    with TestClient(apps[True]) as fast_client, TestClient(apps[False]) as slow_client:
        yield {True: fast_client, False: slow_client}


def post(client: TestClient, path: str, body: bytes) -> tuple[int, dict[str, Any], bytes]:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    return r.status_code, r.json(), _PREDICTION_ID.sub(b'"prediction_id":"<id>"', r.content)


# --- defect 4: deeply nested JSON -------------------------------------------------------------------------------------


def nested_list(depth: int) -> str:
    """``[[[...[1]...]]]``, ``depth`` levels, written as text (serialising it would recurse as deep)."""
    return "[" * depth + "1" + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def bodies_with(value: str) -> dict[str, tuple[str, bytes]]:
    """For each POST route, (the field that holds ``value``, a body that is otherwise valid)."""
    example = orjson.dumps(EXAMPLE).decode()[1:-1]  # the six fields, without the braces
    movie = orjson.dumps({"movie_id": 1, **{k: v for k, v in EXAMPLE.items() if k != "vote_average"}}).decode()[:-1]
    return {
        "/predict": ("user_id", f'{{{example},"user_id":{value}}}'.encode()),
        "/predict-batch": ("movies[0].vote_average", f'{{"movies":[{movie},"vote_average":{value}}}]}}'.encode()),
        "/feedback": ("rating", f'{{"user_id":1,"movie_id":2,"rating":{value}}}'.encode()),
    }


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "fastapi"])
@pytest.mark.parametrize("nested", [nested_list, nested_object], ids=["list", "object"])
@pytest.mark.parametrize("depth", [200, 1_000])
def test_a_value_nested_a_thousand_levels_deep_is_a_422_naming_the_field(
    clients: dict[bool, TestClient], fast: bool, nested: Any, depth: int
) -> None:
    """Defect 4: the 422's message wrote the value with ``repr()``, which raised RecursionError about 1,000 levels
    down: a 500 on all three POST routes. Now the value is written bounded (the ``detail`` says what it was)."""
    for path, (field, body) in bodies_with(nested(depth)).items():
        status, answer, _ = post(clients[fast], path, body)
        assert status == 422, (path, answer)
        assert answer["error"] == "validation_error"
        assert answer["message"].startswith(f"{field}: must be ")
        assert "(got [[[" in answer["message"] or "(got {'a': {'a':" in answer["message"]
        assert len(answer["message"]) < 300
        [problem] = answer["detail"]
        assert problem["field"] == field
        assert problem["value"] in ("<list of 1 items>", "<dict of 1 items>")


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "fastapi"])
@pytest.mark.parametrize("depth", [1_024, 100_000])
def test_json_nested_past_1024_levels_is_a_400(clients: dict[bool, TestClient], fast: bool, depth: int) -> None:
    """Defect 4, deeper: a body nested more than 1,024 levels (here the value's levels plus the body's own) is refused
    by the JSON parser itself (its depth limit), so the answer is 400 ``invalid_json`` at the position where the
    limit was crossed, not a 422 naming the field; never a 5xx."""
    for path, (_, body) in bodies_with(nested_list(depth)).items():
        status, answer, _ = post(clients[fast], path, body)
        assert status == 400, (path, answer)
        assert answer["error"] == "invalid_json"
        assert re.fullmatch(
            r"request body is not valid JSON: .*depth.*line 1 column \d+ \(char \d+\)", answer["message"]
        )


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "fastapi"])
def test_deep_json_anywhere_else_in_a_body(clients: dict[bool, TestClient], fast: bool) -> None:
    deep = nested_list(1_000)
    example = orjson.dumps(EXAMPLE).decode()[:-1]
    cases = [
        ("/predict", f'{example},"extra":{deep}}}', "extra", "unknown field"),
        ("/predict", deep, "body", "must be a JSON object"),
        ("/predict-batch", f'{{"movies":{deep}}}', "movies[0]", "must be a JSON object"),
        ("/predict-batch", f'{{"movies":[{example},"movie_id":{deep}}}]}}', "movies[0].movie_id", "must be a non-"),
        ("/feedback", f'{{"ratings":{deep}}}', "ratings[0]", "must be a JSON object"),
        ("/feedback", deep, "body", "must be a JSON object"),
    ]
    for path, body, field, rule in cases:
        status, answer, _ = post(clients[fast], path, body.encode())
        assert status == 422, (path, body[:40], answer)
        assert answer["message"].startswith(f"{field}: {rule}"), (path, answer["message"])


# --- the request contract, as a property ------------------------------------------------------------------------------

_JUNK = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(0, 5), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 5), max_size=2),
)


def valid_value(feature: Feature) -> st.SearchStrategy[Any]:
    """Values the rule accepts (docs/api.md, Validation rules)."""
    lo, hi = feature.minimum, feature.maximum
    if feature.kind == "flag":
        return st.sampled_from([0, 1, True, False, 0.0, 1.0])
    if feature.kind == "count":
        return st.integers(int(lo), int(hi)) | st.integers(int(lo), int(hi)).map(float)
    return st.floats(lo, hi, allow_nan=False) | st.integers(int(lo), int(hi))


def invalid_value(feature: Feature) -> st.SearchStrategy[Any]:
    """Values the rule refuses: another JSON type, out of range, a fraction for a count, a bool for a non-flag."""
    lo, hi = feature.minimum, feature.maximum
    out: list[st.SearchStrategy[Any]] = [
        _JUNK,
        st.floats(max_value=lo - 0.001, allow_nan=False, allow_infinity=False, min_value=-1e12),
        st.floats(min_value=hi + 0.5, allow_nan=False, allow_infinity=False, max_value=1e15),
        st.integers(-(2**53), int(lo) - 1),
        st.integers(int(hi) + 1, 2**53),
    ]
    if feature.kind == "flag":
        out.append(st.floats(0.01, 0.99))
    else:
        out.append(st.booleans())
    if feature.kind == "count":
        out.append(st.integers(int(lo), min(int(hi), 10**6) - 1).map(lambda n: n + 0.5))
    return st.one_of(out)


_PRINTABLE = st.characters(categories=["L", "N", "P", "S"])
VALID_ID = st.integers(0, MAX_INT_ID) | st.text(_PRINTABLE, min_size=1, max_size=MAX_ID_LENGTH)
INVALID_ID = st.one_of(
    st.integers(-(2**53), -1),
    st.just(""),
    st.text(_PRINTABLE, min_size=MAX_ID_LENGTH + 1, max_size=MAX_ID_LENGTH + 3),
    st.sampled_from(["tab\there", "new\nline", "\x00", "\u2028"]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    _JUNK,
)
_NAMES = frozenset([f.name for f in FEATURES] + ["user_id", "movie_id", "movies", "rank", "top_k"])
UNKNOWN_KEY = st.text(st.characters(categories=["Ll"]), min_size=1, max_size=8).filter(lambda k: k not in _NAMES)


@st.composite
def fields(draw: st.DrawFn, ids: tuple[str, ...], valid: bool | None = None) -> tuple[dict[str, Any], set[str]]:
    """An object of the six features (and ``ids``, each present or not); valid, or (``valid`` False, or half the time
    when None) with one to three rules broken: a feature invalid or missing, an id invalid, an unknown key. Also
    the names of the fields that break a rule."""
    if valid is None:
        valid = draw(st.booleans())
    names = [f.name for f in FEATURES] + list(ids) + ["<unknown>"]
    to_break = set() if valid else set(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)))
    obj: dict[str, Any] = {}
    broken: set[str] = set()
    for feature in FEATURES:
        if feature.name not in to_break:
            obj[feature.name] = draw(valid_value(feature))
        elif draw(st.booleans()):
            obj[feature.name] = draw(invalid_value(feature))
            broken.add(feature.name)
        else:
            broken.add(feature.name)  # missing
    for name in ids:
        if name in to_break:
            obj[name] = draw(INVALID_ID)
            broken.add(name)
        elif draw(st.booleans()):
            obj[name] = draw(VALID_ID)
    if "<unknown>" in to_break:
        key = draw(UNKNOWN_KEY)
        obj[key] = draw(_JUNK | st.integers())
        broken.add(key)
    return obj, broken


def _check_refusal(status: int, answer: dict[str, Any], broken: set[str]) -> None:
    """The documented 422: the first broken rule in ``message``, every problem in ``detail``, one of ``broken``."""
    assert status == 422, answer
    assert set(answer) == {"error", "message", "detail"}
    assert answer["error"] == "validation_error"
    first = answer["detail"][0]
    assert first["field"] in broken, (first, broken)
    assert answer["message"].startswith(f"{first['field']}: {first['rule']}")
    if len(broken) == 1:
        assert first["field"] == next(iter(broken))


_PROPERTY = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@_PROPERTY
@given(drawn=fields(("user_id", "movie_id")))
def test_predict_answers_200_or_a_422_naming_a_broken_field(
    clients: dict[bool, TestClient], drawn: tuple[dict[str, Any], set[str]]
) -> None:
    obj, broken = drawn
    body = orjson.dumps(obj)
    fast = post(clients[True], "/predict", body)
    slow = post(clients[False], "/predict", body)
    assert fast[0] == slow[0]
    assert fast[2] == slow[2]  # the same answer, byte for byte (prediction ids aside), on both paths
    status, answer, _ = fast
    event(f"status {status}")
    if not broken:
        assert status == 200, answer
        assert answer["source"] == "fallback"
        assert 0.0 <= answer["predicted_rating"] <= 10.0
    else:
        _check_refusal(status, answer, broken)


@st.composite
def batches(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    movies = []
    broken: set[str] = set()
    valid = draw(st.booleans())
    n = draw(st.integers(1, 3))
    bad = -1 if valid else draw(st.integers(0, n - 1))
    for i in range(n):
        movie, movie_broken = draw(fields(("movie_id",), valid=i != bad))
        if i != bad and "movie_id" not in movie:
            movie["movie_id"] = draw(VALID_ID)
        if "movie_id" not in movie:
            movie_broken.add("movie_id")  # required in a batch
        movies.append(movie)
        broken |= {f"movies[{i}].{name}" for name in movie_broken}
    body: dict[str, Any] = {"movies": movies}
    if draw(st.booleans()):
        body["user_id"] = draw(VALID_ID)
    if draw(st.booleans()):
        body["top_k"] = draw(st.integers(1, 5))
    return body, broken


@_PROPERTY
@given(drawn=batches())
def test_predict_batch_answers_200_or_a_422_naming_a_broken_field(
    clients: dict[bool, TestClient], drawn: tuple[dict[str, Any], set[str]]
) -> None:
    obj, broken = drawn
    body = orjson.dumps(obj)
    fast = post(clients[True], "/predict-batch", body)
    slow = post(clients[False], "/predict-batch", body)
    assert (fast[0], fast[2]) == (slow[0], slow[2])
    status, answer, _ = fast
    event(f"status {status}")
    if not broken:
        assert status == 200, answer
        expected = min(len(obj["movies"]), obj.get("top_k", len(obj["movies"])))
        assert answer["count"] == len(answer["predictions"]) == expected
    else:
        _check_refusal(status, answer, broken)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@_PROPERTY
@given(body=st.binary(max_size=64) | _JSON.map(orjson.dumps) | _JSON.map(lambda v: orjson.dumps({"movies": v})))
def test_any_body_on_any_route_is_answered_with_a_documented_status(
    clients: dict[bool, TestClient], body: bytes
) -> None:
    for path in ROUTES:
        answers = [post(clients[fast], path, body) for fast in (True, False)]
        status, answer, _ = answers[0]
        event(f"{path} {status}")
        if path != "/feedback":
            assert (answers[0][0], answers[0][2]) == (answers[1][0], answers[1][2])
        assert status in (200, 201, 400, 422), (path, body, answer)
        if status >= 400:
            assert answer["error"] == {400: "invalid_json", 422: "validation_error"}[status]
            assert isinstance(answer["message"], str)
            assert set(answer) <= {"error", "message", "detail"}
