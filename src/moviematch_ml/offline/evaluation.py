"""Evaluation protocols (temporal, k-fold): every candidate fitted and scored on the same splits and features."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.errors import MovieMatchError
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.candidates import CANDIDATES, Candidate
from moviematch_ml.offline.data import RATING_COLUMNS, Dataset
from moviematch_ml.offline.metrics import mae, ndcg_at_k, rmse
from moviematch_ml.offline.point_in_time import compute_features
from moviematch_ml.offline.progress import QUIET, Progress
from moviematch_ml.runtime.cards import RatingScale

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Protocol_ = Literal["temporal", "kfold"]
FeatureMode = Literal["online", "frozen"]

TEMPORAL_TRAIN_FRACTION = 0.8


class EvaluationError(MovieMatchError):
    """A candidate returned unusable predictions (wrong length, NaN, infinite)."""


def temporal_split(n: int) -> list[tuple[IntArray, IntArray]]:
    """Rows are sorted by time: the first 80% train, the last 20% test."""
    cut = round(n * TEMPORAL_TRAIN_FRACTION)
    idx = np.arange(n, dtype=np.int64)
    return [(idx[:cut], idx[cut:])]


def kfold_split(n: int, folds: int, seed: int) -> list[tuple[IntArray, IntArray]]:
    """Random folds of (nearly) equal size from a seeded permutation; each fold is the test set once."""
    if folds < 2:
        raise EvaluationError(f"k-fold needs at least 2 folds, got {folds}")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    parts = np.array_split(perm, folds)
    out = []
    for i, test in enumerate(parts):
        train = np.concatenate([p for j, p in enumerate(parts) if j != i])
        out.append((np.sort(train), np.sort(test)))
    return out


@dataclass(frozen=True)
class FoldResult:
    """Predictions of every candidate on one test set."""

    test: pd.DataFrame
    predictions: dict[str, FloatArray]
    cold: npt.NDArray[np.bool_]
    seconds: dict[str, float]


def check_predictions(name: str, pred: object, n: int, allow_missing: bool) -> FloatArray:
    """Fail loudly on a wrong length or NaN/inf predictions (unless ``allow_missing``, then NaN stays NaN)."""
    arr = np.asarray(pred, dtype=np.float64)
    if arr.shape != (n,):
        raise EvaluationError(f"{name}: returned {arr.shape} predictions for {n} test rows")
    bad = ~np.isfinite(arr)
    if bad.any() and not allow_missing:
        raise EvaluationError(f"{name}: {int(bad.sum())} of {n} predictions are missing or not finite")
    return arr


def run_fold(
    frame: pd.DataFrame,
    train_idx: IntArray,
    test_idx: IntArray,
    candidates: Sequence[Candidate],
    scale: RatingScale,
    allow_missing: bool = False,
    *,
    progress: Progress = QUIET,
    stage: str = "",
) -> FoldResult:
    """Fit and predict every candidate on one split of ``frame`` (ratings + six features); each candidate is one
    stage of ``progress``, named ``stage`` + its name."""
    train = frame.iloc[train_idx].reset_index(drop=True)
    test = frame.iloc[test_idx].reset_index(drop=True)
    blind = test.drop(columns=["rating"])
    preds, seconds = {}, {}
    for cand in candidates:
        t0 = time.perf_counter()
        with progress.step(f"{stage}{cand.name}"):
            pred = cand.fit_predict(train, blind, scale)
        preds[cand.name] = check_predictions(cand.name, pred, len(test), allow_missing)
        seconds[cand.name] = time.perf_counter() - t0
    cold = ~test["user_id"].isin(set(train["user_id"].tolist())).to_numpy()
    return FoldResult(test, preds, cold, seconds)


def fold_metrics(result: FoldResult) -> dict[str, dict[str, float]]:
    """RMSE, MAE, NDCG@10 and cold/warm-user RMSE of every candidate on one fold (NaN predictions skipped)."""
    truth = result.test["rating"].to_numpy(dtype=np.float64)
    users = result.test["user_id"].to_numpy()
    out = {}
    for name, pred in result.predictions.items():
        ok = np.isfinite(pred)
        t, p, c = truth[ok], pred[ok], result.cold[ok]
        out[name] = {
            "rmse": rmse(t, p),
            "mae": mae(t, p),
            "ndcg@10": ndcg_at_k(users[ok], t, p),
            "rmse_cold_users": rmse(t[c], p[c]),
            "rmse_warm_users": rmse(t[~c], p[~c]),
            "missing": float((~ok).sum()),
        }
    return out


def feature_frame(dataset: Dataset, config: TrainConfig, history: npt.ArrayLike | None = None) -> pd.DataFrame:
    """Ratings with their six leak-free features side by side (row order of dataset.ratings).

    ``history``: which ratings may serve as earlier ratings (see ``compute_features``); None = all of them.
    A rating with features the backend sent (``dataset.logged``) has those instead of the computed ones.
    """
    feats = compute_features(dataset, config.features, history)
    if dataset.logged is not None:
        if not dataset.logged.index.equals(dataset.ratings.index):
            raise EvaluationError("the logged features are not aligned with the ratings (one row per rating)")
        logged = dataset.logged.loc[:, list(FEATURE_NAMES)]
        sent = logged.notna().all(axis=1).to_numpy()
        if sent.any():
            feats = feats.astype(np.float64)
            feats.loc[sent, list(FEATURE_NAMES)] = logged.loc[sent].to_numpy(dtype=np.float64)
    return pd.concat([dataset.ratings.loc[:, list(RATING_COLUMNS)], feats], axis=1)


def split_frames(
    dataset: Dataset,
    protocol: Protocol_,
    features: FeatureMode = "online",
    *,
    folds: int = 5,
    seed: int = 42,
    config: TrainConfig | None = None,
    progress: Progress = QUIET,
) -> Iterator[tuple[pd.DataFrame, IntArray, IntArray]]:
    """(feature frame, train rows, test rows) of every split of a protocol.

    online: one frame for all splits, every rating's features from all ratings strictly before it. frozen: one
    frame per split whose history is that split's training ratings only, so no test rating reaches any feature
    (temporal: the training rows' features are the online ones; the test rows see the training part).
    """
    if features not in ("online", "frozen"):
        raise EvaluationError(f"features must be 'online' or 'frozen', got {features!r}")
    cfg = config or TrainConfig(seed=seed)
    n = len(dataset.ratings)
    splits = temporal_split(n) if protocol == "temporal" else kfold_split(n, folds, seed)
    online = None
    if features == "online":
        with progress.step("features"):
            online = feature_frame(dataset, cfg)
    for i, (train_idx, test_idx) in enumerate(splits, start=1):
        if online is not None:
            yield online, train_idx, test_idx
        else:
            history = np.zeros(n, dtype=bool)
            history[train_idx] = True
            with progress.step(f"features of split {i}/{len(splits)}"):
                frame = feature_frame(dataset, cfg, history)
            yield frame, train_idx, test_idx


def evaluate(
    dataset: Dataset,
    protocol: Protocol_ = "temporal",
    *,
    folds: int = 5,
    seed: int = 42,
    config: TrainConfig | None = None,
    candidates: Sequence[Candidate] | None = None,
    allow_missing: bool = False,
    features: FeatureMode = "online",
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Run a protocol; returns the JSON-ready summary (metrics averaged over folds for k-fold).

    ``features``: online (default) = every rating's features from all ratings strictly before it; frozen = from
    the split's training ratings only (see ``split_frames``). Every candidate gets the same frames. ``progress``
    shows each stage: the features, then every candidate of every fold.
    """
    cfg = config or TrainConfig(seed=seed)
    cands = list(candidates) if candidates is not None else [make(cfg) for make in CANDIDATES.values()]
    t0 = time.perf_counter()
    n_splits = folds if protocol == "kfold" else 1
    progress.expect((1 if features == "online" else n_splits) + n_splits * len(cands))
    per_fold, n_train, n_test, n_cold, secs = [], [], [], [], {c.name: 0.0 for c in cands}
    frames = split_frames(dataset, protocol, features, folds=folds, seed=seed, config=cfg, progress=progress)
    for i, (frame, train_idx, test_idx) in enumerate(frames, start=1):
        stage = f"fold {i}/{n_splits}: " if protocol == "kfold" else "temporal split: "
        result = run_fold(
            frame, train_idx, test_idx, cands, dataset.scale, allow_missing, progress=progress, stage=stage
        )
        per_fold.append(fold_metrics(result))
        n_train.append(len(train_idx))
        n_test.append(len(test_idx))
        n_cold.append(int(result.cold.sum()))
        for k, v in result.seconds.items():
            secs[k] += v
    models: dict[str, dict[str, float]] = {}
    for cand in cands:
        row = {key: _mean_finite([f[cand.name][key] for f in per_fold]) for key in per_fold[0][cand.name]}
        row["missing"] = float(sum(f[cand.name]["missing"] for f in per_fold))
        if not allow_missing:
            row.pop("missing")
        models[cand.name] = row
    summary: dict[str, Any] = {
        "protocol": protocol,
        "features": features,
        "n_train": round(float(np.mean(n_train))),
        "n_test": round(float(np.mean(n_test))),
        "rating_scale": dataset.scale.model_dump(mode="json"),
        "models": models,
        "dataset": dataset.name,
        "n_ratings": len(dataset.ratings),
        "cold_user_test_ratings": round(float(np.mean(n_cold))),
        "seed": seed,
        "join": dataset.join,
        "seconds": {k: round(v, 2) for k, v in secs.items()} | {"total": round(time.perf_counter() - t0, 2)},
    }
    if protocol == "kfold":
        summary["folds"] = folds
        summary["per_fold_rmse"] = {c.name: [_round(f[c.name]["rmse"]) for f in per_fold] for c in cands}
    return summary


def _mean_finite(values: list[float]) -> float:
    """Mean over the folds where the metric exists (e.g. folds without cold users have no cold RMSE); else NaN."""
    ok = [v for v in values if np.isfinite(v)]
    return _round(float(np.mean(ok))) if ok else float("nan")


def _round(x: float) -> float:
    return round(x, 4) if np.isfinite(x) else x
