"""Baselines every model is compared with: global mean, damped movie mean, damped user+movie bias, fallback rule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime.cards import RatingScale
from moviematch_ml.runtime.fallback import fallback_rating

FloatArray = npt.NDArray[np.float64]


class BaselineConfig(BaseModel):
    """Damping of the baselines: fixed by convention (Surprise's BaselineOnly defaults), never fitted on test data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    movie_damping: float = Field(5.0, ge=0, description="Pseudo-ratings at the global mean in the movie mean.")
    reg_user: float = Field(15.0, ge=0, description="Regularisation of the user biases (Surprise reg_u).")
    reg_movie: float = Field(10.0, ge=0, description="Regularisation of the movie biases (Surprise reg_i).")
    epochs: int = Field(10, ge=1, description="Alternating least-squares sweeps (Surprise n_epochs).")


# --- fitted state ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalMean:
    """r̂ = μ, the mean training rating."""

    mu: float

    @classmethod
    def fit(cls, train: pd.DataFrame) -> GlobalMean:
        return cls(float(train["rating"].mean()))

    def predict(self, rows: pd.DataFrame) -> FloatArray:
        return np.full(len(rows), self.mu, dtype=np.float64)


@dataclass(frozen=True)
class MovieMean:
    """r̂(m) = (Σ_{r∈R(m)} r + k·μ) / (|R(m)| + k): the movie's mean damped toward μ by k pseudo-ratings.

    A movie never seen in training gets μ.
    """

    mu: float
    means: dict[int, float]

    @classmethod
    def fit(cls, train: pd.DataFrame, damping: float) -> MovieMean:
        mu = float(train["rating"].mean())
        grouped = train.groupby("movie_id")["rating"].agg(["sum", "count"])
        means = (grouped["sum"] + damping * mu) / (grouped["count"] + damping)
        ids = means.index.to_numpy(dtype=np.int64).tolist()
        return cls(mu, dict(zip(ids, means.to_numpy(dtype=np.float64).tolist(), strict=True)))

    def predict(self, rows: pd.DataFrame) -> FloatArray:
        out: FloatArray = np.asarray(rows["movie_id"].map(self.means).fillna(self.mu), dtype=np.float64)
        return out


@dataclass(frozen=True)
class Bias:
    """r̂(u, m) = μ + b_u + b_m, the damped biases of Surprise's BaselineOnly (ALS) and LensKit's Bias.

    Alternating, ``epochs`` times:
        b_u = Σ_{m∈R(u)} (r - μ - b_m) / (λ_u + |R(u)|)
        b_m = Σ_{u∈R(m)} (r - μ - b_u) / (λ_m + |R(m)|)
    Unknown users or movies get a bias of 0.
    """

    mu: float
    user_bias: dict[int | str, float]  # ids as in the data: integers, or the app's text user ids (feedback)
    movie_bias: dict[int | str, float]

    @classmethod
    def fit(cls, train: pd.DataFrame, config: BaselineConfig) -> Bias:
        mu = float(train["rating"].mean())
        u_codes, u_ids = pd.factorize(train["user_id"])
        m_codes, m_ids = pd.factorize(train["movie_id"])
        r = train["rating"].to_numpy(dtype=np.float64) - mu
        n_u = np.bincount(u_codes, minlength=len(u_ids)).astype(np.float64)
        n_m = np.bincount(m_codes, minlength=len(m_ids)).astype(np.float64)
        bu = np.zeros(len(u_ids))
        bm = np.zeros(len(m_ids))
        for _ in range(config.epochs):
            bu = np.bincount(u_codes, weights=r - bm[m_codes], minlength=len(u_ids)) / (config.reg_user + n_u)
            bm = np.bincount(m_codes, weights=r - bu[u_codes], minlength=len(m_ids)) / (config.reg_movie + n_m)
        return cls(
            mu,
            {k: float(v) for k, v in zip(u_ids.tolist(), bu, strict=True)},
            {k: float(v) for k, v in zip(m_ids.tolist(), bm, strict=True)},
        )

    def predict(self, rows: pd.DataFrame) -> FloatArray:
        bu = rows["user_id"].map(self.user_bias).fillna(0.0).to_numpy(dtype=np.float64)
        bm = rows["movie_id"].map(self.movie_bias).fillna(0.0).to_numpy(dtype=np.float64)
        out: FloatArray = self.mu + bu + bm
        return out


def fallback_on_scale(rows: pd.DataFrame, scale: RatingScale) -> FloatArray:
    """The service's fallback rule on the data's scale: r̂ = fallback_rating(x) / (10 / scale.max). Nothing fitted."""
    x = rows.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    out: FloatArray = fallback_rating(x) / scale.to_api
    return out
