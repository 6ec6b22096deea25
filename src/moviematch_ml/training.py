"""Training the six-feature LightGBM model: deterministic, early-stopped on a time split of the training data."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from moviematch_ml.data import Dataset
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.model import FeatureStats, ModelCard, RatingScale
from moviematch_ml.trainfeatures import FeatureConfig

if TYPE_CHECKING:  # evaluation imports this module for SixFeatureCandidate
    from moviematch_ml.evaluation import FoldResult

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


@dataclass(frozen=True)
class TrainResult:
    """A trained model (LightGBM text + its card) and the held-out evidence the report is drawn from."""

    model_text: str
    card: ModelCard
    holdout: FoldResult  # predictions of every model on the temporal split's test rows
    importance: dict[str, float]


MODEL_NAME = "moviematch-six-features"
MODEL_FILE = "model.txt"


def train_six_feature_model(
    dataset: Dataset, config: TrainConfig | None = None, *, created_at: str | None = None, progress: bool = False
) -> TrainResult:
    """Evaluate on the temporal split (model vs every baseline), then fit the final model on all ratings.

    ``created_at`` defaults to the time of the latest rating, so that the same data and config give the same card
    byte for byte; the CLI passes the wall clock.
    """
    import lightgbm as lgb

    from moviematch_ml import evaluation

    cfg = config or TrainConfig()
    frame = evaluation.feature_frame(dataset, cfg)
    train_idx, test_idx = evaluation.temporal_split(len(frame))[0]
    candidates = [make(cfg) for make in evaluation.CANDIDATES.values()]
    holdout = evaluation.run_fold(frame, train_idx, test_idx, candidates, dataset.scale)
    metrics = evaluation.fold_metrics(holdout)

    x = frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    fitted = fit_booster(
        x, frame["rating"].to_numpy(dtype=np.float64), frame["timestamp"].to_numpy(dtype=np.int64), cfg, progress
    )
    booster = lgb.Booster(model_str=fitted.text)
    gains = booster.feature_importance(importance_type="gain")
    importance = {name: round(float(v), 3) for name, v in zip(FEATURE_NAMES, gains, strict=True)}
    sha = hashlib.sha256(fitted.text.encode("utf-8")).hexdigest()
    ratings = dataset.ratings
    last_ts = int(ratings["timestamp"].max())
    when = created_at or pd.Timestamp(last_ts, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
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
        data={
            "dataset": dataset.name,
            "fingerprint_sha256": dataset.fingerprint(),
            "n_ratings": len(ratings),
            "n_users": int(ratings["user_id"].nunique()),
            "n_movies": int(ratings["movie_id"].nunique()),
            "first_timestamp": int(ratings["timestamp"].min()),
            "last_timestamp": last_ts,
            "metadata_join": dataset.join,
        },
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
            "models": {
                name: {k: (round(v, 4) if np.isfinite(v) else None) for k, v in m.items() if k != "missing"}
                for name, m in metrics.items()
            },
        },
    )
    return TrainResult(fitted.text, card, holdout, importance)


def write_model(directory: Path, result: TrainResult) -> Path:
    """Write model.txt and model_card.json into ``directory``; returns the card's path."""
    from moviematch_ml.model import write_card

    directory.mkdir(parents=True, exist_ok=True)
    (directory / result.card.model_file).write_bytes(result.model_text.encode("utf-8"))
    return write_card(directory, result.card)
