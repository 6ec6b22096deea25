"""The six-feature predictor: the service's model runs in our evaluator, what it cannot run goes to LightGBM, and what
is not a model is refused."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest

from conftest import tiny_training_data
from moviematch_ml.errors import ModelChecksumError, ModelFormatError, ModelNotFoundError
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime import native
from moviematch_ml.runtime.cards import CARD_NAME, ModelCard, RatingScale, content_versioned, read_card, write_card
from moviematch_ml.runtime.predictor import SixFeaturePredictor, load_six_features
from moviematch_ml.runtime.trees import TreeEnsemble, UnsupportedModelError


def _train(params: dict[str, Any], rounds: int, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> str:
    base = {"seed": 0, "deterministic": True, "num_threads": 1, "verbose": -1, "min_data_in_leaf": 5}
    booster = lgb.train({**base, **params}, lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES)), rounds)
    text: str = booster.model_to_string()
    return text


def _lightgbm(text: str, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(lgb.Booster(model_str=text).predict(x, num_threads=1), dtype=np.float64)


def _card(**changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "name": "t",
        "version": "t-1",
        "created_at": "2026-01-01T00:00:00+00:00",
        "model_file": "model.txt",
        "model_format": "lightgbm-text",
        "sha256": "0" * 64,
        "features": list(FEATURE_NAMES),
        "rating_scale": RatingScale(min=0.5, max=5.0),
    }
    return ModelCard(**{**fields, **changes})


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"objective": "binary"}, "link function"),
        ({"objective": "regression", "num_leaves": 100, "min_data_in_leaf": 2}, "64 leaves"),
    ],
)
def test_unsupported_models_go_to_lightgbm(params: dict[str, Any], why: str) -> None:
    x, y = tiny_training_data(2000)
    target = (y > 2.5).astype(float) if params["objective"] == "binary" else y
    text = _train(params, 5, x, target)
    with pytest.raises(UnsupportedModelError, match=why):
        TreeEnsemble.from_lightgbm_text(text, len(FEATURE_NAMES))
    predictor = SixFeaturePredictor(_card(), text)
    assert predictor.runtime == "lightgbm"
    assert predictor.ensemble is None
    np.testing.assert_allclose(predictor.predict_raw(x[:50]), _lightgbm(text, x[:50]), atol=1e-12)


def test_the_service_model_runs_in_our_evaluator(tiny_model_dir: Path) -> None:
    predictor = load_six_features(tiny_model_dir)
    # The compiled twin of the numpy evaluator when the extension is built (tests/runtime/test_native.py).
    runtime = "native" if native.Forest is not None else "numpy"
    assert predictor.runtime == runtime
    assert predictor.ensemble is not None
    assert predictor.ensemble.runtime == runtime
    assert predictor.version == read_card(tiny_model_dir).version
    assert predictor.source == "model"
    x, _ = tiny_training_data(200, seed=3)
    text = (tiny_model_dir / "model.txt").read_text(encoding="utf-8")
    raw = _lightgbm(text, x)
    np.testing.assert_allclose(predictor.predict_raw(x), raw, rtol=0, atol=1e-12)
    # Scaled from the 0.5-5 star scale to 0-10, clipped to the API's range.
    np.testing.assert_allclose(predictor.predict(x), np.clip(raw * 2.0, 0.0, 10.0), rtol=0, atol=1e-9)
    one = predictor.predict(x[:1])[0]
    want = np.clip(_lightgbm(text, x[:1])[0] * 2.0, 0.0, 10.0)
    if runtime == "native":
        assert one == want  # the C evaluator adds the leaves in LightGBM's order
    else:
        assert one == pytest.approx(want, abs=1e-12)


def test_garbage_is_still_refused_as_a_model() -> None:
    with pytest.raises(ModelFormatError):
        SixFeaturePredictor(_card(), "this is not a model")


def test_a_model_of_other_features_is_refused(tiny_model_dir: Path) -> None:
    text = (tiny_model_dir / "model.txt").read_text(encoding="utf-8")
    with pytest.raises(ModelFormatError, match="features"):
        SixFeaturePredictor(_card(features=list(reversed(FEATURE_NAMES))), text)


def test_load_checks_the_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    assert load_six_features(directory / CARD_NAME).version == read_card(directory).version  # the card file too
    card = read_card(directory)
    write_card(directory, card.model_copy(update={"kind": "personalized"}))
    with pytest.raises(ModelFormatError, match="not a six-feature"):
        load_six_features(directory)
    write_card(directory, card)
    text = (directory / "model.txt").read_bytes()
    (directory / "model.txt").write_bytes(text.replace(b"tree", b"tref", 1))
    with pytest.raises(ModelChecksumError):
        load_six_features(directory)
    (directory / "model.txt").write_bytes(b"\xff" + text)
    write_card(
        directory, content_versioned(card.model_copy(update={"sha256": hashlib.sha256(b"\xff" + text).hexdigest()}))
    )
    with pytest.raises(ModelFormatError, match="UTF-8"):
        load_six_features(directory)
    with pytest.raises(ModelNotFoundError):
        load_six_features(tmp_path / "nowhere")
