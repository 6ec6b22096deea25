"""The C loops of /predict-batch (``moviematch_ml._codec``) give exactly what the Python loops give.

``_codec.rows`` writes the rows of a batch answer; wrapped as ``serving._render_batch`` wraps it, the bytes must equal
``serving._render_batch_dicts`` (per-row dicts through orjson) for every answer, and it must decline (None) whatever
it cannot write identically (string or bool ids, ratings orjson writes with an exponent). ``_codec.matrix`` fills the
feature matrix from the movies msgspec decoded and must equal the chain + fromiter path. Malformed calls raise Python
exceptions. One end-to-end test holds a 1,000-movie /predict-batch answer to the dict rendering.
"""

from __future__ import annotations

import importlib
import itertools
import math
import operator
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from moviematch_ml import serving
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES, FEATURES
from moviematch_ml.serving import ModelHolder, PredictionService, _BatchAnswer
from moviematch_ml.settings import Settings

# Imported by name so that a build without the extension skips these tests instead of failing to collect.
try:
    _codec: Any = importlib.import_module("moviematch_ml._codec")
except ImportError:  # pragma: no cover - depends on how the package was built
    pytest.skip("moviematch_ml._codec is not built", allow_module_level=True)

BATCH_ID = "0123456789abcdef0123456789abcdef"
MAX_ID = 2**63 - 1
N_FEATURES = len(FEATURE_NAMES)
EDGE_RATINGS = [0.0, -0.0, 10.0, 0.001, 9.999, math.nan]


def _answer(
    ids: list[Any],
    rounded: list[Any],
    *,
    order: list[int] | None = None,
    ranked: bool = False,
    source: str = "model",
    sources: list[str] | None = None,
    personalized_version: str | None = None,
) -> _BatchAnswer:
    """A batch answer as ``PredictionService._predict_batch`` builds it (unranked: order is range(n))."""
    if order is None:
        order = list(range(len(ids)))
    return _BatchAnswer(ids, rounded, source, sources, order, ranked, "v-test", True, personalized_version)


def _expected(answer: _BatchAnswer, batch_id: str = BATCH_ID) -> bytes:
    """The answer written by hand with orjson, independently of serving.py."""
    rows = [
        {
            "movie_id": answer.ids[i],
            "predicted_rating": answer.rounded[i],
            "source": answer.source if answer.sources is None else answer.sources[i],
            "prediction_id": f"{batch_id}-{i}",
        }
        for i in answer.order
    ]
    out: dict[str, object] = {
        "predictions": rows,
        "model_version": answer.version,
        "count": len(rows),
        "ranked": answer.ranked,
    }
    if answer.personalized_version is not None:
        out["personalized_model_version"] = answer.personalized_version
    return orjson.dumps(out)


def _tail(answer: _BatchAnswer) -> dict[str, object]:
    tail: dict[str, object] = {"model_version": answer.version, "count": len(answer.order), "ranked": answer.ranked}
    if answer.personalized_version is not None:
        tail["personalized_model_version"] = answer.personalized_version
    return tail


def _codec_rows(answer: _BatchAnswer, batch_id: str = BATCH_ID) -> bytes | None:
    """``_codec.rows`` called as ``_render_batch`` calls it."""
    sources = None if answer.sources is None else [orjson.dumps(s) for s in answer.sources]
    order = answer.order if answer.ranked else None
    rows: bytes | None = _codec.rows(
        answer.ids, answer.rounded, order, orjson.dumps(answer.source), sources, batch_id.encode("ascii")
    )
    return rows


def _wrapped(rows: bytes, answer: _BatchAnswer) -> bytes:
    return b'{"predictions":[' + rows + b"]," + orjson.dumps(_tail(answer))[1:]


@pytest.fixture
def fixed_id(monkeypatch: pytest.MonkeyPatch) -> str:
    """``serving.new_id`` returns BATCH_ID, so that two renderings of one answer can be compared byte for byte."""
    monkeypatch.setattr(serving, "new_id", lambda: BATCH_ID)
    return BATCH_ID


def _assert_renders_alike(answer: _BatchAnswer) -> bytes:
    """``_render_batch`` (C or not) == ``_render_batch_dicts`` == orjson by hand; returns the bytes."""
    got = serving._render_batch(answer)
    assert got == serving._render_batch_dicts(answer, BATCH_ID, _tail(answer))
    assert got == _expected(answer)
    return got


def _random_answers(seed: int, count: int) -> list[_BatchAnswer]:
    rng = np.random.default_rng(seed)
    answers: list[_BatchAnswer] = []
    for k in range(count):
        n = int(rng.integers(1, 60))
        ids = rng.integers(0, MAX_ID, size=n, dtype=np.int64, endpoint=True).tolist()
        ids[0] = [0, MAX_ID, 1, 2**31, 2**32 + 7][k % 5]  # the extremes of the id range, often
        rounded: list[float] = np.round(rng.uniform(0.0, 10.0, size=n), 3).tolist()
        for j in rng.choice(n, size=min(n, 3), replace=False).tolist():
            rounded[j] = EDGE_RATINGS[int(rng.integers(len(EDGE_RATINGS)))]
        shape = k % 4
        ranked = shape >= 2
        order: list[int] | None = None
        if ranked:
            order = rng.permutation(n).tolist()
            if shape == 3:
                order = order[: int(rng.integers(1, n + 1))]
        sources: list[str] | None = None
        personalized: str | None = None
        if k % 3 == 1:
            sources = ["personalized" if b else "model" for b in (rng.random(n) < 0.5).tolist()]
            personalized = "personal-7"
        elif k % 3 == 2:
            sources = ["personalized"] * n
            personalized = "personal-7"
        source = ["model", "fallback"][k % 2]
        answers.append(
            _answer(
                ids,
                rounded,
                order=order,
                ranked=ranked,
                source=source,
                sources=sources,
                personalized_version=personalized,
            )
        )
    return answers


# --- rows: the same bytes as orjson --------------------------------------------------------------------------------


def test_rows_are_byte_identical_to_the_dict_rendering(fixed_id: str) -> None:
    for answer in _random_answers(seed=20260101, count=400):
        rows = _codec_rows(answer)
        assert rows is not None, answer  # int ids and 3-decimal ratings in [0, 10] never decline
        assert _wrapped(rows, answer) == _expected(answer)
        assert _assert_renders_alike(answer) == _wrapped(rows, answer)


def test_rows_on_the_edge_ratings_and_ids(fixed_id: str) -> None:
    ids = [0, MAX_ID, 1, 9, 10, 2**53 + 1, 2**62, 123456789]
    ratings = [*EDGE_RATINGS, 5.0, 0.5]
    answer = _answer(ids, ratings)
    got = _assert_renders_alike(answer)
    rows = orjson.loads(got)["predictions"]
    assert [r["movie_id"] for r in rows] == ids
    assert b'"predicted_rating":-0.0,' in got
    assert b'"predicted_rating":null,' in got  # NaN, as orjson writes it
    assert rows[-1]["prediction_id"] == f"{BATCH_ID}-7"


def test_every_three_decimal_rating_from_0_to_10(fixed_id: str) -> None:
    ratings: list[float] = np.round(np.arange(10001) / 1000, 3).tolist()
    answer = _answer(list(range(len(ratings))), ratings)
    rows = _codec_rows(answer)
    assert rows is not None
    assert _wrapped(rows, answer) == _expected(answer)


def test_every_double_written_is_written_as_orjson_writes_it() -> None:
    """Random bit patterns, magnitudes over 1e-5..1e17 and 3-decimal values: where rows writes a rating, it writes
    orjson's text."""
    rng = np.random.default_rng(7)
    values: list[float] = rng.integers(0, 2**63, size=20000, dtype=np.int64).view(np.float64).tolist()
    values += (10.0 ** rng.uniform(-5, 17, size=20000)).tolist()
    # 3-decimal values up to past 1e12: the C code writes those k / 1000 by hand, the rest through repr.
    values += np.round(10.0 ** rng.uniform(-4, 12.5, size=20000), 3).tolist()
    values += [-v for v in values[::3]]
    values += [1e-4, -1e-4, 1e16 - 2, 9999999999999998.0, 123456789012345.67, 1e15, math.inf, -math.inf]
    values += [999999999999.999, 1e12, 1e12 + 0.001, 0.0004, 0.0005, 0.0015, 2.675, 1.005, 0.1 + 0.2, 1 / 3]
    written = 0
    for v in values:
        rows = _codec.rows([5], [v], None, b'"m"', None, b"p")
        if rows is None:
            assert v != 0.0
            assert not 1e-4 <= abs(v) < 1e16, v  # declines only what repr writes with an exponent
            continue
        written += 1
        assert rows == orjson.dumps({"movie_id": 5, "predicted_rating": v, "source": "m", "prediction_id": "p-0"})
    assert written > 40000  # most of them: the comparison above is not vacuous


def test_row_order_and_prediction_ids_follow_the_ranking(fixed_id: str) -> None:
    ids = [10, 11, 12, 13, 14]
    ratings = [1.0, 5.0, 3.0, 5.0, 0.0]
    order = [1, 3, 2, 0, 4]
    full = orjson.loads(_assert_renders_alike(_answer(ids, ratings, order=order, ranked=True)))
    assert [r["movie_id"] for r in full["predictions"]] == [11, 13, 12, 10, 14]
    assert [r["prediction_id"][-2:] for r in full["predictions"]] == ["-1", "-3", "-2", "-0", "-4"]
    top = orjson.loads(_assert_renders_alike(_answer(ids, ratings, order=order[:2], ranked=True)))
    assert (top["count"], [r["movie_id"] for r in top["predictions"]]) == (2, [11, 13])


def test_per_row_sources_are_taken_by_movie_not_by_rank(fixed_id: str) -> None:
    sources = ["personalized", "model", "personalized"]
    answer = _answer(
        [1, 2, 3], [1.0, 2.0, 3.0], order=[2, 1, 0], ranked=True, sources=sources, personalized_version="p"
    )
    out = orjson.loads(_assert_renders_alike(answer))
    assert [(r["movie_id"], r["source"]) for r in out["predictions"]] == [
        (3, "personalized"),
        (2, "model"),
        (1, "personalized"),
    ]
    assert out["personalized_model_version"] == "p"


def test_sources_are_written_as_given_json() -> None:
    # The caller passes JSON fragments (serving._json_text): a name needing escapes is written escaped.
    name = 'odd "name" \\ é'
    rows = _codec.rows([1], [2.0], None, orjson.dumps(name), None, b"ab")
    assert rows is not None
    assert orjson.loads(rows)["source"] == name


def test_an_empty_answer(fixed_id: str) -> None:
    assert _codec.rows([], [], None, b'"model"', None, b"ab") == b""
    assert _codec.rows([], [], [], b'"model"', [], b"ab") == b""
    assert _codec.rows([1, 2], [1.0, 2.0], [], b'"model"', None, b"ab") == b""  # top_k of nothing
    got = _assert_renders_alike(_answer([], []))
    assert orjson.loads(got)["predictions"] == []


# --- rows: declines, and the dict rendering still gives orjson's bytes ---------------------------------------------


DECLINED: list[tuple[str, list[Any], list[Any]]] = [
    ("string id first", ["m1", 2, 3], [1.0, 2.0, 3.0]),
    ("string id last", [1, 2, "m3"], [1.0, 2.0, 3.0]),
    ("bool id", [1, True, 3], [1.0, 2.0, 3.0]),
    ("False id", [False, 2], [1.0, 2.0]),
    ("rating 1e-5", [1, 2, 3], [1.0, 1e-5, 3.0]),
    ("rating 1e16", [1, 2, 3], [1.0, 2.0, 1e16]),
    ("rating 1e300", [1, 2], [1e300, 2.0]),
    ("rating -1e-7", [1, 2], [2.0, -1e-7]),
    ("rating 5e-324", [1], [5e-324]),
    ("rating None (a NaN back from the Redis cache)", [1, 2], [1.0, None]),
    ("rating int", [1, 2], [1.0, 7]),
    ("id beyond 2**63-1", [1, 2**63], [1.0, 2.0]),
    ("negative id", [1, -1], [1.0, 2.0]),
]


@pytest.mark.parametrize(("ids", "ratings"), [c[1:] for c in DECLINED], ids=[c[0] for c in DECLINED])
@pytest.mark.parametrize("ranked", [False, True])
def test_declined_answers_still_render_as_orjson_does(
    fixed_id: str, ids: list[Any], ratings: list[Any], ranked: bool
) -> None:
    order = list(reversed(range(len(ids)))) if ranked else None
    answer = _answer(ids, ratings, order=order, ranked=ranked)
    assert _codec_rows(answer) is None
    got = _assert_renders_alike(answer)
    if any(isinstance(i, bool) for i in ids):
        # A bool is an int to Python: it must stay true/false, never be written as 1/0.
        assert (b'"movie_id":true' in got) or (b'"movie_id":false' in got)


def test_a_decline_after_rows_were_written_leaves_no_trace(fixed_id: str) -> None:
    ids: list[Any] = [*range(1000), "late"]
    answer = _answer(ids, [1.5] * len(ids))
    assert _codec_rows(answer) is None
    assert _assert_renders_alike(answer).count(b'"movie_id"') == len(ids)


def test_infinity_is_written_null_as_orjson_writes_it(fixed_id: str) -> None:
    answer = _answer([1, 2, 3], [math.inf, -math.inf, math.nan])
    rows = _codec_rows(answer)
    assert rows is not None
    assert rows.count(b'"predicted_rating":null') == 3
    assert _wrapped(rows, answer) == _expected(answer)
    _assert_renders_alike(answer)


# --- rows: malformed calls raise, never crash ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (([1, 2], [1.0], None, b'"m"', None, b"p"), ValueError),  # ids and ratings of different lengths
        (([1], [1.0, 2.0], None, b'"m"', None, b"p"), ValueError),
        (([1, 2], [1.0, 2.0], [0, 2], b'"m"', None, b"p"), IndexError),  # order out of range
        (([1, 2], [1.0, 2.0], [-1], b'"m"', None, b"p"), IndexError),  # negative: not Python's "from the end"
        (([1, 2], [1.0, 2.0], [0, 2**70], b'"m"', None, b"p"), OverflowError),
        (([1, 2], [1.0, 2.0], (0, 1), b'"m"', None, b"p"), TypeError),  # order not a list
        (([1, 2], [1.0, 2.0], range(2), b'"m"', None, b"p"), TypeError),
        (([1, 2], [1.0, 2.0], [0, 1.0], b'"m"', None, b"p"), TypeError),  # an index that is not an int
        (([1, 2], [1.0, 2.0], None, b'"m"', [b'"a"'], b"p"), TypeError),  # sources of the wrong length
        (([1, 2], [1.0, 2.0], None, b'"m"', [b'"a"'] * 3, b"p"), TypeError),
        (([1, 2], [1.0, 2.0], None, b'"m"', [b'"a"', "b"], b"p"), TypeError),  # a source that is a str
        (([1, 2], [1.0, 2.0], None, b'"m"', (b'"a"', b'"b"'), b"p"), TypeError),  # sources not a list
        (([1, 2], [1.0, 2.0], None, '"m"', None, b"p"), TypeError),  # source a str
        (([1, 2], [1.0, 2.0], None, b'"m"', None, "p"), TypeError),  # prefix a str
        (((1, 2), [1.0, 2.0], None, b'"m"', None, b"p"), TypeError),  # ids not a list
        ((np.array([1, 2]), [1.0, 2.0], None, b'"m"', None, b"p"), TypeError),
        (([1, 2], (1.0, 2.0), None, b'"m"', None, b"p"), TypeError),  # ratings not a list
        (([1, 2], [1.0, 2.0], None, b'"m"', None), TypeError),  # an argument missing
    ],
)
def test_malformed_rows_calls_raise(args: tuple[Any, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        _codec.rows(*args)


def test_empty_rows_calls_do_not_check_what_they_never_read() -> None:
    # With no rows to write, a bad source is never looked at: b"" rather than an error (as orjson would not see it).
    assert _codec.rows([1], [1.0], [], b'"m"', [b'"a"'], b"p") == b""


# --- matrix: the same matrix as chain + fromiter -------------------------------------------------------------------


def _fromiter(movies: list[Any]) -> npt.NDArray[np.float64]:
    values = itertools.chain.from_iterable(map(operator.attrgetter(*FEATURE_NAMES), movies))
    return np.fromiter(values, dtype=np.float64, count=len(movies) * N_FEATURES).reshape(len(movies), N_FEATURES)


def _random_movie(rng: np.random.Generator, k: int) -> dict[str, Any]:
    movie: dict[str, Any] = {"movie_id": k if k % 3 else f"m{k}"}
    for f in FEATURES:
        if f.kind == "flag":
            bit = int(rng.integers(2))
            movie[f.name] = bool(bit) if k % 2 else bit  # true/false and 0/1
        elif f.kind == "count":
            movie[f.name] = int(rng.integers(int(f.minimum), int(f.maximum), endpoint=True))
        else:
            value = float(rng.uniform(f.minimum, f.maximum))
            # floats, bounds, and whole numbers sent as JSON integers (msgspec gives an int for those)
            movie[f.name] = [value, f.minimum, f.maximum, int(value), round(value, 1)][k % 5]
    return movie


def test_matrix_equals_the_fromiter_path_on_decoded_bodies() -> None:
    decoder = serving._BATCH_DECODER
    if decoder is None:  # pragma: no cover - msgspec is a dependency
        pytest.skip("msgspec not installed")
    rng = np.random.default_rng(11)
    seen: set[type] = set()
    for _ in range(30):
        movies = [_random_movie(rng, k) for k in range(int(rng.integers(1, 80)))]
        decoded = decoder.decode(orjson.dumps({"movies": movies})).movies
        seen.update(type(getattr(m, name)) for m in decoded for name in FEATURE_NAMES)
        x = np.full((len(decoded), N_FEATURES), -7.0)
        assert _codec.matrix(decoded, FEATURE_NAMES, x) is True
        expected = _fromiter(decoded)
        assert x.tobytes() == expected.tobytes()  # bit for bit
        assert x.tolist() == [[float(m[name]) for name in FEATURE_NAMES] for m in movies]
    assert seen == {bool, int, float}  # every kind of value the decoder gives went through the C loop


def test_matrix_values_at_the_edges() -> None:
    movies = [
        types.SimpleNamespace(a=True, b=False, c=0, d=-0.0, e=2**53 + 1, f=10**300),
        types.SimpleNamespace(a=1e-320, b=math.inf, c=-5, d=math.nan, e=1.5, f=2**63 - 1),
    ]
    names = ("a", "b", "c", "d", "e", "f")
    x = np.empty((2, 6))
    assert _codec.matrix(movies, names, x) is True
    values = itertools.chain.from_iterable(map(operator.attrgetter(*names), movies))
    expected = np.fromiter(values, dtype=np.float64, count=12).reshape(2, 6)
    assert x.tobytes() == expected.tobytes()
    assert _codec.matrix([], names, np.empty((0, 6))) is True


@pytest.mark.parametrize("odd", ["7.5", b"7.5", None, np.float64(7.5), np.int64(7), [7.5], 7 + 0j])
def test_matrix_declines_values_that_are_not_int_bool_or_float(odd: Any) -> None:
    good = types.SimpleNamespace(**EXAMPLE)
    bad = types.SimpleNamespace(**{**EXAMPLE, "popularity": odd})
    x = np.zeros((2, N_FEATURES))
    assert _codec.matrix([good, bad], FEATURE_NAMES, x) is False


def test_matrix_errors() -> None:
    good = types.SimpleNamespace(**EXAMPLE)
    with pytest.raises(ValueError, match="out must hold"):
        _codec.matrix([good], FEATURE_NAMES, np.zeros((2, N_FEATURES)))
    with pytest.raises(ValueError, match="out must hold"):
        _codec.matrix([good, good], FEATURE_NAMES, np.zeros((1, N_FEATURES)))
    missing = types.SimpleNamespace(**{k: v for k, v in EXAMPLE.items() if k != "vote_count"})
    with pytest.raises(AttributeError, match="vote_count"):
        _codec.matrix([good, missing], FEATURE_NAMES, np.zeros((2, N_FEATURES)))
    with pytest.raises(TypeError):
        _codec.matrix((good,), FEATURE_NAMES, np.zeros((1, N_FEATURES)))  # movies not a list
    with pytest.raises(TypeError):
        _codec.matrix([good], list(FEATURE_NAMES), np.zeros((1, N_FEATURES)))  # names not a tuple
    read_only = np.zeros((1, N_FEATURES))
    read_only.flags.writeable = False
    with pytest.raises(TypeError):
        _codec.matrix([good], FEATURE_NAMES, read_only)
    assert not read_only.any()
    with pytest.raises(TypeError):
        _codec.matrix([good], FEATURE_NAMES, b"\0" * (8 * N_FEATURES))  # bytes are read-only
    with pytest.raises(TypeError):
        _codec.matrix([good], FEATURE_NAMES, np.zeros((2, 2 * N_FEATURES))[:1, ::2])  # not contiguous
    with pytest.raises(OverflowError):
        _codec.matrix([types.SimpleNamespace(**{**EXAMPLE, "vote_count": 10**400})], FEATURE_NAMES, np.zeros(6))


def test_matrix_survives_a_getter_that_mutates_the_list() -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from moviematch_ml import _codec

        movies = []

        class Movie:
            @property
            def a(self):
                movies.clear()
                return 1.0

        movies.extend(Movie() for _ in range(1000))
        try:
            _codec.matrix(movies, ("a", "a"), np.zeros(2000))
        except Exception:
            pass
        print("survived")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "survived"), done.stderr[-500:]


# --- end to end ----------------------------------------------------------------------------------------------------


class _HalfKnows:
    """A personaliser that answers the movies with an even id (mixed per-row sources)."""

    version = "personal-e2e"

    def __call__(self, user_id: Any, movie_ids: Any, x: npt.NDArray[np.float64]) -> Any:
        known = np.array([isinstance(i, int) and i % 2 == 0 for i in movie_ids])
        return np.round(np.linspace(0.5, 5.0, x.shape[0]), 2), known


@pytest.mark.parametrize(
    "envelope",
    [{}, {"rank": True}, {"top_k": 10}, {"user_id": 7}, {"user_id": 7, "top_k": 999}],
    ids=["request-order", "ranked", "top-k", "personalised", "personalised-top-k"],
)
def test_a_1000_movie_batch_renders_as_the_dicts(
    fixed_id: str, tmp_path: Path, tiny_model_dir: Path, envelope: dict[str, Any]
) -> None:
    holder = ModelHolder(Settings(model_path=tiny_model_dir))
    holder.load()
    assert holder.active.source != "fallback"
    service = PredictionService(holder, max_batch_size=1000, personalizer=_HalfKnows())
    rng = np.random.default_rng(3)
    movies = [_random_movie(rng, k) for k in range(1000)]
    for k, movie in enumerate(movies):
        movie["movie_id"] = int(rng.integers(0, MAX_ID, endpoint=True)) if k else MAX_ID
    body = orjson.dumps({"movies": movies, **envelope})

    got = service.predict_batch(body)
    answer = service._predict_batch(body)
    expected = serving._render_batch_dicts(answer, BATCH_ID, _tail(answer))
    assert got == expected  # byte for byte: the C rows were used and wrote what orjson writes
    assert _codec_rows(answer) is not None

    out, reference = orjson.loads(got), orjson.loads(expected)
    assert out == reference
    count = min(envelope.get("top_k", 1000), 1000)
    assert out["count"] == len(out["predictions"]) == count
    assert out["ranked"] == ("rank" in envelope or "top_k" in envelope)
    by_id = {m["movie_id"]: m for m in movies}
    assert all(p["movie_id"] in by_id for p in out["predictions"])
    if out["ranked"]:
        ratings = [p["predicted_rating"] for p in out["predictions"]]
        assert ratings == sorted(ratings, reverse=True)
    else:
        assert [p["movie_id"] for p in out["predictions"]] == [m["movie_id"] for m in movies]
    if "user_id" in envelope:
        assert out["personalized_model_version"] == "personal-e2e"
        assert {p["source"] for p in out["predictions"]} == {"personalized", holder.active.source}
        assert all((p["source"] == "personalized") == (p["movie_id"] % 2 == 0) for p in out["predictions"])
    else:
        assert "personalized_model_version" not in out


# --- positions: a batch's ids looked up in a model's id -> position dict ------------------------------------------


def _positions(
    keys: list[Any], index: dict[Any, int], default: int, dense: Any = None, *, complete: bool = False
) -> tuple[list[int], int]:
    out = np.full(len(keys), 12345, dtype=np.int64)
    not_int = _codec.positions(keys, index, default, out, dense, complete)
    return out.tolist(), not_int


def test_positions_is_dict_get_with_a_default() -> None:
    index: dict[Any, int] = {7: 0, 11: 1, "abc": 2, 2**70: 3}
    keys: list[Any] = [11, 7, 8, "abc", "7", None, 2**70, -7, 11]
    assert _positions(keys, index, -1) == ([1, 0, -1, 2, -1, -1, 3, -1, 1], 3)  # "abc", "7" and None: not ints
    assert _positions(keys, index, 99)[0][2] == 99
    assert _positions([], index, -1) == ([], 0)


def test_positions_with_a_dense_array_gives_the_same_answers() -> None:
    index: dict[Any, int] = {0: 4, 3: 0, 5: 2, 9: 1, "x": 3, 1000: 5}
    dense = np.array([4, -1, -1, 0, -1, 2, -1, -1, -1, 1], dtype=np.int32)  # ids 0..9 only: 1000 is not in it
    keys: list[Any] = [3, 4, 9, 0, 1000, 10, -1, "x", 5, 3, True]
    # A True key is not an int key of the dense array: the dict finds it as 1 (== True), which is not there.
    expected = ([0, -1, 1, 4, 5, -1, -1, 3, 2, 0, -1], 2)
    assert _positions(keys, index, -1, dense) == expected
    assert _positions(keys, index, -1) == expected


def test_positions_with_a_complete_dense_array_answers_ids_past_its_end_with_the_default() -> None:
    # Every non-negative int key of the index is in the array: 10, 1000 and 2**70 are not keys, -1 and 5 are.
    index: dict[Any, int] = {0: 4, 3: 0, 5: 2, 9: 1, "x": 3, -1: 6}
    dense = np.array([4, -1, -1, 0, -1, 2, -1, -1, -1, 1], dtype=np.int32)
    keys: list[Any] = [3, 10, 1000, 2**70, -1, -(2**70), "x", 5, 9]
    expected = ([0, 7, 7, 7, 6, 7, 3, 2, 1], 1)
    assert _positions(keys, index, 7, dense, complete=True) == expected
    assert _positions(keys, index, 7, dense) == expected
    assert _positions(keys, index, 7) == expected


def test_positions_refuses_malformed_calls() -> None:
    with pytest.raises(ValueError, match="len\\(keys\\) int64"):
        _codec.positions([1, 2], {1: 0}, -1, np.empty(3, dtype=np.int64))
    with pytest.raises(ValueError, match="int32"):
        _codec.positions([1], {1: 0}, -1, np.empty(1, dtype=np.int64), b"abc")
    with pytest.raises(TypeError, match="ints"):
        _codec.positions([1], {1: "zero"}, -1, np.empty(1, dtype=np.int64))
    with pytest.raises(TypeError, match="unhashable"):
        _codec.positions([[1]], {1: 0}, -1, np.empty(1, dtype=np.int64))
    with pytest.raises(TypeError):
        _codec.positions((1,), {1: 0}, -1, np.empty(1, dtype=np.int64))  # a tuple, not a list


def test_positions_survives_a_key_that_empties_the_list() -> None:
    keys: list[Any] = []

    class Nasty:
        def __hash__(self) -> int:
            keys.clear()
            return 1

        def __eq__(self, other: object) -> bool:
            return False

    keys.extend([Nasty(), 1, 2])
    with pytest.raises(RuntimeError, match="changed size"):
        _codec.positions(keys, {1: 0}, -1, np.empty(3, dtype=np.int64))


# --- user_rows: the personalised model's input matrix of one user's batch -----------------------------------------


def _user_rows_args(rows: list[int]) -> dict[str, Any]:
    # 3 six-feature-like inputs, a 10-column row: x at 0-2, movie inputs at 3-6, score 7, dot 8, user input 9.
    return {
        "rows": np.array(rows, dtype=np.int64),
        "x6": np.arange(len(rows) * 3, dtype=np.float64).reshape(len(rows), 3),
        "table": np.array(
            [
                [10.0, 3.5, 1.0, 0.25],
                [2.0, 4.0, 0.5, -0.5],
                [1.0, 2.0, 0.0, math.nan],
                [0.0, math.nan, math.nan, math.nan],
            ]
        ),
        "factors": np.array([[1.0, 2.0], [0.5, -1.0]]),  # movies 0 and 1 are the model's
        "user_factors": np.array([0.25, 2.0]),
        "template": np.array([-1.0] * 9 + [42.0]),
        "n_known": 2,
    }


def _user_rows(a: dict[str, Any]) -> npt.NDArray[np.float64]:
    out = np.full((len(a["rows"]), len(a["template"])), -7.0)
    _codec.user_rows(
        a["rows"], a["x6"], a["table"], a["factors"], a["user_factors"], a["template"], out, a["n_known"], 3, 7, 8, 3.0
    )
    return out


def test_user_rows_writes_each_movies_inputs_by_hand() -> None:
    out = _user_rows(_user_rows_args([1, 0, 2, 3]))
    nan = math.nan
    expected = np.array(
        [
            # movie 1: dot = 0.5 * 0.25 + -1 * 2 = -1.875; score = (3 + -0.5) + -1.875 = 0.625
            [0.0, 1.0, 2.0, 2.0, 4.0, 0.5, -0.5, 0.625, -1.875, 42.0],
            # movie 0: dot = 0.25 + 4 = 4.25; score = (3 + 0.25) + 4.25 = 7.5
            [3.0, 4.0, 5.0, 10.0, 3.5, 1.0, 0.25, 7.5, 4.25, 42.0],
            # a rated movie the model does not know, and the last row (nobody's): no factors, so NaN
            [6.0, 7.0, 8.0, 1.0, 2.0, 0.0, nan, nan, nan, 42.0],
            [9.0, 10.0, 11.0, 0.0, nan, nan, nan, nan, nan, 42.0],
        ]
    )
    np.testing.assert_array_equal(out, expected)


def test_user_rows_refuses_rows_outside_the_table_and_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="outside the table"):
        _user_rows(_user_rows_args([0, 4]))
    with pytest.raises(ValueError, match="outside the table"):
        _user_rows(_user_rows_args([-1]))
    bad = _user_rows_args([0, 1])
    bad["factors"] = np.ones((3, 2))  # three movies of factors, two known
    with pytest.raises(ValueError, match="inconsistent"):
        _user_rows(bad)
    bad = _user_rows_args([0, 1])
    out = np.empty((2, 9))
    with pytest.raises(ValueError, match="inconsistent"):
        _codec.user_rows(
            bad["rows"],
            bad["x6"],
            bad["table"],
            bad["factors"],
            bad["user_factors"],
            bad["template"],
            out,
            2,
            3,
            7,
            8,
            0.0,
        )
    assert _user_rows(_user_rows_args([])).shape == (0, 10)


# --- view_data: a user's view, the fold-in solved by Cholesky -----------------------------------------------------


def _fold_in(factors: Any, cols: list[int], resid: list[float], reg_f: float, reg_b: float, damp: float) -> Any:
    """w of view_data for ratings of known movies whose residuals are ``resid`` (mu 0, biases 0)."""
    got = _codec.view_data(
        factors, factors.shape[1], np.zeros(len(factors)), 0.0, cols, resid, [1.0] * len(cols), reg_f, reg_b, damp, 10
    )
    return None if got is None else np.frombuffer(got[0])[3 : 4 + factors.shape[1]]


def test_the_fold_in_by_hand() -> None:
    # One factor, two movies: q = 1 and q = -2, residuals 1 and 3; reg_factors 0.5, reg_bias 0, damping 1.
    # A = [[2, -1], [-1, 5]] + diag(0 * 2 + 1, 0.5 * 2) = [[3, -1], [-1, 6]]; b = [1 + 3, 1 - 6] = [4, -5].
    # w = A^-1 b = [6 * 4 + 1 * -5, 1 * 4 + 3 * -5] / 17 = [19/17, -11/17].
    factors = np.array([[1.0], [-2.0], [7.0]])
    w = _fold_in(factors, [0, 1], [1.0, 3.0], 0.5, 0.0, 1.0)
    assert w is not None
    np.testing.assert_allclose(w, [19 / 17, -11 / 17], rtol=1e-15)


def test_the_fold_in_matches_numpy_and_declines_what_is_not_positive_definite() -> None:
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(50, 16))
    for m in (1, 3, 40):
        cols = rng.integers(0, 50, m).tolist()
        resid = rng.normal(size=m).tolist()
        x = np.hstack([np.ones((m, 1)), factors[cols]])
        a = x.T @ x + np.diag([0.1 * m + 5.0] + [0.2 * m] * 16)
        w = _fold_in(factors, cols, resid, 0.2, 0.1, 5.0)
        assert w is not None
        np.testing.assert_allclose(w, np.linalg.solve(a, x.T @ np.array(resid)), rtol=1e-10, atol=1e-12)
    assert _fold_in(factors, [1], [1.0], 0.0, 0.0, 0.0) is None  # no ridge: singular, numpy's to report
    with pytest.raises(ValueError, match="outside"):
        _fold_in(factors, [50], [1.0], 0.2, 0.0, 5.0)
    with pytest.raises(TypeError):
        _fold_in(factors, [1.5], [1.0], 0.2, 0.0, 5.0)  # type: ignore[list-item]


def test_view_data_by_hand() -> None:
    # One factor; movies 0 (q = 1, bias 0.5) and 1 (q = -2, bias -1); mu = 3. Ratings: movie 1 at t = 5, an unknown
    # movie at t = 2, movie 0 at t = 5 (same time: arrival order), recent = 2.
    factors = np.array([[1.0], [-2.0]])
    bias = np.array([0.5, -1.0])
    got = _codec.view_data(factors, 1, bias, 3.0, [1, -1, 0], [4.0, 2.0, 4.5], [5.0, 2.0, 5.0], 0.5, 0.0, 1.0, 2)
    assert got is not None
    raw, n_recent = got
    assert n_recent == 2
    data = np.frombuffer(raw)
    # residuals: 4 - 3 + 1 = 2, 2 - 3 = -1 (unknown), 4.5 - 3 - 0.5 = 1
    # fold-in over the known two: A = [[2, -1], [-1, 5]] + diag(1, 1) = [[3, -1], [-1, 6]], b = [3, -3]
    # w = [6 * 3 + 1 * -3, 1 * 3 + 3 * -3] / 17 = [15/17, -6/17]
    mean = (4.0 + 2.0 + 4.5) / 3
    spread = math.sqrt((16.0 + 4.0 + 20.25) / 3 - mean * mean)
    np.testing.assert_allclose(data[:5], [3.0, mean, spread, 15 / 17, -6 / 17], rtol=1e-15)
    assert np.isnan(data[5:7]).all()  # the tail's means: the caller's
    assert data[7:].tolist() == [5.0, 5.0, 2.0, 1.0]  # the two latest, by time then arrival: movie 1, movie 0


def test_view_data_refuses_bad_input_and_declines_a_singular_system() -> None:
    factors = np.array([[1.0], [-2.0]])
    bias = np.array([0.5, -1.0])
    assert _codec.view_data(factors, 1, bias, 3.0, [0], [4.0], [1.0], 0.0, 0.0, 0.0, 10) is None  # no ridge
    assert _codec.view_data(factors, 1, bias, 3.0, [-1], [4.0], [1.0], 0.0, 0.0, 0.0, 10) is not None  # no fold-in
    with pytest.raises(ValueError, match="outside"):
        _codec.view_data(factors, 1, bias, 3.0, [2], [4.0], [1.0], 0.5, 0.0, 1.0, 10)
    with pytest.raises(ValueError, match="inconsistent"):
        _codec.view_data(factors, 1, bias, 3.0, [0, 1], [4.0], [1.0, 2.0], 0.5, 0.0, 1.0, 10)
    with pytest.raises(ValueError, match="inconsistent"):
        _codec.view_data(factors, 2, bias, 3.0, [0], [4.0], [1.0], 0.5, 0.0, 1.0, 10)  # factors are (2, 1)
    with pytest.raises(ValueError, match="inconsistent"):
        _codec.view_data(factors, 1, bias, 3.0, [], [], [], 0.5, 0.0, 1.0, 10)  # no rating
    with pytest.raises(TypeError):
        _codec.view_data(factors, 1, bias, 3.0, [0], ["4"], [1.0], 0.5, 0.0, 1.0, 10)
