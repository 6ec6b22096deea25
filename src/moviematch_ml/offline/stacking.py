"""Training the personalised model: the rating state, out-of-fold inputs with simulated new users, the trees.

The trees must learn from inputs as the service will compute them: a user's state at serving time never holds
the rating being predicted. So every training row's inputs come from a state fitted without that row (its inner
fold held out), and a share of the users is made to look new in each fold (docs/personalized.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.features import FEATURE_NAMES, N_FEATURES
from moviematch_ml.offline.als import fit_mf
from moviematch_ml.runtime import inputs
from moviematch_ml.runtime.cards import RatingScale
from moviematch_ml.runtime.factors import MFConfig, lookup
from moviematch_ml.runtime.inputs import MODEL_FEATURES, model_inputs
from moviematch_ml.runtime.personalized import PersonalizedConfig, PersonalizedModel, RatingState, mean_std

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Ids = Sequence[int | str] | npt.NDArray[np.generic]


def _moments(idx: IntArray, r: FloatArray, n: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    count: FloatArray = np.bincount(idx, minlength=n).astype(np.float64)
    total: FloatArray = np.bincount(idx, weights=r, minlength=n).astype(np.float64)
    total_sq: FloatArray = np.bincount(idx, weights=r * r, minlength=n).astype(np.float64)
    return count, total, total_sq


def build_state(
    user_ids: Ids, movie_ids: Ids, ratings: FloatArray, timestamps: FloatArray, config: MFConfig
) -> RatingState:
    """Everything learnt from a set of ratings (data scale, unix seconds): the factorisation, the moments and the
    users' time-ordered residuals."""
    mf = fit_mf(user_ids, movie_ids, ratings, config)
    u = lookup(mf.user_index, user_ids)
    i = lookup(mf.item_index, movie_ids)
    t = np.asarray(timestamps, dtype=np.float64)
    order = np.lexsort((t, u))
    resid = ratings - mf.global_mean - mf.item_bias[i]
    return RatingState(
        mf,
        *_moments(u, ratings, len(mf.user_ids)),
        *_moments(i, ratings, len(mf.item_ids)),
        u[order].astype(np.float64),
        t[order],
        resid[order],
    )


def recent_features(times: FloatArray, resid: FloatArray, start: IntArray, end: IntArray, t: FloatArray) -> FloatArray:
    """Recency features of queries whose user's earlier ratings are rows [start, end) of ``times``/``resid``
    (sorted by time within each user): the mean residual of the last RECENT_RATINGS and of the last
    RECENT_SHORT, days since the last one, and how many of the last RECENT_RATINGS fall in the day before t.
    NaN (count 0) when the user has no earlier rating. Shape (n, len(RECENT_FEATURES)). ``UserView.recent``
    computes the same for one user at serving time.
    """
    cum = np.concatenate([[0.0], np.cumsum(resid)])
    out = np.full((len(end), len(inputs.RECENT_FEATURES)), np.nan)
    has = end > start
    for col, width in ((0, inputs.RECENT_RATINGS), (1, inputs.RECENT_SHORT)):
        lo = np.maximum(start, end - width)
        out[has, col] = (cum[end] - cum[lo])[has] / (end - lo)[has]
    if len(times):
        last = times[np.clip(end - 1, 0, len(times) - 1)]
        out[has, 2] = (t - last)[has] / inputs.SECONDS_PER_DAY
        # Ratings of the last RECENT_RATINGS within a day of t: the window keeps it computable from online state.
        lo = np.maximum(start, end - inputs.RECENT_RATINGS)
        count = np.zeros(len(end))
        for back in range(1, inputs.RECENT_RATINGS + 1):
            row = end - back
            ok = row >= lo
            count += ok & (times[np.clip(row, 0, len(times) - 1)] >= t - inputs.SECONDS_PER_DAY)
        out[:, 3] = count
    else:
        out[:, 3] = 0.0
    return out


def _user_bounds(state: RatingState, u: IntArray, t: FloatArray) -> tuple[IntArray, IntArray]:
    """For each query, the range of the user's history rows strictly before time t."""
    n_users = len(state.mf.user_ids)
    starts = np.searchsorted(state.hist_user, np.arange(n_users + 1), side="left")
    uu = np.where(u >= 0, u, n_users)
    start = starts[uu]
    # Within a user the rows are time-sorted: a combined key keeps it one searchsorted for all queries.
    span = float(max(state.hist_time.max(initial=0.0), t.max(initial=0.0)) + 1.0)
    keys = state.hist_user * span + state.hist_time
    end = np.searchsorted(keys, uu * span + np.maximum(t, 0.0), side="left")
    return start, np.maximum(end, start)


def state_inputs(state: RatingState, x6: FloatArray, u: IntArray, i: IntArray, t: FloatArray) -> FloatArray:
    """The model's input rows of (user index, movie index, time) queries with their six features, from ``state``;
    -1 (unknown) gives that side's inputs as NaN."""
    mf = state.mf
    ku, ki = u >= 0, i >= 0
    uu, ii = np.where(ku, u, 0), np.where(ki, i, 0)
    um, us = mean_std(state.user_count[uu], state.user_total[uu], state.user_total_sq[uu])
    im, is_ = mean_std(state.item_count[ii], state.item_total[ii], state.item_total_sq[ii])
    dot = np.einsum("nk,nk->n", mf.user_factors[uu], mf.item_factors[ii])
    start, end = _user_bounds(state, u, t)
    user = np.column_stack(
        [
            np.where(ku, state.user_count[uu], 0.0),
            np.where(ku, um, np.nan),
            np.where(ku, us, np.nan),
            np.where(ku, mf.user_bias[uu], np.nan),
        ]
    )
    movie = np.column_stack(
        [
            np.where(ki, state.item_count[ii], 0.0),
            np.where(ki, im, np.nan),
            np.where(ki, is_, np.nan),
            np.where(ki, mf.item_bias[ii], np.nan),
        ]
    )
    recent = recent_features(state.hist_time, state.hist_resid, start, end, t)
    return model_inputs(x6, user, movie, np.where(ku & ki, dot, np.nan), mf.global_mean, recent)


def inner_folds(n: int, k: int, seed: int) -> IntArray:
    """A fold number in [0, k) for each of n rows: a seeded permutation cut into k near-equal parts."""
    folds = np.empty(n, dtype=np.int64)
    folds[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return folds


def out_of_fold_inputs(
    user_ids: Ids,
    movie_ids: Ids,
    ratings: FloatArray,
    timestamps: FloatArray,
    x6: FloatArray,
    config: PersonalizedConfig,
) -> FloatArray:
    """Input rows of every training rating, each from a state fitted WITHOUT that row (its inner fold held out).

    In each inner fold a seeded share of the users (``new_user_fraction``) is made to look new: the state keeps
    only their first m ratings in time (m uniform in 1..``new_user_max_ratings``). Without this every training
    row's user has dozens of ratings in the state, and the trees never learn how little a user's first few
    ratings say, which is exactly the situation of a new user of the app.
    """
    n = len(ratings)
    folds = inner_folds(n, config.inner_folds, config.seed)
    uarr, marr = np.asarray(user_ids), np.asarray(movie_ids)
    t = np.asarray(timestamps, dtype=np.float64)
    ucode = np.unique(uarr, return_inverse=True)[1].reshape(-1)
    n_users = int(ucode.max()) + 1 if n else 0
    out = np.empty((n, len(MODEL_FEATURES)))
    for k in range(config.inner_folds):
        held = folds == k
        keep = ~held
        if config.new_user_fraction > 0 and n:
            rng = np.random.default_rng([config.seed, k])
            new = rng.random(n_users) < config.new_user_fraction
            m = rng.integers(1, config.new_user_max_ratings + 1, n_users)
            idx = np.flatnonzero(keep)
            order = idx[np.lexsort((t[idx], ucode[idx]))]
            c = ucode[order]
            rank = np.full(n, n, dtype=np.int64)
            rank[order] = np.arange(len(order)) - np.searchsorted(c, c, side="left")
            keep &= ~new[ucode] | (rank < m[ucode])
        st = build_state(uarr[keep], marr[keep], ratings[keep], t[keep], config.mf)
        u = lookup(st.mf.user_index, uarr[held])
        i = lookup(st.mf.item_index, marr[held])
        out[held] = state_inputs(st, x6[held], u, i, t[held])
    return out


def _lgb_params(config: PersonalizedConfig) -> dict[str, Any]:
    return {
        "objective": "regression",
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_child_samples": config.min_child_samples,
        "feature_fraction": config.feature_fraction,
        "lambda_l2": config.lambda_l2,
        "num_threads": config.num_threads,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


def fit_personalized(
    user_ids: Ids,
    movie_ids: Ids,
    ratings: Sequence[float] | FloatArray,
    timestamps: Sequence[float] | FloatArray,
    x6: FloatArray,
    config: PersonalizedConfig,
    scale: RatingScale,
) -> PersonalizedModel:
    """Train on ratings (data scale, unix-second timestamps) and their six features ((n, 6), FEATURES order)."""
    import lightgbm as lgb

    r = np.asarray(ratings, dtype=np.float64)
    t = np.asarray(timestamps, dtype=np.float64)
    x6 = np.asarray(x6, dtype=np.float64)
    if x6.shape != (len(r), N_FEATURES) or t.shape != r.shape:
        raise ValueError(f"need {len(r)} timestamps and x6 of shape ({len(r)}, {N_FEATURES}), got {x6.shape}")
    x = out_of_fold_inputs(user_ids, movie_ids, r, t, x6, config)
    train = lgb.Dataset(x, r, feature_name=list(MODEL_FEATURES), free_raw_data=True)
    booster = lgb.train(_lgb_params(config), train, num_boost_round=config.n_estimators)
    full = build_state(user_ids, movie_ids, r, t, config.mf)
    return PersonalizedModel(config, full, booster, scale)


def fit_frame(frame: pd.DataFrame, scale: RatingScale, config: PersonalizedConfig | None = None) -> PersonalizedModel:
    """``fit_personalized`` on a frame with user_id, movie_id, rating, timestamp and the six FEATURE_NAMES columns
    (the feature frame of ``evaluation.feature_frame``)."""
    return fit_personalized(
        frame["user_id"].to_numpy(),
        frame["movie_id"].to_numpy(),
        frame["rating"].to_numpy(dtype=np.float64),
        frame["timestamp"].to_numpy(dtype=np.float64),
        frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64),
        config or PersonalizedConfig.model_validate({}),
        scale,
    )


def predict_pairs(
    model: PersonalizedModel, user_ids: Ids, movie_ids: Ids, timestamps: Sequence[float] | FloatArray, x6: FloatArray
) -> tuple[FloatArray, BoolArray]:
    """Predictions (data scale) for (user, movie, time) rows, with the model's training ratings as the state.

    Returns (predictions, mask): mask marks the rows the model personalises (a user with at least
    ``min_user_ratings`` training ratings; and a movie the factorisation knows, with
    ``personalize="known_user_and_movie"``); the other rows are NaN, for the six-feature model to answer.
    """
    st = model.state
    u = lookup(model.mf.user_index, user_ids)
    i = lookup(model.mf.item_index, movie_ids)
    mask = (u >= 0) & (st.user_count[np.maximum(u, 0)] >= model.config.min_user_ratings)
    if model.config.personalize == "known_user_and_movie":
        mask &= i >= 0
    out = np.full(len(u), np.nan)
    if mask.any():
        t = np.asarray(timestamps, dtype=np.float64)[mask]
        x = state_inputs(st, np.asarray(x6, dtype=np.float64)[mask], u[mask], i[mask], t)
        out[mask] = model.predict_inputs(x)
    return out, mask
