"""The personalised model's 20 inputs: their order, and the rows ``model_inputs`` builds, by hand."""

from __future__ import annotations

import math

import numpy as np

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime.inputs import (
    COLUMN,
    MODEL_FEATURES,
    RECENT_FEATURES,
    ROW_COLUMNS,
    ROW_INPUTS,
    STATE_FEATURES,
    model_input_row,
    model_inputs,
    user_template,
)


def test_the_inputs_and_their_order() -> None:
    assert len(MODEL_FEATURES) == 20
    assert MODEL_FEATURES[: len(FEATURE_NAMES)] == FEATURE_NAMES
    assert MODEL_FEATURES[len(FEATURE_NAMES) :] == STATE_FEATURES
    assert STATE_FEATURES[-len(RECENT_FEATURES) :] == RECENT_FEATURES
    assert [COLUMN[name] for name in MODEL_FEATURES] == list(range(20))
    # The inputs that differ between one user's movies: everything but the user's eight.
    assert sorted(ROW_COLUMNS.tolist()) == [k for k, name in enumerate(MODEL_FEATURES) if not name.startswith("user")]
    assert [MODEL_FEATURES[k] for k in ROW_COLUMNS.tolist()] == list(ROW_INPUTS)


def test_model_inputs_by_hand() -> None:
    x6 = np.array([[1.0, 7.0, 100.0, 1.0, 3.0, 50.0], [0.0, 5.0, 10.0, 0.0, 1.0, 2.0]])
    user = np.array([4.0, 3.5, 0.5, 0.25])  # count, mean, spread, bias: the same in every row
    movie = np.array([[10.0, 4.0, 1.0, -0.5], [2.0, 3.0, 0.0, math.nan]])  # the second: unknown to the factorisation
    dot = np.array([0.75, math.nan])
    recent = np.array([0.1, 0.2, 1.5, 2.0])
    out = model_inputs(x6, user, movie, dot, 3.0, recent)
    nan = math.nan
    # cf_score = mu + user bias + movie bias + dot = 3 + 0.25 - 0.5 + 0.75 = 3.5; NaN for the unknown movie.
    expected = np.array(
        [
            [1.0, 7.0, 100.0, 1.0, 3.0, 50.0, 4.0, 3.5, 0.5, 0.25, 10.0, 4.0, 1.0, -0.5, 3.5, 0.75, 0.1, 0.2, 1.5, 2.0],
            [0.0, 5.0, 10.0, 0.0, 1.0, 2.0, 4.0, 3.5, 0.5, 0.25, 2.0, 3.0, 0.0, nan, nan, nan, 0.1, 0.2, 1.5, 2.0],
        ]
    )
    np.testing.assert_array_equal(out, expected)
    assert out[0, COLUMN["cf_score"]] == 3.5
    # Per-row user columns and recency (training builds many users' rows at once) are taken row by row.
    per_row = model_inputs(x6, np.vstack([user, user + 1]), movie, dot, 3.0, np.vstack([recent, recent * 2]))
    assert per_row[1, COLUMN["user_count"]] == 5.0
    assert per_row[1, COLUMN["user_day_count"]] == 4.0
    np.testing.assert_array_equal(per_row[0], out[0])


def test_user_template_holds_the_users_columns_and_recency() -> None:
    row = user_template([4.0, 3.5, 0.5, 0.25], (0.1, 0.2, 1.5, 2.0))
    assert row.shape == (20,)
    assert row[COLUMN["user_count"] : COLUMN["user_bias"] + 1].tolist() == [4.0, 3.5, 0.5, 0.25]
    assert row[COLUMN[RECENT_FEATURES[0]] :].tolist() == [0.1, 0.2, 1.5, 2.0]


def test_the_one_row_builder_is_model_inputs_on_floats() -> None:
    # The single-prediction path builds its row on Python floats: bit for bit model_inputs' row, known movie or not.
    rng = np.random.default_rng(5)
    for _ in range(200):
        x6, user, movie, recent = rng.normal(size=6), rng.normal(size=4), rng.normal(size=4), rng.normal(size=4)
        known = bool(rng.integers(0, 2))
        if not known:
            movie[3] = math.nan
        dot = float(rng.normal()) if known else math.nan
        mu = float(rng.normal())
        full = model_inputs(x6[None, :], user, movie[None, :], np.array([dot]), mu, recent)[0]
        row = model_input_row(x6.tolist(), user.tolist(), movie.tolist(), dot, mu, recent.tolist())
        assert np.array_equal(np.array(row), full, equal_nan=True)
