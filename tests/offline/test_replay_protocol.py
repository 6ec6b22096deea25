"""The replay protocol's service path: its answers are exactly what /predict answers after the same /feedback
calls, and the whole protocol reports every model with its learning curve."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from moviematch_ml.api.app import create_app
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.data import Dataset
from moviematch_ml.offline.live import ServedModels, feedback_body, request_body
from moviematch_ml.offline.point_in_time import compute_features
from moviematch_ml.offline.replay import BUCKET_LABELS, REPLAY_MODELS, bucket_gaps, history_cut, replay, replay_served
from moviematch_ml.online.harness import ServiceHarness
from moviematch_ml.runtime.cards import RatingScale
from moviematch_ml.runtime.factors import MFConfig
from moviematch_ml.runtime.personalized import PersonalizedConfig
from moviematch_ml.settings import Settings

SMALL = PersonalizedConfig(
    mf=MFConfig(factors=3, iterations=5), inner_folds=2, n_estimators=30, num_leaves=7, min_child_samples=5
)


def _dataset(n: int = 700, seed: int = 4) -> Dataset:
    """Users 0-11 rate from the start; users 12-15 only arrive in the last 20 % (cold users of the replay). Two
    ratings share each timestamp, so a rating's own instant is never seen."""
    rng = np.random.default_rng(seed)
    movies = pd.DataFrame(
        {
            "movie_id": np.arange(25),
            "title": [f"m{i}" for i in range(25)],
            "year": np.full(25, 1999.0),
            "genres": [("Drama",) if i % 2 else ("Comedy", "Drama") for i in range(25)],
            "vote_average": np.linspace(5.0, 8.0, 25),
            "vote_count": np.full(25, 100.0),
            "popularity": np.nan,
            "release_year": np.full(25, 1999.0),
        }
    )
    late = np.arange(n) >= int(0.8 * n)
    users = np.where(late & (rng.random(n) < 0.5), rng.integers(12, 16, n), rng.integers(0, 12, n))
    movie = rng.integers(0, 25, n)
    # Each user and movie has a taste: the personalised model has something to learn.
    rating = np.clip(np.round(3 + (users % 3 - 1) + (movie % 2) - 0.5 + rng.normal(0, 0.5, n)), 1, 5)
    ratings = pd.DataFrame(
        {
            "user_id": users,
            "movie_id": movie,
            "rating": rating.astype(float),
            "timestamp": 1_400_000_000 + (np.arange(n) // 2) * 3600,
        }
    )
    return Dataset("synthetic", ratings, movies, RatingScale(min=1.0, max=5.0, step=1.0))


def test_the_replay_answers_what_predict_answers_after_the_same_feedback(tmp_path: Path) -> None:
    dataset = _dataset()
    config = TrainConfig()
    frame = pd.concat([dataset.ratings, compute_features(dataset, config.features)], axis=1)
    cut = history_cut(frame["timestamp"].to_numpy())
    served = ServedModels(frame, dataset.scale, tmp_path / "replay", ServiceHarness, six_config=config, config=SMALL)
    try:
        answers, _, personal = asyncio.run(replay_served(served, cut))
    finally:
        served.close()
    to_api = dataset.scale.to_api
    # The cold users' first rating has no view yet (the six-feature model answers); their later ones do.
    test = frame.iloc[cut:].reset_index(drop=True)
    first_of_cold = ~test["user_id"].isin(frame["user_id"].iloc[:cut]) & ~test["user_id"].duplicated()
    assert first_of_cold.sum() == 4
    assert not personal[first_of_cold.to_numpy()].any()
    assert personal.mean() > 0.9

    # The same model files, a fresh store and the app over HTTP, on the same clock.
    clock = [0.0]
    settings = Settings(model_path=tmp_path / "replay", database_url=f"sqlite:///{tmp_path / 'app.sqlite3'}")
    app = create_app(settings, now=lambda: clock[0])
    got = []
    with TestClient(app) as client:
        history = frame.iloc[:cut]
        for k in range(0, cut, 1000):
            assert client.post("/feedback", content=feedback_body(history.iloc[k : k + 1000], to_api)).is_success
        for _, group in test.groupby("timestamp", sort=True):
            clock[0] = float(group["timestamp"].iloc[0])
            for row in group.itertuples():
                x = [getattr(row, name) for name in FEATURE_NAMES]
                answer = client.post("/predict", content=request_body(row.user_id, row.movie_id, x))
                assert answer.status_code == 200, answer.text
                got.append(answer.json()["predicted_rating"])
            assert client.post("/feedback", content=feedback_body(group, to_api)).is_success
    assert got == pytest.approx((answers * to_api).tolist(), abs=1e-12)


def test_replay_reports_every_model_with_its_learning_curve(tmp_path: Path) -> None:
    out = replay(_dataset(), personalized=SMALL, service=ServiceHarness, directory=tmp_path / "replay")
    assert list(out["models"]) == list(REPLAY_MODELS)
    assert (out["n_history"], out["n_test"]) == (560, 140)
    assert sum(out["bucket_test_ratings"].values()) == 140
    assert out["cold_user_test_ratings"] > 0
    for metrics in out["models"].values():
        assert set(metrics) == {"rmse", "mae", "ndcg@10", "rmse_cold_users", "rmse_warm_users", "learning_curve_rmse"}
        assert 0 < metrics["rmse"] < 4
    # Learning from the replayed ratings beats the bias model frozen at the history on the cold users.
    models = out["models"]
    assert models["online_bias"]["rmse_cold_users"] < models["bias"]["rmse_cold_users"]
    assert out["personalized_answered"] > 0
    gaps = out["personalized_vs_best_online"]
    assert list(gaps) == list(BUCKET_LABELS[1:])
    for label, gap in gaps.items():
        if out["bucket_test_ratings"][label] == 0:
            assert gap is None
            continue
        best = gap["best_peer"]
        curve = {name: models[name]["learning_curve_rmse"][label] for name in ("personalized", best)}
        assert gap["difference"] == pytest.approx(curve["personalized"] - curve[best], abs=2e-4)
        assert gap["ci95"][0] <= gap["difference"] <= gap["ci95"][1]


def test_bucket_gaps_compare_with_the_best_peer_and_resample_users() -> None:
    # Bucket 1 (one earlier rating): three users, one rating each. The model misses user 0 by 1; peer a is exact,
    # peer b misses everyone by 1. Best peer a; difference sqrt(1/3) - 0. Resampling three users: no user 0 drawn
    # (probability 8/27) gives 0, user 0 drawn three times (1/27 > 2.5 %) gives 1, so the interval is [0, 1].
    # Bucket 3-5: one user with two ratings, the model misses both by 2 and peer b by 1: +1, the only resample.
    truth = np.zeros(5)
    preds = {
        "m": np.array([1.0, 0.0, 0.0, 2.0, 2.0]),
        "a": np.zeros(5),
        "b": np.array([1.0, 1.0, 1.0, 1.0, 1.0]),
    }
    preds["a"][3:] = 3.0
    users = np.array(["u0", "u1", "u2", "u3", "u3"])
    bucket = np.array([1, 1, 1, 3, 3])
    gaps = bucket_gaps(truth, preds, users, bucket, model="m", peers=("a", "b"))
    assert gaps["1"] == {"best_peer": "a", "difference": round(3**-0.5, 4), "ci95": [0.0, 1.0], "users": 3}
    assert gaps["2"] is None
    assert gaps["3-5"] == {"best_peer": "b", "difference": 1.0, "ci95": [1.0, 1.0], "users": 1}
    assert "0" not in gaps


def test_validation_replays_within_the_history_and_never_reads_past_it() -> None:
    dataset = _dataset()
    cut = history_cut(dataset.ratings["timestamp"].to_numpy())
    models = ["global_mean", "online_bias"]
    out = replay(dataset, models=models, validation=True)
    assert out["validation"] is True
    assert out["n_history"] + out["n_test"] == cut
    assert out["n_history"] == history_cut(dataset.ratings["timestamp"].to_numpy()[:cut])
    # Every rating after the history changed: the validation replay does not move.
    later = dataset.ratings.copy()
    later.loc[cut:, "rating"] = dataset.scale.max
    again = replay(dataclasses.replace(dataset, ratings=later), models=models, validation=True)
    assert again["models"] == out["models"]
    assert replay(dataset, models=models)["models"] != out["models"]


def test_refit_days_refits_the_services_models_once_a_day(tmp_path: Path) -> None:
    dataset = _dataset()
    out = replay(
        dataset, personalized=SMALL, models=["personalized"], refit_days=1, service=ServiceHarness, directory=tmp_path
    )
    ts = dataset.ratings["timestamp"].to_numpy()
    days = np.unique(ts[history_cut(ts) :] // 86_400)
    # Fitted on the history, then again at the first rating of every later day.
    assert len(days) > 1
    assert out["service_fits"] == len(days)
    assert list(out["models"]) == ["personalized"]


def test_replay_options_are_refused_with_another_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    from moviematch_ml import cli

    refused = "--refit-days, --validation and --report belong to --protocol replay"
    assert cli.main(["evaluate", "--protocol", "temporal", "--refit-days", "7"]) == 2
    assert refused in capsys.readouterr().err
    assert cli.main(["evaluate", "--protocol", "kfold", "--validation"]) == 2
    assert refused in capsys.readouterr().err
