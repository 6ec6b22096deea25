"""The six-feature model as a predictor: its LightGBM text, checked against its card, evaluated by ``trees``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from moviematch_ml.errors import ModelFormatError
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime.cards import ModelCard, card_path, checked_version, read_card, verified_bytes
from moviematch_ml.runtime.trees import EnsembleBooster, fast_booster


class Predictor(Protocol):
    """Anything that turns an (n, 6) feature matrix into n ratings on the API's 0-10 scale."""

    version: str
    source: str

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...


class SixFeaturePredictor:
    """The six-feature gradient-boosted trees, loaded from LightGBM's text format.

    The text (the checksummed artifact) is turned into a ``TreeEnsemble`` at load time, so serving needs neither
    the LightGBM library nor its import time and memory; a model the evaluator does not cover is run by LightGBM.
    """

    source: str = "model"

    def __init__(self, card: ModelCard, model_text: str, version: str | None = None) -> None:
        if card.features != list(FEATURE_NAMES):
            raise ModelFormatError(f"model expects features {card.features}, this service computes {FEATURE_NAMES}")
        self.card = card
        self.version = version or card.version
        self._scale = card.rating_scale.to_api
        self._booster: Any = fast_booster(model_text, len(FEATURE_NAMES))
        self.ensemble = self._booster.ensemble if isinstance(self._booster, EnsembleBooster) else None
        self.runtime = self.ensemble.runtime if self.ensemble is not None else "lightgbm"

    def predict_raw(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The trees' output on the training data's rating scale."""
        if self.ensemble is not None:
            return self.ensemble.predict_raw(x)
        return np.asarray(self._booster.predict(x, num_threads=1), dtype=np.float64)

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        y = self.predict_raw(x) * self._scale
        # Two in-place ufuncs rather than np.clip, whose Python-level wrapper costs more than a one-row prediction.
        out: npt.NDArray[np.float64] = np.minimum(np.maximum(y, 0.0, out=y), 10.0, out=y)
        return out


def load_six_features(path: Path) -> SixFeaturePredictor:
    """Load the model a card describes, verifying its checksum; raises a ModelError subclass on any problem."""
    card = read_card(path)
    cfile = card_path(path)
    if card.model_format != "lightgbm-text" or card.kind != "six_features":
        raise ModelFormatError(f"{cfile}: {card.kind} model in {card.model_format} is not a six-feature LightGBM model")
    version = checked_version(card, cfile)
    text = verified_bytes(cfile, card.model_file, card.sha256)
    try:
        return SixFeaturePredictor(card, text.decode("utf-8"), version)
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{cfile.parent / card.model_file}: not UTF-8 text") from exc
