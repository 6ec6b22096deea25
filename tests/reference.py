"""Reference implementations that only tests need, and the synthetic ratings the personalised-model tests train on.

The incremental per-user state below is what the service once kept for each user (additive sufficient statistics
of their ratings, updated one rating at a time). The package now builds a user's view straight from their stored
ratings (``PersonalizedModel.user_view_of_ratings``, the C kernel ``view_data``) and predicts from a movie table
(``PersonalizedModel.predict``); the tests hold those fast paths to this slow, obvious reference, to float rounding.
Copied from ``moviematch_ml.personalized`` before the package layout moved (UserState, empty_user_state,
update_user_state, user_state, fold_in_state, update_movie_extra, PersonalizedModel.user_view and predict_user),
adapted to the new names; ``predict_user`` builds the 20 inputs with ``runtime.inputs.model_inputs``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from moviematch_ml.offline.data import Dataset
from moviematch_ml.online.service import PredictionService
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.online.user_views import Inputs, UserViews
from moviematch_ml.runtime import native
from moviematch_ml.runtime.cards import RatingScale
from moviematch_ml.runtime.factors import Id, MFConfig, MFModel, lookup
from moviematch_ml.runtime.inputs import RECENT_RATINGS, RECENT_SHORT, SECONDS_PER_DAY, model_inputs
from moviematch_ml.runtime.personalized import PersonalizedConfig, PersonalizedModel, UserView, mean_std

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Ids = Sequence[Id] | npt.NDArray[np.generic]


# --- the incremental per-user state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserState:
    """Additive sufficient statistics of one user's ratings (on the data's scale).

    ``gram`` and ``rhs`` are sum(x x^T) and sum(x * (r - global_mean - item_bias)) with x = [1, item_factors], over
    the ratings of movies the factorisation knows: the fold-in is one small solve on them.
    """

    count: float
    total: float
    total_sq: float
    cf_count: float
    gram: FloatArray
    rhs: FloatArray
    recent_times: tuple[float, ...] = ()
    recent_resid: tuple[float, ...] = ()


def empty_user_state(mf: MFModel) -> UserState:
    """The state of a user with no ratings."""
    d = mf.config.factors + 1
    return UserState(0.0, 0.0, 0.0, 0.0, np.zeros((d, d)), np.zeros(d))


def update_user_state(
    mf: MFModel,
    state: UserState,
    movie_id: Id,
    rating: float,
    timestamp: float,
    previous_rating: float | None = None,
) -> UserState:
    """Pure update: the state after one more rating (data scale, unix seconds). ``previous_rating``: the user
    re-rates a movie, whose old rating is taken out first."""
    i = mf.item_index.get(movie_id, -1)
    out = state
    if previous_rating is not None:
        out = _add(mf, out, i, previous_rating, -1.0)
    out = _add(mf, out, i, rating, 1.0)
    resid = float(rating) - mf.global_mean - (float(mf.item_bias[i]) if i >= 0 else 0.0)
    # The latest RECENT_RATINGS in time order; sorted on time only (a stable sort), so ratings sharing a timestamp
    # keep their arrival order.
    pairs = sorted(
        [*zip(state.recent_times, state.recent_resid, strict=True), (float(timestamp), resid)], key=lambda p: p[0]
    )
    pairs = pairs[-RECENT_RATINGS:]
    return replace(out, recent_times=tuple(p[0] for p in pairs), recent_resid=tuple(p[1] for p in pairs))


def _add(mf: MFModel, s: UserState, i: int, rating: float, sign: float) -> UserState:
    r = float(rating)
    if i < 0:
        return replace(s, count=s.count + sign, total=s.total + sign * r, total_sq=s.total_sq + sign * r * r)
    x = np.concatenate([[1.0], mf.item_factors[i]])
    resid = r - mf.global_mean - mf.item_bias[i]
    return UserState(
        s.count + sign,
        s.total + sign * r,
        s.total_sq + sign * r * r,
        s.cf_count + sign,
        s.gram + sign * np.outer(x, x),
        s.rhs + sign * resid * x,
        s.recent_times,
        s.recent_resid,
    )


def user_state(
    mf: MFModel, movie_ids: Ids, ratings: Sequence[float] | FloatArray, timestamps: Sequence[float] | FloatArray
) -> UserState:
    """A user's state from all their ratings at once (arrival order): folding ``update_user_state`` over them, in
    a few vectorised operations. A movie rated more than once counts once, with its latest rating."""
    # A sequence is taken as it is: np.asarray would turn a mix of int and str ids into strings.
    ids: list[Id] = movie_ids.tolist() if isinstance(movie_ids, np.ndarray) else list(movie_ids)
    r = np.asarray(ratings, dtype=np.float64)
    t = np.asarray(timestamps, dtype=np.float64)
    if len(set(ids)) != len(ids):
        latest = np.array(sorted({m: k for k, m in enumerate(ids)}.values()), dtype=np.int64)
        ids, r, t = [ids[k] for k in latest], r[latest], t[latest]
    i = lookup(mf.item_index, ids)
    known = i >= 0
    ik = i[known]
    x = np.hstack([np.ones((len(ik), 1)), mf.item_factors[ik]])
    bias = np.where(known, mf.item_bias[np.maximum(i, 0)], 0.0)
    resid = r - mf.global_mean - bias
    recent = np.argsort(t, kind="stable")[-RECENT_RATINGS:]
    return UserState(
        float(len(r)),
        float(r.sum()),
        float((r * r).sum()),
        float(known.sum()),
        x.T @ x,
        x.T @ resid[known],
        tuple(t[recent].tolist()),
        tuple(resid[recent].tolist()),
    )


def update_movie_extra(
    extra: tuple[float, float, float], rating: float, previous_rating: float | None = None
) -> tuple[float, float, float]:
    """Pure update of what a movie received since training: (count, sum, sum of squares) on the data scale."""
    count, total, total_sq = extra
    r = float(rating)
    if previous_rating is not None:
        p = float(previous_rating)
        return count, total - p + r, total_sq - p * p + r * r
    return count + 1.0, total + r, total_sq + r * r


def fold_in_state(mf: MFModel, state: UserState) -> tuple[float, FloatArray]:
    """(bias, factors) of a user from their state: the ridge solve of ``factors.fold_in``."""
    d = mf.config.factors + 1
    if state.cf_count <= 0:
        return 0.0, np.zeros(d - 1)
    diag = np.full(d, mf.config.reg_factors * state.cf_count)
    diag[0] = mf.config.reg_bias * state.cf_count + mf.config.bias_damping
    w = np.asarray(np.linalg.solve(state.gram + np.diag(diag), state.rhs), dtype=np.float64)
    return float(w[0]), w[1:]


def _answers_for(model: PersonalizedModel, state: UserState | None) -> bool:
    return state is not None and state.count > 0 and state.count >= model.config.min_user_ratings


def _mean_std(count: float, total: float, total_sq: float) -> tuple[float, float]:
    mean, std = mean_std(np.array([count]), np.array([total]), np.array([total_sq]))
    return float(mean[0]), float(std[0])


def user_view(model: PersonalizedModel, state: UserState | None) -> UserView | None:
    """The view of a user from their state (the old ``PersonalizedModel.user_view``), or None when the model does
    not answer for them (no state, or fewer ratings than ``min_user_ratings``)."""
    if state is None or not _answers_for(model, state):
        return None
    bias, factors = fold_in_state(model.mf, state)
    mean, std = _mean_std(state.count, state.total, state.total_sq)
    return UserView(state.count, mean, std, bias, factors, state.recent_times, state.recent_resid)


def recent_of_state(state: UserState, now: float) -> tuple[float, float, float, float]:
    """The four recency inputs at ``now``, from the ratings of the state's buffer strictly before it: the mean
    residual of the last RECENT_RATINGS and of the last RECENT_SHORT, the days since the last one, and how many of
    the last RECENT_RATINGS fall in the day before ``now`` (NaN, NaN, NaN, 0 with none)."""
    before = [k for k, t in enumerate(state.recent_times) if t < now]
    if not before:
        return math.nan, math.nan, math.nan, 0.0
    times = [state.recent_times[k] for k in before]
    resid = [state.recent_resid[k] for k in before]
    last, last_short = resid[-RECENT_RATINGS:], resid[-RECENT_SHORT:]
    within_day = sum(1 for t in times[-RECENT_RATINGS:] if t >= now - SECONDS_PER_DAY)
    return (
        sum(last) / len(last),
        sum(last_short) / len(last_short),
        (now - times[-1]) / SECONDS_PER_DAY,
        float(within_day),
    )


def predict_user(
    model: PersonalizedModel,
    state: UserState | None,
    movie_ids: Ids,
    x6: FloatArray,
    now: float | None = None,
    movie_extra: FloatArray | None = None,
) -> tuple[FloatArray, BoolArray]:
    """Predictions on the data scale of one user, described by their state, for a batch of movies; and the mask of
    the movies the model answers (the others NaN).

    ``now`` (unix seconds, default the clock) is when the recency inputs are measured; ``movie_extra``, optional
    (n, 3) in request order, is what the movies received since training (count, sum, sum of squares on the data
    scale, see ``update_movie_extra``), added to the trained moments.
    """
    mf, st = model.mf, model.state
    i = lookup(mf.item_index, movie_ids)
    n = len(i)
    if state is None or not _answers_for(model, state):
        return np.full(n, np.nan), np.zeros(n, dtype=bool)
    mask = np.ones(n, dtype=bool) if model.config.personalize == "known_user" else i >= 0
    bias, factors = fold_in_state(mf, state)
    mean, std = _mean_std(state.count, state.total, state.total_sq)
    known = i >= 0
    iz = np.where(known, i, 0)
    count = np.where(known, st.item_count[iz], 0.0)
    total = np.where(known, st.item_total[iz], 0.0)
    total_sq = np.where(known, st.item_total_sq[iz], 0.0)
    if movie_extra is not None:
        extra = np.asarray(movie_extra, dtype=np.float64).reshape(n, 3)
        count, total, total_sq = count + extra[:, 0], total + extra[:, 1], total_sq + extra[:, 2]
    movie = np.empty((n, 4))
    movie[:, 0] = count
    movie[:, 1], movie[:, 2] = mean_std(count, total, total_sq)
    movie[:, 3] = np.where(known, mf.item_bias[iz], np.nan)
    dot = np.where(known, mf.item_factors[iz] @ factors, np.nan)
    recent = np.array(recent_of_state(state, time.time() if now is None else float(now)))
    user = np.array([state.count, mean, std, bias])
    x = model_inputs(np.asarray(x6, dtype=np.float64), user, movie, dot, mf.global_mean, recent)
    out = np.full(n, np.nan)
    if mask.any():
        out[mask] = model.predict_inputs(x[mask])
    return out, mask


# --- synthetic ratings for the personalised model's tests ---------------------------------------------------------

SCALE = RatingScale(min=0.5, max=5.0, step=0.5)
Data = dict[str, npt.NDArray[Any]]
DAY = 86_400.0
# A small, fast model of the synthetic ratings: two factors, three inner folds, 60 trees of 7 leaves.
SYNTHETIC_CONFIG = PersonalizedConfig(
    mf=MFConfig(factors=2, iterations=5),
    n_estimators=60,
    learning_rate=0.1,
    num_leaves=7,
    min_child_samples=5,
    inner_folds=3,
)


def synthetic_ratings(seed: int = 0, n_users: int = 40, n_items: int = 25) -> dict[str, npt.NDArray[np.generic]]:
    """Ratings with user and movie effects plus a rank-1 taste, and six made-up features: users 0..n_users-1 rate
    from a handful of the movies 100..100+n_items-1 to most of them, over 400 days from 2001-09-09."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.5, n_users)
    c = rng.normal(0, 0.5, n_items)
    p, q = rng.normal(0, 0.7, n_users), rng.normal(0, 0.7, n_items)
    density = np.linspace(0.12, 0.9, n_users)[:, None]
    u, i = np.nonzero(rng.random((n_users, n_items)) < density)
    r = np.clip(np.round((3.2 + a[u] + c[i] + p[u] * q[i] + rng.normal(0, 0.3, len(u))) * 2) / 2, 0.5, 5.0)
    t = 1_000_000_000 + rng.integers(0, 400, len(u)) * DAY
    x6 = np.column_stack(
        [
            rng.integers(0, 3, len(u)),
            np.clip((3.2 + c[i]) * 2, 0, 10),
            rng.integers(0, 500, len(u)),
            rng.integers(0, 2, len(u)),
            rng.uniform(0, 40, len(u)),
            rng.uniform(0, 100, len(u)),
        ]
    ).astype(np.float64)
    return {"u": u.astype(np.int64), "i": i.astype(np.int64) + 100, "r": r, "t": t.astype(np.float64), "x6": x6}


SYNTHETIC_GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def synthetic_dataset(n: int = 3000, seed: int = 0) -> Dataset:
    """A small data set with the MovieLens layout: movies with genres and crowd metadata, and ratings that follow
    each movie's quality and each user's taste."""
    rng = np.random.default_rng(seed)
    n_movies, n_users = 60, 40
    quality = rng.normal(0, 0.8, n_movies)
    taste = rng.normal(0, 0.5, n_users)
    movies = pd.DataFrame(
        {
            "movie_id": np.arange(n_movies),
            "title": [f"m{i}" for i in range(n_movies)],
            "year": rng.integers(1960, 2010, n_movies).astype(float),
            "genres": [tuple(rng.choice(SYNTHETIC_GENRES, rng.integers(1, 4), replace=False)) for _ in range(n_movies)],
            "vote_average": np.clip(6.5 + 1.5 * quality, 0, 10),
            "vote_count": rng.integers(10, 10_000, n_movies).astype(float),
            "popularity": np.nan,
            "release_year": np.nan,
        }
    )
    movies["release_year"] = movies["year"]
    u = rng.integers(0, n_users, n)
    m = rng.integers(0, n_movies, n)
    rating = np.clip(np.round((3.5 + quality[m] + taste[u] + rng.normal(0, 0.7, n)) * 2) / 2, 0.5, 5.0)
    ratings = pd.DataFrame(
        {"user_id": u, "movie_id": m, "rating": rating, "timestamp": 1_100_000_000 + np.sort(rng.integers(0, 10**8, n))}
    )
    return Dataset("synthetic", ratings, movies, RatingScale(min=0.5, max=5.0, step=0.5))


def with_config(model: PersonalizedModel, **changes: Any) -> PersonalizedModel:
    """The same trees and state under another configuration."""
    return PersonalizedModel(model.config.model_copy(update=changes), model.state, model.booster, model.scale)


def use_codec(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the rest of the test on the C kernels (skipped when they are not built) or on their Python twins."""
    if not compiled:
        monkeypatch.setattr(native, "codec", None)
    elif native.codec is None:
        pytest.skip("the _codec extension is not built")


def rating_columns(
    data: Data,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """The user ids, movie ids, ratings, timestamps and six features of ``synthetic_ratings()``, in that order: the
    first arguments of the training functions."""
    return data["u"], data["i"], data["r"], data["t"], data["x6"]


def write_csvs(tmp_path: Path, ds: Dataset) -> tuple[Path, Path]:
    """``ds`` as ratings.csv and movies.csv (the ml-latest layout the train and evaluate commands read)."""
    r, m = tmp_path / "ratings.csv", tmp_path / "movies.csv"
    ds.ratings.rename(columns={"user_id": "userId", "movie_id": "movieId"}).to_csv(r, index=False)
    movies = pd.DataFrame(
        {
            "movieId": ds.movies["movie_id"],
            "title": [f"{t} ({int(y)})" for t, y in zip(ds.movies["title"], ds.movies["year"], strict=True)],
            "genres": ["|".join(g) for g in ds.movies["genres"]],
        }
    )
    movies.to_csv(m, index=False)
    return r, m


class Service(PredictionService):
    """The prediction service answering in one blocking call, each request in its own event loop: for tests of what
    it answers, not of how it waits."""

    def predict_one(self, body: bytes) -> bytes:  # type: ignore[override]
        return asyncio.run(super().predict_one(body))

    def predict_batch(self, body: bytes) -> bytes:  # type: ignore[override]
        return asyncio.run(super().predict_batch(body))


class StandIn(UserViews):
    """Users' views whose answers the test decides (``predict``), asked through the service's seam: ``cached`` (every
    user is in memory: the store is never read), then ``answer``."""

    def cached(self, model: PersonalizedModel, user_id: str) -> Inputs | bool:
        return cast(Inputs, (user_id, None))

    def answer(
        self, model: PersonalizedModel, inputs: Inputs, movie_ids: Sequence[str | int | None], x: FloatArray
    ) -> tuple[FloatArray, npt.NDArray[np.bool_]] | None:
        return self.predict(model, cast(str, inputs[0]), movie_ids, x)


class Knows(StandIn):
    """Answers 1.25 for the movies whose id is in ``known`` (every movie when None); counts its calls."""

    def __init__(self, store: FeedbackStore, known: set[object] | None = None) -> None:
        super().__init__(store, ttl=0)
        self.known = known
        self.calls = 0

    def predict(
        self, model: PersonalizedModel, user_id: str | int, movie_ids: Sequence[str | int | None], x: FloatArray
    ) -> tuple[FloatArray, npt.NDArray[np.bool_]] | None:
        self.calls += 1
        mask = np.array([self.known is None or m in self.known for m in movie_ids], dtype=bool)
        return (np.where(mask, 1.25, np.nan), mask) if mask.any() else None
