"""Training the personalised model: recency features by hand, inputs that never see their own rating, evaluation
scoring equal to the service's, determinism, and the real-data targets.

(Serving it: tests/runtime/test_personalized.py.)
"""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from moviematch_ml.offline.stacking import (
    build_state,
    fit_personalized,
    out_of_fold_inputs,
    predict_pairs,
    recent_features,
    state_inputs,
)
from moviematch_ml.runtime.factors import lookup
from moviematch_ml.runtime.inputs import COLUMN, MODEL_FEATURES, RECENT_RATINGS
from moviematch_ml.runtime.personalized import PersonalizedModel, UserView
from reference import DAY, SCALE, SYNTHETIC_CONFIG, Data, predict_user, rating_columns, user_state, with_config

# --- recency -------------------------------------------------------------------------------------------------------


def test_recent_features_by_hand() -> None:
    # One user, ratings at days 0, 1, 1.5 with residuals 1, -1, 0.5; query at day 2 sees all three.
    times = np.array([0.0, 1.0, 1.5]) * DAY
    resid = np.array([1.0, -1.0, 0.5])
    out = recent_features(times, resid, np.array([0, 0]), np.array([3, 1]), np.array([2.0, 2.0]) * DAY)
    # last-10 mean, last-3 mean, days since last, ratings within the last day
    np.testing.assert_allclose(out[0], [0.5 / 3, 0.5 / 3, 0.5, 2.0])
    np.testing.assert_allclose(out[1], [1.0, 1.0, 2.0, 0.0])  # only the first rating is before the query
    none = recent_features(times, resid, np.array([0]), np.array([0]), np.array([0.0]))
    assert np.isnan(none[0, :3]).all()
    assert none[0, 3] == 0.0
    # The service's one-user twin on Python floats gives the same figures.
    view = UserView(3.0, 0.0, 0.0, 0.0, np.zeros(2), array("d", times), array("d", resid))
    np.testing.assert_allclose(view.recent(2.0 * DAY), out[0])
    np.testing.assert_allclose(view.recent(0.5 * DAY), [1.0, 1.0, 0.5, 1.0])  # only the first rating, half a day ago
    assert np.isnan(view.recent(0.0)[:3]).all()
    assert view.recent(0.0)[3] == 0.0
    # Every rating before now (the means kept with the view) and some after it (computed per call) give the
    # vectorised figures, at times on either side of each rating and of each rating plus a day.
    rng = np.random.default_rng(3)
    many_times = np.sort(rng.uniform(0.0, 5.0, 14)) * DAY
    many_resid = rng.normal(0.0, 1.0, 14)
    tail = slice(14 - RECENT_RATINGS, 14)  # the view keeps the latest RECENT_RATINGS, as the service's view does
    busy = UserView(14.0, 0.0, 0.0, 0.0, np.zeros(2), array("d", many_times[tail]), array("d", many_resid[tail]))
    edges = np.concatenate([many_times[tail], many_times[tail] + DAY])
    queries = np.sort(np.concatenate([edges - 1.0, edges, edges + 1.0, [10.0 * DAY]]))
    start = np.full(len(queries), 14 - RECENT_RATINGS)
    end = np.searchsorted(many_times, queries, side="left")
    want = recent_features(many_times, many_resid, start, np.maximum(end, start), queries)
    for q, expected in zip(queries.tolist(), want, strict=True):
        np.testing.assert_allclose(busy.recent(q), expected, rtol=0, atol=1e-12, err_msg=str(q))


# --- no leakage ----------------------------------------------------------------------------------------------------


def test_a_training_rows_inputs_never_see_its_own_rating(synthetic_data: Data) -> None:
    base = out_of_fold_inputs(
        *rating_columns(synthetic_data),
        SYNTHETIC_CONFIG,
    )
    assert base.shape == (len(synthetic_data["r"]), len(MODEL_FEATURES))
    assert (
        base[:, : synthetic_data["x6"].shape[1]].tobytes() == synthetic_data["x6"].tobytes()
    )  # the six features as they came
    for j in (0, 17, len(synthetic_data["r"]) - 1):
        changed = synthetic_data["r"].copy()
        changed[j] = 5.0 if changed[j] < 3 else 0.5
        again = out_of_fold_inputs(
            synthetic_data["u"],
            synthetic_data["i"],
            changed,
            synthetic_data["t"],
            synthetic_data["x6"],
            SYNTHETIC_CONFIG,
        )
        assert again[j].tobytes() == base[j].tobytes()
        # The change does reach other rows (so this test could fail): the rows it was state for.
        assert not np.array_equal(np.nan_to_num(again), np.nan_to_num(base))


# --- scoring -------------------------------------------------------------------------------------------------------


def test_evaluation_scoring_of_a_training_user_matches_the_service(
    synthetic_model: PersonalizedModel, synthetic_data: Data
) -> None:
    # predict_pairs (evaluation: the training state's rows) == the reference user state == the service's fast path
    # (the user's view from their ratings, the movie table), for a user whose every rating is in training.
    rows = synthetic_data["u"] == 5
    ids, ratings, times = synthetic_data["i"][rows], synthetic_data["r"][rows], synthetic_data["t"][rows]
    movies = np.array([100, 101, 102, 103])
    x6 = synthetic_data["x6"][:4]
    now = float(synthetic_data["t"].max()) + DAY
    offline, mask = predict_pairs(synthetic_model, np.full(4, 5), movies, np.full(4, now), x6)
    assert mask.all()
    state = user_state(synthetic_model.mf, ids, ratings, times)
    reference, mask2 = predict_user(synthetic_model, state, movies, x6, now=now)
    assert mask2.all()
    np.testing.assert_allclose(reference, offline, atol=1e-9)
    view = synthetic_model.user_view_of_ratings(ids.tolist(), ratings.tolist(), times.tolist())
    assert view is not None
    online, mask3 = synthetic_model.predict(view, x6, movies.tolist(), synthetic_model.movie_table(), now)
    assert mask3.all()
    np.testing.assert_allclose(online, synthetic_model.to_api(offline), atol=1e-9)


def test_state_inputs_are_the_model_inputs_of_the_training_state(
    synthetic_model: PersonalizedModel, synthetic_data: Data
) -> None:
    st = synthetic_model.state
    u = lookup(synthetic_model.mf.user_index, [5, 5, 999])
    i = lookup(synthetic_model.mf.item_index, [100, 424242, 100])
    x = state_inputs(st, synthetic_data["x6"][:3], u, i, np.full(3, 2e9))
    k = synthetic_model.mf.user_index[5]
    assert x[0, COLUMN["user_count"]] == st.user_count[k]
    assert x[0, COLUMN["user_bias"]] == synthetic_model.mf.user_bias[k]
    assert np.isnan(x[1, [COLUMN["movie_bias"], COLUMN["cf_score"], COLUMN["cf_dot"]]]).all()  # unknown movie
    assert x[1, COLUMN["movie_count"]] == 0.0
    assert x[2, COLUMN["user_count"]] == 0.0  # unknown user: no ratings, the rest NaN
    assert np.isnan(x[2, [COLUMN["user_mean"], COLUMN["user_bias"], COLUMN["cf_score"]]]).all()
    assert x[2, COLUMN["user_day_count"]] == 0.0


def test_unknown_users_are_left_to_the_six_feature_model(synthetic_model: PersonalizedModel) -> None:
    x6 = np.tile([1.0, 7.0, 100.0, 1.0, 3.0, 50.0], (3, 1))
    pred, mask = predict_pairs(synthetic_model, [9999, 0, 0], [100, 424242, 100], [0.0, 0.0, 0.0], x6)
    # Known user: personalised even for a movie the state has never seen (measured better than the fallback).
    assert mask.tolist() == [False, True, True]
    assert np.isnan(pred[0])
    assert np.isfinite(pred[1:]).all()
    strict = with_config(synthetic_model, personalize="known_user_and_movie")
    assert predict_pairs(strict, [0, 0], [100, 424242], [0.0, 0.0], x6[:2])[1].tolist() == [True, False]
    # A user with fewer training ratings than min_user_ratings is left out too.
    fewest = int(synthetic_model.state.user_count.min())
    gated = with_config(synthetic_model, min_user_ratings=fewest + 1)
    user = synthetic_model.mf.user_ids[int(np.argmin(synthetic_model.state.user_count))]
    assert predict_pairs(gated, [user, 0], [100, 100], [0.0, 0.0], x6[:2])[1].tolist() == [False, True]


def test_fit_is_deterministic(synthetic_data: Data, synthetic_model: PersonalizedModel) -> None:
    again = fit_personalized(
        *rating_columns(synthetic_data),
        SYNTHETIC_CONFIG,
        SCALE,
    )
    assert again.booster.model_to_string() == synthetic_model.booster.model_to_string()
    assert again.mf.user_factors.tobytes() == synthetic_model.mf.user_factors.tobytes()
    full = build_state(
        synthetic_data["u"], synthetic_data["i"], synthetic_data["r"], synthetic_data["t"], SYNTHETIC_CONFIG.mf
    )
    assert (
        full.mf.user_factors.tobytes() == synthetic_model.mf.user_factors.tobytes()
    )  # the state of every training rating
    assert full.hist_time.tobytes() == synthetic_model.state.hist_time.tobytes()


def test_fit_refuses_inputs_of_the_wrong_shape(synthetic_data: Data) -> None:
    with pytest.raises(ValueError, match="x6 of shape"):
        fit_personalized(
            synthetic_data["u"],
            synthetic_data["i"],
            synthetic_data["r"],
            synthetic_data["t"],
            synthetic_data["x6"][:, :5],
            SYNTHETIC_CONFIG,
            SCALE,
        )


# --- real data -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_data_targets() -> None:
    """The issue's targets on movielens-small (5-fold and temporal), as `moviematch-ml evaluate` computes them."""
    from moviematch_ml.offline.boosting import TrainConfig
    from moviematch_ml.offline.candidates import PersonalizedCandidate
    from moviematch_ml.offline.data import load_movielens_small
    from moviematch_ml.offline.evaluation import evaluate

    ds = load_movielens_small()
    cfg = TrainConfig.model_validate({})
    kfold = evaluate(ds, "kfold", config=cfg, candidates=[PersonalizedCandidate(six_config=cfg)])
    k = kfold["models"]["personalized"]
    assert k["rmse"] <= 0.845
    assert k["ndcg@10"] >= 0.915
    temporal = evaluate(ds, "temporal", config=cfg, candidates=[PersonalizedCandidate(six_config=cfg)])
    t = temporal["models"]["personalized"]
    assert t["rmse"] <= 1.005
    assert t["rmse_warm_users"] <= 0.866  # SVD++ on the same split
