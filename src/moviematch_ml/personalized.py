"""The personalised model: gradient-boosted trees over the six features, user and movie state and the CF score."""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from moviematch_ml.cf import MFConfig, MFModel, lookup, read_npz, write_npz
from moviematch_ml.errors import ModelFormatError
from moviematch_ml.features import FEATURE_NAMES, N_FEATURES
from moviematch_ml.model import (
    EnsembleBooster,
    ModelCard,
    RatingScale,
    card_path,
    fast_booster,
    full_rows,
    read_card,
    verified_bytes,
    write_card,
)

_codec: Any
try:  # the C loops (see setup.py); without a compiler, predict_table builds its matrix in numpy
    from moviematch_ml import _codec
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _codec = None

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Id = int | str
Ids = Sequence[Id] | npt.NDArray[np.generic]

_BASE_STATE_FEATURES: Final[tuple[str, ...]] = (
    "user_count",
    "user_mean",
    "user_std",
    "user_bias",
    "movie_count",
    "movie_mean",
    "movie_std",
    "movie_bias",
    "cf_score",
    "cf_dot",
)
RECENT_FEATURES: Final[tuple[str, ...]] = (
    "user_recent_resid",
    "user_recent3_resid",
    "user_recent_days",
    "user_day_count",
)
# How many of a user's latest ratings the recency feature averages (their residual against the item baseline).
RECENT_RATINGS: Final[int] = 10
RECENT_SHORT: Final[int] = 3
SECONDS_PER_DAY: Final[float] = 86_400.0
STATE_FEATURES: Final[tuple[str, ...]] = (*_BASE_STATE_FEATURES, *RECENT_FEATURES)
MODEL_FEATURES: Final[tuple[str, ...]] = (*FEATURE_NAMES, *STATE_FEATURES)
# Column of each input in the model's matrix.
_COL: Final[dict[str, int]] = {name: k for k, name in enumerate(MODEL_FEATURES)}
# The inputs that differ between the movies of one user's batch, in the order predict_table writes them: the six
# features, the movie's four, the CF score and dot product (the user's eight are the same in every row).
_ROW_INPUTS: Final[tuple[str, ...]] = (
    *FEATURE_NAMES,
    *(name for name in _BASE_STATE_FEATURES if not name.startswith("user_")),
)
_ROW_COLUMNS: Final[npt.NDArray[np.int64]] = np.array([_COL[name] for name in _ROW_INPUTS], dtype=np.int64)
_ROW_TEMPLATE: Final[npt.NDArray[np.float64]] = np.zeros(len(_ROW_INPUTS))  # user_rows overwrites every column
MODEL_FILE: Final[str] = "personalized.txt"
STATE_FILE: Final[str] = "state.npz"
_STATE_ARRAYS: Final[tuple[str, ...]] = (
    "user_count",
    "user_total",
    "user_total_sq",
    "item_count",
    "item_total",
    "item_total_sq",
    "hist_user",
    "hist_time",
    "hist_resid",
)


class PersonalizedConfig(BaseModel):
    """How the personalised model is trained (hyper-parameters chosen on a validation split of training data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mf: MFConfig = Field(default_factory=lambda: MFConfig())
    inner_folds: int = Field(
        default=5, ge=2, le=20, description="Out-of-fold folds for the state features of training rows."
    )
    seed: int = Field(default=42, ge=0)
    n_estimators: int = Field(default=150, ge=1, le=20_000)
    learning_rate: float = Field(default=0.1, gt=0, le=1)
    num_leaves: int = Field(default=31, ge=2, le=4096)
    min_child_samples: int = Field(default=50, ge=1)
    feature_fraction: float = Field(default=0.8, gt=0, le=1)
    lambda_l2: float = Field(default=1.0, ge=0)
    new_user_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="Share of users made to look new in each inner fold (see the docs)."
    )
    new_user_max_ratings: int = Field(default=20, ge=1, description="Most ratings a simulated new user keeps.")
    min_user_ratings: int = Field(
        default=1, ge=1, description="Ratings a user needs before the model answers for them (see the docs)."
    )
    personalize: Literal["known_user", "known_user_and_movie"] = Field(
        default="known_user", description="Which rows the model answers; the rest go to the six-feature model."
    )
    num_threads: int = Field(default=1, ge=1, le=64, description="LightGBM threads; 1 is fastest on a busy 2-core box.")


# --- per-user online state ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserState:
    """What the service keeps per user: additive sufficient statistics of their ratings (on the data's scale).

    ``gram`` and ``rhs`` are sum(x x^T) and sum(x * (r - global_mean - item_bias)) with x = [1, item_factors], over
    the ratings of movies the factorisation knows: the fold-in is one small solve on them. They depend on the
    trained item state, so they are rebuilt (``user_state``) from the stored ratings after every retrain.
    """

    count: float
    total: float
    total_sq: float
    cf_count: float
    gram: FloatArray
    rhs: FloatArray
    recent_times: tuple[float, ...] = ()
    recent_resid: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form (lists of floats) for a database column or a Redis value."""
        return {
            "count": self.count,
            "total": self.total,
            "total_sq": self.total_sq,
            "cf_count": self.cf_count,
            "gram": self.gram.tolist(),
            "rhs": self.rhs.tolist(),
            "recent_times": list(self.recent_times),
            "recent_resid": list(self.recent_resid),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> UserState:
        return cls(
            float(obj["count"]),
            float(obj["total"]),
            float(obj["total_sq"]),
            float(obj["cf_count"]),
            np.asarray(obj["gram"], dtype=np.float64),
            np.asarray(obj["rhs"], dtype=np.float64),
            tuple(float(v) for v in obj.get("recent_times", ())),
            tuple(float(v) for v in obj.get("recent_resid", ())),
        )


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
    """Pure update: the state after one more rating (data scale, unix seconds). Pass ``previous_rating`` when the
    user re-rates a movie: its contribution is removed first, so the state stays that of their latest ratings.
    """
    i = mf.item_index.get(movie_id, -1)
    out = state
    if previous_rating is not None:
        out = _add(mf, out, i, previous_rating, -1.0)
    out = _add(mf, out, i, rating, 1.0)
    resid = float(rating) - mf.global_mean - (float(mf.item_bias[i]) if i >= 0 else 0.0)
    # Keep the latest RECENT_RATINGS in time order (a late-arriving old rating slots into place).
    # Sorted on time only (a stable sort): ratings sent in one batch share a timestamp, and must keep their arrival
    # order rather than be ordered by residual, which would keep the user's ten best-liked as "the latest".
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
    )


def user_state(
    mf: MFModel, movie_ids: Ids, ratings: Sequence[float] | FloatArray, timestamps: Sequence[float] | FloatArray
) -> UserState:
    """A user's state from all their ratings at once, in arrival order.

    Equal to folding ``update_user_state`` over them, in a few vectorised operations (the service rebuilds a
    user's state from the store on a cache miss, so this is on the request path). A movie rated more than once
    counts once, with its latest rating: what ``update_user_state(..., previous_rating=...)`` keeps.
    """
    # As cf.lookup: a sequence is taken as it is. (np.asarray turned a mix of int and str ids into strings, so one
    # non-numeric movie id hid every known movie of an int-keyed model.)
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
    # The latest RECENT_RATINGS by time; the stable sort keeps arrival order among equal timestamps.
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
    """Pure update of what a movie received since training, (count, sum, sum of squares) on the data scale.

    Feed it to ``predict_user(movie_extra=...)``; after a retrain the trained moments include these ratings, so
    every movie's extra starts again at (0, 0, 0).
    """
    count, total, total_sq = extra
    r = float(rating)
    if previous_rating is not None:
        p = float(previous_rating)
        return count, total - p + r, total_sq - p * p + r * r
    return count + 1.0, total + r, total_sq + r * r


def fold_in_state(mf: MFModel, state: UserState) -> tuple[float, FloatArray]:
    """(bias, factors) of a user from their state: the same ridge solve as ``MFModel.fold_in``."""
    d = mf.config.factors + 1
    if state.cf_count <= 0:
        return 0.0, np.zeros(d - 1)
    diag = np.full(d, mf.config.reg_factors * state.cf_count)
    diag[0] = mf.config.reg_bias * state.cf_count + mf.config.bias_damping
    w = np.asarray(np.linalg.solve(state.gram + np.diag(diag), state.rhs), dtype=np.float64)
    return float(w[0]), w[1:]


# Where UserView keeps what it knows, in one array: the user's count, mean, spread, and the fold-in solution
# w = [bias, factors...] (the model's user columns, in the model's order); then the two residual means of the
# tail and the recent times and residuals, at the end.
_V_COUNT, _V_MEAN, _V_STD, _V_BIAS = range(4)
_V_FACTORS = 4
_FLOAT64: Final[np.dtype[np.float64]] = np.dtype(np.float64)


class UserView:
    """The user side of the personalised model's inputs, computed once per user state rather than per request:
    the fold-in solve, mean and spread of their ratings, and their latest ratings for the recency features.

    Immutable. Everything is kept in one ``array("d")``: a replica caches tens of thousands of views, and a view
    of 3 ratings took 825 bytes as a dataclass of six Python floats, a numpy array (a view on the solve's result,
    which it kept alive) and two arrays, against 409 as one array (``bench/state_lookup.py``).
    """

    __slots__ = ("_data", "_n", "_t0")

    def __init__(
        self,
        count: float,
        mean: float,
        std: float,
        bias: float,
        factors: Sequence[float] | FloatArray,
        recent_times: Sequence[float],  # ascending
        recent_resid: Sequence[float],
    ) -> None:
        data = array("d", (count, mean, std, bias))
        data.frombytes(np.asarray(factors, dtype=np.float64).tobytes())
        self._pack(data, recent_times, recent_resid)

    @classmethod
    def of_solution(
        cls,
        count: float,
        mean: float,
        std: float,
        w: FloatArray,
        recent_times: Sequence[float],
        recent_resid: Sequence[float],
    ) -> UserView:
        """The view with ``w`` = [bias, factors...], the fold-in solve's result as it comes (float64)."""
        view = cls.__new__(cls)
        data = array("d", (count, mean, std))
        data.frombytes(w.tobytes())
        view._pack(data, recent_times, recent_resid)
        return view

    @classmethod
    def of_data(cls, raw: bytes, n_recent: int) -> UserView:
        """The view whose array is ``raw`` (``_codec.view_data``'s layout: count, mean, spread, w, two places for
        the tail's means, then the ``n_recent`` recent times and residuals); the tail's means are computed here,
        as ``_pack`` computes them."""
        view = cls.__new__(cls)
        data = array("d")
        data.frombytes(raw)
        view._data = data
        view._n = n_recent
        view._t0 = len(data) - 2 * n_recent
        if n_recent:
            data[view._t0 - 2], data[view._t0 - 1] = view._means(n_recent)
        return view

    def _pack(self, data: array[float], recent_times: Sequence[float], recent_resid: Sequence[float]) -> None:
        n = len(recent_resid)
        if len(recent_times) != n:
            raise ValueError(f"{len(recent_times)} recent times for {n} residuals")
        data.extend((math.nan, math.nan))
        self._t0 = len(data)
        data.extend(recent_times)
        data.extend(recent_resid)
        self._data = data
        self._n = n
        if n:
            # The two residual means when every one of these ratings is before the query time, the usual case:
            # computed once per view instead of on every request (two fsums were a fifth of a /predict's own work).
            data[self._t0 - 2], data[self._t0 - 1] = self._means(n)

    @property
    def count(self) -> float:
        return self._data[_V_COUNT]

    @property
    def mean(self) -> float:
        return self._data[_V_MEAN]

    @property
    def std(self) -> float:
        return self._data[_V_STD]

    @property
    def bias(self) -> float:
        return self._data[_V_BIAS]

    def columns(self) -> array[float]:
        """count, mean, spread and bias: the model's user columns, in its order."""
        return self._data[:_V_FACTORS]

    @property
    def factors(self) -> FloatArray:
        """The user's factors: a read-only numpy view on the view's array, made per call (for a batch's matmul;
        the one-movie path uses ``dot``)."""
        out = self._factors()
        out.flags.writeable = False
        return out

    def _factors(self) -> FloatArray:
        # Positional arguments: np.frombuffer's keyword parsing cost more than the rest of it (0.46 against 0.17 us).
        k = self._t0 - 2 - _V_FACTORS
        out: FloatArray = np.frombuffer(self._data, _FLOAT64, k, 8 * _V_FACTORS)
        return out

    def dot(self, item_factors: FloatArray) -> float:
        """The user's factors . ``item_factors`` (one movie's): the one-movie path's dot product."""
        return float(item_factors.dot(self._factors()))

    @property
    def recent_times(self) -> array[float]:
        """The latest ratings' times, ascending (a copy)."""
        return self._data[self._t0 : self._t0 + self._n]

    @property
    def recent_resid(self) -> array[float]:
        """Their residuals against the item baseline, in the same order (a copy)."""
        return self._data[self._t0 + self._n :]

    def __repr__(self) -> str:
        return (
            f"UserView(count={self.count!r}, mean={self.mean!r}, std={self.std!r}, bias={self.bias!r}, "
            f"factors={self.factors.tolist()!r}, recent_times={self.recent_times.tolist()!r}, "
            f"recent_resid={self.recent_resid.tolist()!r})"
        )

    def _means(self, end: int) -> tuple[float, float]:
        """Mean residual of the last RECENT_RATINGS and of the last RECENT_SHORT of the first ``end`` recent
        ratings."""
        data = self._data
        first = self._t0 + self._n  # the first residual
        lo = max(0, end - RECENT_RATINGS)
        short = max(0, end - RECENT_SHORT)
        return (
            math.fsum(data[first + lo : first + end]) / (end - lo),
            math.fsum(data[first + short : first + end]) / (end - short),
        )

    def recent(self, now: float) -> tuple[float, float, float, float]:
        """``recent_features`` of this user at time ``now``, on Python floats (the one-row path)."""
        data = self._data
        t0 = self._t0  # the recent times are data[t0 : t0 + n], the tail's two means just before them
        end = t0 + self._n  # (positions in data throughout: this is on every personalised /predict)
        if end > t0 and now > data[end - 1]:  # every rating is before now
            mean, mean_short = data[t0 - 2], data[t0 - 1]
        else:
            end = bisect.bisect_left(data, now, t0, end)  # ratings strictly before now
            if end == t0:
                return math.nan, math.nan, math.nan, 0.0
            mean, mean_short = self._means(end - t0)
        # Ratings within the day before now, among the last RECENT_RATINGS: the times are ascending.
        within_day = end - bisect.bisect_left(data, now - SECONDS_PER_DAY, max(t0, end - RECENT_RATINGS), end)
        return mean, mean_short, (now - data[end - 1]) / SECONDS_PER_DAY, float(within_day)


def _scalar_mean_std(count: float, total: float, total_sq: float) -> tuple[float, float]:
    """``_mean_std`` of one set of moments, on Python floats."""
    if count <= 0:
        return math.nan, math.nan
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


# --- state built from a set of ratings ---------------------------------------------------------------------------


def _moments(idx: IntArray, r: FloatArray, n: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    count: FloatArray = np.bincount(idx, minlength=n).astype(np.float64)
    total: FloatArray = np.bincount(idx, weights=r, minlength=n).astype(np.float64)
    total_sq: FloatArray = np.bincount(idx, weights=r * r, minlength=n).astype(np.float64)
    return count, total, total_sq


def _mean_std(count: FloatArray, total: FloatArray, total_sq: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean and standard deviation from moments; NaN where there is no rating (the trees learn what NaN means)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
        var = np.where(count > 0, total_sq / count - mean * mean, np.nan)
    return mean, np.sqrt(np.maximum(var, 0.0))


def recent_features(times: FloatArray, resid: FloatArray, start: IntArray, end: IntArray, t: FloatArray) -> FloatArray:
    """Recency features of queries whose user's earlier ratings are rows [start, end) of ``times``/``resid``
    (sorted by time within each user): the mean residual of the last RECENT_RATINGS and of the last
    RECENT_SHORT, days since the last one, and how many of the last RECENT_RATINGS fall in the day before t.
    NaN (count 0) when the user has no earlier rating. Shape (n, len(RECENT_FEATURES)).
    """
    cum = np.concatenate([[0.0], np.cumsum(resid)])
    out = np.full((len(end), len(RECENT_FEATURES)), np.nan)
    has = end > start
    for col, width in ((0, RECENT_RATINGS), (1, RECENT_SHORT)):
        lo = np.maximum(start, end - width)
        out[has, col] = (cum[end] - cum[lo])[has] / (end - lo)[has]
    if len(times):
        last = times[np.clip(end - 1, 0, len(times) - 1)]
        out[has, 2] = (t - last)[has] / SECONDS_PER_DAY
        # Ratings of the last RECENT_RATINGS within a day of t: the window keeps it computable from online state.
        lo = np.maximum(start, end - RECENT_RATINGS)
        count = np.zeros(len(end))
        for back in range(1, RECENT_RATINGS + 1):
            row = end - back
            ok = row >= lo
            count += ok & (times[np.clip(row, 0, len(times) - 1)] >= t - SECONDS_PER_DAY)
        out[:, 3] = count
    else:
        out[:, 3] = 0.0
    return out


@dataclass(frozen=True, slots=True)
class RatingState:
    """Everything learnt from a set of ratings: the factorisation, per-user / per-movie moments, and each user's
    ratings in time order (their residual against the item baseline) for the recency features."""

    mf: MFModel
    user_count: FloatArray
    user_total: FloatArray
    user_total_sq: FloatArray
    item_count: FloatArray
    item_total: FloatArray
    item_total_sq: FloatArray
    hist_user: FloatArray
    hist_time: FloatArray
    hist_resid: FloatArray

    @classmethod
    def build(
        cls, user_ids: Ids, movie_ids: Ids, ratings: FloatArray, timestamps: FloatArray, config: MFConfig
    ) -> RatingState:
        mf = MFModel.fit(user_ids, movie_ids, ratings, config)
        u = lookup(mf.user_index, user_ids)
        i = lookup(mf.item_index, movie_ids)
        t = np.asarray(timestamps, dtype=np.float64)
        order = np.lexsort((t, u))
        resid = ratings - mf.global_mean - mf.item_bias[i]
        return cls(
            mf,
            *_moments(u, ratings, len(mf.user_ids)),
            *_moments(i, ratings, len(mf.item_ids)),
            u[order].astype(np.float64),
            t[order],
            resid[order],
        )

    def _user_bounds(self, u: IntArray, t: FloatArray) -> tuple[IntArray, IntArray]:
        """For each query, the range of the user's history rows strictly before time t."""
        n_users = len(self.mf.user_ids)
        starts = np.searchsorted(self.hist_user, np.arange(n_users + 1), side="left")
        uu = np.where(u >= 0, u, n_users)
        start = starts[uu]
        # Within a user the rows are time-sorted: a combined key keeps it one searchsorted for all queries.
        span = float(max(self.hist_time.max(initial=0.0), t.max(initial=0.0)) + 1.0)
        keys = self.hist_user * span + self.hist_time
        end = np.searchsorted(keys, uu * span + np.maximum(t, 0.0), side="left")
        return start, np.maximum(end, start)

    def features(self, u: IntArray, i: IntArray, t: FloatArray) -> FloatArray:
        """The state features of (user index, movie index, time) queries; -1 (unknown) gives NaN for that side."""
        mf = self.mf
        ku, ki = u >= 0, i >= 0
        uu, ii = np.where(ku, u, 0), np.where(ki, i, 0)
        um, us = _mean_std(self.user_count[uu], self.user_total[uu], self.user_total_sq[uu])
        im, is_ = _mean_std(self.item_count[ii], self.item_total[ii], self.item_total_sq[ii])
        dot = np.einsum("nk,nk->n", mf.user_factors[uu], mf.item_factors[ii])
        start, end = self._user_bounds(u, t)
        recent = recent_features(self.hist_time, self.hist_resid, start, end, t)
        return _assemble(
            np.where(ku, self.user_count[uu], 0.0),
            np.where(ku, um, np.nan),
            np.where(ku, us, np.nan),
            np.where(ku, mf.user_bias[uu], np.nan),
            np.where(ki, self.item_count[ii], 0.0),
            np.where(ki, im, np.nan),
            np.where(ki, is_, np.nan),
            np.where(ki, mf.item_bias[ii], np.nan),
            ku & ki,
            mf.global_mean,
            dot,
            recent,
        )


def _assemble(
    ucount: FloatArray,
    umean: FloatArray,
    ustd: FloatArray,
    ubias: FloatArray,
    icount: FloatArray,
    imean: FloatArray,
    istd: FloatArray,
    ibias: FloatArray,
    known: BoolArray,
    mu: float,
    dot: FloatArray,
    recent: FloatArray,
) -> FloatArray:
    score = np.where(known, mu + ubias + ibias + dot, np.nan)
    return np.column_stack(
        [ucount, umean, ustd, ubias, icount, imean, istd, ibias, score, np.where(known, dot, np.nan), recent]
    )


def inner_folds(n: int, k: int, seed: int) -> IntArray:
    """A fold number in [0, k) for each of n rows: a seeded permutation cut into k near-equal parts."""
    folds = np.empty(n, dtype=np.int64)
    folds[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return folds


def out_of_fold_state_features(
    user_ids: Ids, movie_ids: Ids, ratings: FloatArray, timestamps: FloatArray, config: PersonalizedConfig
) -> FloatArray:
    """State features of every training row, each from a state fitted WITHOUT that row (its inner fold held out).

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
    out = np.empty((n, len(STATE_FEATURES)))
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
        st = RatingState.build(uarr[keep], marr[keep], ratings[keep], t[keep], config.mf)
        out[held] = st.features(lookup(st.mf.user_index, uarr[held]), lookup(st.mf.item_index, marr[held]), t[held])
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


# --- the model ---------------------------------------------------------------------------------------------------


class PersonalizedModel:
    """Trained personalised model: the trees, the rating state they read, and the scale of the ratings."""

    def __init__(self, config: PersonalizedConfig, state: RatingState, booster: Any, scale: RatingScale) -> None:
        self.config = config
        self.state = state
        self.booster = booster
        self.scale = scale
        self.card: ModelCard | None = None

    @property
    def mf(self) -> MFModel:
        """The factorisation whose item state the online user states refer to."""
        return self.state.mf

    @property
    def version(self) -> str:
        """The model card's version once saved or loaded (what responses report as ``model_version``)."""
        return self.card.version if self.card is not None else "personalized-unsaved"

    def to_api(self, pred: FloatArray, *, in_place: bool = False) -> FloatArray:
        """Predictions on the data's scale -> the API's 0-10 scale (NaN stays NaN); ``in_place``: into ``pred``
        (a float64 array the caller owns), without a new array."""
        if in_place:
            y = np.multiply(pred, self.scale.to_api, out=pred)
        else:
            y = np.asarray(pred, dtype=np.float64) * self.scale.to_api
        out: FloatArray = np.minimum(np.maximum(y, 0.0, out=y), 10.0, out=y)  # NaN stays NaN, as with np.clip
        return out

    def from_api(self, rating: float) -> float:
        """A 0-10 rating from ``/feedback`` -> the data's scale the user state is kept in."""
        return float(rating) / self.scale.to_api

    @classmethod
    def fit_frame(cls, frame: Any, scale: RatingScale, config: PersonalizedConfig | None = None) -> PersonalizedModel:
        """Train from a DataFrame with user_id, movie_id, rating, timestamp and the six FEATURE_NAMES columns
        (the training frame ``evaluation`` and ``trainfeatures`` build)."""
        return cls.fit(
            frame["user_id"].to_numpy(),
            frame["movie_id"].to_numpy(),
            frame["rating"].to_numpy(dtype=np.float64),
            frame["timestamp"].to_numpy(dtype=np.float64),
            frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64),
            config or PersonalizedConfig.model_validate({}),
            scale,
        )

    @classmethod
    def fit(
        cls,
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
        x = np.hstack([x6, out_of_fold_state_features(user_ids, movie_ids, r, t, config)])
        train = lgb.Dataset(x, r, feature_name=list(MODEL_FEATURES), free_raw_data=True)
        booster = lgb.train(_lgb_params(config), train, num_boost_round=config.n_estimators)
        full = RatingState.build(user_ids, movie_ids, r, t, config.mf)
        return cls(config, full, booster, scale)

    def _predict_rows(self, x: FloatArray) -> FloatArray:
        return self._clip(np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64))

    def _clip(self, y: FloatArray) -> FloatArray:
        # Two in-place ufuncs: np.clip's Python-level wrapper costs more than this on a batch.
        out: FloatArray = np.minimum(np.maximum(y, self.scale.min, out=y), self.scale.max, out=y)
        return out

    def _personalisable(self, known_user: BoolArray, known_movie: BoolArray) -> BoolArray:
        if self.config.personalize == "known_user":
            return known_user
        return known_user & known_movie

    def predict_pairs(
        self, user_ids: Ids, movie_ids: Ids, timestamps: Sequence[float] | FloatArray, x6: FloatArray
    ) -> tuple[FloatArray, BoolArray]:
        """Predictions (data scale) for (user, movie, time) rows, with the training ratings as the state.

        This is what evaluation calls. Returns (predictions, mask): mask marks the rows the model personalises
        (a known user, see ``PersonalizedConfig.personalize``); the other rows are NaN and the caller answers
        them with the six-feature model.
        """
        u = lookup(self.mf.user_index, user_ids)
        i = lookup(self.mf.item_index, movie_ids)
        enough = (u >= 0) & (self.state.user_count[np.maximum(u, 0)] >= self.config.min_user_ratings)
        mask = self._personalisable(enough, i >= 0)
        out = np.full(len(u), np.nan)
        if mask.any():
            t = np.asarray(timestamps, dtype=np.float64)[mask]
            x = np.hstack([np.asarray(x6, dtype=np.float64)[mask], self.state.features(u[mask], i[mask], t)])
            out[mask] = self._predict_rows(x)
        return out, mask

    def user_view(self, user: UserState | None) -> UserView | None:
        """What every prediction for this user needs from their state, or None when the model does not answer for
        them (no state, or fewer ratings than ``min_user_ratings``)."""
        if user is None or user.count <= 0 or user.count < self.config.min_user_ratings:
            return None
        bu, pu = fold_in_state(self.mf, user)
        mean, std = _scalar_mean_std(user.count, user.total, user.total_sq)
        return UserView(user.count, mean, std, bu, pu, user.recent_times, user.recent_resid)

    def user_view_of_ratings(
        self, movie_ids: Sequence[Id], ratings: Sequence[float], timestamps: Sequence[float]
    ) -> UserView | None:
        """``user_view(user_state(self.mf, movie_ids, ratings, timestamps))`` (to float rounding), straight from
        the ratings (data scale, in arrival order) without the general state: what the service does on a cache
        miss, where a user has a handful of ratings and numpy's per-call overhead is most of the cost of
        ``user_state`` (which stays the reference and the public way to keep a state).

        The same rules: a movie rated more than once counts once, with its latest rating; the recent ratings are
        the latest RECENT_RATINGS by time, arrival order among equal timestamps. The ridge system of
        ``fold_in_state`` is built with one matmul over the rows [1, q_i, residual_i] of the known movies.
        """
        ids = movie_ids if isinstance(movie_ids, list) else list(movie_ids)
        r, t = ratings, timestamps
        n = len(ids)
        if len(set(ids)) != n:
            latest = sorted({m: k for k, m in enumerate(ids)}.values())
            ids, r, t = [ids[k] for k in latest], [r[k] for k in latest], [t[k] for k in latest]
            n = len(ids)
        if n <= 0 or n < self.config.min_user_ratings:
            return None
        mf = self.mf
        mu = mf.global_mean
        item_bias = mf.item_bias
        cols = list(map(mf.item_index.get, ids, repeat(-1, n)))
        if _codec is not None:
            # All of what follows in one C call (_codec.view_data): the Python below cost most of a cache miss.
            packed = _codec.view_data(
                self._item_factors,
                mf.config.factors,
                self._item_bias,
                mu,
                cols,
                r if isinstance(r, list) else list(r),
                t if isinstance(t, list) else list(t),
                mf.config.reg_factors,
                mf.config.reg_bias,
                mf.config.bias_damping,
                RECENT_RATINGS,
            )
            if packed is not None:
                return UserView.of_data(*packed)
        resid = [v - mu - item_bias.item(c) if c >= 0 else v - mu for v, c in zip(r, cols, strict=True)]
        known = [k for k, c in enumerate(cols) if c >= 0]
        m = len(known)
        d = mf.config.factors + 1
        w: FloatArray
        if m:  # no extension, or a system view_data found not positive definite: numpy's solve (which reports it)
            x = np.empty((m, d + 1))
            x[:, 0] = 1.0
            x[:, 1:d] = mf.item_factors.take([cols[k] for k in known], 0)  # (take: a third of fancy indexing's cost)
            x[:, d] = [resid[k] for k in known]
            g = x.T @ x  # [[gram, rhs], [rhs^T, .]]: the state's two sums in one product
            # The ridge terms of fold_in_state on the diagonal of the gram part; the bias entry g[0, 0] is m.
            g.ravel()[: d * (d + 2) : d + 2] += mf.config.reg_factors * m  # (a new C-ordered array: ravel is a view)
            g[0, 0] = m + (mf.config.reg_bias * m + mf.config.bias_damping)
            w = np.asarray(np.linalg.solve(g[:d, :d], g[:d, d]), dtype=np.float64)
        else:
            w = np.zeros(d)
        total = sum(r)
        mean, std = _scalar_mean_std(float(n), total, sum([v * v for v in r]))
        # The latest RECENT_RATINGS by time; sorted() is stable, so equal timestamps keep their arrival order.
        recent = sorted(range(n), key=t.__getitem__)[-RECENT_RATINGS:]
        return UserView.of_solution(float(n), mean, std, w, [t[k] for k in recent], [resid[k] for k in recent])

    def predict_user(
        self,
        user: UserState | None,
        movie_ids: Ids,
        x6: FloatArray,
        now: float | None = None,
        movie_extra: FloatArray | None = None,
    ) -> tuple[FloatArray, BoolArray]:
        """Predictions (data scale) of one user, described by their online state, for a batch of movies.

        ``now`` (unix seconds, default the clock) is the prediction time the recency features are measured from.
        ``movie_extra``, optional (n, 3) in request order, is what the movies received since training (count, sum,
        sum of squares of ratings: see ``update_movie_extra``); it is added to the trained movie moments. Returns
        (predictions, mask) as ``predict_pairs``. The service calls ``user_view`` once per state and then
        ``predict_view`` per request.
        """
        return self.predict_view(self.user_view(user), movie_ids, x6, now, movie_extra)

    def predict_view(
        self,
        view: UserView | None,
        movie_ids: Ids,
        x6: FloatArray,
        now: float | None = None,
        movie_extra: FloatArray | None = None,
        index: IntArray | None = None,
        movie_columns: FloatArray | None = None,
    ) -> tuple[FloatArray, BoolArray]:
        """``predict_user`` from a ``user_view``: one dict lookup per movie (unless ``index``, the movies' positions
        from ``cf.lookup``, is given), a few vectorised numpy operations and one call of the trees.

        ``movie_columns``, optional (n, 4) in request order, are the movies' count, mean, spread and bias inputs
        already computed (rows of ``movie_table``); it replaces ``movie_extra``.
        """
        i = lookup(self.mf.item_index, movie_ids) if index is None else index
        n = len(i)
        if view is None:
            return np.full(n, np.nan), np.zeros(n, dtype=bool)
        mask = self._personalisable(np.ones(n, dtype=bool), i >= 0)
        if not mask.any():
            return np.full(n, np.nan), mask
        every = bool(mask.all())
        ii = i if every else i[mask]
        m = len(ii)
        ki = ii >= 0
        # The model's input matrix written column by column (what ``_assemble`` builds for training, without its
        # temporaries): the user's columns are one value each, which the trees then look up once per batch.
        rows = np.empty((m, len(MODEL_FEATURES)))
        x6 = np.asarray(x6, dtype=np.float64)
        rows[:, :N_FEATURES] = x6 if every else x6[mask]
        rows[:, _COL["user_count"] : _COL["user_bias"] + 1] = (view.count, view.mean, view.std, view.bias)
        movie = rows[:, _COL["movie_count"] : _COL["movie_bias"] + 1]
        if movie_columns is not None:
            movie[:] = movie_columns if every else movie_columns[mask]
        else:
            extra = None if movie_extra is None else np.asarray(movie_extra, dtype=np.float64).reshape(n, 3)
            movie[:] = self._movie_columns(ii, extra if every or extra is None else extra[mask])
        ibias = movie[:, 3]
        dot = rows[:, _COL["cf_dot"]]
        known = np.flatnonzero(ki)
        if len(known) == m:
            np.matmul(self.mf.item_factors[ii], view.factors, out=dot)
        else:  # only the movies the model knows have factors (a batch may be mostly others)
            dot.fill(np.nan)
            dot[known] = self.mf.item_factors[ii[known]] @ view.factors
        # As in _assemble: mu + user bias + movie bias + dot, NaN for a movie the model does not know.
        rows[:, _COL["cf_score"]] = self.mf.global_mean + view.bias + ibias + dot
        rows[:, _COL[RECENT_FEATURES[0]] :] = view.recent(time.time() if now is None else float(now))
        if every:
            return self._predict_rows(rows), mask
        out = np.full(n, np.nan)
        out[mask] = self._predict_rows(rows)
        return out, mask

    def predict_table(
        self, view: UserView, x6: FloatArray, rows: IntArray, table: FloatArray, now: float | None = None
    ) -> FloatArray:
        """``predict_view`` of a batch whose movies are given as rows of a movie table: ``table`` is
        ``movie_table``'s layout (one row per movie of the model, in its order, then any others; (R, 4) count,
        mean, spread, bias) and ``rows`` ((n,) ints) each movie's row. Every row is personalised, so this is only
        for ``personalize == "known_user"``. Equal to ``predict_view`` with those movie inputs, to float rounding.

        The inputs that differ between movies are written in one pass (``_codec.user_rows``): in numpy it was a
        gather, a matmul and a dozen column writes, 35 us of a 1,000-movie batch.
        """
        if self.config.personalize != "known_user":
            raise ValueError('predict_table answers every movie: only for personalize == "known_user"')
        n_known = len(self.mf.item_ids)
        m = len(rows)
        template = np.empty(len(MODEL_FEATURES))
        template[_COL["user_count"] : _COL["user_bias"] + 1] = (view.count, view.mean, view.std, view.bias)
        template[_COL[RECENT_FEATURES[0]] :] = view.recent(time.time() if now is None else float(now))
        x6 = np.ascontiguousarray(x6, dtype=np.float64)
        booster = self.booster
        if _codec is not None:
            # Only the 12 inputs that differ between movies are written; the trees take the user's 8 from the
            # template (TreeEnsemble.predict_raw_columns): 96 bytes a movie to write and read instead of 160.
            narrow = np.empty((m, len(_ROW_COLUMNS)))
            _codec.user_rows(
                np.ascontiguousarray(rows, dtype=np.int64),
                x6,
                np.ascontiguousarray(table, dtype=np.float64),
                self._item_factors,
                view._factors(),
                _ROW_TEMPLATE,
                narrow,
                n_known,
                N_FEATURES,
                N_FEATURES + 4,
                N_FEATURES + 5,
                self.mf.global_mean + view.bias,
            )
            if isinstance(booster, EnsembleBooster):
                return self._clip(booster.ensemble.predict_raw_columns(narrow, _ROW_COLUMNS, template))
            out = full_rows(narrow, _ROW_COLUMNS, template)  # LightGBM's own booster takes the whole matrix
        else:  # the same matrix in numpy
            out = np.empty((m, len(MODEL_FEATURES)))
            out[:] = template
            out[:, :N_FEATURES] = x6
            movie = table[rows]
            out[:, _COL["movie_count"] : _COL["movie_bias"] + 1] = movie
            dot = out[:, _COL["cf_dot"]]
            dot.fill(np.nan)
            known = np.flatnonzero(rows < n_known)
            dot[known] = self.mf.item_factors[rows[known]] @ np.asarray(view.factors, dtype=np.float64)
            out[:, _COL["cf_score"]] = self.mf.global_mean + view.bias + movie[:, 3] + dot
        return self._predict_rows(out)

    @property
    def _item_bias(self) -> FloatArray:
        bias: FloatArray = np.ascontiguousarray(self.mf.item_bias, dtype=np.float64)
        return bias

    @property
    def _item_factors(self) -> FloatArray:
        # user_rows reads the factors as one C-contiguous float64 block (a loaded model's already are: no copy).
        factors: FloatArray = np.ascontiguousarray(self.mf.item_factors, dtype=np.float64)
        return factors

    def _movie_columns(self, index: IntArray, extra: FloatArray | None) -> FloatArray:
        """(len(index), 4) movie count, mean, spread and bias inputs of the movies at ``index`` (-1: unknown to the
        model), with ``extra`` ((len(index), 3) count, sum, sum of squares received since training) added."""
        known = index >= 0
        iz = np.where(known, index, 0)
        st = self.state
        count = np.where(known, st.item_count[iz], 0.0)
        total = np.where(known, st.item_total[iz], 0.0)
        total_sq = np.where(known, st.item_total_sq[iz], 0.0)
        if extra is not None:
            count, total, total_sq = count + extra[:, 0], total + extra[:, 1], total_sq + extra[:, 2]
        cols = np.empty((len(index), 4))
        cols[:, 0] = count
        cols[:, 1], cols[:, 2] = _mean_std(count, total, total_sq)
        cols[:, 3] = np.where(known, self.mf.item_bias[iz], np.nan)
        return cols

    def movie_table(self, extra: FloatArray | None = None) -> FloatArray:
        """The movie inputs of every movie at once: (movies of the model + 1, 4), row k for the model's movie k
        (``extra``, optional (movies of the model, 3), added to its moments as in ``predict_user``) and a last row
        for a movie the model does not know and nobody rated. A batch then takes its rows with one gather."""
        n = len(self.mf.item_ids)
        index = np.append(np.arange(n, dtype=np.int64), -1)  # -1 last: the unknown movie
        return self._movie_columns(index, None if extra is None else np.vstack([extra, np.zeros((1, 3))]))

    def unknown_movie_columns(self, extra: FloatArray) -> FloatArray:
        """Movie inputs of movies the model does not know, from what they received since training ((k, 3))."""
        return self._movie_columns(np.full(len(extra), -1, dtype=np.int64), np.asarray(extra, dtype=np.float64))

    def predict_view_one(
        self,
        view: UserView,
        movie_id: Id,
        x6: list[float],
        now: float | None = None,
        movie_extra: tuple[float, float, float] | None = None,
    ) -> float | None:
        """``predict_view`` of one movie on Python floats (a ``/predict`` request: numpy's per-call overhead
        would cost more than the arithmetic). The prediction on the data scale, or None when the model does not
        answer this movie (see ``PersonalizedConfig.personalize``). Equal to ``predict_view`` to float rounding.
        """
        st = self.state
        mf = st.mf
        i = mf.item_index.get(movie_id, -1)
        known = i >= 0
        if known:
            icount, itotal, itotal_sq = st.item_count.item(i), st.item_total.item(i), st.item_total_sq.item(i)
        elif self.config.personalize != "known_user":
            return None
        else:
            icount = itotal = itotal_sq = 0.0
        if movie_extra is not None:
            icount, itotal, itotal_sq = icount + movie_extra[0], itotal + movie_extra[1], itotal_sq + movie_extra[2]
        im, istd = _scalar_mean_std(icount, itotal, itotal_sq)
        user = view.columns()  # count, mean, spread, bias
        if known:
            ibias = mf.item_bias.item(i)
            dot = view.dot(mf.item_factors[i])
            score = mf.global_mean + user[_V_BIAS] + ibias + dot
        else:
            ibias = dot = score = math.nan
        row = [
            *x6,
            *user,
            icount,
            im,
            istd,
            ibias,
            score,
            dot,
            *view.recent(time.time() if now is None else float(now)),
        ]
        booster = self.booster
        if isinstance(booster, EnsembleBooster):
            y = booster.ensemble.predict_value(row)
        else:
            y = float(booster.predict(np.array([row]), num_threads=1)[0])
        return min(max(y, self.scale.min), self.scale.max)

    # --- persistence -------------------------------------------------------------------------------------------

    def save(
        self,
        directory: Path,
        *,
        name: str = "moviematch-personalized",
        version: str | None = None,
        created_at: str | None = None,
        data: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> ModelCard:
        """Write the trees (LightGBM text), the state (npz without pickle + JSON) and a card with every sha256."""
        directory.mkdir(parents=True, exist_ok=True)
        text = self.booster.model_to_string(num_iteration=-1).encode("utf-8")
        (directory / MODEL_FILE).write_bytes(text)
        extra = self.mf.save(directory)
        st = self.state
        arrays = {name_: np.asarray(getattr(st, name_)) for name_ in _STATE_ARRAYS}
        npz = write_npz(arrays)
        (directory / STATE_FILE).write_bytes(npz)
        extra[STATE_FILE] = hashlib.sha256(npz).hexdigest()
        sha = hashlib.sha256(text).hexdigest()
        card = ModelCard(
            name=name,
            version=version or f"personalized-{sha[:12]}",
            kind="personalized",
            created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            model_file=MODEL_FILE,
            model_format="lightgbm-text",
            sha256=sha,
            features=list(MODEL_FEATURES),
            rating_scale=self.scale,
            data=data or {},
            training={"config": self.config.model_dump(mode="json")},
            metrics=metrics or {},
            extra_files=dict(sorted(extra.items())),
        )
        write_card(directory, card)
        self.card = card
        return card

    @classmethod
    def load(cls, path: Path) -> PersonalizedModel:
        """Load a saved model, verifying the sha256 of the trees and of every extra file against the card.

        The trees are run by ``model.TreeEnsemble`` (LightGBM's own answers to float rounding, without importing
        LightGBM in the service), or by LightGBM for a model the evaluator does not cover.
        """
        card = read_card(path)
        cfile = card_path(path)
        if card.kind != "personalized" or card.model_format != "lightgbm-text":
            raise ModelFormatError(f"{cfile}: a {card.kind} model in {card.model_format} is not a personalised model")
        if card.features != list(MODEL_FEATURES):
            raise ModelFormatError(
                f"{cfile}: model expects features {card.features}, this version computes {list(MODEL_FEATURES)}"
            )
        missing = {"cf.npz", "cf.json", STATE_FILE} - set(card.extra_files)
        if missing:
            raise ModelFormatError(f"{cfile}: card lists no checksum for {sorted(missing)}")
        text = verified_bytes(cfile, card.model_file, card.sha256)
        for fname, sha in card.extra_files.items():
            verified_bytes(cfile, fname, sha)
        mf = MFModel.load(cfile.parent, card.extra_files)
        arrays = read_npz(verified_bytes(cfile, STATE_FILE, card.extra_files[STATE_FILE]))
        if set(arrays) != set(_STATE_ARRAYS):
            raise ModelFormatError(f"{cfile.parent / STATE_FILE}: unexpected arrays {sorted(arrays)}")
        n_hist = arrays["hist_user"].shape
        for key in _STATE_ARRAYS:
            want = (len(mf.user_ids),) if key.startswith("user") else (len(mf.item_ids),)
            if key.startswith("hist"):
                want = n_hist
            if arrays[key].shape != want or len(n_hist) != 1:
                raise ModelFormatError(f"{cfile.parent / STATE_FILE}: {key} has shape {arrays[key].shape}")
        state = RatingState(mf, *(arrays[k] for k in _STATE_ARRAYS))
        try:
            booster = fast_booster(text.decode("utf-8"), len(MODEL_FEATURES))
        except (UnicodeDecodeError, ModelFormatError) as exc:
            raise ModelFormatError(f"{cfile.parent / card.model_file}: not a LightGBM model: {exc}") from exc
        config = PersonalizedConfig.model_validate(card.training.get("config", {}))
        model = cls(config, state, booster, card.rating_scale)
        model.card = card
        return model


# --- evaluation ----------------------------------------------------------------------------------------------------


class PersonalizedCandidate:
    """The personalised model as ``evaluation`` sees it: state from the training ratings only, and the six-feature
    model (fitted on the same training rows) answering the rows the personalised model cannot, as in the service.
    """

    name: str = "personalized"

    def __init__(self, config: PersonalizedConfig | None = None, six_config: Any = None) -> None:
        self.config = config or PersonalizedConfig.model_validate({})
        self.six_config = six_config
        self.last_mask: BoolArray | None = None

    def fit_predict(self, train: Any, test: Any, scale: RatingScale) -> FloatArray:
        from moviematch_ml.training import SixFeatureCandidate, TrainConfig

        six = SixFeatureCandidate(self.six_config or TrainConfig.model_validate({}))
        fallback = six.fit_predict(train, test, scale)
        cols = list(FEATURE_NAMES)
        model = PersonalizedModel.fit_frame(train, scale, self.config)
        pred, mask = model.predict_pairs(
            test["user_id"].to_numpy(),
            test["movie_id"].to_numpy(),
            test["timestamp"].to_numpy(dtype=np.float64),
            test.loc[:, cols].to_numpy(dtype=np.float64),
        )
        self.last_mask = mask
        out: FloatArray = np.where(mask, pred, fallback)
        return out
