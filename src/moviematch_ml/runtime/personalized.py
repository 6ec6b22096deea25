"""The personalised model at serving time: its learned state, a user's view, the movie table, and predictions.

The model reads the six features, what is known of the user (from their ratings through ``/feedback``, folded in
against the factorisation's movie side), of the movie and the recency of the user's ratings: the 20 inputs of
``inputs.MODEL_FEATURES``. Training is in ``offline/stacking.py``; this module only predicts, loads and saves.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from moviematch_ml.errors import ModelFormatError
from moviematch_ml.features import N_FEATURES
from moviematch_ml.runtime import native
from moviematch_ml.runtime.cards import (
    DataSource,
    ModelCard,
    RatingScale,
    card_path,
    checked_version,
    content_versioned,
    read_card,
    read_npz,
    verified_bytes,
    write_card,
    write_npz,
)
from moviematch_ml.runtime.factors import MFConfig, MFModel, lookup
from moviematch_ml.runtime.inputs import (
    COLUMN,
    MODEL_FEATURES,
    RECENT_RATINGS,
    RECENT_SHORT,
    ROW_COLUMNS,
    ROW_INPUTS,
    SECONDS_PER_DAY,
    model_input_row,
    model_inputs,
    user_template,
)
from moviematch_ml.runtime.trees import EnsembleBooster, fast_booster, full_rows

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Id = int | str
Ids = Sequence[Id] | npt.NDArray[np.generic]

MODEL_FILE: Final[str] = "personalized.txt"
STATE_FILE: Final[str] = "state.npz"
STATE_ARRAYS: Final[tuple[str, ...]] = (
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
# Movie ids below this (4 MB of int32) are looked up in an array rather than a dict (MovieTable.dense); MovieLens'
# ids stop at 193,609.
DENSE_IDS_MAX: Final[int] = 1 << 20
_NARROW_TEMPLATE: Final[FloatArray] = np.zeros(len(ROW_INPUTS))  # user_rows overwrites every column
_TRUE: Final[BoolArray] = np.ones(1, dtype=bool)
_FALSE: Final[BoolArray] = np.zeros(1, dtype=bool)
_TRUE.flags.writeable = False
_FALSE.flags.writeable = False


class PersonalizedConfig(BaseModel):
    """How the personalised model is trained and which rows it answers (chosen on a validation split of training
    data, docs/personalized.md)."""

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
        default=0.3, ge=0, lt=1, description="Share of users made to look new in each inner fold (see the docs)."
    )
    new_user_max_ratings: int = Field(default=30, ge=1, description="Most ratings a simulated new user keeps.")
    min_user_ratings: int = Field(
        default=1, ge=1, description="Ratings a user needs before the model answers for them (see the docs)."
    )
    personalize: Literal["known_user", "known_user_and_movie"] = Field(
        default="known_user", description="Which rows the model answers; the rest go to the six-feature model."
    )
    num_threads: int = Field(default=1, ge=1, le=64, description="LightGBM threads; 1 is fastest on a busy 2-core box.")


@dataclass(frozen=True, slots=True)
class RatingState:
    """Everything learnt from a set of ratings: the factorisation, per-user / per-movie moments (count, sum, sum of
    squares), and each user's ratings in time order (their residual against the movie baseline), from which
    training computes the recency features."""

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


# Where UserView keeps what it knows, in one array: the user's count, mean, spread, and the fold-in solution
# w = [bias, factors...] (the model's user columns, in the model's order); then the two residual means of the
# tail and the recent times and residuals, at the end.
_V_COUNT, _V_MEAN, _V_STD, _V_BIAS = range(4)
_V_FACTORS = 4
_FLOAT64: Final[np.dtype[np.float64]] = np.dtype(np.float64)


class UserView:
    """The user side of the personalised model's inputs, computed once per user state rather than per request:
    the fold-in solve, mean and spread of their ratings, and their latest ratings for the recency features.

    Immutable. Everything is kept in one ``array("d")``: a replica caches tens of thousands of views, and one array
    takes half the memory of Python floats and numpy arrays (``bench/state_lookup.py`` measures it).
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
    def of_data(cls, raw: bytes, n_recent: int) -> UserView:
        """The view whose array is ``raw`` (``native.view_data``'s layout: count, mean, spread, w, two places for
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
        """The user's factors: a read-only numpy view on the view's array, made per call."""
        out = self.factors_array()
        out.flags.writeable = False
        return out

    def factors_array(self) -> FloatArray:
        """The user's factors as a numpy view on the view's array (for the kernels; do not write to it)."""
        # Positional arguments: np.frombuffer's keyword parsing costs more than the rest of the call.
        k = self._t0 - 2 - _V_FACTORS
        out: FloatArray = np.frombuffer(self._data, _FLOAT64, k, 8 * _V_FACTORS)
        return out

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


def mean_std(count: FloatArray, total: FloatArray, total_sq: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean and standard deviation from moments; NaN where there is no rating (the trees learn what NaN means)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
        var = np.where(count > 0, total_sq / count - mean * mean, np.nan)
    return mean, np.sqrt(np.maximum(var, 0.0))


@dataclass(frozen=True, slots=True)
class MovieTable:
    """The movie inputs (count, mean, spread, bias) of every movie a request can name, built once from the trained
    moments plus what the movies received through ``/feedback``; a batch gathers its rows with one id lookup.

    Rows: the model's movies in its order, then the rated movies it does not know, then one row for any other
    movie (nobody rated it, the model does not know it).
    """

    rows: dict[Id, int]  # every movie with a row of its own, by its id spelt as the model spells its ids
    table: FloatArray  # (len(rows) + 1, 4)
    n_known: int  # the model's movies: rows [0, n_known)
    int_ids: bool  # the model's ids are ints: a request's "42" is movie 42
    # ``rows`` for its non-negative int ids as an array (-1 where it has none), when they are all below
    # DENSE_IDS_MAX: a batch's int ids are found by position rather than by hashing (native.positions, complete).
    dense: npt.NDArray[np.int32] | None

    def key(self, movie_id: Id | None) -> Id:
        """A request's movie id as the model spells its ids (the store keeps every id as text)."""
        if movie_id is None:
            return ""  # no movie id (a /predict without one): a movie nobody knows
        if self.int_ids and isinstance(movie_id, str) and movie_id.isdigit():
            return int(movie_id)
        if not self.int_ids and isinstance(movie_id, int):
            return str(movie_id)
        return movie_id

    def position(self, movie_id: Id | None) -> int:
        """One movie's row of ``table``: ``positions`` of one id, without the arrays."""
        return self.rows.get(self.key(movie_id), len(self.table) - 1)

    def positions(self, movie_ids: Sequence[Id | None]) -> IntArray:
        """Each movie's row of ``table`` (the last row for a movie with none of its own)."""
        default = len(self.table) - 1
        if self.dense is not None and type(movie_ids) is list:
            out: IntArray = np.empty(len(movie_ids), dtype=np.int64)
            strays = native.positions(movie_ids, self.rows, default, out, self.dense, True)
            # Every id an int, as the model spells its ids: no other spelling to try. With text keys (a model without
            # movie state keys the store's movies by their text), ``dense`` holds the keys that are an int's text and
            # a text id is looked up as it is: what ``key`` does, whatever the ids.
            if strays == 0 or not self.int_ids:
                return out
        kinds = set(map(type, movie_ids))
        keys: list[Id] = (
            list(movie_ids)  # type: ignore[arg-type]  # None is not among the types
            if kinds == ({int} if self.int_ids else {str})
            else [self.key(m) for m in movie_ids]
        )
        return lookup(self.rows, keys, default)


def _dense_text_rows(rows: dict[Id, int]) -> npt.NDArray[np.int32] | None:
    """``_dense_rows`` of text keys: the rows of the keys that are a non-negative int's text ("42", not "042"), by
    that int, so that a request's 42 finds "42" by position, as ``MovieTable.key`` spells it (str(42)). An empty
    array (nothing found by position) when there is none."""
    ints: dict[Id, int] = {
        int(k): row
        for k, row in rows.items()
        if isinstance(k, str) and k.isascii() and k.isdigit() and k == str(int(k))
    }
    if not ints:
        return np.full(0, -1, dtype=np.int32)
    return _dense_rows(ints)


def _dense_rows(rows: dict[Id, int]) -> npt.NDArray[np.int32] | None:
    ints = [k for k in rows if type(k) is int and k >= 0]
    if not ints or max(ints) >= DENSE_IDS_MAX:
        return None
    dense = np.full(max(ints) + 1, -1, dtype=np.int32)
    dense[ints] = [rows[k] for k in ints]
    return dense


class PersonalizedModel:
    """Trained personalised model: the trees, the rating state they read, and the scale of the ratings."""

    def __init__(self, config: PersonalizedConfig, state: RatingState, booster: Any, scale: RatingScale) -> None:
        self.config = config
        self.state = state
        self.booster = booster
        self.scale = scale
        self.card: ModelCard | None = None
        self._movieless = False  # set by without_movie_state: no trained moments, the store's totals always count
        keys = list(state.mf.item_index)
        self.int_ids = bool(keys) and all(isinstance(k, int) for k in keys[:100])
        # C-contiguous float64 blocks for the kernels (a loaded model's already are: no copy).
        self._item_factors = np.ascontiguousarray(state.mf.item_factors, dtype=np.float64)
        self._item_bias = np.ascontiguousarray(state.mf.item_bias, dtype=np.float64)

    @property
    def mf(self) -> MFModel:
        """The factorisation whose movie side the users are folded in against."""
        return self.state.mf

    @property
    def version(self) -> str:
        """The model card's version once saved or loaded (what answers report as ``model_version``)."""
        return self.card.version if self.card is not None else "personalized-unsaved"

    @property
    def counts_store_ratings(self) -> bool:
        """Trained from the service's own store: its movie moments already count every stored rating, so the
        store's totals must not be added again."""
        if self._movieless:
            return False
        return self.card is not None and self.card.data.get("dataset") == "feedback"

    def store_keys(self, movie_ids: list[str]) -> list[Id]:
        """Movie ids as the feedback store keeps them (text) -> as the model spells its ids."""
        if self.int_ids:
            return [int(m) if m.isdigit() else m for m in movie_ids]
        return list[Id](movie_ids)

    def to_api(self, pred: FloatArray, *, in_place: bool = False) -> FloatArray:
        """Predictions on the data's scale -> the API's 0-10 scale (NaN stays NaN); ``in_place``: into ``pred``."""
        if in_place:
            y = np.multiply(pred, self.scale.to_api, out=pred)
        else:
            y = np.asarray(pred, dtype=np.float64) * self.scale.to_api
        out: FloatArray = np.minimum(np.maximum(y, 0.0, out=y), 10.0, out=y)  # NaN stays NaN, as with np.clip
        return out

    def from_api(self, rating: float) -> float:
        """A 0-10 rating from ``/feedback`` -> the data's scale the user's view is kept in."""
        return float(rating) / self.scale.to_api

    def predict_inputs(self, x: FloatArray) -> FloatArray:
        """The trees on full (n, 20) input rows, clipped to the data's scale."""
        return self._clip(np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64))

    def _clip(self, y: FloatArray) -> FloatArray:
        # Two in-place ufuncs: np.clip's Python-level wrapper costs more than this on a batch.
        out: FloatArray = np.minimum(np.maximum(y, self.scale.min, out=y), self.scale.max, out=y)
        return out

    def without_movie_state(self) -> PersonalizedModel:
        """This model with no movie-side learned state: for requests whose movie ids are in another id space than
        the one it was trained in (``ModelCard.id_space``), where its movie factors, biases and moments would
        belong to other movies. Every movie is then unknown to it: the movie inputs come from what the store's
        movies received through ``/feedback`` alone, a user's view keeps their count, mean, spread and recency
        (their own ratings) while their fold-in has no movie to stand on (bias and factors 0). The same trees."""
        mf, st = self.mf, self.state
        k = mf.config.factors
        movieless = MFModel(
            mf.config,
            mf.global_mean,
            mf.user_bias,
            np.zeros(0),
            mf.user_factors,
            np.zeros((0, k)),
            mf.user_ids,
            [],
            mf.user_index,
            {},
        )
        empty = np.zeros(0)
        state = RatingState(
            movieless,
            st.user_count,
            st.user_total,
            st.user_total_sq,
            empty,
            empty,
            empty,
            st.hist_user,
            st.hist_time,
            st.hist_resid,
        )
        model = PersonalizedModel(self.config, state, self.booster, self.scale)
        model.card = self.card
        # Every movie of the store counts: none of its ratings is in the (absent) trained moments.
        model._movieless = True
        return model

    # --- the user side ------------------------------------------------------------------------------------------

    def user_view_of_ratings(
        self, movie_ids: Sequence[Id], ratings: Sequence[float], timestamps: Sequence[float]
    ) -> UserView | None:
        """A user's view from their ratings (data scale, arrival order), or None when the model does not answer
        for them (fewer ratings than ``min_user_ratings``). A movie rated more than once counts once, with its
        latest rating. The fold-in and the rest are ``native.view_data``: what a cache miss costs."""
        ids = movie_ids if isinstance(movie_ids, list) else list(movie_ids)
        r = ratings if isinstance(ratings, list) else list(ratings)
        t = timestamps if isinstance(timestamps, list) else list(timestamps)
        n = len(ids)
        if len(set(ids)) != n:
            latest = sorted({m: k for k, m in enumerate(ids)}.values())
            ids, r, t = [ids[k] for k in latest], [r[k] for k in latest], [t[k] for k in latest]
            n = len(ids)
        if n <= 0 or n < self.config.min_user_ratings:
            return None
        mf = self.mf
        cols = lookup(mf.item_index, ids).tolist()
        raw, n_recent = native.view_data(
            self._item_factors,
            mf.config.factors,
            self._item_bias,
            mf.global_mean,
            cols,
            r,
            t,
            mf.config.reg_factors,
            mf.config.reg_bias,
            mf.config.bias_damping,
            RECENT_RATINGS,
        )
        return UserView.of_data(raw, n_recent)

    # --- the movie side -----------------------------------------------------------------------------------------

    def movie_table(self, received: Mapping[str, tuple[float, float, float]] | None = None) -> MovieTable:
        """The movie inputs of every movie, with ``received`` (by the store's movie id, as text: count, sum and
        sum of squares of the ratings on the API's scale) added to the trained moments. Ignored when the model
        was trained from the store (``counts_store_ratings``)."""
        scale = self.from_api(1.0)
        mf, st = self.mf, self.state
        n = len(mf.item_ids)
        count, total, total_sq = st.item_count.copy(), st.item_total.copy(), st.item_total_sq.copy()
        unknown: dict[Id, tuple[float, float, float]] = {}
        probe = MovieTable({}, np.empty((1, 4)), 0, self.int_ids, None)
        for store_id, (c, s, ss) in ({} if received is None or self.counts_store_ratings else received).items():
            moments = (float(c), s * scale, ss * scale**2)
            key = probe.key(store_id)
            i = mf.item_index.get(key, -1)
            if i >= 0:
                count[i] += moments[0]
                total[i] += moments[1]
                total_sq[i] += moments[2]
            else:
                unknown[key] = moments
        table = np.empty((n + len(unknown) + 1, 4))
        table[:n, 0] = count
        table[:n, 1], table[:n, 2] = mean_std(count, total, total_sq)
        table[:n, 3] = mf.item_bias
        if unknown:
            extra = np.array(list(unknown.values()), dtype=np.float64)
            table[n:-1, 0] = extra[:, 0]
            table[n:-1, 1], table[n:-1, 2] = mean_std(extra[:, 0], extra[:, 1], extra[:, 2])
            table[n:-1, 3] = np.nan
        table[-1] = (0.0, np.nan, np.nan, np.nan)
        rows: dict[Id, int] = mf.item_index
        if unknown:
            rows = dict(rows)  # the model's own index stays as it is: the rated unknown movies go on a copy
            rows.update({key: n + k for k, key in enumerate(unknown)})
        return MovieTable(rows, table, n, self.int_ids, _dense_rows(rows) if self.int_ids else _dense_text_rows(rows))

    # --- predictions --------------------------------------------------------------------------------------------

    def predict(
        self,
        view: UserView,
        x6: FloatArray,
        movie_ids: Sequence[Id | None],
        table: MovieTable,
        now: float | None = None,
    ) -> tuple[FloatArray, BoolArray]:
        """One user's ratings (API scale) of the movies of ``x6`` ((n, 6)), and the mask of those the model answers
        (every one with ``personalize="known_user"``, else the movies the factorisation knows). ``now`` (unix
        seconds, default the clock) is when the recency features are measured from."""
        recent = view.recent(time.time() if now is None else float(now))
        x6 = np.ascontiguousarray(x6, dtype=np.float64)
        if len(movie_ids) == 1:
            position = table.position(movie_ids[0])
            one = self._predict_one(view, recent, x6, position, table)
            known = self.config.personalize == "known_user" or position < table.n_known
            return np.array([one]), _TRUE if known else _FALSE
        rows = table.positions(movie_ids)
        template = user_template(view.columns(), recent)
        m = len(rows)
        mu = self.mf.global_mean
        booster = self.booster
        if native.codec is not None:
            # Only the 12 inputs that differ between movies are written; the trees take the user's 8 from the
            # template (TreeEnsemble.predict_raw_columns).
            narrow = np.empty((m, len(ROW_INPUTS)))
            native.codec.user_rows(
                rows,
                x6,
                table.table,
                self._item_factors,
                view.factors_array(),
                _NARROW_TEMPLATE,
                narrow,
                table.n_known,
                N_FEATURES,
                N_FEATURES + 4,
                N_FEATURES + 5,
                mu + view.bias,
            )
            if isinstance(booster, EnsembleBooster):
                y = booster.ensemble.predict_raw_columns(narrow, ROW_COLUMNS, template)
            else:  # LightGBM's own booster takes the whole matrix
                y = np.asarray(booster.predict(full_rows(narrow, ROW_COLUMNS, template), num_threads=1))
        else:
            y = self.predict_inputs(self._inputs_py(view, template, x6, rows, table))
        pred = self.to_api(self._clip(np.asarray(y, dtype=np.float64)), in_place=True)
        if self.config.personalize == "known_user":
            return pred, np.ones(m, dtype=bool)
        return pred, rows < table.n_known

    def _inputs_py(
        self, view: UserView, template: FloatArray, x6: FloatArray, rows: IntArray, table: MovieTable
    ) -> FloatArray:
        """The full input rows in numpy (``inputs.model_inputs``, the C kernel's twin)."""
        movie = table.table[rows]
        dot = np.full(len(rows), np.nan)
        known = np.flatnonzero(rows < table.n_known)
        dot[known] = self._item_factors[rows[known]] @ view.factors_array()
        user = template[COLUMN["user_count"] : COLUMN["user_bias"] + 1]
        recent = template[COLUMN["user_recent_resid"] :]
        return model_inputs(x6, user, movie, dot, self.mf.global_mean, recent)

    def _predict_one(
        self,
        view: UserView,
        recent: tuple[float, float, float, float],
        x6: FloatArray,
        position: int,
        table: MovieTable,
    ) -> float:
        """``predict`` of one movie (a /predict) on Python floats (``inputs.model_input_row``): at one row, each
        numpy call would cost more than its arithmetic."""
        movie = table.table[position].tolist()
        dot = float(self._item_factors[position].dot(view.factors_array())) if position < table.n_known else math.nan
        row = model_input_row(x6[0].tolist(), view.columns(), movie, dot, self.mf.global_mean, recent)
        booster = self.booster
        if isinstance(booster, EnsembleBooster):
            y = booster.ensemble.predict_value(row)
        else:
            y = float(booster.predict(np.array([row]), num_threads=1)[0])
        scale = self.scale
        one = min(max(y, scale.min), scale.max) * scale.to_api
        return min(max(one, 0.0), 10.0)

    # --- persistence --------------------------------------------------------------------------------------------

    def save(
        self,
        directory: Path,
        *,
        name: str = "moviematch-personalized",
        created_at: str | None = None,
        data: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        data_terms: list[DataSource] | None = None,
        movie_id_space: str | None = None,
    ) -> ModelCard:
        """Write the trees (LightGBM text), the state (npz without pickle + JSON) and a card with every sha256; the
        card's version is its content's (``cards.content_version``). ``movie_id_space``: whose movie ids the
        training data used (the card's ``movie_id_space``)."""
        directory.mkdir(parents=True, exist_ok=True)
        text = self.booster.model_to_string(num_iteration=-1).encode("utf-8")
        (directory / MODEL_FILE).write_bytes(text)
        extra = self.mf.save(directory)
        st = self.state
        npz = write_npz({name_: np.asarray(getattr(st, name_)) for name_ in STATE_ARRAYS})
        (directory / STATE_FILE).write_bytes(npz)
        extra[STATE_FILE] = hashlib.sha256(npz).hexdigest()
        sha = hashlib.sha256(text).hexdigest()
        card = ModelCard(
            name=name,
            version="",  # named by its content below
            kind="personalized",
            created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            model_file=MODEL_FILE,
            model_format="lightgbm-text",
            sha256=sha,
            features=list(MODEL_FEATURES),
            rating_scale=self.scale,
            data=data or {},
            data_terms=data_terms or [],
            training={"config": self.config.model_dump(mode="json")},
            metrics=metrics or {},
            extra_files=dict(sorted(extra.items())),
            movie_id_space=movie_id_space,
        )
        card = content_versioned(card)
        write_card(directory, card)
        self.card = card
        return card

    @classmethod
    def load(cls, path: Path) -> PersonalizedModel:
        """Load a saved model, verifying the sha256 of the trees and of every extra file against the card.

        The trees are run by ``trees.TreeEnsemble`` (LightGBM's own answers to float rounding, without importing
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
        version = checked_version(card, cfile)
        text = verified_bytes(cfile, card.model_file, card.sha256)
        for fname, sha in card.extra_files.items():
            verified_bytes(cfile, fname, sha)
        mf = MFModel.load(cfile.parent, card.extra_files)
        arrays = read_npz(verified_bytes(cfile, STATE_FILE, card.extra_files[STATE_FILE]))
        if set(arrays) != set(STATE_ARRAYS):
            raise ModelFormatError(f"{cfile.parent / STATE_FILE}: unexpected arrays {sorted(arrays)}")
        n_hist = arrays["hist_user"].shape
        for key in STATE_ARRAYS:
            want = (len(mf.user_ids),) if key.startswith("user") else (len(mf.item_ids),)
            if key.startswith("hist"):
                want = n_hist
            if arrays[key].shape != want or len(n_hist) != 1:
                raise ModelFormatError(f"{cfile.parent / STATE_FILE}: {key} has shape {arrays[key].shape}")
        state = RatingState(mf, *(arrays[k] for k in STATE_ARRAYS))
        try:
            booster = fast_booster(text.decode("utf-8"), len(MODEL_FEATURES))
        except (UnicodeDecodeError, ModelFormatError) as exc:
            raise ModelFormatError(f"{cfile.parent / card.model_file}: not a LightGBM model: {exc}") from exc
        config = PersonalizedConfig.model_validate(card.training.get("config", {}))
        model = cls(config, state, booster, card.rating_scale)
        model.card = card if card.version == version else card.model_copy(update={"version": version})
        return model
