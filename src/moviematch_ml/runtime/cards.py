"""Model cards and model files: what a model is, and reading its files only when their sha256 is the card's."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moviematch_ml.errors import ModelChecksumError, ModelFormatError, ModelNotFoundError

CARD_NAME: Final[str] = "model_card.json"
BUNDLED_MODEL_DIR: Final[Path] = Path(__file__).resolve().parent.parent / "bundled"
# The personalised model lives in this subdirectory of the six-feature model's directory.
PERSONALIZED_DIR: Final[str] = "personalized"


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
    bin_shares: dict[str, float] | None = Field(
        None, description="The share of training inputs in each drift bin (runtime/drift.py), by the bin's label."
    )


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


def card_path(path: Path) -> Path:
    """Accept either a model directory or the card file itself."""
    return path / CARD_NAME if path.is_dir() else path


def read_card(path: Path) -> ModelCard:
    """Read and validate a model card, without touching the model file."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise ModelNotFoundError(f"no model card at {cpath}")
    try:
        return ModelCard.model_validate_json(cpath.read_bytes())
    except ValidationError as exc:
        raise ModelFormatError(f"{cpath}: not a valid model card: {exc.errors()[0]['msg']}") from exc


def write_card(directory: Path, card: ModelCard) -> Path:
    """Write a card next to its model file (deterministic JSON: sorted keys, fixed indent)."""
    path = directory / CARD_NAME
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def verified_bytes(card_file: Path, name: str, expected_sha256: str | None) -> bytes:
    """Read a file named by a card and refuse it unless its sha256 is ``expected_sha256`` (None: the card records
    none, which is refused too)."""
    path = card_file.parent / name
    if expected_sha256 is None:
        raise ModelFormatError(f"model card {card_file} records no checksum for {name}; refusing to load it")
    if not path.is_file():
        raise ModelNotFoundError(f"model card {card_file} names {name}, which does not exist")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ModelChecksumError(
            f"{path}: sha256 {actual} does not match {expected_sha256} in the model card; refusing to load it"
        )
    return data


def write_npz(arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    """An .npz archive of float64 arrays with fixed timestamps: the same arrays always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            body = io.BytesIO()
            np.lib.format.write_array(body, np.ascontiguousarray(arrays[name], dtype=np.float64), allow_pickle=False)
            zf.writestr(info, body.getvalue())
    return buf.getvalue()


def read_npz(data: bytes) -> dict[str, npt.NDArray[np.float64]]:
    """The arrays of an .npz archive as float64, refusing object arrays (no pickle)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: np.asarray(npz[name], dtype=np.float64) for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ModelFormatError(f"not a numeric .npz archive: {exc}") from exc
