"""Evaluation candidates: the registry `evaluate` runs, and the fallback rule as a candidate."""

from __future__ import annotations

import pandas as pd

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.baselines import fallback_on_scale
from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.candidates import CANDIDATES, FallbackCandidate
from moviematch_ml.runtime.cards import RatingScale

TRAIN = pd.DataFrame({"user_id": [1, 1, 2], "movie_id": [10, 20, 10], "rating": [5.0, 3.0, 3.0]})


def test_the_required_models_are_registered() -> None:
    assert {"global_mean", "movie_mean", "bias", "fallback", "six_features"} <= set(CANDIDATES)


def test_every_registered_candidate_is_named_by_its_key() -> None:
    # The key is the name `evaluate` reports the candidate under: a mismatch would file its figures elsewhere.
    for key, make in CANDIDATES.items():
        assert make(TrainConfig()).name == key


def test_fallback_candidate_is_the_rule_on_the_data_scale() -> None:
    # The rule itself is tested by hand in test_baselines.py; the candidate must be it, whatever the training rows.
    rows = pd.DataFrame([[2, 8.0, 100, 1, 3, 10.0], [0, 5.0, 0, 0, 40, 1.0]], columns=list(FEATURE_NAMES))
    for scale in (RatingScale(min=1, max=10), RatingScale(min=0.5, max=5.0, step=0.5)):
        want = fallback_on_scale(rows, scale).tolist()
        assert FallbackCandidate().fit_predict(TRAIN, rows, scale).tolist() == want
        assert FallbackCandidate().fit_predict(TRAIN.iloc[:0], rows, scale).tolist() == want
