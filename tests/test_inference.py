"""The numpy tree evaluator gives LightGBM's predictions (to 1e-9) and hands what it cannot run back to LightGBM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest

from conftest import tiny_training_data
from moviematch_ml.errors import ModelFormatError
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.model import (
    EnsembleBooster,
    LightGBMPredictor,
    ModelCard,
    RatingScale,
    TreeEnsemble,
    UnsupportedModelError,
    fast_booster,
    load_predictor,
)


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


@pytest.mark.parametrize(
    ("params", "rounds"),
    [
        ({"objective": "regression", "num_leaves": 7, "learning_rate": 0.2}, 20),
        ({"objective": "regression", "num_leaves": 31, "learning_rate": 0.1}, 60),
        ({"objective": "regression", "num_leaves": 48, "learning_rate": 0.1}, 10),  # 64-bit masks
        ({"objective": "huber", "num_leaves": 15, "max_depth": 3}, 15),
    ],
)
def test_numpy_evaluator_matches_lightgbm(params: dict[str, Any], rounds: int) -> None:
    x, y = tiny_training_data(2000)
    text = _train(params, rounds, x, y)
    ensemble = TreeEnsemble.from_lightgbm_text(text, len(FEATURE_NAMES))
    rows = _rows_to_check(text)
    expected = lgb.Booster(model_str=text).predict(rows, num_threads=1)
    np.testing.assert_allclose(ensemble.predict_raw(rows), expected, rtol=0, atol=1e-9)
    # The one-row path (bisect on lists) must agree as well.
    singles = np.array([ensemble.predict_raw(rows[i : i + 1])[0] for i in range(0, len(rows), 7)])
    np.testing.assert_allclose(singles, expected[::7], rtol=0, atol=1e-9)


def test_constant_target_gives_single_leaf_trees() -> None:
    x, _ = tiny_training_data(200)
    text = _train({"objective": "regression", "num_leaves": 7}, 3, x, np.full(200, 3.5))
    ensemble = TreeEnsemble.from_lightgbm_text(text, len(FEATURE_NAMES))
    np.testing.assert_allclose(ensemble.predict_raw(x[:5]), np.full(5, 3.5), atol=1e-9)


def test_hand_built_stump() -> None:
    # One tree: vote_average <= 5 -> leaf 0 (1.0), else leaf 1 (4.0). Expected values written by hand.
    text = "\n".join(
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
    ensemble = TreeEnsemble.from_lightgbm_text(text, 6)
    x = np.zeros((3, 6))
    x[:, 1] = [4.9, 5.0, 5.1]
    assert ensemble.predict_raw(x).tolist() == [1.0, 1.0, 4.0]
    assert ensemble.predict_raw(x[2:]).tolist() == [4.0]


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"objective": "binary"}, "link function"),
        ({"objective": "regression", "num_leaves": 100, "min_data_in_leaf": 2}, "64 leaves"),
    ],
)
def test_unsupported_models_go_to_lightgbm(params: dict[str, Any], why: str) -> None:
    x, y = tiny_training_data(2000)
    target = (y > 2.5).astype(float) if params["objective"] == "binary" else y
    text = _train(params, 5, x, target)
    with pytest.raises(UnsupportedModelError, match=why):
        TreeEnsemble.from_lightgbm_text(text, len(FEATURE_NAMES))
    predictor = LightGBMPredictor(_card(), text)
    assert predictor.runtime == "lightgbm"
    expected = lgb.Booster(model_str=text).predict(x[:50], num_threads=1)
    np.testing.assert_allclose(predictor.predict_raw(x[:50]), expected, atol=1e-12)


def _card() -> ModelCard:
    return ModelCard(
        name="t",
        version="t-1",
        created_at="2026-01-01T00:00:00+00:00",
        model_file="model.txt",
        model_format="lightgbm-text",
        sha256="0" * 64,
        features=list(FEATURE_NAMES),
        rating_scale=RatingScale(min=0.5, max=5.0),
    )


def test_the_service_model_uses_our_evaluator(tiny_model_dir: Path) -> None:
    predictor = load_predictor(tiny_model_dir)
    assert predictor.runtime == "native"  # the compiled twin of the numpy evaluator (tests/test_native.py)
    x, _ = tiny_training_data(100, seed=3)
    text = (tiny_model_dir / "model.txt").read_text(encoding="utf-8")
    raw = np.asarray(lgb.Booster(model_str=text).predict(x, num_threads=1))
    # Scaled from the 0.5-5 star scale to 0-10, clipped to the API's range.
    np.testing.assert_allclose(predictor.predict(x), np.clip(raw * 2.0, 0.0, 10.0), rtol=0, atol=1e-9)


def test_garbage_is_still_refused_as_a_model() -> None:
    with pytest.raises(ModelFormatError):
        LightGBMPredictor(_card(), "this is not a model")


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
    np.testing.assert_allclose(fast.predict(x, num_threads=1), booster.predict(x, num_threads=1), rtol=0, atol=1e-9)
    binary = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, (y > 2).astype(float)), 3)
    assert isinstance(fast_booster(binary.model_to_string(), 9), lgb.Booster)  # link function: LightGBM runs it


def test_nan_goes_where_lightgbm_sends_it() -> None:
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
    fast = fast_booster(text, 4)
    assert isinstance(fast, EnsembleBooster)
    probe = rng.uniform(-5, 10, (400, 4))
    probe[rng.random((400, 4)) < 0.4] = np.nan
    probe[:16] = [[np.nan if (k >> j) & 1 else 1.0 for j in range(4)] for k in range(16)]  # every NaN pattern
    expected = booster.predict(probe, num_threads=1)
    np.testing.assert_allclose(fast.predict(probe), expected, rtol=0, atol=1e-9)
    singles = [fast.predict(probe[i : i + 1])[0] for i in range(len(probe))]
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
    probe = np.array([[0.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(fast.predict(probe), booster.predict(probe), atol=1e-12)
