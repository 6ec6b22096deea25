"""Training the six-feature LightGBM model: deterministic, early-stopped on a time split of the training data."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from moviematch_ml.cf import MFConfig
from moviematch_ml.data import Dataset
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.model import FeatureStats, ModelCard, RatingScale
from moviematch_ml.trainfeatures import FeatureConfig

if TYPE_CHECKING:  # evaluation imports this module for SixFeatureCandidate; personalized imports it lazily
    from moviematch_ml.evaluation import FoldResult
    from moviematch_ml.personalized import PersonalizedConfig, PersonalizedModel

FloatArray = npt.NDArray[np.float64]

QUANTILES: tuple[tuple[str, float], ...] = (
    ("p01", 0.01),
    ("p05", 0.05),
    ("p25", 0.25),
    ("p50", 0.50),
    ("p75", 0.75),
    ("p95", 0.95),
    ("p99", 0.99),
)


class LightGBMParams(BaseModel):
    """The LightGBM knobs we set; everything else stays at LightGBM's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(0.2, gt=0, le=1)
    num_leaves: int = Field(15, ge=2, le=1024)
    min_data_in_leaf: int = Field(200, ge=1)
    lambda_l2: float = Field(10.0, ge=0)
    max_bin: int = Field(255, ge=4)
    max_rounds: int = Field(
        100, ge=1, description="Upper bound on trees: more barely helps and the service must predict ~500k rows/s."
    )
    monotone_constraints: tuple[int, int, int, int, int, int] = Field(
        (0, 0, 0, 0, 0, 0),
        description="Per feature (FEATURE_NAMES order): 1 prediction may only rise with it, -1 only fall, 0 free.",
    )
    num_threads: int = Field(
        1, ge=1, description="Fixed so that results do not depend on the machine; 1 avoids OpenMP stalls on busy cores."
    )


class TrainConfig(BaseModel):
    """Everything that determines a trained model besides the data; hashed into the model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(42, ge=0)
    lightgbm: LightGBMParams = LightGBMParams()
    features: FeatureConfig = FeatureConfig()
    early_stopping_rounds: int = Field(50, ge=1)
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="The latest part of the TRAINING rows, by time, used for early stopping."
    )
    refit_full: bool = Field(
        True, description="After early stopping, retrain on all training rows with the chosen number of trees."
    )

    def digest(self) -> str:
        """sha256 of the canonical JSON of this config."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FittedBooster:
    """A trained booster as LightGBM text, with how it was chosen."""

    text: str
    best_iteration: int
    num_trees: int
    num_leaves_total: int
    valid_rmse: float
    n_train: int
    n_valid: int

    def predict(self, x: FloatArray) -> FloatArray:
        import lightgbm as lgb

        booster = lgb.Booster(model_str=self.text)
        return np.asarray(booster.predict(x, num_threads=1), dtype=np.float64)


def _lgb_params(config: TrainConfig) -> dict[str, Any]:
    p = config.lightgbm
    return {
        "objective": "regression",
        "metric": "rmse",
        "learning_rate": p.learning_rate,
        "num_leaves": p.num_leaves,
        "min_data_in_leaf": p.min_data_in_leaf,
        "lambda_l2": p.lambda_l2,
        "max_bin": p.max_bin,
        "monotone_constraints": list(p.monotone_constraints),
        "num_threads": p.num_threads,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


def fit_booster(
    x: FloatArray, y: FloatArray, times: npt.NDArray[np.int64], config: TrainConfig, progress: bool = False
) -> FittedBooster:
    """Fit LightGBM with early stopping on the latest ``validation_fraction`` of these rows (by time).

    Only the rows given are used: callers pass training rows, so test rows never choose the number of trees.
    """
    import lightgbm as lgb

    order = np.argsort(times, kind="stable")
    n_valid = max(1, round(len(order) * config.validation_fraction))
    fit_idx, valid_idx = order[:-n_valid], order[-n_valid:]
    params = _lgb_params(config)
    names = list(FEATURE_NAMES)
    dtrain = lgb.Dataset(x[fit_idx], y[fit_idx], feature_name=names, free_raw_data=False, params={"verbosity": -1})
    dvalid = lgb.Dataset(x[valid_idx], y[valid_idx], reference=dtrain, free_raw_data=False)
    callbacks: list[Any] = [lgb.early_stopping(config.early_stopping_rounds, verbose=False)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.lightgbm.max_rounds, desc="training trees", unit="tree", file=sys.stderr, leave=False)

        def _tick(env: Any) -> None:
            assert bar is not None
            bar.update(1)

        callbacks.append(_tick)
    try:
        booster = lgb.train(
            params,
            dtrain,
            num_boost_round=config.lightgbm.max_rounds,
            valid_sets=[dvalid],
            valid_names=["valid"],
            callbacks=callbacks,
        )
    finally:
        if bar is not None:
            bar.close()
    best = int(booster.best_iteration) or booster.current_iteration()
    valid_rmse = float(booster.best_score["valid"]["rmse"])
    if config.refit_full:
        dall = lgb.Dataset(x, y, feature_name=names, free_raw_data=False, params={"verbosity": -1})
        booster = lgb.train(params, dall, num_boost_round=best)
        text = booster.model_to_string()
    else:
        text = booster.model_to_string(num_iteration=best)
    final = lgb.Booster(model_str=text)
    dump = final.dump_model()
    leaves = sum(int(t["num_leaves"]) for t in dump["tree_info"])
    return FittedBooster(text, best, final.num_trees(), leaves, valid_rmse, len(fit_idx), len(valid_idx))


@dataclass(frozen=True)
class SixFeatureCandidate:
    """The service model as an evaluation candidate: LightGBM on the six features, fitted on the training rows."""

    config: TrainConfig = field(default_factory=TrainConfig)
    name: str = "six_features"

    def fit_predict(self, train: pd.DataFrame, test: pd.DataFrame, scale: RatingScale) -> FloatArray:
        x = train.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
        fitted = fit_booster(
            x, train["rating"].to_numpy(dtype=np.float64), train["timestamp"].to_numpy(dtype=np.int64), self.config
        )
        pred = fitted.predict(test.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64))
        # The service clips to the API range; on the data's scale that is [0, scale.max].
        out: FloatArray = np.clip(pred, 0.0, scale.max)
        return out


def feature_stats(frame: pd.DataFrame) -> dict[str, FeatureStats]:
    """min, max, mean and quantiles of each feature: the training distribution drift detection compares with."""
    out = {}
    for name in FEATURE_NAMES:
        col = frame[name].to_numpy(dtype=np.float64)
        qs = np.quantile(col, [q for _, q in QUANTILES])
        out[name] = FeatureStats(
            min=float(col.min()),
            max=float(col.max()),
            mean=round(float(col.mean()), 6),
            quantiles={k: round(float(v), 6) for (k, _), v in zip(QUANTILES, qs, strict=True)},
        )
    return out


def model_version(dataset: Dataset, config: TrainConfig) -> str:
    """Reproducible version: the same data and config always give the same version, whatever the clock says."""
    return f"six-{dataset.fingerprint()[:10]}-{config.digest()[:8]}"


def personalized_config(seed: int = 42) -> PersonalizedConfig:
    """The personalised model's config for a ``--seed``: its inner folds, trees and factorisation all follow it."""
    from moviematch_ml.personalized import PersonalizedConfig

    return PersonalizedConfig(seed=seed, mf=MFConfig(seed=seed))


def personalized_digest(config: PersonalizedConfig, six: TrainConfig) -> str:
    """sha256 of both configs: the personalised model reads the six features, so their config is part of it."""
    both = {"personalized": config.model_dump(mode="json"), "six_features": six.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(both, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def personalized_version(dataset: Dataset, config: PersonalizedConfig, six: TrainConfig) -> str:
    """Reproducible version of the personalised model: data fingerprint + hash of the configs, never the clock."""
    return f"personalized-{dataset.fingerprint()[:10]}-{personalized_digest(config, six)[:8]}"


def min_training_ratings(config: TrainConfig) -> int:
    """Fewest ratings the six-feature trees can learn anything from: on the temporal hold-out they are fitted on
    80% of the ratings less the latest ``validation_fraction``, and one split needs two leaves of
    ``min_data_in_leaf`` ratings each (556 with the defaults)."""
    from moviematch_ml.evaluation import TEMPORAL_TRAIN_FRACTION

    fit_share = TEMPORAL_TRAIN_FRACTION * (1.0 - config.validation_fraction)
    return math.ceil(2 * config.lightgbm.min_data_in_leaf / fit_share - 1e-9)


@dataclass(frozen=True)
class PersonalizedResult:
    """The trained personalised model, its version and the card fields (data, hold-out metrics) it is saved with."""

    model: PersonalizedModel
    version: str
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
# The service looks for the personalised model in this subdirectory of MODEL_PATH.
PERSONALIZED_DIR: Final[str] = "personalized"
# Models whose hold-out figures go into the personalised model's card (the model and what it is measured against).
PERSONALIZED_COMPARED: Final[tuple[str, ...]] = ("personalized", "six_features", "bias")


def _rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (round(v, 4) if np.isfinite(v) else None) for k, v in metrics.items() if k != "missing"}


def _personalized_metrics(holdout: FoldResult, mask: npt.NDArray[np.bool_], n_train: int) -> dict[str, Any]:
    """Hold-out figures of the personalised model against the six-feature and bias models: on every test rating,
    and on the ones it answered itself (users with ratings in the training part); the rest the six-feature
    model answers, as in the service."""
    from moviematch_ml import evaluation

    metrics = evaluation.fold_metrics(holdout)
    truth = holdout.test["rating"].to_numpy(dtype=np.float64)
    answered = {}
    for name in PERSONALIZED_COMPARED:
        pred = holdout.predictions[name]
        answered[name] = {
            "rmse": round(evaluation.rmse(truth[mask], pred[mask]), 4) if mask.any() else None,
            "mae": round(evaluation.mae(truth[mask], pred[mask]), 4) if mask.any() else None,
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
    progress: bool = False,
) -> TrainResult:
    """Train the six-feature model and, given its config, the personalised model, from the same feature frame.

    Both are first evaluated on the temporal split (against every baseline), then fitted on all ratings.
    ``created_at`` defaults to the time of the latest rating, so that the same data and configs give the same
    files byte for byte; the CLI passes the wall clock.
    """
    import lightgbm as lgb

    from moviematch_ml import evaluation
    from moviematch_ml.personalized import PersonalizedCandidate, PersonalizedModel

    cfg = config or TrainConfig()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    frame = evaluation.feature_frame(dataset, cfg)
    seconds["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_idx, test_idx = evaluation.temporal_split(len(frame))[0]
    candidates: list[evaluation.Candidate] = [
        make(cfg) for name, make in evaluation.CANDIDATES.items() if name != "personalized"
    ]
    pcand = PersonalizedCandidate(personalized, six_config=cfg) if personalized is not None else None
    if pcand is not None:
        candidates.append(pcand)
    holdout = evaluation.run_fold(frame, train_idx, test_idx, candidates, dataset.scale)
    metrics = evaluation.fold_metrics(holdout)
    seconds["holdout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x = frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    fitted = fit_booster(
        x, frame["rating"].to_numpy(dtype=np.float64), frame["timestamp"].to_numpy(dtype=np.int64), cfg, progress
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
    card = ModelCard(
        name=MODEL_NAME,
        version=model_version(dataset, cfg),
        kind="six_features",
        created_at=when,
        model_file=MODEL_FILE,
        model_format="lightgbm-text",
        sha256=sha,
        features=list(FEATURE_NAMES),
        rating_scale=dataset.scale,
        feature_stats=feature_stats(frame),
        data=data,
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
            "note": "models fitted on the first 80% of ratings by time, scored on the last 20%, on the data's scale",
            "n_train": len(train_idx),
            "n_test": len(test_idx),
            "cold_user_test_ratings": int(holdout.cold.sum()),
            "models": {name: _rounded(m) for name, m in metrics.items()},
        },
    )
    presult = None
    if personalized is not None and pcand is not None and pcand.last_mask is not None:
        t0 = time.perf_counter()
        pmodel = PersonalizedModel.fit_frame(frame, dataset.scale, personalized)
        seconds["personalized"] = time.perf_counter() - t0
        presult = PersonalizedResult(
            pmodel,
            personalized_version(dataset, personalized, cfg),
            dict(data),
            _personalized_metrics(holdout, pcand.last_mask, len(train_idx)),
        )
    return TrainResult(fitted.text, card, holdout, importance, presult, seconds)


def train_six_feature_model(
    dataset: Dataset, config: TrainConfig | None = None, *, created_at: str | None = None, progress: bool = False
) -> TrainResult:
    """The six-feature model alone (``train_models`` without the personalised model)."""
    return train_models(dataset, config, None, created_at=created_at, progress=progress)


def write_model(directory: Path, result: TrainResult) -> Path:
    """Write model.txt and model_card.json into ``directory`` and, if trained, the personalised model into
    ``directory/personalized/`` (its own card, every file checksummed); returns the six-feature card's path."""
    from moviematch_ml.model import write_card

    directory.mkdir(parents=True, exist_ok=True)
    (directory / result.card.model_file).write_bytes(result.model_text.encode("utf-8"))
    card_file = write_card(directory, result.card)
    p = result.personalized
    if p is not None:
        p.model.save(
            directory / PERSONALIZED_DIR,
            name=PERSONALIZED_NAME,
            version=p.version,
            created_at=result.card.created_at,
            data=p.data,
            metrics=p.metrics,
        )
    return card_file


def remove_personalized(directory: Path) -> bool:
    """Delete a personalised model left in ``directory/personalized/`` by an earlier training, so the service
    never pairs it with a newer six-feature model. Only the files a personalised model consists of are removed
    (and the folder, once empty). Returns whether there was one."""
    from moviematch_ml.cf import JSON_NAME, NPZ_NAME
    from moviematch_ml.model import CARD_NAME
    from moviematch_ml.personalized import MODEL_FILE as PERSONALIZED_FILE
    from moviematch_ml.personalized import STATE_FILE

    folder = directory / PERSONALIZED_DIR
    if not (folder / CARD_NAME).is_file():
        return False
    for name in (CARD_NAME, PERSONALIZED_FILE, STATE_FILE, NPZ_NAME, JSON_NAME):
        (folder / name).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
    return True
