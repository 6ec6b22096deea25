"""The fallback rule: a fixed, documented formula over the six features, used when no model can answer.

    base  = (vote_count * vote_average + PRIOR_VOTES * PRIOR_MEAN) / (vote_count + PRIOR_VOTES)
    taste = FAVOURITE_BONUS * is_favorite_genre + SHARED_GENRE_BONUS * min(n_shared_genres, MAX_SHARED_GENRES)
    rating = clip(base + taste, 0, 10)

``base`` is the damped (Bayesian) average: a film with few votes is pulled towards a typical crowd rating, so
one 10/10 vote does not outrank a classic. ``taste`` nudges the films that match the user's genres. The constants
were fixed by reasoning, not fitted to any test data; the Node client (``clients/node``) carries the same formula
and a test checks that both give the same numbers.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from moviematch_ml.features import FEATURE_NAMES

PRIOR_MEAN: Final[float] = 6.5
PRIOR_VOTES: Final[float] = 100.0
FAVOURITE_BONUS: Final[float] = 0.3
SHARED_GENRE_BONUS: Final[float] = 0.1
MAX_SHARED_GENRES: Final[float] = 3.0

VERSION: Final[str] = "fallback-1"

_I_SHARED = FEATURE_NAMES.index("n_shared_genres")
_I_AVG = FEATURE_NAMES.index("vote_average")
_I_COUNT = FEATURE_NAMES.index("vote_count")
_I_FAV = FEATURE_NAMES.index("is_favorite_genre")


def fallback_rating(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Apply the rule to an (n, 6) feature matrix in FEATURES order; ratings on the 0-10 scale."""
    count = x[:, _I_COUNT]
    base = (count * x[:, _I_AVG] + PRIOR_VOTES * PRIOR_MEAN) / (count + PRIOR_VOTES)
    taste = FAVOURITE_BONUS * x[:, _I_FAV] + SHARED_GENRE_BONUS * np.minimum(x[:, _I_SHARED], MAX_SHARED_GENRES)
    out: npt.NDArray[np.float64] = np.clip(base + taste, 0.0, 10.0)
    return out


class FallbackPredictor:
    """The rule as a predictor, so serving code treats it like any model."""

    version: str = VERSION
    source: str = "fallback"

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return fallback_rating(x)
