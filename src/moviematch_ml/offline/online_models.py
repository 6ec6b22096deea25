"""Online baselines of the replay protocol: models refitted on a schedule that learn each rating as it arrives.

Both see a ``Stream`` (every rating in time order, ids as dense codes) and only ever read the ratings they were
fitted on or shown by ``reveal``: ``predict`` gets row numbers and reads their user and movie, never their rating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.offline.als import fit_mf
from moviematch_ml.offline.baselines import BaselineConfig
from moviematch_ml.runtime.factors import MFConfig, MFModel

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

SECONDS_PER_DAY: Final[float] = 86_400.0
SECONDS_PER_WEEK: Final[float] = 7 * SECONDS_PER_DAY


@dataclass(frozen=True)
class Stream:
    """Ratings in time order: users and movies as dense codes (0..n-1, in order of first appearance), ratings on
    the data's scale, unix timestamps."""

    user: IntArray
    movie: IntArray
    rating: FloatArray
    timestamp: FloatArray
    n_users: int
    n_movies: int

    @classmethod
    def of(cls, ratings: pd.DataFrame) -> Stream:
        """From a frame with user_id, movie_id, rating, timestamp, already in time order."""
        ts = ratings["timestamp"].to_numpy(dtype=np.float64)
        if len(ts) > 1 and bool((np.diff(ts) < 0).any()):
            raise ValueError("the ratings must be in time order")
        u, users = pd.factorize(ratings["user_id"])
        m, movies = pd.factorize(ratings["movie_id"])
        return cls(
            u.astype(np.int64),
            m.astype(np.int64),
            ratings["rating"].to_numpy(dtype=np.float64),
            ts,
            len(users),
            len(movies),
        )

    def __len__(self) -> int:
        return len(self.rating)


class OnlineModel(Protocol):
    """A model of the replay: fitted on the first rows of the stream, then shown each later rating after it
    predicted it."""

    @property
    def name(self) -> str: ...

    def due(self, now: float) -> bool:
        """Whether a refit is due before predicting ratings made at ``now``."""
        ...

    def fit(self, n_seen: int, now: float) -> None:
        """Fit on the stream's rows [0, n_seen) (every rating strictly before ``now``)."""
        ...

    def predict(self, rows: IntArray) -> FloatArray:
        """Predictions of these rows (their user and movie only), on the data's scale."""
        ...

    def reveal(self, rows: IntArray) -> None:
        """These rows' ratings are now known."""
        ...


def _period(now: float, seconds: float) -> int:
    return int(np.floor(now / seconds))


@dataclass
class OnlineBias:
    """r̂ = μ + b_u + b_m, damped biases (Surprise's BaselineOnly by ALS: ``reg_movie`` 10, ``reg_user`` 15, 10
    sweeps) refitted every ``refit_seconds`` (a day) on every earlier rating. Between refits μ and b_m stay, and
    the user's bias is the ridge user step over all their strictly earlier ratings against the current b_m:

        b_u = Σ_{m∈R(u)} (r - μ - b_m) / (reg_user + |R(u)|)

    so each revealed rating moves it at once (a new user starts at 0). A movie never rated before gets b_m = 0.
    """

    stream: Stream
    config: BaselineConfig = field(default_factory=BaselineConfig)
    refit_seconds: float = SECONDS_PER_DAY
    name: str = "online_bias"
    mu: float = 0.0
    movie_bias: FloatArray = field(default_factory=lambda: np.zeros(0))
    user_sum: FloatArray = field(default_factory=lambda: np.zeros(0))
    user_count: FloatArray = field(default_factory=lambda: np.zeros(0))
    fitted_period: int | None = None

    def due(self, now: float) -> bool:
        return self.fitted_period is None or _period(now, self.refit_seconds) > self.fitted_period

    def fit(self, n_seen: int, now: float) -> None:
        s, c = self.stream, self.config
        u, m, r = s.user[:n_seen], s.movie[:n_seen], s.rating[:n_seen]
        mu = float(r.mean())
        n_u = np.bincount(u, minlength=s.n_users).astype(np.float64)
        n_m = np.bincount(m, minlength=s.n_movies).astype(np.float64)
        bu = np.zeros(s.n_users)
        bm = np.zeros(s.n_movies)
        for _ in range(c.epochs):
            bu = np.bincount(u, weights=r - mu - bm[m], minlength=s.n_users) / (c.reg_user + n_u)
            bm = np.bincount(m, weights=r - mu - bu[u], minlength=s.n_movies) / (c.reg_movie + n_m)
        self.mu, self.movie_bias = mu, bm
        self.user_sum = np.bincount(u, weights=r - mu - bm[m], minlength=s.n_users).astype(np.float64)
        self.user_count = n_u
        self.fitted_period = _period(now, self.refit_seconds)

    def user_bias(self, users: IntArray) -> FloatArray:
        out: FloatArray = self.user_sum[users] / (self.config.reg_user + self.user_count[users])
        return out

    def predict(self, rows: IntArray) -> FloatArray:
        s = self.stream
        out: FloatArray = self.mu + self.user_bias(s.user[rows]) + self.movie_bias[s.movie[rows]]
        return out

    def reveal(self, rows: IntArray) -> None:
        s = self.stream
        u, m = s.user[rows], s.movie[rows]
        np.add.at(self.user_sum, u, s.rating[rows] - self.mu - self.movie_bias[m])
        np.add.at(self.user_count, u, 1.0)


# The factorisation of the online MF baseline: the 32 factors; the rest the service's own defaults.
ONLINE_MF: Final[MFConfig] = MFConfig(factors=32)


@dataclass
class OnlineMF:
    """A biased matrix factorisation (ALS, ``config``: 32 factors) refitted every ``refit_seconds`` (a week) on every
    earlier rating; every user's bias and factors are folded in (the ALS user step, what ``factors.fold_in``
    computes) from all their strictly earlier ratings against the current movie side, so each revealed rating moves
    them at once.

    The first fit runs ``config.iterations`` sweeps; each refit starts from the previous movie side and runs
    ``refit_sweeps`` (a week adds a fraction of a percent of the ratings: the previous solution is nearly the new
    one). A movie unknown to the last fit gets no bias and no factors (r̂ = μ + b_u), and its ratings do not enter
    the user's fold-in. The fold-in is kept incrementally: per user, the normal equations of their ridge problem
    (Σ x xᵀ and Σ x·(r - μ - b_m) over their ratings, x = [1, q_m]), one rank-one update per revealed rating and a
    33 × 33 solve, instead of a pass over all their ratings.
    """

    stream: Stream
    config: MFConfig = ONLINE_MF
    refit_seconds: float = SECONDS_PER_WEEK
    refit_sweeps: int = 1
    name: str = "online_mf"
    mf: MFModel | None = None
    fitted_period: int | None = None
    _history: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    _normal: dict[int, tuple[FloatArray, FloatArray, float]] = field(default_factory=dict)  # since the last fit
    _weights: dict[int, FloatArray] = field(default_factory=dict)  # user -> [bias, factors...]

    def due(self, now: float) -> bool:
        return self.fitted_period is None or _period(now, self.refit_seconds) > self.fitted_period

    def fit(self, n_seen: int, now: float) -> None:
        s = self.stream
        start = self.mf
        config = self.config if start is None else self.config.model_copy(update={"iterations": self.refit_sweeps})
        mf = self.mf = fit_mf(s.user[:n_seen], s.movie[:n_seen], s.rating[:n_seen], config, start=start)
        if start is None:  # the users' ratings so far, kept for their fold-in
            for i in range(n_seen):
                movies, ratings = self._history.setdefault(int(s.user[i]), ([], []))
                movies.append(int(s.movie[i]))
                ratings.append(float(s.rating[i]))
        # fit_mf ends on a user step against the final movie side: each fitted user's (bias, factors) is their
        # fold-in from the ratings of the fit, i.e. all their ratings so far.
        self._weights = {
            int(user): np.concatenate(([mf.user_bias[k]], mf.user_factors[k])) for k, user in enumerate(mf.user_ids)
        }
        self._normal.clear()
        self.fitted_period = _period(now, self.refit_seconds)

    def user_weights(self, user: int) -> FloatArray:
        """The user's [bias, factors...] from all their ratings revealed so far (zeros for a new user)."""
        w = self._weights.get(user)
        if w is None:
            w = self._weights[user] = np.zeros(self.config.factors + 1)
        return w

    def predict(self, rows: IntArray) -> FloatArray:
        mf = self.mf
        if mf is None:
            raise RuntimeError("OnlineMF.predict before fit")
        s = self.stream
        out = np.empty(len(rows))
        for k, row in enumerate(rows.tolist()):
            w = self.user_weights(int(s.user[row]))
            i = mf.item_index.get(int(s.movie[row]), -1)
            y = mf.global_mean + float(w[0])
            if i >= 0:
                y += float(mf.item_bias[i]) + float(mf.item_factors[i] @ w[1:])
            out[k] = y
        return out

    def reveal(self, rows: IntArray) -> None:
        mf = self.mf
        if mf is None:
            raise RuntimeError("OnlineMF.reveal before fit")
        s = self.stream
        for row in rows.tolist():
            user, movie, rating = int(s.user[row]), int(s.movie[row]), float(s.rating[row])
            movies, ratings = self._history.setdefault(user, ([], []))
            movies.append(movie)
            ratings.append(rating)
            if mf.item_index.get(movie, -1) < 0:
                continue  # ignored by the fold-in: nothing changes
            normal = self._normal.get(user)
            if normal is None:  # the first change since the fit: the user's equations from all their ratings
                normal = self._normal[user] = self._equations(movies, ratings)
            else:
                a, b, n = normal
                x, target = self._row(mf.item_index[movie], rating)
                a += np.outer(x, x)
                b += x * target
                normal = self._normal[user] = (a, b, n + 1.0)
            self._weights[user] = self._solve(*normal)

    def _row(self, item: int, rating: float) -> tuple[FloatArray, float]:
        mf = self.mf
        assert mf is not None
        return np.concatenate(([1.0], mf.item_factors[item])), rating - mf.global_mean - float(mf.item_bias[item])

    def _equations(self, movies: list[int], ratings: list[float]) -> tuple[FloatArray, FloatArray, float]:
        mf = self.mf
        assert mf is not None
        cols = np.array([mf.item_index.get(m, -1) for m in movies], dtype=np.int64)
        known = cols >= 0
        items = cols[known]
        x = np.hstack([np.ones((len(items), 1)), mf.item_factors[items]])
        target = np.asarray(ratings)[known] - mf.global_mean - mf.item_bias[items]
        return x.T @ x, x.T @ target, float(len(items))

    def _solve(self, a: FloatArray, b: FloatArray, n: float) -> FloatArray:
        c = self.config
        reg = np.full(len(b), c.reg_factors * n)
        reg[0] = c.reg_bias * n + c.bias_damping
        out: FloatArray = np.asarray(np.linalg.solve(a + np.diag(reg), b), dtype=np.float64)
        return out
