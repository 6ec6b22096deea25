"""The training report: RMSE by prediction decile by hand, and the Markdown with its PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.report import (
    cold_warm_rmse,
    decile_rmse,
    render_markdown,
    replay_text,
    scale_label,
    write_replay_report,
    write_report,
)
from moviematch_ml.offline.training import train_six_feature_model
from moviematch_ml.runtime.cards import RatingScale
from reference import synthetic_dataset


def test_decile_rmse_by_hand() -> None:
    pred = np.arange(20, dtype=float)
    truth = pred + np.where(pred < 10, 1.0, 0.0)
    dec = decile_rmse(pred, truth)
    assert len(dec) == 10
    assert dec[0] == (0.5, 1.0, 2)
    assert dec[9] == (18.5, 0.0, 2)


def test_report_writes_markdown_and_pngs(tmp_path: Path) -> None:
    result = train_six_feature_model(synthetic_dataset(), TrainConfig(seed=1))
    md = write_report(tmp_path, result)
    text = md.read_text(encoding="utf-8")
    assert "| six_features |" in text
    assert "| bias |" in text
    for png in ("feature_importance", "predicted_vs_actual", "error_by_decile", "rmse_cold_warm"):
        assert (tmp_path / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png}.png)" in text
    # Without a personalised model there is no section for one.
    assert "## Personalised model" not in text


def test_cold_warm_rmse_by_hand_and_an_empty_group_is_none() -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    predictions = {"a": np.array([2.0, 2.0, 3.0, 2.0]), "b": truth.copy()}
    cold = np.array([True, True, False, False])
    # a: cold errors 1, 0 -> sqrt(1/2); warm errors 0, -2 -> sqrt(4/2).
    assert cold_warm_rmse(predictions, truth, cold) == {
        "cold users": [float(np.sqrt(0.5)), 0.0],
        "warm users": [float(np.sqrt(2.0)), 0.0],
    }
    no_cold = cold_warm_rmse(predictions, truth, np.zeros(4, dtype=bool))
    assert no_cold["cold users"] is None  # no bars of height 0: the plot says there were none
    assert no_cold["warm users"] == [float(np.sqrt((1 + 0 + 0 + 4) / 4)), 0.0]


def test_the_report_says_which_scale_and_which_data() -> None:
    assert scale_label(RatingScale(min=0.5, max=5.0, step=0.5)) == (
        "0.5–5, the training data's scale; the API answers ×2 on 0–10"
    )
    assert scale_label(RatingScale(min=0.0, max=10.0)) == "0–10, the API's scale"
    text = render_markdown(train_six_feature_model(synthetic_dataset(), TrainConfig(seed=1)))
    assert (
        "every rating, prediction and error below and in the plots is on it (0.5–5, the training data's scale" in text
    )
    assert "- Source: ratings and movies from " not in text  # synthetic data: no source stated, none invented


def _replay_summary() -> dict[str, object]:
    curve = {"0": 1.0, "1": 0.9, "2": None, "3-5": 0.8, "6-10": 0.8, "11-20": 0.7, "21-50": 0.7, "51+": 0.6}
    model = {
        "rmse": 0.85,
        "mae": 0.65,
        "ndcg@10": 0.9,
        "rmse_cold_users": 0.9,
        "rmse_warm_users": None,
        "learning_curve_rmse": curve,
    }
    return {
        "dataset": "synthetic",
        "n_history": 80,
        "n_test": 20,
        "cold_user_test_ratings": 5,
        "rating_scale": {"min": 0.5, "max": 5.0, "step": 0.5},
        "bucket_test_ratings": {"0": 2, "1": 3, "2": 0, "3-5": 4, "6-10": 4, "11-20": 3, "21-50": 2, "51+": 2},
        "models": {"online_bias": model},
        "per_rating": {"online_bias": {"state_update_ms": 0.01}},
        "seconds": {"total": 1.5},
    }


def test_replay_report_has_the_table_and_the_learning_curve(tmp_path: Path) -> None:
    path = write_replay_report(tmp_path, _replay_summary())
    text = path.read_text(encoding="utf-8")
    assert "| online_bias | 0.8500 | 0.6500 | 0.9000 | 0.9000 | – |" in text
    # An empty bucket shows as a dash, not as 0.
    assert "| online_bias | 1.0000 | 0.9000 | – | 0.8000 | 0.8000 | 0.7000 | 0.7000 | 0.6000 |" in text
    assert "| test ratings | 2 | 3 | 0 | 4 | 4 | 3 | 2 | 2 |" in text
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "per rating (ms): online_bias: state_update_ms 0.010" in replay_text(_replay_summary())
