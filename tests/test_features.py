"""features.py: the six features' rules and the identifier rule, every validator derived from them, and the Node
client's copy of them.

Each rule is written once and given in several forms: ``Feature.parse`` (the exact path), ``json_types`` +
``column_ok`` (the vectorised path), ``msgspec_type`` (the typed batch decoder) and ``annotation`` (the pydantic type
behind the OpenAPI schema); ``parse_id``, ``id_msgspec_type`` and ``Identifier`` for the identifiers. The property
tests below drive all of them with the same generated JSON texts and check that they agree, except where the rules
document a gap: msgspec refuses integral floats for counts and flags (the exact path then accepts them), and neither
msgspec nor pydantic checks an identifier's printability (the service checks it after msgspec; OpenAPI has no
pattern for it).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from moviematch_ml.errors import FieldError, InvalidJSONError
from moviematch_ml.features import (
    EXAMPLE,
    FEATURE_NAMES,
    FEATURES,
    ID_RULE,
    MAX_ID_LENGTH,
    MAX_INT_ID,
    Feature,
    Identifier,
    id_msgspec_type,
    parse_id,
)
from moviematch_ml.online.contract import loads, matrix_from_mappings
from moviematch_ml.runtime import fallback

REPO: Final[Path] = Path(__file__).resolve().parents[1]
COUNTS: Final[list[Feature]] = [f for f in FEATURES if f.kind == "count"]
NUMBERS: Final[list[Feature]] = [f for f in FEATURES if f.kind == "number"]
FLAGS: Final[list[Feature]] = [f for f in FEATURES if f.kind == "flag"]
NOT_FLAGS: Final[list[Feature]] = COUNTS + NUMBERS
[FLAG] = FLAGS

# No example database (nothing written to the working tree). The autouse fixture of tests/conftest.py (a chdir into
# the test's tmp_path) is function-scoped, which Hypothesis warns about; it is harmless across examples.
PROPERTY: Final = settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def names_of(features: list[Feature]) -> list[str]:
    return [f.name for f in features]


def refusal(feature: Feature, value: object) -> FieldError:
    with pytest.raises(FieldError) as info:
        feature.parse(value, feature.name)
    return info.value


def assert_refused(feature: Feature, value: object) -> None:
    error = refusal(feature, value)
    assert (error.loc, error.rule, error.value) == (feature.name, feature.rule, value)


# --- the rules, by hand -----------------------------------------------------------------------------------------------


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
    assert ID_RULE == "must be a non-negative integer or a string of 1-128 printable characters"


@pytest.mark.parametrize("feature", FEATURES, ids=names_of(list(FEATURES)))
@pytest.mark.parametrize("bad", ["7", None, [1], {"v": 1}, ""])
def test_wrong_type(feature: Feature, bad: Any) -> None:
    assert_refused(feature, bad)


@pytest.mark.parametrize("feature", NOT_FLAGS, ids=names_of(NOT_FLAGS))
@pytest.mark.parametrize("bad", [True, False])
def test_bool_only_for_the_flag(feature: Feature, bad: bool) -> None:
    assert_refused(feature, bad)


@pytest.mark.parametrize("feature", NOT_FLAGS, ids=names_of(NOT_FLAGS))
def test_out_of_range(feature: Feature) -> None:
    step = 1 if feature.kind == "count" else 0.5
    for bad in (feature.minimum - step, feature.maximum + step):
        assert_refused(feature, int(bad) if feature.kind == "count" else bad)


@pytest.mark.parametrize("feature", NOT_FLAGS, ids=names_of(NOT_FLAGS))
def test_range_bounds_are_inclusive(feature: Feature) -> None:
    for ok in (feature.minimum, feature.maximum):
        value = int(ok) if feature.kind == "count" else float(ok)
        assert feature.parse(value, feature.name) == ok


@pytest.mark.parametrize("feature", COUNTS, ids=names_of(COUNTS))
def test_counts_must_be_integers(feature: Feature) -> None:
    assert_refused(feature, 2.5)
    # An integral float is the same count (JavaScript has no separate integer type).
    assert feature.parse(2.0, feature.name) == 2.0
    assert feature.parse(2, feature.name) == 2.0


@pytest.mark.parametrize("feature", FEATURES, ids=names_of(list(FEATURES)))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(feature: Feature, bad: float) -> None:
    # JSON cannot carry them (the service answers 400 first: tests/api/test_predict.py), but the rule refuses them too.
    error = refusal(feature, bad)
    assert (error.loc, error.rule) == (feature.name, feature.rule)


def test_vote_count_contract_example() -> None:
    [vote_count] = [f for f in FEATURES if f.name == "vote_count"]
    error = refusal(vote_count, -1)
    assert str(error) == "vote_count: must be an integer between 0 and 1000000000 (got -1)"


@pytest.mark.parametrize(("ok", "value"), [(0, 0.0), (1, 1.0), (True, 1.0), (False, 0.0), (0.0, 0.0), (1.0, 1.0)])
def test_flag_accepts_0_1_true_false(ok: Any, value: float) -> None:
    assert FLAG.parse(ok, FLAG.name) == value


@pytest.mark.parametrize("bad", [2, -1, 0.5, "true", "1"])
def test_flag_refuses_anything_else(bad: Any) -> None:
    assert FLAG.rule == "must be 0, 1, true or false"
    assert_refused(FLAG, bad)


@pytest.mark.parametrize("bad", [-1, 2**63, "", "a" * 129, "tab\there", "nul\x00", 1.5, 3.0, True, None, [1], {}])
def test_identifier_rules(bad: Any) -> None:
    with pytest.raises(FieldError) as info:
        parse_id(bad, "user_id")
    assert (info.value.loc, info.value.rule, info.value.value) == ("user_id", ID_RULE, bad)


@pytest.mark.parametrize("ok", [0, 42, 2**63 - 1, "u-42", "a" * 128, "usér ünïcode", "7"])
def test_identifiers_are_echoed_as_sent(ok: str | int) -> None:
    got = parse_id(ok, "movie_id")
    assert (type(got), got) == (type(ok), ok)


# --- every validator of a feature agrees with parse -------------------------------------------------------------------

MSGSPEC: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    f.name: msgspec.json.Decoder(f.msgspec_type()) for f in FEATURES
}
PYDANTIC: Final[dict[str, TypeAdapter[Any]]] = {f.name: TypeAdapter(f.annotation()) for f in FEATURES}
ID_MSGSPEC: Final[msgspec.json.Decoder[Any]] = msgspec.json.Decoder(id_msgspec_type())
ID_PYDANTIC: Final[TypeAdapter[Any]] = TypeAdapter(Identifier)

# JSON spellings json.dumps never writes: exponents, long fractions that round to integers, numbers beyond a double.
SPELLED_NUMBERS: Final[list[str]] = [
    "1e2", "1E2", "2e0", "1.0e0", "-0", "-0.0", "0.5e1", "1e-400", "-1e-400", "1e400", "-1e400",
    "0.99999999999999999", "30.0000000000000001", "1000000000.0000001", "1" + "0" * 400,
]  # fmt: skip
# Strings pydantic's lax mode would coerce into numbers or booleans (the rules refuse every string).
COERCIBLE: Final[list[str]] = ["2", "1", "0", "7.5", "1e2", " 2 ", "true", "false", "yes", "on", "NaN", "Infinity"]


def number_values(lo: int, hi: int) -> st.SearchStrategy[object]:
    """JSON numbers in, at and around [lo, hi], integral or not, and far away, huge integers included."""
    near = st.one_of(st.integers(lo - 2, lo + 2), st.integers(hi - 2, hi + 2), st.integers(lo, hi))
    huge = st.one_of(
        st.integers(2**63 - 2, 2**64 + 2), st.integers(-(2**64) - 2, -(2**63) + 2), st.integers(10**300, 10**310)
    )
    floats = st.one_of(
        st.floats(lo - 1, hi + 1),
        near.map(float),  # integral floats
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([-0.0, 5e-324, 0.5, hi - 0.5, hi + 1e-9, lo - 1e-9]),
    )
    return st.one_of(near, st.integers(), huge, floats)


def other_values() -> st.SearchStrategy[object]:
    """Every other JSON type: booleans, null, strings (numeric ones too), arrays and objects."""
    return st.one_of(
        st.booleans(),
        st.none(),
        st.text(max_size=4),
        st.sampled_from(COERCIBLE),
        st.lists(st.integers(0, 1), max_size=2),
        st.dictionaries(st.text(max_size=2), st.integers(0, 1), max_size=1),
    )


def as_json(value: object) -> str:
    return json.dumps(value, allow_nan=False)


def feature_texts(feature: Feature) -> st.SearchStrategy[str]:
    """JSON texts of one feature's value: numbers around its range, every other JSON type, odd spellings."""
    values = st.one_of(number_values(int(feature.minimum), int(feature.maximum)), other_values())
    return st.one_of(values.map(as_json), st.sampled_from(SPELLED_NUMBERS))


def decoded(text: str | bytes) -> tuple[bool, object]:
    """(True, value) as the service's JSON parser reads ``text``, or (False, None) when it refuses it (400)."""
    try:
        return True, loads(text if isinstance(text, bytes) else text.encode())
    except InvalidJSONError:
        return False, None


def parsed(feature: Feature, value: object) -> float | None:
    try:
        return feature.parse(value, feature.name)
    except FieldError:
        return None


def exact(feature: Feature, text: str) -> float | None:
    """What the exact path makes of ``text``: the feature's value, or None when the service refuses it."""
    ok, value = decoded(text)
    return parsed(feature, value) if ok else None


def vectorised(feature: Feature, values: list[object]) -> list[float] | None:
    """The column of ``values`` through the vectorised path (json_types + column_ok), or None when it says no."""
    rows: list[object] = [{**EXAMPLE, "movie_id": i, feature.name: v} for i, v in enumerate(values)]
    out = matrix_from_mappings(rows, "movie_id")
    if out is None:
        return None
    x, _ = out
    column: list[float] = x[:, FEATURE_NAMES.index(feature.name)].tolist()
    return column


def with_msgspec(feature: Feature, text: str) -> float | None:
    try:
        return float(MSGSPEC[feature.name].decode(text.encode()))
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def with_pydantic(feature: Feature, text: str) -> float | None:
    try:
        return float(PYDANTIC[feature.name].validate_json(text))
    except ValidationError:
        return None


@PROPERTY
@given(data=st.data(), feature=st.sampled_from(FEATURES))
def test_every_validator_of_a_feature_agrees_with_parse(data: st.DataObject, feature: Feature) -> None:
    text = data.draw(feature_texts(feature), label="json")
    expected = exact(feature, text)
    ok, value = decoded(text)
    if ok:  # a body the JSON parser refuses never reaches the vectorised check
        assert vectorised(feature, [value]) == (None if expected is None else [expected])
    # The OpenAPI type accepts exactly what parse accepts (pydantic's own JSON parser, default mode).
    assert with_pydantic(feature, text) == expected
    got = with_msgspec(feature, text)
    if got is not None:
        assert got == expected  # msgspec never accepts what the rule refuses
    elif expected is not None:
        # The documented gap: integral floats (2.0, 1e2) for counts and flags; the exact path accepts them.
        assert feature.kind in ("count", "flag")
        assert type(value) is float


@PROPERTY
@given(data=st.data(), feature=st.sampled_from(FEATURES))
def test_a_column_is_accepted_when_every_value_is(data: st.DataObject, feature: Feature) -> None:
    # Columns mixing types and values: the vectorised check says yes exactly when parse accepts every value.
    texts = data.draw(st.lists(feature_texts(feature), min_size=1, max_size=5), label="column")
    values = [value for ok, value in map(decoded, texts) if ok]
    if not values:
        return
    expected = [parsed(feature, v) for v in values]
    got = vectorised(feature, values)
    if None in expected:
        assert got is None
    else:
        assert got == expected


# --- every validator of the identifier rule agrees with parse_id ------------------------------------------------------


def id_values() -> st.SearchStrategy[object]:
    """Identifiers and near misses: integers at both ends, floats, booleans, strings of every Unicode category
    (controls, format characters, separators...) and around the length limit, lone surrogates, other types."""
    return st.one_of(
        st.integers(-3, 3),
        st.integers(MAX_INT_ID - 2, MAX_INT_ID + 2),
        st.integers(),
        st.integers(2**64 - 2, 2**64 + 2),
        st.integers(0, 10).map(float),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        st.text(max_size=6),
        st.text(min_size=MAX_ID_LENGTH - 2, max_size=MAX_ID_LENGTH + 2),
        st.sampled_from(["\ud800", "a\udfff", "\t", "\x00", "\xa0", "\u200b", "\u2028", "7", "-1", "1.0"]),
        st.lists(st.integers(0, 3), max_size=2),
        st.dictionaries(st.text(max_size=2), st.integers(0, 1), max_size=1),
    )


def id_bodies() -> st.SearchStrategy[bytes]:
    """JSON texts of identifiers, ASCII-escaped or raw UTF-8 (lone surrogates then give bytes that are not UTF-8)."""
    return st.tuples(id_values(), st.booleans()).map(
        lambda v: json.dumps(v[0], ensure_ascii=v[1]).encode("utf-8", "surrogatepass")
    )


def typed(value: object) -> tuple[type, object] | None:
    """Value and type (1 and True, "1" and 1 are different identifiers), or None for a refusal."""
    return None if value is None else (type(value), value)


def id_exact(body: bytes) -> tuple[type, object] | None:
    try:
        return typed(parse_id(loads(body), "movie_id"))
    except (InvalidJSONError, FieldError):
        return None


def id_with_msgspec(body: bytes) -> tuple[type, object] | None:
    try:
        return typed(ID_MSGSPEC.decode(body))
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def id_with_pydantic(body: bytes) -> tuple[type, object] | None:
    try:
        return typed(ID_PYDANTIC.validate_json(body))
    except ValidationError:
        return None


def printable(checked: tuple[type, object] | None) -> tuple[type, object] | None:
    """The check the service makes after msgspec's decoder (online/contract.py): strings must be printable."""
    if checked is not None and isinstance(checked[1], str) and not checked[1].isprintable():
        return None
    return checked


@PROPERTY
@given(body=id_bodies())
def test_every_validator_of_the_identifier_rule_agrees_with_parse_id(body: bytes) -> None:
    expected = id_exact(body)
    # The vectorised path checks the id column too.
    ok, value = decoded(body)
    if ok:
        out = matrix_from_mappings([{**EXAMPLE, "movie_id": value}], "movie_id")
        assert (None if out is None else typed(out[1][0])) == expected
    # msgspec's decoder, then the printability check: exactly parse_id.
    in_msgspec = id_with_msgspec(body)
    assert printable(in_msgspec) == expected
    # The OpenAPI type is the same rule as msgspec's: it has no printability test either (the known gap).
    in_pydantic = id_with_pydantic(body)
    assert in_pydantic == in_msgspec
    if in_pydantic != expected:
        assert in_pydantic is not None
        assert expected is None
        text = in_pydantic[1]
        assert isinstance(text, str)
        assert not text.isprintable()
        assert 1 <= len(text) <= MAX_ID_LENGTH


# --- the Node client's copy -------------------------------------------------------------------------------------------

NODE_FALLBACK: Final[Path] = REPO / "clients" / "node" / "fallback.js"
FALLBACK_CONSTANTS: Final[tuple[str, ...]] = (
    "PRIOR_MEAN",
    "PRIOR_VOTES",
    "FAVOURITE_BONUS",
    "SHARED_GENRE_BONUS",
    "MAX_SHARED_GENRES",
    "VERSION",
)


def node_definitions() -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the Node client's copy of the rules cannot be read")
    constants = ", ".join(f"{name}: m.{name}" for name in FALLBACK_CONSTANTS)
    script = (
        f"import({json.dumps(NODE_FALLBACK.as_uri())})"
        f".then(m => console.log(JSON.stringify({{features: m.FEATURES, constants: {{{constants}}}}})))"
    )
    done = subprocess.run(
        [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def test_the_node_client_has_the_same_features_and_fallback_rule() -> None:
    node = node_definitions()
    assert node["features"] == [
        {"name": f.name, "kind": f.kind, "minimum": f.minimum, "maximum": f.maximum, "rule": f.rule} for f in FEATURES
    ]
    assert node["constants"] == {name: getattr(fallback, name) for name in FALLBACK_CONSTANTS}
