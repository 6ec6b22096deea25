"""Replay part of movielens-small through /feedback into a running service: its predictions for those users move
closer to the ratings they later gave."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, CARD_NAME, read_card
from realserver import request, start, stop

pytestmark = pytest.mark.slow


def _rmse(pred: list[float], truth: list[float]) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(truth)) ** 2)))


def test_replayed_feedback_brings_predictions_closer_to_held_out_ratings(tmp_path: Path) -> None:
    from moviematch_ml.offline.boosting import TrainConfig
    from moviematch_ml.offline.data import load_movielens_small
    from moviematch_ml.offline.evaluation import feature_frame
    from moviematch_ml.offline.stacking import fit_frame

    dataset = load_movielens_small()
    frame = feature_frame(dataset, TrainConfig())
    counts = frame.groupby("user_id").size()
    rng = np.random.default_rng(0)
    users = sorted(rng.choice(counts[counts >= 60].index.to_numpy(), 25, replace=False).tolist())

    # The personalised model never sees the replayed users: everything it learns of them comes through /feedback.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    card = read_card(BUNDLED_MODEL_DIR)
    for name in (CARD_NAME, card.model_file):
        shutil.copy(BUNDLED_MODEL_DIR / name, model_dir / name)
    model = fit_frame(frame[~frame["user_id"].isin(users)], dataset.scale)
    model.save(model_dir / "personalized")

    server = start(
        tmp_path,
        MODEL_PATH=str(model_dir),
        DATABASE_URL=f"sqlite:///{tmp_path / 'replay.sqlite3'}",
        STATE_TTL_SECONDS="0",
    )
    to_api = 10.0 / dataset.scale.max
    try:
        before: list[float] = []
        after: list[float] = []
        truth: list[float] = []
        for user in users:
            rows = frame[frame["user_id"] == user].sort_values("timestamp", kind="stable")
            half = len(rows) // 2
            fed, held = rows.iloc[:half], rows.iloc[half:]
            movies = [
                {
                    "movie_id": int(m),
                    **{
                        n: (int(v) if n != "vote_average" and float(v).is_integer() else float(v))
                        for n, v in zip(FEATURE_NAMES, feats, strict=True)
                    },
                }
                for m, feats in zip(held["movie_id"], held.loc[:, list(FEATURE_NAMES)].to_numpy(), strict=True)
            ]
            batch = {"user_id": int(user), "movies": movies}
            status, _, cold = request(server.port, "POST", "/predict-batch", batch)
            assert status == 200
            assert {p["source"] for p in cold["predictions"]} == {"model"}
            ratings = [
                {"user_id": int(user), "movie_id": int(m), "rating": float(r) * to_api}
                for m, r in zip(fed["movie_id"], fed["rating"], strict=True)
            ]
            status, _, stored = request(server.port, "POST", "/feedback", {"ratings": ratings})
            assert (status, stored["accepted"]) == (201, len(ratings))
            status, _, warm = request(server.port, "POST", "/predict-batch", batch)
            assert status == 200
            assert {p["source"] for p in warm["predictions"]} == {"personalized"}
            before += [p["predicted_rating"] for p in cold["predictions"]]
            after += [p["predicted_rating"] for p in warm["predictions"]]
            truth += (held["rating"].to_numpy() * to_api).tolist()
    finally:
        stop(server)
    rmse_before, rmse_after = _rmse(before, truth), _rmse(after, truth)
    print(
        f"replay: {len(truth)} held-out ratings of {len(users)} users, "
        f"RMSE (0-10) {rmse_before:.3f} -> {rmse_after:.3f}"
    )
    # The six-feature model was trained on all of movielens-small (these held-out ratings included), so "before" is
    # flattered; the personalised answers must still be closer.
    assert rmse_after < rmse_before - 0.05
