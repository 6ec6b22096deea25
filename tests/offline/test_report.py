"""The training report: RMSE by prediction decile by hand, and the Markdown with its PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.report import decile_rmse, write_report
from moviematch_ml.offline.training import train_six_feature_model
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
