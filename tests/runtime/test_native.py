"""Every C kernel of ``runtime/native.py`` gives what its Python twin gives, and refuses malformed calls.

=========================  ==============================================
kernel                     held to
=========================  ==============================================
``Forest``                 ``TreeEnsemble(native=False)`` and LightGBM
``codec.rows``             ``native.rows_py`` and orjson, byte for byte
``codec.matrix``           ``native.matrix_py``, bit for bit
``codec.positions``        ``native.positions_py``
``codec.user_rows``        ``inputs.model_inputs``
``codec.view_data``        ``native.view_data_py`` and numpy's solve
=========================  ==============================================

The compiled tree evaluator is held to LightGBM and to numpy on 16-, 32- and 64-bit masks, on values sitting exactly
on split thresholds, on NaN (learnt default sides and NaN-read-as-0), on LightGBM's zero threshold, on batches whose
constant columns the C code folds into the starting masks, and from several threads at once. A kernel's tests are
skipped when its extension is not built (the twin then does the work); one end-to-end test holds a 1,000-movie
/predict-batch answer to orjson's bytes.
"""

from __future__ import annotations

import asyncio
import functools
import math
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightgbm as lgb
import msgspec
import numpy as np
import numpy.typing as npt
import orjson
import pytest

from conftest import tiny_training_data
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES, FEATURES, id_msgspec_type
from moviematch_ml.online import service as service_module
from moviematch_ml.online.models import ModelSet
from moviematch_ml.online.service import PredictionService
from moviematch_ml.online.user_views import UserViews
from moviematch_ml.runtime import native
from moviematch_ml.runtime.inputs import MODEL_FEATURES, ROW_COLUMNS, ROW_INPUTS, model_inputs, user_template
from moviematch_ml.runtime.personalized import PersonalizedModel
from moviematch_ml.runtime.trees import TreeEnsemble, full_rows

needs_forest = pytest.mark.skipif(native.Forest is None, reason="the _trees extension is not built")
needs_codec = pytest.mark.skipif(native.codec is None, reason="the _codec extension is not built")
RUNTIMES = [pytest.param(True, id="native", marks=needs_forest), pytest.param(False, id="numpy")]

N_FEATURES = len(FEATURE_NAMES)
# LightGBM's kZeroThreshold is the float 1e-35f: |x| <= 1.0000000180025095e-35 reads as 0. Both evaluators use the
# same widened constant; values in (1e-35, 1.0000000180025095e-35] are the edge (test_the_zero_threshold_is_1e35f).
LIGHTGBM_ZERO = float(np.float32(1e-35))
Array = npt.NDArray[np.float64]


# --- Forest: the compiled tree evaluator ----------------------------------------------------------------------------


def _data(n: int, *, with_nan: bool, seed: int) -> tuple[Array, Array]:
    """tiny_training_data with a feature that goes negative (so a NaN read as 0 lands on both sides of its
    thresholds) and, with_nan, NaN in three features (so splits learn a default side for it)."""
    x, y = tiny_training_data(n, seed=seed)
    x = x.copy()
    x[:, 4] -= 30.0
    y = y + 0.03 * x[:, 4] + 0.002 * x[:, 5]
    if with_nan:
        rng = np.random.default_rng(seed + 100)
        for j in (1, 4, 5):
            x[rng.random(n) < 0.2, j] = np.nan
        y = np.where(np.isnan(x[:, 1]), 4.5, y)  # NaN in vote_average predicts high: its side matters
    return x, y


@functools.cache
def _model(num_leaves: int, with_nan: bool) -> str:
    """LightGBM text of a small regression model (trained once per test session)."""
    x, y = _data(3000, with_nan=with_nan, seed=0)
    params = {
        "objective": "regression",
        "num_leaves": num_leaves,
        "min_data_in_leaf": 3,
        "learning_rate": 0.1,
        "seed": 0,
        "deterministic": True,
        "num_threads": 1,
        "verbose": -1,
    }
    booster = lgb.train(params, lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES)), 15)
    text: str = booster.model_to_string()
    return text


def _pair(text: str, n_features: int = N_FEATURES) -> tuple[TreeEnsemble, TreeEnsemble]:
    """The compiled evaluator and its numpy twin of one model."""
    compiled = TreeEnsemble.from_lightgbm_text(text, n_features)
    numpy_evaluator = TreeEnsemble.from_lightgbm_text(text, n_features, native=False)
    assert compiled.runtime == "native"
    assert numpy_evaluator.runtime == "numpy"
    return compiled, numpy_evaluator


def _lightgbm(text: str, x: Array) -> Array:
    return np.asarray(lgb.Booster(model_str=text).predict(x, num_threads=1), dtype=np.float64)


def _random_rows(n: int, seed: int) -> Array:
    x, _ = _data(max(n, 8), with_nan=False, seed=seed)
    x[:4] = np.array([np.inf, -np.inf, 0.0, -0.0])[:, None]  # extremes and signed zero in every feature
    x[4:8] = np.array([1e-36, -1e-36, 1e-300, -1e-300])[:, None]  # read as 0 by LightGBM
    return x[:n]


def _threshold_rows(ensemble: TreeEnsemble, seed: int) -> Array:
    """Each feature's every split threshold exactly (x == threshold goes left), and the doubles either side."""
    parts = []
    for j, thresholds in enumerate(ensemble.thresholds):
        for value in (thresholds, np.nextafter(thresholds, np.inf), np.nextafter(thresholds, -np.inf)):
            value = value[~((np.abs(value) > 1e-35) & (np.abs(value) <= LIGHTGBM_ZERO))]  # see LIGHTGBM_ZERO
            x = _random_rows(len(value), seed + j)
            x[:, j] = value
            parts.append(x)
    return np.vstack(parts)


def _nan_rows(seed: int) -> Array:
    rng = np.random.default_rng(seed)
    x = _random_rows(600, seed)
    clean = x[100:164].copy()
    x[rng.random(x.shape) < 0.3] = np.nan
    # Every NaN pattern over the six features, the other cells ordinary values.
    x[:64] = np.where([[(k >> j) & 1 for j in range(N_FEATURES)] for k in range(64)], np.nan, clean)
    return x


def _forest_args(ensemble: TreeEnsemble) -> dict[str, Any]:
    """The arrays TreeEnsemble hands to Forest (trees.py), by keyword."""
    return {
        "thresholds": np.concatenate([*ensemble.thresholds, np.empty(0)]).astype(np.float64),
        "thr_starts": np.cumsum([0] + [len(t) for t in ensemble.thresholds], dtype=np.int64),
        "tables": ensemble.forest_tables,
        "table_starts": np.cumsum([0] + [len(t) for t in ensemble.tables[:-1]], dtype=np.int64),
        "leaf_values": np.ascontiguousarray(ensemble.leaf_values, dtype=np.float64),
        "n_trees": ensemble.n_trees,
    }


def _forest(ensemble: TreeEnsemble) -> Any:
    """A Forest of the ensemble's own arrays (what its compiled runtime calls)."""
    return native.Forest(**_forest_args(ensemble))


@needs_forest
@pytest.mark.parametrize("with_nan", [False, True], ids=["clean-model", "nan-model"])
@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
@pytest.mark.parametrize("rows", ["random", "thresholds", "nan"])
def test_forest_matches_lightgbm_and_numpy(num_leaves: int, with_nan: bool, rows: str) -> None:
    text = _model(num_leaves, with_nan)
    compiled, numpy_evaluator = _pair(text)
    # The model really has the shape this case is about.
    if num_leaves == 16:
        assert compiled.width == 16  # the top bit of a 16-bit mask (the C evaluator's, for up to 16 leaves) is a leaf
        assert compiled.forest_tables.dtype == np.uint16
        assert compiled.tables[0].dtype == np.uint32  # numpy's own tables stay 32-bit
    elif num_leaves == 32:
        assert compiled.width == 32  # the top bit of a 32-bit mask is a leaf
        assert compiled.tables[0].dtype == np.uint32
        assert compiled.forest_tables.dtype == np.uint32
    else:
        assert 32 < compiled.width <= 64
        assert compiled.tables[0].dtype == np.uint64
    decisions = {int(d) for line in text.splitlines() if line.startswith("decision_type=") for d in line[14:].split()}
    if with_nan:
        assert any((d >> 2) & 3 == 2 for d in decisions)  # NaN-as-missing splits, with a learnt default side
    else:
        assert all((d >> 2) & 3 == 0 for d in decisions)  # NaN is read as 0 ...
        assert (compiled.thresholds[4] < 0).any()  # ... and 0 is on both sides of this feature's thresholds
        assert (compiled.thresholds[4] > 0).any()

    if rows == "random":
        x = _random_rows(1000, seed=11)
    elif rows == "thresholds":
        x = _threshold_rows(compiled, seed=12)
    else:
        x = _nan_rows(seed=13)
    got = compiled.predict_raw(x)
    assert got.shape == (len(x),)
    assert len(np.unique(got)) > 20  # the rows reach many different leaves
    np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12)
    # One row at a time (predict_row: a batch of one, nothing folded) adds the same leaves in the same order.
    singles = np.array([compiled.predict_value(row) for row in x.tolist()])
    np.testing.assert_array_equal(singles, got)


def _constant_column_batches(ensemble: TreeEnsemble) -> dict[str, Array]:
    rng = np.random.default_rng(21)
    base = _random_rows(300, seed=21)
    base[rng.random(base.shape) < 0.1] = np.nan
    batches: dict[str, Array] = {}
    x = base.copy()
    x[:, 0] = ensemble.thresholds[0][len(ensemble.thresholds[0]) // 2]  # exactly on a threshold
    x[:, 3] = 1.0
    x[:, 5] = np.nan  # a column all NaN: folded as the NaN row
    batches["some-constant"] = x
    x = base.copy()
    x[:, 4] = np.where(np.arange(len(x)) % 2, 0.0, -0.0)  # equal as numbers: folded
    x[:, 1] = 1e-36  # folded, and read as 0
    x[:, 2] = x[0, 2]
    batches["zeros"] = x
    x = base.copy()
    x[:, :5] = base[7, :5]  # only one column varies
    batches["one-varies"] = x
    x = np.repeat(base[3:4], 50, axis=0)  # every row the same: every column folded
    batches["all-constant"] = x
    x = np.full((40, N_FEATURES), np.nan)
    batches["all-nan"] = x
    x = base[:100].copy()
    x[:, 2] = 5.0
    x[-1, 2] = np.nan  # constant but for one NaN: not folded
    x[:, 3] = np.nan
    x[0, 3] = 1.0  # NaN but for one row: not folded
    batches["almost-constant"] = x
    return batches


@needs_forest
@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
def test_constant_columns_give_the_one_row_answers(num_leaves: int) -> None:
    text = _model(num_leaves, True)
    compiled, numpy_evaluator = _pair(text)
    for name, x in _constant_column_batches(compiled).items():
        got = compiled.predict_raw(x)
        singles = np.array([compiled.predict_value(row.tolist()) for row in x])
        np.testing.assert_array_equal(got, singles, err_msg=name)
        np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12, err_msg=name)


@needs_forest
@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
def test_values_repeated_from_the_row_before_give_the_one_row_answers(num_leaves: int) -> None:
    # Rows that repeat the row before in some columns start from the masks kept for those columns (the C code
    # orders the varying columns by how often they repeat): blocks of rows sharing columns 0-2 (NaN included),
    # rows repeated whole, and a block boundary in every column, must give each row's own answer.
    text = _model(num_leaves, True)
    compiled, numpy_evaluator = _pair(text)
    rng = np.random.default_rng(17)
    x = _random_rows(300, seed=19)
    for start in range(0, 300, 7):
        x[start : start + 5, :3] = x[start, :3]  # a block sharing its first three columns
    x[40:50, 1] = np.nan
    x[100:104] = x[100]  # identical rows
    x[200:260:2, 4] = x[201:261:2, 4]  # pairs equal in one column only
    x = x[:, rng.permutation(N_FEATURES)]  # whichever columns repeat, not only the first ones
    got = compiled.predict_raw(x)
    singles = np.array([compiled.predict_value(row.tolist()) for row in x])
    np.testing.assert_array_equal(got, singles)
    np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12)


@functools.cache
def _wide_model() -> str:
    """A 20-input model with 31-leaf trees, as wide as the personalised one: 14 inputs that vary per row
    (several passes of the fused tail), the others constant or repeated in blocks (the memo)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4000, 20))
    x[rng.random(x.shape) < 0.05] = np.nan
    y = np.nansum(x[:, :8] * np.arange(1, 9), axis=1) + np.nan_to_num(x[:, 8] * x[:, 9]) + rng.normal(size=4000)
    params = {"objective": "regression", "num_leaves": 31, "min_data_in_leaf": 5, "seed": 0, "verbose": -1}
    text: str = lgb.train({**params, "num_threads": 1}, lgb.Dataset(x, y), 40).model_to_string()
    return text


@needs_forest
@pytest.mark.parametrize("n", [1, 3, 4, 5, 203])
def test_a_wide_model_with_memo_tail_and_repeats_gives_the_one_row_answers(n: int) -> None:
    # One user's batch: 4 columns constant (folded), 6 shared by runs of rows (movies the model does not know
    # share their inputs: the memo), 10 varying (the tail: ANDed four table rows a pass), whole rows repeated, and
    # a row count that leaves rows over after the four-at-a-time sums.
    text = _wide_model()
    compiled, numpy_evaluator = _pair(text, 20)
    rng = np.random.default_rng(23)
    x = rng.normal(size=(210, 20))
    x[rng.random(x.shape) < 0.05] = np.nan
    x[:, 16:] = x[0, 16:]
    for start in range(0, 210, 9):
        x[start : start + 7, 10:16] = x[start, 10:16]
    x[2:4] = x[1]  # identical rows (a copied answer)
    x[150:160] = x[149]  # a run of them across a group of four
    x = x[:n]
    got = compiled.predict_raw(x)
    singles = np.array([compiled.predict_value(row.tolist()) for row in x])
    np.testing.assert_array_equal(got, singles)
    np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12)


@needs_forest
@pytest.mark.parametrize("n_inputs", [7, 65])
def test_constant_and_repeated_columns_are_found_whatever_the_number_of_inputs(n_inputs: int) -> None:
    # The repeat count compares two columns at a time where it can: an odd last column, and models too wide for
    # that (more than 64 inputs), are counted one by one. A constant column (one of them NaN, one the last) is
    # folded once; a column that is constant but for one row (the second, the last) must not be.
    rng = np.random.default_rng(n_inputs)
    train = rng.normal(size=(3000, n_inputs))
    train[rng.random(train.shape) < 0.05] = np.nan
    y = np.nansum(train * np.linspace(1, 2, n_inputs), axis=1) + rng.normal(size=3000)
    params = {"objective": "regression", "num_leaves": 31, "min_data_in_leaf": 5, "seed": 0, "verbose": -1}
    text: str = lgb.train({**params, "num_threads": 1}, lgb.Dataset(train, y), 20).model_to_string()
    compiled, numpy_evaluator = _pair(text, n_inputs)
    x = rng.normal(size=(50, n_inputs))
    x[:, 0] = np.nan
    x[:, 3] = 0.25
    x[:, 1] = 1.5
    x[37, 1] = -1.5  # all rows equal but one
    x[:, -1] = 0.5
    x[12, -1] = -0.5  # the same in the last column
    x[:, 2] = np.repeat(rng.normal(size=10), 5)  # runs of five
    got = compiled.predict_raw(x)
    singles = np.array([compiled.predict_value(row.tolist()) for row in x])
    np.testing.assert_array_equal(got, singles)
    np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("use_native", RUNTIMES)
@pytest.mark.parametrize("n", [1, 5, 203])
def test_rows_given_as_some_columns_and_shared_values_give_the_full_rows_answers(n: int, use_native: bool) -> None:
    # A personalised batch writes only the inputs that differ between its movies; the user's are given once.
    # Columns in any order, one of them constant (folded), the absent features' shared values with a NaN among them.
    text = _wide_model()
    ensemble = TreeEnsemble.from_lightgbm_text(text, 20, native=use_native)
    rng = np.random.default_rng(29)
    full = rng.normal(size=(n, 20))
    shared = [1, 4, 6, 9, 16, 17, 18, 19]
    full[:, shared] = rng.normal(size=len(shared))
    full[:, 17] = np.nan
    full[:, 12] = 0.5  # a column of x that is the same in every row
    for start in range(0, n, 6):
        full[start : start + 4, 10:14] = full[start, 10:14]
    columns = np.array([c for c in rng.permutation(20) if c not in shared], dtype=np.int64)
    x = np.ascontiguousarray(full[:, columns])
    values = full[0].copy()
    values[columns] = 99.0  # ignored: those features are columns of x
    np.testing.assert_array_equal(full_rows(x, columns, values)[:, shared], full[:, shared])
    np.testing.assert_array_equal(ensemble.predict_raw_columns(x, columns, values), ensemble.predict_raw(full))
    np.testing.assert_allclose(ensemble.predict_raw(full), _lightgbm(text, full), rtol=0, atol=1e-12)


@needs_forest
def test_predict_refuses_columns_that_are_not_distinct_features() -> None:
    forest = _forest(TreeEnsemble.from_lightgbm_text(_wide_model(), 20))
    out = np.empty(3)
    values = np.zeros(20)
    x = np.zeros((3, 2))
    for columns, match in (
        (np.array([1, 1]), "distinct features"),
        (np.array([0, 20]), "distinct features"),
        (np.array([-1, 2]), "distinct features"),
        (np.array([0, 1, 2]), r"x must be \(n, n_features\)"),
        (np.arange(21), "1 to n_features"),
    ):
        with pytest.raises(ValueError, match=match):
            forest.predict(x, out, columns.astype(np.int64), values)
    with pytest.raises(ValueError, match="1 to n_features"):
        forest.predict(x, out, np.array([0, 1], dtype=np.int64), np.zeros(19))
    with pytest.raises(ValueError, match="go together"):
        forest.predict(x, out, np.array([0, 1], dtype=np.int64))


@needs_forest
def test_batches_of_one_and_zero_rows() -> None:
    compiled, numpy_evaluator = _pair(_model(60, True))
    x = _nan_rows(seed=31)
    for i in range(0, 200, 9):
        one = compiled.predict_raw(x[i : i + 1])
        assert one.shape == (1,)
        assert one[0] == compiled.predict_value(x[i].tolist())
        np.testing.assert_allclose(one, numpy_evaluator.predict_raw(x[i : i + 1]), rtol=0, atol=1e-12)
    empty = compiled.predict_raw(np.empty((0, N_FEATURES)))
    assert empty.shape == (0,)
    assert empty.dtype == np.float64
    assert numpy_evaluator.predict_raw(np.empty((0, N_FEATURES))).shape == (0,)
    out = np.empty(0)
    assert _forest(compiled).predict(np.empty((0, N_FEATURES)), out) is None


@pytest.mark.parametrize("use_native", RUNTIMES)
def test_the_zero_threshold_is_1e35f(use_native: bool) -> None:
    # A trained model (NaN data) with a split at -1.0000000180025095e-35 (LightGBM's bin bound for 0):
    # a value exactly on it is 0 to LightGBM (goes right), and less than the threshold to TreeEnsemble.
    text = _model(32, True)
    ensemble = TreeEnsemble.from_lightgbm_text(text, N_FEATURES, native=use_native)
    assert -LIGHTGBM_ZERO in ensemble.thresholds[4].tolist()
    x = _random_rows(200, seed=71)
    x[:, 4] = np.tile([LIGHTGBM_ZERO, -LIGHTGBM_ZERO, 1.00000001e-35, -1.00000001e-35], 50)
    np.testing.assert_allclose(ensemble.predict_raw(x), _lightgbm(text, x), rtol=0, atol=1e-12)


@needs_forest
def test_predict_value_refuses_bad_rows() -> None:
    compiled, _ = _pair(_model(32, False))
    row = [1.0, 5.0, 100.0, 0.0, 3.0, 10.0]
    assert compiled.predict_value(row) == compiled.predict_value(tuple(row))  # type: ignore[arg-type]
    for wrong in ([], row[:-1], [*row, 1.0], row * 20):
        with pytest.raises(ValueError, match=f"{len(wrong)} values for 6 features"):
            compiled.predict_value(wrong)
    for bad in ("a", None, [1.0], object()):
        with pytest.raises(TypeError):
            compiled.predict_value([*row[:3], bad, *row[4:]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list or tuple"):
        compiled.predict_value(5)  # type: ignore[arg-type]
    assert compiled.predict_value(row) == compiled.predict_raw(np.array([row]))[0]  # still fine afterwards


@needs_forest
def test_native_predict_refuses_wrong_shapes() -> None:
    compiled, _ = _pair(_model(60, False))
    forest = _forest(compiled)
    x = _random_rows(10, seed=41)
    expected = compiled.predict_raw(x)
    bad_calls: list[tuple[Any, Any]] = [
        (x, np.empty(9)),  # out too short
        (x, np.empty(11)),  # out too long
        (x[:, :5].copy(), np.empty(10)),  # too few features
        (np.hstack([x, x[:, :1]]), np.empty(10)),  # too many features
        (x, bytearray(8 * 10 - 4)),  # out not whole float64s
        (np.empty((0, N_FEATURES)), np.empty(1)),
        (x[:1], np.empty(0)),
    ]
    for args in bad_calls:
        with pytest.raises(ValueError, match=r"x must be \(n, n_features\) float64"):
            forest.predict(*args)
    with pytest.raises(ValueError, match="contiguous"):
        forest.predict(np.asfortranarray(x), np.empty(10))
    with pytest.raises(TypeError, match="read-write bytes-like"):  # w*: the message does not say "contiguous"
        forest.predict(x, np.empty(20)[::2])
    readonly = np.empty(10)
    readonly.flags.writeable = False
    with pytest.raises(TypeError):
        forest.predict(x, readonly)
    with pytest.raises(TypeError):
        forest.predict(x.tolist(), np.empty(10))
    with pytest.raises(TypeError):
        forest.predict(x)
    # predict_raw itself: a matrix with the wrong number of columns is refused, not read past its end.
    with pytest.raises(ValueError, match="n_features"):
        compiled.predict_raw(x[:, :5])
    out = np.empty(10)
    forest.predict(x, out)
    np.testing.assert_array_equal(out, expected)


def _i64(values: Any) -> npt.NDArray[np.int64]:
    return np.asarray(values, dtype=np.int64)


_BREAKS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "zero trees": (lambda a: {**a, "n_trees": 0}, "no trees or no features"),
    "negative trees": (lambda a: {**a, "n_trees": -3}, "no trees or no features"),
    "no features": (
        lambda a: {**a, "table_starts": _i64([]), "thr_starts": _i64([0]), "thresholds": np.empty(0)},
        "no trees or no features",
    ),
    "thr_starts too short": (lambda a: {**a, "thr_starts": a["thr_starts"][:-1]}, "n_features \\+ 1"),
    "thr_starts too long": (lambda a: {**a, "thr_starts": _i64([*a["thr_starts"], a["thr_starts"][-1]])}, r"\+ 1"),
    "thr_starts short of the thresholds": (
        lambda a: {**a, "thr_starts": _i64([*a["thr_starts"][:-1], a["thr_starts"][-1] - 1])},
        "cover the thresholds",
    ),
    "thr_starts past the thresholds": (
        lambda a: {**a, "thresholds": a["thresholds"][:-1]},
        "cover the thresholds",
    ),
    "thr_starts not from 0": (lambda a: {**a, "thr_starts": a["thr_starts"] + 1}, "cover the thresholds"),
    "thr_starts decreasing": (
        lambda a: {**a, "thr_starts": _i64([0, a["thr_starts"][-1], *([0] * (N_FEATURES - 2)), a["thr_starts"][-1]])},
        "decrease|outside",
    ),
    "table_starts past the tables": (
        lambda a: {**a, "table_starts": _i64([*a["table_starts"][:-1], a["table_starts"][-1] + 1])},
        "outside tables",
    ),
    "table_starts far past the tables": (
        lambda a: {**a, "table_starts": a["table_starts"] + 10**12},
        "outside tables",
    ),
    "negative table_starts": (lambda a: {**a, "table_starts": a["table_starts"] - 1}, "outside tables"),
    "tables cut short": (lambda a: {**a, "tables": a["tables"][:-1]}, "outside tables"),
    "tables not whole masks": (lambda a: {**a, "tables": a["tables"].tobytes()[:-1]}, r"\(rows, n_trees\)"),
    "leaf_values not n_trees * width": (lambda a: {**a, "leaf_values": a["leaf_values"][:-1]}, "n_trees \\* width"),
    "more than 64 leaves": (
        lambda a: {**a, "leaf_values": np.zeros(65 * a["n_trees"])},
        "1 to 64 leaves",
    ),
    "no leaves": (lambda a: {**a, "leaf_values": np.empty(0)}, "1 to 64 leaves"),
}


@needs_forest
@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
@pytest.mark.parametrize("case", list(_BREAKS))
def test_forest_refuses_inconsistent_arrays(num_leaves: int, case: str) -> None:
    ensemble = TreeEnsemble.from_lightgbm_text(_model(num_leaves, False), N_FEATURES)
    good = _forest_args(ensemble)
    forest = native.Forest(**good)  # the unbroken arrays are accepted and give the ensemble's answers
    x = _random_rows(50, seed=51)
    out = np.empty(50)
    forest.predict(x, out)
    np.testing.assert_array_equal(out, ensemble.predict_raw(x))
    with pytest.raises(RuntimeError, match="already initialised"):
        forest.__init__(**good)
    with pytest.raises(RuntimeError, match="not initialised"):
        native.Forest.__new__(native.Forest).predict_row([0.0] * N_FEATURES)
    breaks, message = _BREAKS[case]
    with pytest.raises(ValueError, match=f"^Forest: .*({message})"):
        native.Forest(**breaks(good))
    with pytest.raises(TypeError):
        native.Forest(**{**good, "tables": list(range(10))})


@needs_forest
def test_forest_refuses_a_table_start_that_overflows() -> None:
    good = _forest_args(TreeEnsemble.from_lightgbm_text(_model(32, False), N_FEATURES))
    with pytest.raises(ValueError, match="outside tables"):
        native.Forest(**{**good, "table_starts": _i64([*good["table_starts"][:-1], 2**63 - 1])})


@needs_forest
def test_a_forest_whose_init_failed_cannot_predict() -> None:
    # In a child process: before the fix this crashed the interpreter.
    code = textwrap.dedent(
        """
        import numpy as np
        from moviematch_ml.runtime.native import Forest
        f = Forest.__new__(Forest)
        tables = np.full((4, 1), 0xFFFFFFFF, dtype=np.uint32)
        args = (np.array([1.0, 2.0]), np.array([0, 2]), tables, np.array([10**12]), np.array([1.0, 4.0]), 1)
        try:
            f.__init__(*args)
        except ValueError:
            pass
        try:
            f.predict_row([0.5])
        except RuntimeError:
            print("refused")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "refused"), done.stderr


@needs_forest
def test_threads_predicting_at_once_get_the_serial_answers() -> None:
    compiled, _ = _pair(_model(60, True))
    batches = [_nan_rows(seed=61 + k) for k in range(4)]
    for k, batch in enumerate(batches):
        batch[:, k] = batch[0, k]  # a different constant column in each: each call folds its own masks
    serial = [compiled.predict_raw(b) for b in batches]
    start = threading.Barrier(len(batches))
    results: list[list[Array]] = [[] for _ in batches]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            start.wait()
            for _ in range(30):
                results[k].append(compiled.predict_raw(batches[k]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, got in enumerate(results):
        assert len(got) == 30
        for y in got:
            np.testing.assert_array_equal(y, serial[k])


# --- rows: the JSON of a batch answer's rows ------------------------------------------------------------------------

BATCH_ID = "0123456789abcdef0123456789abcdef"
MAX_ID = 2**63 - 1
EDGE_RATINGS = [0.0, -0.0, 10.0, 0.001, 9.999, math.nan]


@dataclass(frozen=True)
class _Answer:
    """The rows of a batch answer, as ``contract.render_batch`` hands them to ``native.rows``."""

    ids: list[Any]
    rounded: list[Any]
    order: list[int]  # the rows, in answer order (request order when not ranked)
    ranked: bool
    source: str
    sources: list[str] | None


def _answer(
    ids: list[Any],
    rounded: list[Any],
    *,
    order: list[int] | None = None,
    ranked: bool = False,
    source: str = "model",
    sources: list[str] | None = None,
) -> _Answer:
    return _Answer(ids, rounded, list(range(len(ids))) if order is None else order, ranked, source, sources)


def _rows_args(answer: _Answer) -> tuple[Any, ...]:
    """The arguments of ``rows``/``rows_py`` for an answer, as ``contract.render_batch`` passes them."""
    sources = None if answer.sources is None else [orjson.dumps(s) for s in answer.sources]
    order = answer.order if answer.ranked else None
    return answer.ids, answer.rounded, order, orjson.dumps(answer.source), sources, BATCH_ID.encode("ascii")


def _expected(answer: _Answer) -> bytes:
    """The rows written by hand with orjson (a list's text without its brackets), independently of native.py."""
    rows = [
        {
            "movie_id": answer.ids[i],
            "predicted_rating": answer.rounded[i],
            "source": answer.source if answer.sources is None else answer.sources[i],
            "prediction_id": f"{BATCH_ID}-{i}",
        }
        for i in answer.order
    ]
    return orjson.dumps(rows)[1:-1]


def _codec_rows(answer: _Answer) -> bytes | None:
    """The C kernel itself: None where it declines."""
    rows: bytes | None = native.codec.rows(*_rows_args(answer))
    return rows


def _assert_renders_alike(answer: _Answer) -> bytes:
    """``rows`` (C where it can) == ``rows_py`` == orjson by hand; returns the bytes."""
    got = native.rows(*_rows_args(answer))
    assert got == native.rows_py(*_rows_args(answer))
    assert got == _expected(answer)
    return got


def _parsed(rows: bytes) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = orjson.loads(b"[" + rows + b"]")
    return out


def _random_answers(seed: int, count: int) -> list[_Answer]:
    rng = np.random.default_rng(seed)
    answers: list[_Answer] = []
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
        if k % 3 == 1:
            sources = ["personalized" if b else "model" for b in (rng.random(n) < 0.5).tolist()]
        elif k % 3 == 2:
            sources = ["personalized"] * n
        source = ["model", "fallback"][k % 2]
        answers.append(_answer(ids, rounded, order=order, ranked=ranked, source=source, sources=sources))
    return answers


@needs_codec
def test_rows_are_byte_identical_to_the_dict_rendering() -> None:
    for answer in _random_answers(seed=20260101, count=400):
        rows = _codec_rows(answer)
        assert rows is not None, answer  # int ids and 3-decimal ratings in [0, 10] never decline
        assert rows == _expected(answer)
        assert _assert_renders_alike(answer) == rows


def test_rows_on_the_edge_ratings_and_ids() -> None:
    ids = [0, MAX_ID, 1, 9, 10, 2**53 + 1, 2**62, 123456789]
    ratings = [*EDGE_RATINGS, 5.0, 0.5]
    answer = _answer(ids, ratings)
    got = _assert_renders_alike(answer)
    rows = _parsed(got)
    assert [r["movie_id"] for r in rows] == ids
    assert b'"predicted_rating":-0.0,' in got
    assert b'"predicted_rating":null,' in got  # NaN, as orjson writes it
    assert rows[-1]["prediction_id"] == f"{BATCH_ID}-7"
    if native.codec is not None:
        assert _codec_rows(answer) == got  # written by the C kernel, not its twin


@needs_codec
def test_every_three_decimal_rating_from_0_to_10() -> None:
    ratings: list[float] = np.round(np.arange(10001) / 1000, 3).tolist()
    answer = _answer(list(range(len(ratings))), ratings)
    rows = _codec_rows(answer)
    assert rows is not None
    assert rows == _expected(answer)
    assert rows == native.rows_py(*_rows_args(answer))


@needs_codec
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
        rows = native.codec.rows([5], [v], None, b'"m"', None, b"p")
        if rows is None:
            assert v != 0.0
            assert not 1e-4 <= abs(v) < 1e16, v  # declines only what repr writes with an exponent
            continue
        written += 1
        assert rows == orjson.dumps({"movie_id": 5, "predicted_rating": v, "source": "m", "prediction_id": "p-0"})
    assert written > 40000  # most of them: the comparison above is not vacuous


def test_row_order_and_prediction_ids_follow_the_ranking() -> None:
    ids = [10, 11, 12, 13, 14]
    ratings = [1.0, 5.0, 3.0, 5.0, 0.0]
    order = [1, 3, 2, 0, 4]
    full = _parsed(_assert_renders_alike(_answer(ids, ratings, order=order, ranked=True)))
    assert [r["movie_id"] for r in full] == [11, 13, 12, 10, 14]
    assert [r["prediction_id"][-2:] for r in full] == ["-1", "-3", "-2", "-0", "-4"]
    top = _parsed(_assert_renders_alike(_answer(ids, ratings, order=order[:2], ranked=True)))
    assert [r["movie_id"] for r in top] == [11, 13]
    # Not ranked: request order, whatever the order says.
    unranked = _Answer(ids, ratings, order, False, "model", None)
    assert [r["movie_id"] for r in _parsed(native.rows(*_rows_args(unranked)))] == ids


def test_per_row_sources_are_taken_by_movie_not_by_rank() -> None:
    sources = ["personalized", "model", "personalized"]
    answer = _answer([1, 2, 3], [1.0, 2.0, 3.0], order=[2, 1, 0], ranked=True, sources=sources)
    out = _parsed(_assert_renders_alike(answer))
    assert [(r["movie_id"], r["source"]) for r in out] == [(3, "personalized"), (2, "model"), (1, "personalized")]


@needs_codec
def test_sources_are_written_as_given_json() -> None:
    # The caller passes JSON texts (contract.render_batch does): a name needing escapes is written escaped.
    name = 'odd "name" \\ é'
    args = ([1], [2.0], None, orjson.dumps(name), None, b"ab")
    rows = native.codec.rows(*args)
    assert rows is not None
    assert orjson.loads(rows)["source"] == name
    assert rows == native.rows_py(*args)


@needs_codec
def test_an_empty_answer() -> None:
    assert native.codec.rows([], [], None, b'"model"', None, b"ab") == b""
    assert native.codec.rows([], [], [], b'"model"', [], b"ab") == b""
    assert native.codec.rows([1, 2], [1.0, 2.0], [], b'"model"', None, b"ab") == b""  # top_k of nothing
    assert native.rows_py([1, 2], [1.0, 2.0], [], b'"model"', None, b"ab") == b""
    assert _assert_renders_alike(_answer([], [])) == b""


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


@needs_codec
@pytest.mark.parametrize(("ids", "ratings"), [c[1:] for c in DECLINED], ids=[c[0] for c in DECLINED])
@pytest.mark.parametrize("ranked", [False, True])
def test_declined_answers_still_render_as_orjson_does(ids: list[Any], ratings: list[Any], ranked: bool) -> None:
    order = list(reversed(range(len(ids)))) if ranked else None
    answer = _answer(ids, ratings, order=order, ranked=ranked)
    assert _codec_rows(answer) is None
    got = _assert_renders_alike(answer)  # the twin wrote them
    if any(isinstance(i, bool) for i in ids):
        # A bool is an int to Python: it must stay true/false, never be written as 1/0.
        assert (b'"movie_id":true' in got) or (b'"movie_id":false' in got)


@needs_codec
def test_a_decline_after_rows_were_written_leaves_no_trace() -> None:
    ids: list[Any] = [*range(1000), "late"]
    answer = _answer(ids, [1.5] * len(ids))
    assert _codec_rows(answer) is None
    assert _assert_renders_alike(answer).count(b'"movie_id"') == len(ids)


@needs_codec
def test_infinity_is_written_null_as_orjson_writes_it() -> None:
    answer = _answer([1, 2, 3], [math.inf, -math.inf, math.nan])
    rows = _codec_rows(answer)
    assert rows is not None
    assert rows.count(b'"predicted_rating":null') == 3
    assert rows == _expected(answer)
    _assert_renders_alike(answer)


@needs_codec
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
        native.codec.rows(*args)


@needs_codec
def test_empty_rows_calls_do_not_check_what_they_never_read() -> None:
    # With no rows to write, a bad source is never looked at: b"" rather than an error (as orjson would not see it).
    assert native.codec.rows([1], [1.0], [], b'"m"', [b'"a"'], b"p") == b""


# --- matrix: decoded movies -> feature matrix -----------------------------------------------------------------------

# msgspec's typed decoder of a batch's movies, its types from FEATURES (as the service's decoder, online/contract.py):
# it gives a movie's values as the JSON wrote them, bool, int or float.
_MOVIES_DECODER: Any = msgspec.json.Decoder(
    msgspec.defstruct(
        "Movies",
        [
            (
                "movies",
                list[  # type: ignore[misc]  # a class built at run time
                    msgspec.defstruct(
                        "Movie", [("movie_id", id_msgspec_type()), *((f.name, f.msgspec_type()) for f in FEATURES)]
                    )
                ],
            )
        ],
    )
)


def _matrix_py(movies: list[Any], names: tuple[str, ...] = FEATURE_NAMES) -> Array:
    out = np.full((len(movies), len(names)), -7.0)
    assert native.matrix_py(movies, names, out) is True
    return out


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


@needs_codec
def test_matrix_equals_its_twin_on_decoded_bodies() -> None:
    rng = np.random.default_rng(11)
    seen: set[type] = set()
    for _ in range(30):
        movies = [_random_movie(rng, k) for k in range(int(rng.integers(1, 80)))]
        decoded = _MOVIES_DECODER.decode(orjson.dumps({"movies": movies})).movies
        seen.update(type(getattr(m, name)) for m in decoded for name in FEATURE_NAMES)
        x = np.full((len(decoded), N_FEATURES), -7.0)
        assert native.codec.matrix(decoded, FEATURE_NAMES, x) is True
        assert x.tobytes() == _matrix_py(decoded).tobytes()  # bit for bit
        assert x.tolist() == [[float(m[name]) for name in FEATURE_NAMES] for m in movies]
    assert seen == {bool, int, float}  # every kind of value the decoder gives went through the C loop


@needs_codec
def test_matrix_values_at_the_edges() -> None:
    movies = [
        types.SimpleNamespace(a=True, b=False, c=0, d=-0.0, e=2**53 + 1, f=10**300),
        types.SimpleNamespace(a=1e-320, b=math.inf, c=-5, d=math.nan, e=1.5, f=2**63 - 1),
    ]
    names = ("a", "b", "c", "d", "e", "f")
    x = np.empty((2, 6))
    assert native.codec.matrix(movies, names, x) is True
    assert x.tobytes() == _matrix_py(movies, names).tobytes()
    assert x[0].tolist()[:5] == [1.0, 0.0, 0.0, 0.0, float(2**53)]  # 2**53 + 1 rounds to even, as float() does
    assert math.copysign(1.0, x[0, 3]) == -1.0
    assert native.codec.matrix([], names, np.empty((0, 6))) is True


@needs_codec
@pytest.mark.parametrize("odd", ["7.5", b"7.5", None, np.float64(7.5), np.int64(7), [7.5], 7 + 0j])
def test_matrix_declines_values_that_are_not_int_bool_or_float(odd: Any) -> None:
    good = types.SimpleNamespace(**EXAMPLE)
    bad = types.SimpleNamespace(**{**EXAMPLE, "popularity": odd})
    x = np.zeros((2, N_FEATURES))
    assert native.codec.matrix([good, bad], FEATURE_NAMES, x) is False
    if isinstance(odd, np.number):  # the dispatcher then takes its twin, which reads numpy's numbers
        assert native.matrix([good, bad], FEATURE_NAMES, x) is True
        assert x.tobytes() == _matrix_py([good, bad]).tobytes()
        assert x[1, FEATURE_NAMES.index("popularity")] == float(odd)


@needs_codec
def test_matrix_errors() -> None:
    good = types.SimpleNamespace(**EXAMPLE)
    with pytest.raises(ValueError, match="out must hold"):
        native.codec.matrix([good], FEATURE_NAMES, np.zeros((2, N_FEATURES)))
    with pytest.raises(ValueError, match="out must hold"):
        native.codec.matrix([good, good], FEATURE_NAMES, np.zeros((1, N_FEATURES)))
    missing = types.SimpleNamespace(**{k: v for k, v in EXAMPLE.items() if k != "vote_count"})
    with pytest.raises(AttributeError, match="vote_count"):
        native.codec.matrix([good, missing], FEATURE_NAMES, np.zeros((2, N_FEATURES)))
    with pytest.raises(TypeError):
        native.codec.matrix((good,), FEATURE_NAMES, np.zeros((1, N_FEATURES)))  # movies not a list
    with pytest.raises(TypeError):
        native.codec.matrix([good], list(FEATURE_NAMES), np.zeros((1, N_FEATURES)))  # names not a tuple
    read_only = np.zeros((1, N_FEATURES))
    read_only.flags.writeable = False
    with pytest.raises(TypeError):
        native.codec.matrix([good], FEATURE_NAMES, read_only)
    assert not read_only.any()
    with pytest.raises(TypeError):
        native.codec.matrix([good], FEATURE_NAMES, b"\0" * (8 * N_FEATURES))  # bytes are read-only
    with pytest.raises(TypeError):
        native.codec.matrix([good], FEATURE_NAMES, np.zeros((2, 2 * N_FEATURES))[:1, ::2])  # not contiguous
    with pytest.raises(OverflowError):
        native.codec.matrix([types.SimpleNamespace(**{**EXAMPLE, "vote_count": 10**400})], FEATURE_NAMES, np.zeros(6))


@needs_codec
def test_matrix_survives_a_getter_that_mutates_the_list() -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from moviematch_ml.runtime.native import codec

        movies = []

        class Movie:
            @property
            def a(self):
                movies.clear()
                return 1.0

        movies.extend(Movie() for _ in range(1000))
        try:
            codec.matrix(movies, ("a", "a"), np.zeros(2000))
        except Exception:
            pass
        print("survived")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "survived"), done.stderr[-500:]


# --- positions: ids -> positions in an id index ---------------------------------------------------------------------


def _positions(
    keys: list[Any], index: dict[Any, int], default: int, dense: Any = None, *, complete: bool = False
) -> tuple[list[int], int]:
    """The C kernel's answer, which must be its twin's, given the same arguments."""
    out = np.full(len(keys), 12345, dtype=np.int64)
    not_int = native.codec.positions(keys, index, default, out, dense, complete)
    twin = np.full(len(keys), 12345, dtype=np.int64)
    assert native.positions_py(keys, index, default, twin, dense, complete) == not_int
    assert twin.tolist() == out.tolist()
    return out.tolist(), not_int


@needs_codec
def test_positions_is_dict_get_with_a_default() -> None:
    index: dict[Any, int] = {7: 0, 11: 1, "abc": 2, 2**70: 3}
    keys: list[Any] = [11, 7, 8, "abc", "7", None, 2**70, -7, 11]
    assert _positions(keys, index, -1) == ([1, 0, -1, 2, -1, -1, 3, -1, 1], 3)  # "abc", "7" and None: not ints
    assert _positions(keys, index, 99)[0][2] == 99
    assert _positions([], index, -1) == ([], 0)


@needs_codec
def test_positions_with_a_dense_array_gives_the_same_answers() -> None:
    index: dict[Any, int] = {0: 4, 3: 0, 5: 2, 9: 1, "x": 3, 1000: 5}
    dense = np.array([4, -1, -1, 0, -1, 2, -1, -1, -1, 1], dtype=np.int32)  # ids 0..9 only: 1000 is not in it
    keys: list[Any] = [3, 4, 9, 0, 1000, 10, -1, "x", 5, 3, True]
    # A True key is not an int key of the dense array: the dict finds it as 1 (== True), which is not there.
    expected = ([0, -1, 1, 4, 5, -1, -1, 3, 2, 0, -1], 2)
    assert _positions(keys, index, -1, dense) == expected
    assert _positions(keys, index, -1) == expected


@needs_codec
def test_positions_with_a_complete_dense_array_answers_ids_past_its_end_with_the_default() -> None:
    # Every non-negative int key of the index is in the array: 10, 1000 and 2**70 are not keys, -1 and 5 are.
    index: dict[Any, int] = {0: 4, 3: 0, 5: 2, 9: 1, "x": 3, -1: 6}
    dense = np.array([4, -1, -1, 0, -1, 2, -1, -1, -1, 1], dtype=np.int32)
    keys: list[Any] = [3, 10, 1000, 2**70, -1, -(2**70), "x", 5, 9]
    expected = ([0, 7, 7, 7, 6, 7, 3, 2, 1], 1)
    assert _positions(keys, index, 7, dense, complete=True) == expected
    assert _positions(keys, index, 7, dense) == expected
    assert _positions(keys, index, 7) == expected


@needs_codec
def test_positions_with_a_dense_array_of_text_keys_finds_ints_by_their_text() -> None:
    # A table keyed by text (personalized._dense_text_rows): "7" and "42" are an int's text, "007" and "tt1" are not;
    # the array finds 7 and 42 by position, the text ids are looked up as they are.
    index: dict[Any, int] = {"7": 0, "42": 1, "007": 2, "tt1": 3}
    dense = np.full(43, -1, dtype=np.int32)
    dense[7], dense[42] = 0, 1
    keys: list[Any] = [42, 7, "7", "007", "tt1", 8, 43, 10**30, None]
    expected = ([1, 0, 0, 2, 3, -1, -1, -1, -1], 4)  # "7", "007", "tt1" and None are not ints
    assert _positions(keys, index, -1, dense, complete=True) == expected


def test_positions_of_other_sequences_go_to_the_twin() -> None:
    # The C kernel reads a list: a tuple (or a numpy array's values) is looked up by the twin, with the same answers.
    index: dict[Any, int] = {7: 0, 11: 1, "abc": 2}
    out = np.empty(4, dtype=np.int64)
    assert native.positions((11, "abc", 8, "7"), index, -1, out) == 2
    assert out.tolist() == [1, 2, -1, -1]


@needs_codec
def test_positions_refuses_malformed_calls() -> None:
    with pytest.raises(ValueError, match="len\\(keys\\) int64"):
        native.codec.positions([1, 2], {1: 0}, -1, np.empty(3, dtype=np.int64))
    with pytest.raises(ValueError, match="int32"):
        native.codec.positions([1], {1: 0}, -1, np.empty(1, dtype=np.int64), b"abc")
    with pytest.raises(TypeError, match="ints"):
        native.codec.positions([1], {1: "zero"}, -1, np.empty(1, dtype=np.int64))
    with pytest.raises(TypeError, match="unhashable"):
        native.codec.positions([[1]], {1: 0}, -1, np.empty(1, dtype=np.int64))
    with pytest.raises(TypeError):
        native.codec.positions((1,), {1: 0}, -1, np.empty(1, dtype=np.int64))  # a tuple, not a list


@needs_codec
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
        native.codec.positions(keys, {1: 0}, -1, np.empty(3, dtype=np.int64))


# --- user_rows: one user's personalised input rows ------------------------------------------------------------------


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


def _user_rows(a: dict[str, Any]) -> Array:
    out = np.full((len(a["rows"]), len(a["template"])), -7.0)
    native.codec.user_rows(
        a["rows"], a["x6"], a["table"], a["factors"], a["user_factors"], a["template"], out, a["n_known"], 3, 7, 8, 3.0
    )
    return out


@needs_codec
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


@needs_codec
@pytest.mark.parametrize("k", [0, 1, 16])
def test_user_rows_equals_model_inputs(k: int) -> None:
    # A personalised batch as PersonalizedModel.predict writes it: the 12 inputs that differ between movies in C,
    # the user's 8 from the template; the full rows must be those model_inputs builds.
    rng = np.random.default_rng(k)
    n_known, n_table, m = 30, 34, 200
    table = rng.normal(size=(n_table, 4))
    table[:, 0] = rng.integers(0, 50, n_table)
    table[n_known:, 3] = np.nan  # movies the factorisation does not know have no bias
    table[-1] = (0.0, np.nan, np.nan, np.nan)  # the row of a movie nobody rated
    table[3, 1:3] = np.nan  # a known movie nobody rated
    factors = rng.normal(size=(n_known, k))
    user_factors = rng.normal(size=k)
    rows = rng.integers(0, n_table, m)
    rows[:4] = [0, n_known - 1, n_known, n_table - 1]
    x6 = rng.normal(size=(m, N_FEATURES))
    mu, user = 3.5, np.array([12.0, 3.25, 0.75, -0.3])
    recent = (0.1, -0.2, 2.5, 1.0)
    narrow = np.empty((m, len(ROW_INPUTS)))
    native.codec.user_rows(
        rows,
        x6,
        table,
        factors,
        user_factors,
        np.zeros(len(ROW_INPUTS)),
        narrow,
        n_known,
        N_FEATURES,
        N_FEATURES + 4,
        N_FEATURES + 5,
        mu + user[3],
    )
    got = full_rows(narrow, ROW_COLUMNS, user_template(user.tolist(), recent))
    dot = np.full(m, np.nan)
    known = rows < n_known
    dot[known] = factors[rows[known]] @ user_factors
    want = model_inputs(x6, user, table[rows], dot, mu, np.array(recent))
    assert got.shape == want.shape == (m, len(MODEL_FEATURES))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@needs_codec
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
        native.codec.user_rows(
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


# --- view_data: a user's view from their ratings --------------------------------------------------------------------

ViewData = Callable[..., tuple[bytes, int] | None]
# The C kernel and its twin (numpy's solve): each case below runs on both.
KERNELS = [
    pytest.param("codec", id="C-cholesky", marks=needs_codec),
    pytest.param("twin", id="numpy-solve"),
]


def _kernel(name: str) -> ViewData:
    return cast(ViewData, native.codec.view_data if name == "codec" else native.view_data_py)


def _fold_in(
    kernel: ViewData, factors: Any, cols: list[int], resid: list[float], reg_f: float, reg_b: float, damp: float
) -> Any:
    """w of view_data for ratings of known movies whose residuals are ``resid`` (mu 0, biases 0)."""
    got = kernel(
        factors, factors.shape[1], np.zeros(len(factors)), 0.0, cols, resid, [1.0] * len(cols), reg_f, reg_b, damp, 10
    )
    return None if got is None else np.frombuffer(got[0])[3 : 4 + factors.shape[1]]


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_fold_in_by_hand(kernel: str) -> None:
    # One factor, two movies: q = 1 and q = -2, residuals 1 and 3; reg_factors 0.5, reg_bias 0, damping 1.
    # A = [[2, -1], [-1, 5]] + diag(0 * 2 + 1, 0.5 * 2) = [[3, -1], [-1, 6]]; b = [1 + 3, 1 - 6] = [4, -5].
    # w = A^-1 b = [6 * 4 + 1 * -5, 1 * 4 + 3 * -5] / 17 = [19/17, -11/17].
    factors = np.array([[1.0], [-2.0], [7.0]])
    w = _fold_in(_kernel(kernel), factors, [0, 1], [1.0, 3.0], 0.5, 0.0, 1.0)
    assert w is not None
    np.testing.assert_allclose(w, [19 / 17, -11 / 17], rtol=1e-15)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_fold_in_matches_numpy(kernel: str) -> None:
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(50, 16))
    for m in (1, 3, 40):
        cols = rng.integers(0, 50, m).tolist()
        resid = rng.normal(size=m).tolist()
        x = np.hstack([np.ones((m, 1)), factors[cols]])
        a = x.T @ x + np.diag([0.1 * m + 5.0] + [0.2 * m] * 16)
        w = _fold_in(_kernel(kernel), factors, cols, resid, 0.2, 0.1, 5.0)
        assert w is not None
        np.testing.assert_allclose(w, np.linalg.solve(a, x.T @ np.array(resid)), rtol=1e-10, atol=1e-12)


@needs_codec
def test_a_system_that_is_not_positive_definite_is_left_to_numpy_which_reports_it() -> None:
    factors = np.array([[1.0], [-2.0], [7.0]])
    assert _fold_in(native.codec.view_data, factors, [1], [1.0], 0.0, 0.0, 0.0) is None  # no ridge: singular
    args = (factors, 1, np.zeros(3), 0.0, [1], [1.0], [1.0], 0.0, 0.0, 0.0, 10)
    with pytest.raises(np.linalg.LinAlgError):
        native.view_data(*args)  # the dispatcher falls back to its twin, whose solve says why
    with pytest.raises(ValueError, match="outside"):
        _fold_in(native.codec.view_data, factors, [50], [1.0], 0.2, 0.0, 5.0)
    with pytest.raises(TypeError):
        _fold_in(native.codec.view_data, factors, [1.5], [1.0], 0.2, 0.0, 5.0)  # type: ignore[list-item]


@pytest.mark.parametrize("kernel", KERNELS)
def test_view_data_by_hand(kernel: str) -> None:
    # One factor; movies 0 (q = 1, bias 0.5) and 1 (q = -2, bias -1); mu = 3. Ratings: movie 1 at t = 5, an unknown
    # movie at t = 2, movie 0 at t = 5 (same time: arrival order), recent = 2.
    factors = np.array([[1.0], [-2.0]])
    bias = np.array([0.5, -1.0])
    got = _kernel(kernel)(factors, 1, bias, 3.0, [1, -1, 0], [4.0, 2.0, 4.5], [5.0, 2.0, 5.0], 0.5, 0.0, 1.0, 2)
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


@needs_codec
@pytest.mark.parametrize("k", [0, 2, 16])
def test_view_data_equals_its_twin(k: int) -> None:
    rng = np.random.default_rng(k + 40)
    factors = rng.normal(size=(60, k))
    bias = rng.normal(size=60)
    for n in (1, 2, 9, 10, 11, 37):
        cols = rng.integers(-1, 60, n).tolist()  # -1: a movie the model does not know
        ratings = (rng.integers(1, 11, n) / 2).tolist()
        times = rng.integers(0, 5, n).astype(float).tolist()  # many equal times: arrival order decides
        args = (factors, k, bias, 3.4, cols, ratings, times, 0.2, 0.05, 5.0, 10)
        got = native.codec.view_data(*args)
        assert got is not None
        want = native.view_data_py(*args)
        assert got[1] == want[1] == min(n, 10)
        a, b = np.frombuffer(got[0]), np.frombuffer(want[0])
        # count, mean, spread, w = [bias, k factors], the two places of the tail's means, the recent times and residuals
        assert a.shape == b.shape == (6 + k + 2 * min(n, 10),)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)  # NaN where NaN
        assert np.isnan(a[4 + k : 6 + k]).all()
        assert a[6 + k :].tolist() == b[6 + k :].tolist()  # the recent ratings: the same ones, exactly


@needs_codec
def test_view_data_refuses_bad_input_and_declines_a_singular_system() -> None:
    factors = np.array([[1.0], [-2.0]])
    bias = np.array([0.5, -1.0])
    view_data = native.codec.view_data
    assert view_data(factors, 1, bias, 3.0, [0], [4.0], [1.0], 0.0, 0.0, 0.0, 10) is None  # no ridge
    assert view_data(factors, 1, bias, 3.0, [-1], [4.0], [1.0], 0.0, 0.0, 0.0, 10) is not None  # no fold-in
    with pytest.raises(ValueError, match="outside"):
        view_data(factors, 1, bias, 3.0, [2], [4.0], [1.0], 0.5, 0.0, 1.0, 10)
    with pytest.raises(ValueError, match="inconsistent"):
        view_data(factors, 1, bias, 3.0, [0, 1], [4.0], [1.0, 2.0], 0.5, 0.0, 1.0, 10)
    with pytest.raises(ValueError, match="inconsistent"):
        view_data(factors, 2, bias, 3.0, [0], [4.0], [1.0], 0.5, 0.0, 1.0, 10)  # factors are (2, 1)
    with pytest.raises(ValueError, match="inconsistent"):
        view_data(factors, 1, bias, 3.0, [], [], [], 0.5, 0.0, 1.0, 10)  # no rating
    with pytest.raises(TypeError):
        view_data(factors, 1, bias, 3.0, [0], ["4"], [1.0], 0.5, 0.0, 1.0, 10)


# --- end to end: a 1,000-movie /predict-batch answer ----------------------------------------------------------------


class _HalfKnows:
    """Users' views that answer the movies with an even id (mixed per-row sources), for every user."""

    def cached(self, model: PersonalizedModel, user_id: str) -> Any:
        return (user_id, None)  # in memory: the service never reads a store

    def answer(
        self, model: PersonalizedModel, inputs: Any, movie_ids: list[Any], x: Array
    ) -> tuple[Array, npt.NDArray[np.bool_]]:
        known = np.array([isinstance(i, int) and i % 2 == 0 for i in movie_ids])
        return np.round(np.linspace(0.5, 5.0, x.shape[0]), 2), known


@pytest.mark.parametrize(
    "envelope",
    [{}, {"rank": True}, {"top_k": 10}, {"user_id": 7}, {"user_id": 7, "top_k": 999}],
    ids=["request-order", "ranked", "top-k", "personalised", "personalised-top-k"],
)
def test_a_1000_movie_batch_renders_as_orjson_does(
    tiny_personalized_dir: Path, envelope: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service's answer (online/contract.render_batch over native.rows) with a fixed batch id, so that it can be
    # compared byte for byte with orjson's writing of the same answer.
    monkeypatch.setattr(service_module, "new_id", lambda: BATCH_ID)
    models = ModelSet(tiny_personalized_dir)
    current = models.load()
    assert current.six.source != "fallback"
    assert current.personalized is not None
    service = PredictionService(models, max_batch_size=1000, user_views=cast(UserViews, _HalfKnows()))
    rng = np.random.default_rng(3)
    movies = [_random_movie(rng, k) for k in range(1000)]
    for k, movie in enumerate(movies):
        movie["movie_id"] = int(rng.integers(0, MAX_ID, endpoint=True)) if k else MAX_ID
    position = {m["movie_id"]: k for k, m in enumerate(movies)}
    assert len(position) == len(movies)

    got = asyncio.run(service.predict_batch(orjson.dumps({"movies": movies, **envelope})))
    out = orjson.loads(got)
    assert orjson.dumps(out) == got  # byte for byte what orjson writes of the same answer
    rows = out["predictions"]
    if native.codec is not None:  # and the C kernel wrote these rows (it declines what it cannot write alike)
        ids, ratings = [r["movie_id"] for r in rows], [r["predicted_rating"] for r in rows]
        assert native.codec.rows(ids, ratings, None, b'"m"', None, b"p") is not None

    count = min(envelope.get("top_k", 1000), 1000)
    ranked = "rank" in envelope or "top_k" in envelope
    tail = {"model_version": current.version, "variant": "champion", "count": count, "ranked": ranked}
    assert list(out) == ["predictions", *tail]
    assert {key: out[key] for key in tail} == tail
    assert len(rows) == count
    assert all(r["prediction_id"] == f"{BATCH_ID}-{position[r['movie_id']]}" for r in rows)
    if ranked:
        ratings = [r["predicted_rating"] for r in rows]
        assert ratings == sorted(ratings, reverse=True)
    else:
        assert [r["movie_id"] for r in rows] == [m["movie_id"] for m in movies]
    if "user_id" in envelope:
        assert {r["source"] for r in rows} == {"personalized", current.six.source}
        assert all((r["source"] == "personalized") == (r["movie_id"] % 2 == 0) for r in rows)
    else:
        assert {r["source"] for r in rows} == {current.six.source}
