"""Baselines: hand-computed means and biases on tiny data, and the fallback rule on the data's scale."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.baselines import BaselineConfig, Bias, GlobalMean, MovieMean, fallback_on_scale
from moviematch_ml.runtime.cards import RatingScale

TRAIN = pd.DataFrame({"user_id": [1, 1, 2], "movie_id": [10, 20, 10], "rating": [5.0, 3.0, 3.0]})
TEST = pd.DataFrame({"user_id": [1, 2, 9], "movie_id": [10, 20, 99]})


def test_global_mean() -> None:
    assert GlobalMean.fit(TRAIN).predict(TEST).tolist() == pytest.approx([11 / 3] * 3)


def test_movie_mean_is_damped_toward_the_global_mean() -> None:
    model = MovieMean.fit(TRAIN, damping=1.0)
    mu = 11 / 3
    # movie 10: (5 + 3 + mu) / 3; movie 20: (3 + mu) / 2; unknown movie 99: mu.
    assert model.predict(TEST).tolist() == pytest.approx([(8 + mu) / 3, (3 + mu) / 2, mu])


def test_bias_one_als_sweep_by_hand() -> None:
    model = Bias.fit(TRAIN, BaselineConfig(reg_user=1.0, reg_movie=1.0, epochs=1))
    # mu = 11/3; b_u1 = ((5-mu) + (3-mu)) / (1+2) = 2/9; b_u2 = (3-mu) / (1+1) = -1/3;
    # b_10 = ((5-mu-2/9) + (3-mu+1/3)) / (1+2) = 7/27; b_20 = (3-mu-2/9) / (1+1) = -4/9.
    assert model.user_bias == pytest.approx({1: 2 / 9, 2: -1 / 3})
    assert model.movie_bias == pytest.approx({10: 7 / 27, 20: -4 / 9})
    mu = 11 / 3
    assert model.predict(TEST).tolist() == pytest.approx([mu + 2 / 9 + 7 / 27, mu - 1 / 3 - 4 / 9, mu])


def test_bias_converges_to_a_fixed_point() -> None:
    cfg = BaselineConfig(reg_user=1.0, reg_movie=1.0, epochs=200)
    m = Bias.fit(TRAIN, cfg)
    mu = 11 / 3
    # At convergence b_u1 = Σ(r - mu - b_m) / (λ + n) holds with the final movie biases.
    bu1 = ((5 - mu - m.movie_bias[10]) + (3 - mu - m.movie_bias[20])) / 3
    assert m.user_bias[1] == pytest.approx(bu1, abs=1e-9)


def test_fallback_on_the_data_scale() -> None:
    row = {
        "n_shared_genres": 2,
        "vote_average": 8.0,
        "vote_count": 100,
        "is_favorite_genre": 1,
        "years_since_release": 3,
        "popularity": 10.0,
    }
    rows = pd.DataFrame([row], columns=list(FEATURE_NAMES))
    # base = (100*8 + 100*6.5) / 200 = 7.25; taste = 0.3 + 0.2 -> 7.75 on 0-10 -> 3.875 stars of 5.
    stars = RatingScale(min=0.5, max=5.0, step=0.5)
    assert fallback_on_scale(rows, stars).tolist() == pytest.approx([3.875])
    assert fallback_on_scale(rows, RatingScale(min=1, max=10)).tolist() == pytest.approx([7.75])
    assert np.all(np.isfinite(fallback_on_scale(rows, stars)))
