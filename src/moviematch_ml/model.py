"""Model files and their cards: the safe on-disk format, checksum verification and the six-feature predictor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moviematch_ml.errors import ModelChecksumError, ModelFormatError, ModelNotFound
from moviematch_ml.features import FEATURE_NAMES

CARD_NAME: Final[str] = "model_card.json"
BUNDLED_MODEL_DIR: Final[Path] = Path(__file__).parent / "bundled"


class RatingScale(BaseModel):
    """The scale the training ratings were on; predictions are mapped from it to the API's 0-10 scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float
    max: float = Field(gt=0)
    step: float | None = None

    @property
    def to_api(self) -> float:
        """Multiplier from this scale to the API's 0-10 scale (5 stars -> 10)."""
        return 10.0 / self.max


class FeatureStats(BaseModel):
    """The training distribution of one feature: what drift detection compares live traffic against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float
    max: float
    mean: float
    quantiles: dict[str, float]


class ModelCard(BaseModel):
    """What a model file is, where it came from and how good it is; the checksum makes it tamper-evident."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: Literal[1] = 1
    name: str
    version: str
    kind: Literal["six_features", "personalized"] = "six_features"
    created_at: str
    model_file: str
    model_format: Literal["lightgbm-text", "json"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    features: list[str]
    rating_scale: RatingScale
    feature_stats: dict[str, FeatureStats] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra_files: dict[str, str] = Field(
        default_factory=dict, description="Other files of the model (name -> sha256), e.g. collaborative factors."
    )


class Predictor(Protocol):
    """Anything that turns an (n, 6) feature matrix into n ratings on the API's 0-10 scale."""

    version: str
    source: str

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(path: Path) -> Path:
    """Accept either a model directory or the card file itself."""
    return path / CARD_NAME if path.is_dir() else path


def read_card(path: Path) -> ModelCard:
    """Read and validate a model card, without touching the model file."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise ModelNotFound(f"no model card at {cpath}")
    try:
        return ModelCard.model_validate_json(cpath.read_bytes())
    except ValidationError as exc:
        raise ModelFormatError(f"{cpath}: not a valid model card: {exc.errors()[0]['msg']}") from exc


def verified_bytes(card_file: Path, name: str, expected_sha256: str) -> bytes:
    """Read a file named by a card and refuse it unless its sha256 matches what the card says."""
    path = card_file.parent / name
    if not path.is_file():
        raise ModelNotFound(f"model card {card_file} names {name}, which does not exist")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ModelChecksumError(
            f"{path}: sha256 {actual} does not match {expected_sha256} in the model card; refusing to load it"
        )
    return data


class LightGBMPredictor:
    """The six-feature gradient-boosted trees, loaded from LightGBM's text format."""

    source: str = "model"

    def __init__(self, card: ModelCard, model_text: str) -> None:
        import lightgbm as lgb  # imported here so that importing this module stays cheap

        if card.features != list(FEATURE_NAMES):
            raise ModelFormatError(f"model expects features {card.features}, this service computes {FEATURE_NAMES}")
        try:
            self._booster = lgb.Booster(model_str=model_text)
        except lgb.basic.LightGBMError as exc:
            raise ModelFormatError(f"not a LightGBM model: {exc}") from exc
        if self._booster.num_feature() != len(FEATURE_NAMES):
            raise ModelFormatError(f"model has {self._booster.num_feature()} inputs, expected {len(FEATURE_NAMES)}")
        self.card = card
        self.version = card.version
        self._scale = card.rating_scale.to_api

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        y = np.asarray(self._booster.predict(x, num_threads=1), dtype=np.float64)
        out: npt.NDArray[np.float64] = np.clip(y * self._scale, 0.0, 10.0)
        return out


def load_predictor(path: Path) -> LightGBMPredictor:
    """Load the model a card describes, verifying its checksum; raises a ModelError subclass on any problem."""
    card = read_card(path)
    cfile = card_path(path)
    if card.model_format != "lightgbm-text" or card.kind != "six_features":
        raise ModelFormatError(f"{cfile}: {card.kind} model in {card.model_format} is not a six-feature LightGBM model")
    text = verified_bytes(cfile, card.model_file, card.sha256)
    try:
        return LightGBMPredictor(card, text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{cfile.parent / card.model_file}: not UTF-8 text") from exc


def write_card(directory: Path, card: ModelCard) -> Path:
    """Write a card next to its model file (deterministic JSON: sorted keys, fixed indent)."""
    path = directory / CARD_NAME
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
