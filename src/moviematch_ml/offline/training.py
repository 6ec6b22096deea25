"""Training both models from one data set: evaluated on the temporal hold-out first, then fitted on every rating."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline import evaluation
from moviematch_ml.offline.boosting import TrainConfig, feature_stats, fit_booster
from moviematch_ml.offline.candidates import CANDIDATES, Candidate, PersonalizedCandidate
from moviematch_ml.offline.data import Dataset
from moviematch_ml.offline.evaluation import TEMPORAL_TRAIN_FRACTION, FoldResult
from moviematch_ml.offline.metrics import mae, rmse
from moviematch_ml.offline.progress import QUIET, Progress
from moviematch_ml.offline.stacking import fit_frame
from moviematch_ml.runtime.cards import (
    APP_SPACE,
    CARD_NAME,
    MOVIELENS_SPACE,
    PERSONALIZED_DIR,
    ModelCard,
    content_versioned,
    write_card,
)
from moviematch_ml.runtime.factors import JSON_NAME, NPZ_NAME, MFConfig
from moviematch_ml.runtime.personalized import MODEL_FILE as PERSONALIZED_FILE
from moviematch_ml.runtime.personalized import STATE_FILE, PersonalizedConfig, PersonalizedModel

FloatArray = npt.NDArray[np.float64]


def personalized_config(seed: int = 42) -> PersonalizedConfig:
    """The personalised model's config for a ``--seed``: its inner folds, trees and factorisation all follow it."""
    return PersonalizedConfig(seed=seed, mf=MFConfig(seed=seed))


def min_training_ratings(config: TrainConfig) -> int:
    """Fewest ratings the six-feature trees can learn anything from: on the temporal hold-out they are fitted on
    80% of the ratings less the latest ``validation_fraction``, and one split needs two leaves of
    ``min_data_in_leaf`` ratings each (556 with the defaults)."""
    fit_share = TEMPORAL_TRAIN_FRACTION * (1.0 - config.validation_fraction)
    return math.ceil(2 * config.lightgbm.min_data_in_leaf / fit_share - 1e-9)


@dataclass(frozen=True)
class PersonalizedResult:
    """The trained personalised model and the card fields (data, hold-out metrics) it is saved with (its version is
    its content's: ``model.version`` once written)."""

    model: PersonalizedModel
    data: dict[str, Any]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class TrainResult:
    """A trained model (LightGBM text + its card) and the held-out evidence the report is drawn from.

    ``personalized`` is the personalised model trained from the same data (None with ``--no-personalized``);
    ``seconds`` the wall time of each stage (kept out of the cards, which must not depend on the clock).
    """

    model_text: str
    card: ModelCard
    holdout: FoldResult  # predictions of every model on the temporal split's test rows
    importance: dict[str, float]
    personalized: PersonalizedResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)


MODEL_NAME = "moviematch-six-features"
MODEL_FILE = "model.txt"
PERSONALIZED_NAME: Final[str] = "moviematch-personalized"
# Models whose hold-out figures go into the personalised model's card (the model and what it is measured against).
PERSONALIZED_COMPARED: Final[tuple[str, ...]] = ("personalized", "six_features", "bias")


def _rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (round(v, 4) if np.isfinite(v) else None) for k, v in metrics.items() if k != "missing"}


def _personalized_metrics(holdout: FoldResult, mask: npt.NDArray[np.bool_], n_train: int) -> dict[str, Any]:
    """Hold-out figures of the personalised model against the six-feature and bias models: on every test rating,
    and on the ones it answered itself (users with ratings in the training part); the rest the six-feature
    model answers, as in the service."""
    metrics = evaluation.fold_metrics(holdout)
    truth = holdout.test["rating"].to_numpy(dtype=np.float64)
    answered = {}
    for name in PERSONALIZED_COMPARED:
        pred = holdout.predictions[name]
        answered[name] = {
            "rmse": round(rmse(truth[mask], pred[mask]), 4) if mask.any() else None,
            "mae": round(mae(truth[mask], pred[mask]), 4) if mask.any() else None,
        }
    return {
        "protocol": "temporal",
        "note": "models fitted on the first 80% of ratings by time, scored on the last 20%, on the data's scale",
        "n_train": n_train,
        "n_test": len(truth),
        "cold_user_test_ratings": int(holdout.cold.sum()),
        "personalized_test_ratings": int(mask.sum()),
        "models": {name: _rounded(metrics[name]) for name in PERSONALIZED_COMPARED},
        "personalized_rows": answered,
    }


def train_models(
    dataset: Dataset,
    config: TrainConfig | None = None,
    personalized: PersonalizedConfig | None = None,
    *,
    created_at: str | None = None,
    progress: Progress = QUIET,
) -> TrainResult:
    """Train the six-feature model and, given its config, the personalised model, from the same feature frame.

    Both are first evaluated on the temporal split (against every baseline), then fitted on all ratings.
    ``created_at`` defaults to the time of the latest rating, so that the same data and configs give the same
    files byte for byte; the CLI passes the wall clock. ``progress`` shows each stage: the features, every model
    of the hold-out, each final model.
    """
    import lightgbm as lgb

    cfg = config or TrainConfig()
    candidates: list[Candidate] = [make(cfg) for name, make in CANDIDATES.items() if name != "personalized"]
    pcand = PersonalizedCandidate(personalized, six_config=cfg) if personalized is not None else None
    if pcand is not None:
        candidates.append(pcand)
    progress.expect(1 + len(candidates) + 1 + (pcand is not None))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with progress.step("features"):
        frame = evaluation.feature_frame(dataset, cfg)
    seconds["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_idx, test_idx = evaluation.temporal_split(len(frame))[0]
    holdout = evaluation.run_fold(
        frame, train_idx, test_idx, candidates, dataset.scale, progress=progress, stage="hold-out: "
    )
    metrics = evaluation.fold_metrics(holdout)
    seconds["holdout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x = frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    with progress.step("final six-feature model") as note:
        fitted = fit_booster(
            x, frame["rating"].to_numpy(dtype=np.float64), frame["timestamp"].to_numpy(dtype=np.int64), cfg, note
        )
    booster = lgb.Booster(model_str=fitted.text)
    gains = booster.feature_importance(importance_type="gain")
    importance = {name: round(float(v), 3) for name, v in zip(FEATURE_NAMES, gains, strict=True)}
    seconds["six_features"] = time.perf_counter() - t0
    sha = hashlib.sha256(fitted.text.encode("utf-8")).hexdigest()
    ratings = dataset.ratings
    last_ts = int(ratings["timestamp"].max())
    when = created_at or pd.Timestamp(last_ts, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    data = {
        "dataset": dataset.name,
        "fingerprint_sha256": dataset.fingerprint(),
        "n_ratings": len(ratings),
        "n_users": int(ratings["user_id"].nunique()),
        "n_movies": int(ratings["movie_id"].nunique()),
        "first_timestamp": int(ratings["timestamp"].min()),
        "last_timestamp": last_ts,
        "metadata_join": dataset.join,
        **dataset.source,
    }
    card = content_versioned(
        ModelCard(
            name=MODEL_NAME,
            version="",  # named by its content below: the data's fingerprint is provenance (data), not the name
            kind="six_features",
            created_at=when,
            model_file=MODEL_FILE,
            model_format="lightgbm-text",
            sha256=sha,
            features=list(FEATURE_NAMES),
            rating_scale=dataset.scale,
            feature_stats=feature_stats(frame),
            data=data,
            data_terms=list(dataset.terms),
            training={
                "config": cfg.model_dump(mode="json"),
                "config_sha256": cfg.digest(),
                "lightgbm_version": lgb.__version__,
                "best_iteration": fitted.best_iteration,
                "num_trees": fitted.num_trees,
                "num_leaves_total": fitted.num_leaves_total,
                "early_stopping_valid_rmse": round(fitted.valid_rmse, 4),
                "n_fit": fitted.n_train,
                "n_early_stopping": fitted.n_valid,
                "feature_importance_gain": importance,
            },
            metrics={
                "protocol": "temporal",
                "note": "models fitted on the first 80% of ratings by time, scored on the last 20%, "
                "on the data's scale",
                "n_train": len(train_idx),
                "n_test": len(test_idx),
                "cold_user_test_ratings": int(holdout.cold.sum()),
                "models": {name: _rounded(m) for name, m in metrics.items()},
            },
        )
    )
    presult = None
    if personalized is not None and pcand is not None and pcand.last_mask is not None:
        t0 = time.perf_counter()
        with progress.step("final personalised model"):
            pmodel = fit_frame(frame, dataset.scale, personalized)
        seconds["personalized"] = time.perf_counter() - t0
        presult = PersonalizedResult(
            pmodel,
            dict(data),
            _personalized_metrics(holdout, pcand.last_mask, len(train_idx)),
        )
    return TrainResult(fitted.text, card, holdout, importance, presult, seconds)


def train_six_feature_model(
    dataset: Dataset, config: TrainConfig | None = None, *, created_at: str | None = None, progress: Progress = QUIET
) -> TrainResult:
    """The six-feature model alone (``train_models`` without the personalised model)."""
    return train_models(dataset, config, None, created_at=created_at, progress=progress)


def write_model(directory: Path, result: TrainResult) -> Path:
    """Write model.txt and model_card.json into ``directory`` and, if trained, the personalised model into
    ``directory/personalized/`` (its own card, every file checksummed); returns the six-feature card's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / result.card.model_file).write_bytes(result.model_text.encode("utf-8"))
    card_file = write_card(directory, result.card)
    p = result.personalized
    if p is not None:
        p.model.save(
            directory / PERSONALIZED_DIR,
            name=PERSONALIZED_NAME,
            created_at=result.card.created_at,
            data=p.data,
            data_terms=result.card.data_terms,
            metrics=p.metrics,
            movie_id_space=movie_id_space(str(p.data.get("dataset", ""))),
        )
    return card_file


def movie_id_space(dataset: str) -> str | None:
    """The id space of a data set's movie ids: the app's for its own feedback (``train --from-feedback``),
    MovieLens' for MovieLens; None (not declared) for a CSV file, whose ids the card cannot know."""
    if dataset == "feedback":
        return APP_SPACE
    return MOVIELENS_SPACE if dataset.startswith("movielens") else None


def remove_personalized(directory: Path) -> bool:
    """Delete a personalised model left in ``directory/personalized/`` by an earlier training, so the service
    never pairs it with a newer six-feature model. Only the files a personalised model consists of are removed
    (and the folder, once empty). Returns whether there was one."""
    folder = directory / PERSONALIZED_DIR
    if not (folder / CARD_NAME).is_file():
        return False
    for name in (CARD_NAME, PERSONALIZED_FILE, STATE_FILE, NPZ_NAME, JSON_NAME):
        (folder / name).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
    return True
