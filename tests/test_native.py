"""The compiled tree evaluator (``moviematch_ml._trees``) gives LightGBM's and numpy's answers, and refuses bad input.

``TreeEnsemble`` walks its bit-vector tables in C when the extension is built (``runtime == "native"``); these tests
hold that path to LightGBM and to the numpy evaluator (``native=False``) on 32- and 64-bit masks, on values sitting
exactly on split thresholds, on NaN (learnt default sides and NaN-read-as-0), on LightGBM's zero threshold, on
batches whose constant columns the C code folds into the starting masks, from several threads at once, and check
that malformed calls raise Python exceptions instead of reading outside the tables.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest

from conftest import tiny_training_data
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.model import TreeEnsemble, load_predictor

# Imported by name: the extension has no type stub, so mypy sees Any (model.py does the same import).
Forest: Any = importlib.import_module("moviematch_ml._trees").Forest

N_FEATURES = len(FEATURE_NAMES)
# LightGBM's kZeroThreshold is the float 1e-35f: |x| <= 1.0000000180025095e-35 reads as 0. model.py and _trees.c
# use the double 1e-35, so values in (1e-35, 1.0000000180025095e-35] differ (test_the_zero_threshold_is_1e35f).
LIGHTGBM_ZERO = float(np.float32(1e-35))
Array = npt.NDArray[np.float64]


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


def _pair(text: str) -> tuple[TreeEnsemble, TreeEnsemble]:
    native = TreeEnsemble.from_lightgbm_text(text, N_FEATURES)
    numpy_evaluator = TreeEnsemble.from_lightgbm_text(text, N_FEATURES, native=False)
    assert native.runtime == "native"
    assert numpy_evaluator.runtime == "numpy"
    return native, numpy_evaluator


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


@pytest.mark.parametrize("with_nan", [False, True], ids=["clean-model", "nan-model"])
@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
@pytest.mark.parametrize("rows", ["random", "thresholds", "nan"])
def test_native_matches_lightgbm_and_numpy(num_leaves: int, with_nan: bool, rows: str) -> None:
    text = _model(num_leaves, with_nan)
    native, numpy_evaluator = _pair(text)
    # The model really has the shape this case is about.
    if num_leaves == 16:
        assert native.width == 16  # the top bit of a 16-bit mask (the C evaluator's, for up to 16 leaves) is a leaf
        assert native._native_tables.dtype == np.uint16
        assert native.tables[0].dtype == np.uint32  # numpy's own tables stay 32-bit
    elif num_leaves == 32:
        assert native.width == 32  # the top bit of a 32-bit mask is a leaf
        assert native.tables[0].dtype == np.uint32
    else:
        assert 32 < native.width <= 64
        assert native.tables[0].dtype == np.uint64
    decisions = {int(d) for line in text.splitlines() if line.startswith("decision_type=") for d in line[14:].split()}
    if with_nan:
        assert any((d >> 2) & 3 == 2 for d in decisions)  # NaN-as-missing splits, with a learnt default side
    else:
        assert all((d >> 2) & 3 == 0 for d in decisions)  # NaN is read as 0 ...
        assert (native.thresholds[4] < 0).any()  # ... and 0 is on both sides of this feature's thresholds
        assert (native.thresholds[4] > 0).any()

    if rows == "random":
        x = _random_rows(1000, seed=11)
    elif rows == "thresholds":
        x = _threshold_rows(native, seed=12)
    else:
        x = _nan_rows(seed=13)
    got = native.predict_raw(x)
    assert got.shape == (len(x),)
    assert len(np.unique(got)) > 20  # the rows reach many different leaves
    np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12)
    # One row at a time (predict_row: a batch of one, nothing folded) adds the same leaves in the same order.
    singles = np.array([native.predict_value(row) for row in x.tolist()])
    np.testing.assert_array_equal(singles, got)


def _constant_column_batches(native: TreeEnsemble) -> dict[str, Array]:
    rng = np.random.default_rng(21)
    base = _random_rows(300, seed=21)
    base[rng.random(base.shape) < 0.1] = np.nan
    batches: dict[str, Array] = {}
    x = base.copy()
    x[:, 0] = native.thresholds[0][len(native.thresholds[0]) // 2]  # exactly on a threshold
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


@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
def test_constant_columns_give_the_one_row_answers(num_leaves: int) -> None:
    text = _model(num_leaves, True)
    native, numpy_evaluator = _pair(text)
    for name, x in _constant_column_batches(native).items():
        got = native.predict_raw(x)
        singles = np.array([native.predict_value(row.tolist()) for row in x])
        np.testing.assert_array_equal(got, singles, err_msg=name)
        np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
def test_values_repeated_from_the_row_before_give_the_one_row_answers(num_leaves: int) -> None:
    # Rows that repeat the row before in some columns start from the masks kept for those columns (the C code
    # orders the varying columns by how often they repeat): blocks of rows sharing columns 0-2 (NaN included),
    # rows repeated whole, and a block boundary in every column, must give each row's own answer.
    text = _model(num_leaves, True)
    native, numpy_evaluator = _pair(text)
    rng = np.random.default_rng(17)
    x = _random_rows(300, seed=19)
    for start in range(0, 300, 7):
        x[start : start + 5, :3] = x[start, :3]  # a block sharing its first three columns
    x[40:50, 1] = np.nan
    x[100:104] = x[100]  # identical rows
    x[200:260:2, 4] = x[201:261:2, 4]  # pairs equal in one column only
    x = x[:, rng.permutation(N_FEATURES)]  # whichever columns repeat, not only the first ones
    got = native.predict_raw(x)
    singles = np.array([native.predict_value(row.tolist()) for row in x])
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


@pytest.mark.parametrize("n", [1, 3, 4, 5, 203])
def test_a_wide_model_with_memo_tail_and_repeats_gives_the_one_row_answers(n: int) -> None:
    # One user's batch: 4 columns constant (folded), 6 shared by runs of rows (movies the model does not know
    # share their inputs: the memo), 10 varying (the tail: ANDed four table rows a pass), whole rows repeated, and
    # a row count that leaves rows over after the four-at-a-time sums.
    text = _wide_model()
    native = TreeEnsemble.from_lightgbm_text(text, 20)
    assert native.runtime == "native"
    numpy_evaluator = TreeEnsemble.from_lightgbm_text(text, 20, native=False)
    rng = np.random.default_rng(23)
    x = rng.normal(size=(210, 20))
    x[rng.random(x.shape) < 0.05] = np.nan
    x[:, 16:] = x[0, 16:]
    for start in range(0, 210, 9):
        x[start : start + 7, 10:16] = x[start, 10:16]
    x[2:4] = x[1]  # identical rows (a copied answer)
    x[150:160] = x[149]  # a run of them across a group of four
    x = x[:n]
    got = native.predict_raw(x)
    singles = np.array([native.predict_value(row.tolist()) for row in x])
    np.testing.assert_array_equal(got, singles)
    np.testing.assert_allclose(got, numpy_evaluator.predict_raw(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12)


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
    native = TreeEnsemble.from_lightgbm_text(text, n_inputs)
    assert native.runtime == "native"
    x = rng.normal(size=(50, n_inputs))
    x[:, 0] = np.nan
    x[:, 3] = 0.25
    x[:, 1] = 1.5
    x[37, 1] = -1.5  # all rows equal but one
    x[:, -1] = 0.5
    x[12, -1] = -0.5  # the same in the last column
    x[:, 2] = np.repeat(rng.normal(size=10), 5)  # runs of five
    got = native.predict_raw(x)
    singles = np.array([native.predict_value(row.tolist()) for row in x])
    np.testing.assert_array_equal(got, singles)
    np.testing.assert_allclose(got, _lightgbm(text, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 5, 203])
def test_rows_given_as_some_columns_and_shared_values_give_the_full_rows_answers(n: int) -> None:
    # A personalised batch writes only the inputs that differ between its movies; the user's are given once.
    # Columns in any order, one of them constant (folded), the absent features' shared values with a NaN among them.
    text = _wide_model()
    native = TreeEnsemble.from_lightgbm_text(text, 20)
    numpy_evaluator = TreeEnsemble.from_lightgbm_text(text, 20, native=False)
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
    want = native.predict_raw(full)
    np.testing.assert_array_equal(native.predict_raw_columns(x, columns, values), want)
    np.testing.assert_array_equal(
        numpy_evaluator.predict_raw_columns(x, columns, values), numpy_evaluator.predict_raw(full)
    )


def test_predict_refuses_columns_that_are_not_distinct_features() -> None:
    native = TreeEnsemble.from_lightgbm_text(_wide_model(), 20)
    forest = native._native
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


def test_batches_of_one_and_zero_rows() -> None:
    native, numpy_evaluator = _pair(_model(60, True))
    x = _nan_rows(seed=31)
    for i in range(0, 200, 9):
        one = native.predict_raw(x[i : i + 1])
        assert one.shape == (1,)
        assert one[0] == native.predict_value(x[i].tolist())
        np.testing.assert_allclose(one, numpy_evaluator.predict_raw(x[i : i + 1]), rtol=0, atol=1e-12)
    empty = native.predict_raw(np.empty((0, N_FEATURES)))
    assert empty.shape == (0,)
    assert empty.dtype == np.float64
    out = np.empty(0)
    assert native._native.predict(np.empty((0, N_FEATURES)), out) is None


def _stump(index: int, feature: int, threshold: float, leaves: tuple[float, float]) -> list[str]:
    return [
        f"Tree={index}",
        "num_leaves=2",
        "num_cat=0",
        f"split_feature={feature}",
        "split_gain=1",
        f"threshold={threshold!r}",
        "decision_type=2",
        "left_child=-1",
        "right_child=-2",
        f"leaf_value={leaves[0]!r} {leaves[1]!r}",
        "leaf_weight=1 1",
        "leaf_count=1 1",
        "internal_value=0",
        "internal_weight=0",
        "internal_count=2",
        "is_linear=0",
        "shrinkage=1",
        "",
        "",
    ]


def test_values_within_the_zero_threshold_predict_as_zero() -> None:
    # Two stumps on feature 0, with thresholds no trained model would pick: 0 (1e-36 would go right, 0 goes
    # left) and -1e-37 (-1e-36 would go left, 0 goes right). LightGBM reads |x| <= 1e-35 as 0: 1 + 40 = 41.
    text = "\n".join(
        [
            "tree",
            "version=v4",
            "num_class=1",
            "num_tree_per_iteration=1",
            "label_index=0",
            "max_feature_idx=1",
            "objective=regression",
            "feature_names=a b",
            "feature_infos=[-1:1] [-1:1]",
            "",
            *_stump(0, 0, 0.0, (1.0, 4.0)),
            *_stump(1, 0, -1e-37, (10.0, 40.0)),
            "end of trees",
            "",
            "pandas_categorical:null",
            "",
        ]
    )
    native = TreeEnsemble.from_lightgbm_text(text, 2)
    numpy_evaluator = TreeEnsemble.from_lightgbm_text(text, 2, native=False)
    assert native.runtime == "native"
    as_zero = [0.0, -0.0, 1e-36, -1e-36, 1e-40, -1e-40, 1e-35, -1e-35]
    # A list, not a dict: -0.0 == 0.0 would merge the two keys.
    expected = [*((v, 41.0) for v in as_zero), (1e-30, 44.0), (-1e-30, 11.0)]  # 1e-30 is not zero
    for value, answer in expected:
        assert native.predict_value([value, 0.0]) == answer, value
        assert native.predict_value([value, 5.0]) == answer, value
    values = np.array([v for v, _ in expected])
    want = np.array([a for _, a in expected])
    varying = np.column_stack([values, np.arange(len(values), dtype=np.float64)])
    np.testing.assert_array_equal(native.predict_raw(varying), want)
    np.testing.assert_array_equal(numpy_evaluator.predict_raw(varying), want)
    np.testing.assert_array_equal(_lightgbm(text, varying), want)
    for value, w in expected:  # the value in a constant column: folded into the starting masks
        constant = np.column_stack([np.full(5, value), np.arange(5, dtype=np.float64)])
        np.testing.assert_array_equal(native.predict_raw(constant), np.full(5, w), err_msg=str(value))


@pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])
def test_the_zero_threshold_is_1e35f(native: bool) -> None:
    # A trained model (NaN data) with a split at -1.0000000180025095e-35 (LightGBM's bin bound for 0):
    # a value exactly on it is 0 to LightGBM (goes right), and less than the threshold to TreeEnsemble.
    text = _model(32, True)
    ensemble = TreeEnsemble.from_lightgbm_text(text, N_FEATURES, native=native)
    assert -LIGHTGBM_ZERO in ensemble.thresholds[4].tolist()
    x = _random_rows(200, seed=71)
    x[:, 4] = np.tile([LIGHTGBM_ZERO, -LIGHTGBM_ZERO, 1.00000001e-35, -1.00000001e-35], 50)
    np.testing.assert_allclose(ensemble.predict_raw(x), _lightgbm(text, x), rtol=0, atol=1e-12)


def test_predict_value_refuses_bad_rows() -> None:
    native, _ = _pair(_model(32, False))
    row = [1.0, 5.0, 100.0, 0.0, 3.0, 10.0]
    assert native.predict_value(row) == native.predict_value(tuple(row))  # type: ignore[arg-type]
    for wrong in ([], row[:-1], [*row, 1.0], row * 20):
        with pytest.raises(ValueError, match=f"{len(wrong)} values for 6 features"):
            native.predict_value(wrong)
    for bad in ("a", None, [1.0], object()):
        with pytest.raises(TypeError):
            native.predict_value([*row[:3], bad, *row[4:]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list or tuple"):
        native.predict_value(5)  # type: ignore[arg-type]
    assert native.predict_value(row) == native.predict_raw(np.array([row]))[0]  # still fine afterwards


def test_native_predict_refuses_wrong_shapes() -> None:
    native, _ = _pair(_model(60, False))
    forest = native._native
    x = _random_rows(10, seed=41)
    expected = native.predict_raw(x)
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
        native.predict_raw(x[:, :5])
    out = np.empty(10)
    forest.predict(x, out)
    np.testing.assert_array_equal(out, expected)


def _forest_args(ensemble: TreeEnsemble) -> dict[str, Any]:
    """The arrays TreeEnsemble hands to Forest (model.py), by keyword."""
    return {
        "thresholds": np.concatenate([*ensemble.thresholds, np.empty(0)]).astype(np.float64),
        "thr_starts": np.cumsum([0] + [len(t) for t in ensemble.thresholds], dtype=np.int64),
        "tables": ensemble._native_tables,
        "table_starts": np.asarray(ensemble._table_starts, dtype=np.int64),
        "leaf_values": np.ascontiguousarray(ensemble.leaf_values, dtype=np.float64),
        "n_trees": ensemble.n_trees,
    }


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


@pytest.mark.parametrize("num_leaves", [16, 32, 60], ids=["16-bit", "32-bit", "64-bit"])
@pytest.mark.parametrize("case", list(_BREAKS))
def test_forest_refuses_inconsistent_arrays(num_leaves: int, case: str) -> None:
    ensemble = TreeEnsemble.from_lightgbm_text(_model(num_leaves, False), N_FEATURES)
    good = _forest_args(ensemble)
    forest = Forest(**good)  # the unbroken arrays are accepted and give the ensemble's answers
    x = _random_rows(50, seed=51)
    out = np.empty(50)
    forest.predict(x, out)
    np.testing.assert_array_equal(out, ensemble.predict_raw(x))
    with pytest.raises(RuntimeError, match="already initialised"):
        forest.__init__(**good)
    with pytest.raises(RuntimeError, match="not initialised"):
        Forest.__new__(Forest).predict_row([0.0] * N_FEATURES)
    breaks, message = _BREAKS[case]
    with pytest.raises(ValueError, match=f"^Forest: .*({message})"):
        Forest(**breaks(good))
    with pytest.raises(TypeError):
        Forest(**{**good, "tables": list(range(10))})


def test_forest_refuses_a_table_start_that_overflows() -> None:
    good = _forest_args(TreeEnsemble.from_lightgbm_text(_model(32, False), N_FEATURES))
    with pytest.raises(ValueError, match="outside tables"):
        Forest(**{**good, "table_starts": _i64([*good["table_starts"][:-1], 2**63 - 1])})


def test_a_forest_whose_init_failed_cannot_predict() -> None:
    # In a child process: before the fix this crashed the interpreter.
    code = textwrap.dedent(
        """
        import numpy as np
        from moviematch_ml._trees import Forest
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


def test_threads_predicting_at_once_get_the_serial_answers() -> None:
    native, _ = _pair(_model(60, True))
    batches = [_nan_rows(seed=61 + k) for k in range(4)]
    for k, batch in enumerate(batches):
        batch[:, k] = batch[0, k]  # a different constant column in each: each call folds its own masks
    serial = [native.predict_raw(b) for b in batches]
    start = threading.Barrier(len(batches))
    results: list[list[Array]] = [[] for _ in batches]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            start.wait()
            for _ in range(30):
                results[k].append(native.predict_raw(batches[k]))
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


def test_the_service_model_runs_native(tiny_model_dir: Path) -> None:
    predictor = load_predictor(tiny_model_dir)
    assert predictor.runtime == "native"
    assert predictor.ensemble is not None
    assert predictor.ensemble.runtime == "native"
    x, _ = tiny_training_data(200, seed=3)
    text = (tiny_model_dir / "model.txt").read_text(encoding="utf-8")
    np.testing.assert_allclose(predictor.predict_raw(x), _lightgbm(text, x), rtol=0, atol=1e-12)
    assert predictor.predict(x[:1])[0] == np.clip(_lightgbm(text, x[:1])[0] * 2.0, 0.0, 10.0)
