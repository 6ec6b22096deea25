"""Fitting the six-feature model: LightGBM, deterministic, early-stopped on the latest part of the training rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.point_in_time import FeatureConfig
from moviematch_ml.runtime.cards import FeatureStats
from moviematch_ml.runtime.drift import QUANTILE_LEVELS, DriftBins, training_shares

FloatArray = npt.NDArray[np.float64]

# The quantiles a card records: the drift bins' edges (runtime/drift.py), named there once.
QUANTILES: tuple[tuple[str, float], ...] = tuple(QUANTILE_LEVELS.items())


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
    x: FloatArray,
    y: FloatArray,
    times: npt.NDArray[np.int64],
    config: TrainConfig,
    on_tree: Callable[[str], None] | None = None,
) -> FittedBooster:
    """Fit LightGBM with early stopping on the latest ``validation_fraction`` of these rows (by time).

    Only the rows given are used: callers pass training rows, so test rows never choose the number of trees.
    ``on_tree`` is told of each tree fitted while early stopping searches (``tree 12/2000``), then of the refit.
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
    if on_tree is not None:
        tell = on_tree
        callbacks.append(lambda env: tell(f"tree {env.iteration + 1}/{env.end_iteration}"))
    booster = lgb.train(
        params,
        dtrain,
        num_boost_round=config.lightgbm.max_rounds,
        valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=callbacks,
    )
    best = int(booster.best_iteration) or booster.current_iteration()
    valid_rmse = float(booster.best_score["valid"]["rmse"])
    if on_tree is not None:
        on_tree(f"{best} trees, refitted on every row")
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


def feature_stats(frame: pd.DataFrame) -> dict[str, FeatureStats]:
    """min, max, mean and quantiles of each feature, and the share of its values in each drift bin: the training
    distribution drift detection compares with (runtime/drift.py)."""
    out = {}
    for name in FEATURE_NAMES:
        col = frame[name].to_numpy(dtype=np.float64)
        qs = np.quantile(col, [q for _, q in QUANTILES])
        stats = FeatureStats(
            min=float(col.min()),
            max=float(col.max()),
            mean=round(float(col.mean()), 6),
            quantiles={k: round(float(v), 6) for (k, _), v in zip(QUANTILES, qs, strict=True)},
        )
        # The bins of the card's own (rounded) numbers: the ones the service will count inputs in.
        shares = training_shares(DriftBins.of(name, stats), col)
        out[name] = stats.model_copy(update={"bin_shares": shares})
    return out
