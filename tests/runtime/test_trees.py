"""The tree evaluator gives LightGBM's predictions (to 1e-9), in numpy and in C, and hands what it cannot run back to
LightGBM. (Every case of the compiled evaluator against its numpy twin: tests/runtime/test_native.py.)"""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest

from conftest import tiny_training_data
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime import native
from moviematch_ml.runtime.trees import EnsembleBooster, TreeEnsemble, UnsupportedModelError, fast_booster

# Both runtimes of TreeEnsemble: the compiled evaluator (when the extension is built) and numpy.
RUNTIMES = [
    pytest.param(
        True,
        id="native",
        marks=pytest.mark.skipif(native.Forest is None, reason="the _trees extension is not built"),
    ),
    pytest.param(False, id="numpy"),
]


def _train(params: dict[str, Any], rounds: int, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> str:
    base = {"seed": 0, "deterministic": True, "num_threads": 1, "verbose": -1, "min_data_in_leaf": 5}
    booster = lgb.train({**base, **params}, lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES)), rounds)
    text: str = booster.model_to_string()
    return text


def _rows_to_check(text: str, n: int = 3000) -> npt.NDArray[np.float64]:
    """Random rows, plus rows sitting exactly on every split threshold, plus zeros and near-zeros."""
    rng = np.random.default_rng(1)
    x, _ = tiny_training_data(n, seed=1)
    x = x.copy()
    booster = lgb.Booster(model_str=text)
    dump = booster.dump_model()["tree_info"]
    on_threshold: list[tuple[int, float]] = []

    def collect(node: dict[str, Any]) -> None:
        if "split_feature" in node:
            on_threshold.append((node["split_feature"], float(node["threshold"])))
            collect(node["left_child"])
            collect(node["right_child"])

    for tree in dump:
        collect(tree["tree_structure"])
    for k, (feature, threshold) in enumerate(on_threshold[: n // 2]):
        x[k, feature] = threshold  # x == threshold must go left, as in LightGBM (x <= threshold)
        x[n // 2 + k, feature] = np.nextafter(threshold, np.inf)  # the smallest value that goes right
    x[-20:] = 0.0
    x[-40:-20, rng.integers(0, 6)] = 1e-40  # LightGBM reads |x| <= 1e-35 as zero
    return x


@pytest.mark.parametrize("use_native", RUNTIMES)
@pytest.mark.parametrize(
    ("params", "rounds"),
    [
        ({"objective": "regression", "num_leaves": 7, "learning_rate": 0.2}, 20),
        ({"objective": "regression", "num_leaves": 31, "learning_rate": 0.1}, 60),
        ({"objective": "regression", "num_leaves": 48, "learning_rate": 0.1}, 10),  # 64-bit masks
        ({"objective": "huber", "num_leaves": 15, "max_depth": 3}, 15),
    ],
)
def test_the_evaluator_matches_lightgbm(params: dict[str, Any], rounds: int, use_native: bool) -> None:
    x, y = tiny_training_data(2000)
    text = _train(params, rounds, x, y)
    ensemble = TreeEnsemble.from_lightgbm_text(text, len(FEATURE_NAMES), native=use_native)
    assert ensemble.runtime == ("native" if use_native else "numpy")
    rows = _rows_to_check(text)
    expected = lgb.Booster(model_str=text).predict(rows, num_threads=1)
    np.testing.assert_allclose(ensemble.predict_raw(rows), expected, rtol=0, atol=1e-9)
    # The one-row path (numpy: bisect on lists) must agree as well.
    singles = np.array([ensemble.predict_raw(rows[i : i + 1])[0] for i in range(0, len(rows), 7)])
    np.testing.assert_allclose(singles, expected[::7], rtol=0, atol=1e-9)


def test_constant_target_gives_single_leaf_trees() -> None:
    x, _ = tiny_training_data(200)
    text = _train({"objective": "regression", "num_leaves": 7}, 3, x, np.full(200, 3.5))
    for use_native in (True, False):
        ensemble = TreeEnsemble.from_lightgbm_text(text, len(FEATURE_NAMES), native=use_native)
        np.testing.assert_allclose(ensemble.predict_raw(x[:5]), np.full(5, 3.5), atol=1e-9)


_STUMP_TEXT = "\n".join(
    [
        "tree",
        "version=v4",
        "num_class=1",
        "num_tree_per_iteration=1",
        "label_index=0",
        "max_feature_idx=5",
        "objective=regression",
        "",
        "Tree=0",
        "num_leaves=2",
        "num_cat=0",
        "split_feature=1",
        "threshold=5",
        "decision_type=2",
        "left_child=-1",
        "right_child=-2",
        "leaf_value=1 4",
        "shrinkage=1",
        "",
        "",
        "end of trees",
    ]
)


@pytest.mark.parametrize("use_native", RUNTIMES)
def test_hand_built_stump(use_native: bool) -> None:
    # One tree: vote_average <= 5 -> leaf 0 (1.0), else leaf 1 (4.0). Expected values written by hand.
    ensemble = TreeEnsemble.from_lightgbm_text(_STUMP_TEXT, 6, native=use_native)
    x = np.zeros((3, 6))
    x[:, 1] = [4.9, 5.0, 5.1]
    assert ensemble.predict_raw(x).tolist() == [1.0, 1.0, 4.0]
    assert ensemble.predict_raw(x[2:]).tolist() == [4.0]
    assert ensemble.predict_value([0.0, 5.0, 0.0, 0.0, 0.0, 0.0]) == 1.0


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


@pytest.mark.parametrize("use_native", RUNTIMES)
def test_values_within_the_zero_threshold_predict_as_zero(use_native: bool) -> None:
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
    ensemble = TreeEnsemble.from_lightgbm_text(text, 2, native=use_native)
    assert ensemble.runtime == ("native" if use_native else "numpy")
    as_zero = [0.0, -0.0, 1e-36, -1e-36, 1e-40, -1e-40, 1e-35, -1e-35]
    # A list, not a dict: -0.0 == 0.0 would merge the two keys.
    expected = [*((v, 41.0) for v in as_zero), (1e-30, 44.0), (-1e-30, 11.0)]  # 1e-30 is not zero
    for value, answer in expected:
        assert ensemble.predict_value([value, 0.0]) == answer, value
        assert ensemble.predict_value([value, 5.0]) == answer, value
    values = np.array([v for v, _ in expected])
    want = np.array([a for _, a in expected])
    varying = np.column_stack([values, np.arange(len(values), dtype=np.float64)])
    np.testing.assert_array_equal(ensemble.predict_raw(varying), want)
    np.testing.assert_array_equal(lgb.Booster(model_str=text).predict(varying, num_threads=1), want)
    for value, w in expected:  # the value in a constant column (the C evaluator folds it into its starting masks)
        constant = np.column_stack([np.full(5, value), np.arange(5, dtype=np.float64)])
        np.testing.assert_array_equal(ensemble.predict_raw(constant), np.full(5, w), err_msg=str(value))


def test_fast_booster_is_a_drop_in_for_other_feature_counts() -> None:
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 10, (500, 9))
    y = x[:, 0] * 0.3 + np.sin(x[:, 4]) + rng.normal(0, 0.1, 500)
    booster = lgb.train(
        {"objective": "regression", "num_leaves": 15, "verbose": -1, "num_threads": 1, "seed": 0},
        lgb.Dataset(x, y),
        30,
    )
    text = booster.model_to_string()
    fast = fast_booster(text, 9)
    assert isinstance(fast, EnsembleBooster)
    assert fast.num_feature() == 9
    assert fast.model_to_string() == text  # a loaded model saves again byte for byte
    np.testing.assert_allclose(fast.predict(x, num_threads=1), booster.predict(x, num_threads=1), rtol=0, atol=1e-9)
    binary = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, (y > 2).astype(float)), 3)
    assert isinstance(fast_booster(binary.model_to_string(), 9), lgb.Booster)  # link function: LightGBM runs it


@pytest.mark.parametrize("use_native", RUNTIMES)
def test_nan_goes_where_lightgbm_sends_it(use_native: bool) -> None:
    # Feature 0 has NaNs in training: its splits learn a default side for NaN (NaN-as-missing), and the target
    # makes both sides occur. Feature 1 has none but negative values: LightGBM reads a NaN there as 0, which
    # lands on either side of its thresholds. Every NaN pattern must give LightGBM's answer, on both paths.
    rng = np.random.default_rng(7)
    x = rng.uniform(-5, 10, (3000, 4))
    x[rng.random(3000) < 0.3, 0] = np.nan
    y = np.where(np.isnan(x[:, 0]), 9.0 * (x[:, 2] > 5), x[:, 0] * 0.5) + np.abs(x[:, 1])
    booster = lgb.train(
        {"objective": "regression", "num_leaves": 15, "verbose": -1, "num_threads": 1, "seed": 0},
        lgb.Dataset(x, y),
        num_boost_round=30,
    )
    text = booster.model_to_string()
    decisions = {int(d) for line in text.splitlines() if line.startswith("decision_type=") for d in line[14:].split()}
    # Both kinds of split are really in the model.
    assert decisions & {8, 10}
    assert decisions & {0, 2}
    ensemble = TreeEnsemble.from_lightgbm_text(text, 4, native=use_native)
    probe = rng.uniform(-5, 10, (400, 4))
    probe[rng.random((400, 4)) < 0.4] = np.nan
    probe[:16] = [[np.nan if (k >> j) & 1 else 1.0 for j in range(4)] for k in range(16)]  # every NaN pattern
    expected = booster.predict(probe, num_threads=1)
    np.testing.assert_allclose(ensemble.predict_raw(probe), expected, rtol=0, atol=1e-9)
    singles = [ensemble.predict_raw(probe[i : i + 1])[0] for i in range(len(probe))]
    np.testing.assert_allclose(singles, expected, rtol=0, atol=1e-9)


def test_zero_as_missing_models_are_left_to_lightgbm() -> None:
    # zero_as_missing sends values near 0 to a default side: not a threshold prefix, so LightGBM runs it.
    rng = np.random.default_rng(8)
    x = rng.uniform(-5, 10, (2000, 4))
    x[rng.random(2000) < 0.3, 0] = 0.0
    y = np.where(x[:, 0] == 0.0, 9.0, x[:, 0] * 0.5)
    booster = lgb.train(
        {"objective": "regression", "num_leaves": 7, "verbose": -1, "num_threads": 1, "zero_as_missing": True},
        lgb.Dataset(x, y),
        num_boost_round=10,
    )
    text = booster.model_to_string()
    with pytest.raises(UnsupportedModelError, match="zero-as-missing"):
        TreeEnsemble.from_lightgbm_text(text, 4)
    fast = fast_booster(text, 4)
    assert isinstance(fast, lgb.Booster)
    probe = np.array([[0.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(fast.predict(probe), booster.predict(probe), atol=1e-12)
