"""The personalised model's 20 inputs: their names and order, and the one function that builds its rows.

A row is the six features, then what is known of the user (count, mean and spread of their ratings, their
folded-in bias), of the movie (the same four), the collaborative score and dot product, and the user's recency:

    cf_dot   = p_u . q_i                         (NaN unless both the user's and the movie's factors are known)
    cf_score = mu + b_u + b_i + cf_dot

Training builds the rows of many users at once, serving those of one user for a batch of movies; both call
``model_inputs``. The C kernel ``user_rows`` (runtime/native.py) is its accelerated twin for one user's batch, and
``model_input_row`` the same row on Python floats, for a single prediction (where each numpy call would cost more
than its arithmetic). tests/runtime/test_inputs.py holds the three equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from moviematch_ml.features import FEATURE_NAMES, N_FEATURES

FloatArray = npt.NDArray[np.float64]

USER_COLUMNS: Final[tuple[str, ...]] = ("user_count", "user_mean", "user_std", "user_bias")
MOVIE_COLUMNS: Final[tuple[str, ...]] = ("movie_count", "movie_mean", "movie_std", "movie_bias")
RECENT_FEATURES: Final[tuple[str, ...]] = (
    "user_recent_resid",
    "user_recent3_resid",
    "user_recent_days",
    "user_day_count",
)
STATE_FEATURES: Final[tuple[str, ...]] = (*USER_COLUMNS, *MOVIE_COLUMNS, "cf_score", "cf_dot", *RECENT_FEATURES)
MODEL_FEATURES: Final[tuple[str, ...]] = (*FEATURE_NAMES, *STATE_FEATURES)
COLUMN: Final[dict[str, int]] = {name: k for k, name in enumerate(MODEL_FEATURES)}

# How many of a user's latest ratings the recency features look at (their residuals against the movie baseline).
RECENT_RATINGS: Final[int] = 10
RECENT_SHORT: Final[int] = 3
SECONDS_PER_DAY: Final[float] = 86_400.0

# The inputs that differ between the movies of one user's batch, in the order the C kernel writes them: the six
# features, the movie's four, the score and the dot product. (The user's eight are the same in every row.)
ROW_INPUTS: Final[tuple[str, ...]] = (*FEATURE_NAMES, *MOVIE_COLUMNS, "cf_score", "cf_dot")
ROW_COLUMNS: Final[npt.NDArray[np.int64]] = np.array([COLUMN[name] for name in ROW_INPUTS], dtype=np.int64)
_USER = slice(COLUMN["user_count"], COLUMN["user_bias"] + 1)
_MOVIE = slice(COLUMN["movie_count"], COLUMN["movie_bias"] + 1)
_RECENT = slice(COLUMN[RECENT_FEATURES[0]], len(MODEL_FEATURES))


def model_inputs(
    x6: FloatArray, user: FloatArray, movie: FloatArray, dot: FloatArray, mu: float, recent: FloatArray
) -> FloatArray:
    """The (n, 20) input rows in MODEL_FEATURES order.

    ``x6`` (n, 6) the features; ``user`` (n, 4) or (4,) count, mean, spread, bias; ``movie`` (n, 4) the same of
    the movie (bias NaN for a movie the factorisation does not know); ``dot`` (n,) p_u . q_i, NaN where either side
    is unknown; ``recent`` (n, 4) or (4,) the recency features. A (4,) user or recency is the same in every row.
    """
    n = len(x6)
    out = np.empty((n, len(MODEL_FEATURES)))
    out[:, :N_FEATURES] = x6
    out[:, _USER] = user
    out[:, _MOVIE] = movie
    user_bias = out[:, COLUMN["user_bias"]]
    # The same additions, in the same order, as the C kernel: (mu + b_u) + b_i + dot.
    out[:, COLUMN["cf_score"]] = mu + user_bias + out[:, COLUMN["movie_bias"]] + dot
    out[:, COLUMN["cf_dot"]] = dot
    out[:, _RECENT] = recent
    return out


def user_template(user: Sequence[float], recent: tuple[float, float, float, float]) -> FloatArray:
    """A (20,) row holding one user's columns and recency (the other columns are written per movie)."""
    row = np.empty(len(MODEL_FEATURES))
    row[_USER] = user
    row[_RECENT] = recent
    return row


def model_input_row(
    x6: Sequence[float], user: Sequence[float], movie: Sequence[float], dot: float, mu: float, recent: Sequence[float]
) -> list[float]:
    """One row of ``model_inputs``, on Python floats: ``x6`` (6), ``user`` (4), ``movie`` (4), ``dot`` (NaN where
    either side is unknown), ``recent`` (4)."""
    return [*x6, *user, *movie, mu + user[3] + movie[3] + dot, dot, *recent]
