"""Evaluation: the protocols' splits, loud failures, pluggable candidates and frozen features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.candidates import GlobalMeanCandidate
from moviematch_ml.offline.data import Dataset
from moviematch_ml.offline.evaluation import (
    EvaluationError,
    FeatureMode,
    Protocol_,
    check_predictions,
    evaluate,
    kfold_split,
    split_frames,
    temporal_split,
)
from moviematch_ml.offline.metrics import rmse
from moviematch_ml.offline.point_in_time import FeatureConfig, compute_features
from moviematch_ml.runtime.cards import RatingScale

FloatArray = np.ndarray


def test_temporal_split_is_the_first_80_percent() -> None:
    [(train, test)] = temporal_split(10)
    assert train.tolist() == list(range(8))
    assert test.tolist() == [8, 9]


def test_kfold_split_partitions_and_is_seeded() -> None:
    splits = kfold_split(103, 5, seed=1)
    tests = [t for _, t in splits]
    assert sorted(np.concatenate(tests).tolist()) == list(range(103))
    assert [len(t) for t in tests] == [21, 21, 21, 20, 20]
    for train, test in splits:
        assert not set(train.tolist()) & set(test.tolist())
        assert len(train) + len(test) == 103
    assert all((a[1] == b[1]).all() for a, b in zip(splits, kfold_split(103, 5, seed=1), strict=True))
    assert not (kfold_split(103, 5, seed=2)[0][1] == tests[0]).all()
    with pytest.raises(EvaluationError):
        kfold_split(10, 1, seed=0)


def test_missing_predictions_fail_loudly() -> None:
    with pytest.raises(EvaluationError, match="1 of 3 predictions"):
        check_predictions("m", [1.0, float("nan"), 2.0], 3, allow_missing=False)
    with pytest.raises(EvaluationError, match=r"returned \(2,\) predictions for 3"):
        check_predictions("m", [1.0, 2.0], 3, allow_missing=False)
    assert np.isnan(check_predictions("m", [1.0, float("nan"), 2.0], 3, allow_missing=True)[1])


def _dataset(n: int = 600, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    movies = pd.DataFrame(
        {
            "movie_id": np.arange(20),
            "title": [f"m{i}" for i in range(20)],
            "year": np.full(20, 1999.0),
            "genres": [("Drama",) if i % 2 else ("Comedy", "Drama") for i in range(20)],
            "vote_average": np.nan,
            "vote_count": np.nan,
            "popularity": np.nan,
            "release_year": np.full(20, 1999.0),
        }
    )
    ratings = pd.DataFrame(
        {
            "user_id": rng.integers(0, 15, n),
            "movie_id": rng.integers(0, 20, n),
            "rating": rng.integers(1, 6, n).astype(float),
            "timestamp": 1_000_000_000 + np.arange(n) * 3600,
        }
    )
    return Dataset("synthetic", ratings, movies, RatingScale(min=1.0, max=5.0, step=1.0))


@dataclass(frozen=True)
class _Blind:
    """A candidate that checks it never sees the test ratings and predicts the training mean of each user."""

    name: str = "user_mean"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        assert "rating" not in test.columns
        assert set(FEATURE_NAMES) <= set(train.columns)
        assert set(FEATURE_NAMES) <= set(test.columns)
        means = train.groupby("user_id")["rating"].mean()
        out: FloatArray = test["user_id"].map(means).fillna(train["rating"].mean()).to_numpy(dtype=np.float64)
        return out


def test_evaluate_with_a_plugged_in_candidate() -> None:
    ds = _dataset()
    out = evaluate(ds, "temporal", candidates=[GlobalMeanCandidate(), _Blind()])
    assert (out["protocol"], out["n_train"], out["n_test"]) == ("temporal", 480, 120)
    assert out["rating_scale"] == {"min": 1.0, "max": 5.0, "step": 1.0}
    assert list(out["models"]) == ["global_mean", "user_mean"]
    test = ds.ratings.iloc[480:]
    mu = ds.ratings["rating"].iloc[:480].mean()
    assert out["models"]["global_mean"]["rmse"] == pytest.approx(
        rmse(test["rating"].to_numpy(), np.full(120, mu)), abs=1e-4
    )
    assert set(out["models"]["user_mean"]) == {"rmse", "mae", "ndcg@10", "rmse_cold_users", "rmse_warm_users"}


def test_evaluate_kfold_averages_the_folds() -> None:
    ds = _dataset()
    out = evaluate(ds, "kfold", folds=3, seed=7, candidates=[GlobalMeanCandidate()])
    assert out["folds"] == 3
    assert (out["n_train"], out["n_test"]) == (400, 200)
    per_fold = out["per_fold_rmse"]["global_mean"]
    assert out["models"]["global_mean"]["rmse"] == pytest.approx(np.mean(per_fold), abs=1e-4)
    # No user is cold in random folds of this data: the cold RMSE is undefined, not zero.
    assert math.isnan(out["models"]["global_mean"]["rmse_cold_users"])


@dataclass(frozen=True)
class _Broken:
    name: str = "broken"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        out = np.ones(len(test))
        out[0] = np.nan
        return out


def test_evaluate_refuses_nan_unless_allowed() -> None:
    with pytest.raises(EvaluationError, match="broken"):
        evaluate(_dataset(), "temporal", candidates=[_Broken()])
    out = evaluate(_dataset(), "temporal", candidates=[_Broken()], allow_missing=True)
    assert out["models"]["broken"]["missing"] == 1


# --- frozen features: the test rows' features come from the training ratings only -------------------------------


@dataclass
class _Recorder:
    """Predicts 3 and keeps the frames it was given."""

    name: str = "recorder"

    def __post_init__(self) -> None:
        self.seen: list[tuple[pd.DataFrame, pd.DataFrame]] = []

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        self.seen.append((train.copy(), test.copy()))
        return np.full(len(test), 3.0)


def _ten() -> Dataset:
    """8 training ratings (movie 0, 3 stars, users 0-7), then 2 test ratings of movie 1 (5 then 1 star)."""
    movies = pd.DataFrame(
        {
            "movie_id": [0, 1],
            "title": ["a", "b"],
            "year": [1999.0, 1999.0],
            "genres": [("Drama",), ("Comedy",)],
            "vote_average": np.nan,
            "vote_count": np.nan,
            "popularity": np.nan,
            "release_year": [1999.0, 1999.0],
        }
    )
    ratings = pd.DataFrame(
        {
            "user_id": np.arange(10),
            "movie_id": [0] * 8 + [1, 1],
            "rating": [3.0] * 8 + [5.0, 1.0],
            "timestamp": 1_000_000_000 + np.arange(10) * 3600,
        }
    )
    return Dataset("ten", ratings, movies, RatingScale(min=1.0, max=5.0, step=1.0))


def test_frozen_temporal_features_by_hand() -> None:
    cfg = TrainConfig(features=FeatureConfig(vote_source="ratings", damping=1.0))
    online, frozen = _Recorder(), _Recorder()
    out_online = evaluate(_ten(), "temporal", config=cfg, candidates=[online])
    out_frozen = evaluate(_ten(), "temporal", config=cfg, candidates=[frozen], features="frozen")
    assert (out_online["features"], out_frozen["features"]) == ("online", "frozen")
    [(train_on, test_on)] = online.seen
    [(train_fr, test_fr)] = frozen.seen
    # Training rows only ever see training rows: identical in both modes.
    pd.testing.assert_frame_equal(train_on, train_fr, check_exact=True)
    # Test row 8 (first rating of movie 1): 8 earlier ratings, all 3 stars, in both modes -> (0 + 1*3) / 1 = 3
    # stars = 6.0, count 0, popularity 0 of 8.
    # Test row 9, online: movie 1 had row 8 (5 stars); global earlier mean (8*3 + 5) / 9 = 29/9 ->
    # (5 + 29/9) / 2 = 37/9 stars = 74/9 on 0-10, count 1, popularity 1 of 9 ratings in the window x 10,000.
    # Frozen: row 8 is a test rating, so movie 1 has no history: 3 stars = 6.0, count 0, popularity 0.
    assert test_on["vote_average"].tolist() == pytest.approx([6.0, 74 / 9])
    assert test_fr["vote_average"].tolist() == pytest.approx([6.0, 6.0])
    assert test_on["vote_count"].tolist() == [0, 1]
    assert test_fr["vote_count"].tolist() == [0, 0]
    assert test_on["popularity"].tolist() == pytest.approx([0.0, 10_000 / 9])
    assert test_fr["popularity"].tolist() == [0.0, 0.0]
    # The test rows' own time still sets the age (rated in 2001, released 1999).
    assert test_fr["years_since_release"].tolist() == [2, 2]


def _features_of_splits(ds: Dataset, protocol: Protocol_, mode: FeatureMode) -> list[pd.DataFrame]:
    return [frame.loc[:, list(FEATURE_NAMES)] for frame, _, _ in split_frames(ds, protocol, mode, folds=3, seed=7)]


@pytest.mark.parametrize("protocol", ["temporal", "kfold"])
def test_frozen_features_never_see_a_test_rating(protocol: Protocol_) -> None:
    ds = _dataset(900, seed=3)
    before = _features_of_splits(ds, protocol, "frozen")
    splits = list(split_frames(ds, protocol, "frozen", folds=3, seed=7))
    for k, (_, _, test_idx) in enumerate(splits):
        ratings = ds.ratings.copy()
        # Every test rating of this split changes (1 <-> 5, 2 <-> 4; 3 -> 1).
        old = ratings.loc[test_idx, "rating"].to_numpy()
        ratings.loc[test_idx, "rating"] = np.where(old == 3.0, 1.0, 6.0 - old)
        changed = Dataset(ds.name, ratings, ds.movies, ds.scale)
        after = _features_of_splits(changed, protocol, "frozen")[k]
        # Not one feature of any row (training or test) of this split moves.
        pd.testing.assert_frame_equal(after, before[k], check_exact=True)
        # Online, the same change does move features (so the check above can fail).
        online_before = _features_of_splits(ds, protocol, "online")[k]
        online_after = _features_of_splits(changed, protocol, "online")[k]
        assert (online_after != online_before).any(axis=None)


def test_frozen_frames_are_the_history_masked_features() -> None:
    ds = _dataset(600, seed=1)
    for frame, train_idx, test_idx in split_frames(ds, "kfold", "frozen", folds=3, seed=7):
        history = np.zeros(600, dtype=bool)
        history[train_idx] = True
        expected = compute_features(ds, TrainConfig(seed=7).features, history=history)
        pd.testing.assert_frame_equal(frame.loc[:, list(FEATURE_NAMES)], expected, check_exact=True)
        assert len(train_idx) + len(test_idx) == 600
    [(frame, train_idx, _)] = list(split_frames(ds, "temporal", "frozen"))
    online = compute_features(ds, TrainConfig().features)
    # Temporal: the training rows keep exactly their online features.
    pd.testing.assert_frame_equal(
        frame.loc[train_idx, list(FEATURE_NAMES)], online.loc[train_idx], check_exact=True, check_names=False
    )


def test_every_candidate_gets_the_same_frozen_frames_and_bad_modes_fail() -> None:
    a, b = _Recorder("a"), _Recorder("b")
    out = evaluate(_dataset(), "kfold", folds=3, seed=7, candidates=[a, b], features="frozen")
    assert out["features"] == "frozen"
    assert len(a.seen) == len(b.seen) == 3
    for (tr_a, te_a), (tr_b, te_b) in zip(a.seen, b.seen, strict=True):
        pd.testing.assert_frame_equal(tr_a, tr_b, check_exact=True)
        pd.testing.assert_frame_equal(te_a, te_b, check_exact=True)
    with pytest.raises(EvaluationError, match="features must be"):
        evaluate(_dataset(), "temporal", candidates=[GlobalMeanCandidate()], features="stale")  # type: ignore[arg-type]
