"""The models evaluation compares, as candidates: each fits on a training frame and predicts a test frame.

A candidate is anything with a ``name`` and ``fit_predict(train, test, scale)``. ``CANDIDATES`` names the ones
``evaluate`` runs by default, in output order; a new model is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.baselines import BaselineConfig, Bias, GlobalMean, MovieMean, fallback_on_scale
from moviematch_ml.offline.boosting import TrainConfig, fit_booster
from moviematch_ml.offline.stacking import fit_frame, predict_pairs
from moviematch_ml.runtime.cards import RatingScale
from moviematch_ml.runtime.personalized import PersonalizedConfig

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class Candidate(Protocol):
    """A model under evaluation.

    ``fit_predict(train, test, scale)``: ``train`` has columns user_id, movie_id, rating, timestamp and the six
    FEATURE_NAMES; ``test`` has the same columns without rating. Return one prediction per test row, in test row
    order, on the data's own rating scale (``scale``). Fit only on ``train``.
    """

    @property
    def name(self) -> str:
        """The key of this model in the output (``models``)."""
        ...

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray: ...


# --- scorers: the evaluation's view of each baseline -------------------------------------------------------------


@dataclass(frozen=True)
class GlobalMeanCandidate:
    """Candidate wrapper of GlobalMean."""

    name: str = "global_mean"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        return GlobalMean.fit(train).predict(test)


@dataclass(frozen=True)
class MovieMeanCandidate:
    """Candidate wrapper of MovieMean."""

    config: BaselineConfig = field(default_factory=BaselineConfig)
    name: str = "movie_mean"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        return MovieMean.fit(train, self.config.movie_damping).predict(test)


@dataclass(frozen=True)
class BiasCandidate:
    """Candidate wrapper of Bias."""

    config: BaselineConfig = field(default_factory=BaselineConfig)
    name: str = "bias"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        return Bias.fit(train, self.config).predict(test)


@dataclass(frozen=True)
class FallbackCandidate:
    """Candidate wrapper of the fallback rule (ignores the training rows)."""

    name: str = "fallback"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        return fallback_on_scale(test, scale)


@dataclass(frozen=True)
class SixFeatureCandidate:
    """The service model as an evaluation candidate: LightGBM on the six features, fitted on the training rows."""

    config: TrainConfig = field(default_factory=TrainConfig)
    name: str = "six_features"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        x = train.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
        fitted = fit_booster(
            x, train["rating"].to_numpy(dtype=np.float64), train["timestamp"].to_numpy(dtype=np.int64), self.config
        )
        pred = fitted.predict(test.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64))
        # The service clips to the API range; on the data's scale that is [0, scale.max].
        out: FloatArray = np.clip(pred, 0.0, scale.max)
        return out


class PersonalizedCandidate:
    """The personalised model as ``evaluation`` sees it: state from the training ratings only, and the six-feature
    model (fitted on the same training rows) answering the rows the personalised model cannot, as in the service.
    """

    name: str = "personalized"

    def __init__(self, config: PersonalizedConfig | None = None, six_config: TrainConfig | None = None) -> None:
        self.config = config or PersonalizedConfig.model_validate({})
        self.six_config = six_config
        self.last_mask: BoolArray | None = None

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        six = SixFeatureCandidate(self.six_config or TrainConfig.model_validate({}))
        fallback = six.fit_predict(train, test, scale)
        cols = list(FEATURE_NAMES)
        model = fit_frame(train, scale, self.config)
        pred, mask = predict_pairs(
            model,
            test["user_id"].to_numpy(),
            test["movie_id"].to_numpy(),
            test["timestamp"].to_numpy(dtype=np.float64),
            test.loc[:, cols].to_numpy(dtype=np.float64),
        )
        self.last_mask = mask
        out: FloatArray = np.where(mask, pred, fallback)
        return out


# The models `evaluate` compares, in output order. A new model is one more entry: name -> factory(config).
CANDIDATES: dict[str, Callable[[TrainConfig], Candidate]] = {
    "global_mean": lambda cfg: GlobalMeanCandidate(),
    "movie_mean": lambda cfg: MovieMeanCandidate(),
    "bias": lambda cfg: BiasCandidate(),
    "fallback": lambda cfg: FallbackCandidate(),
    "six_features": lambda cfg: SixFeatureCandidate(cfg),
    "personalized": lambda cfg: PersonalizedCandidate(six_config=cfg),
}
