"""The replay (prequential) protocol: ratings in time order, each later rating predicted from everything strictly
before it, then revealed, as the running service sees them.

The first 80 % of the ratings are the history (moved forward to the first rating of its timestamp, so no
timestamp is split). Then, one timestamp at a time: every model predicts every rating made at that instant from
what it has learnt so far, and only then are those ratings revealed to all of them. Nothing at or after a
rating's timestamp reaches its prediction: not its own rating, not another rating of the same instant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.offline.baselines import BaselineConfig, Bias, GlobalMean
from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.data import RATING_COLUMNS, Dataset
from moviematch_ml.offline.evaluation import TEMPORAL_TRAIN_FRACTION, EvaluationError, check_predictions
from moviematch_ml.offline.live import ServedModels, ServiceFactory
from moviematch_ml.offline.metrics import mae, ndcg_at_k, rmse
from moviematch_ml.offline.online_models import SECONDS_PER_DAY, OnlineBias, OnlineMF, OnlineModel, Stream
from moviematch_ml.offline.point_in_time import compute_features
from moviematch_ml.offline.progress import QUIET, Progress
from moviematch_ml.runtime.personalized import PersonalizedConfig

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# The learning curve's buckets: how many ratings the user had made before (strictly earlier timestamps).
BUCKETS: Final[tuple[tuple[int, str], ...]] = (
    (0, "0"),
    (1, "1"),
    (2, "2"),
    (3, "3-5"),
    (6, "6-10"),
    (11, "11-20"),
    (21, "21-50"),
    (51, "51+"),
)
BUCKET_LABELS: Final[tuple[str, ...]] = tuple(label for _, label in BUCKETS)
# The peers the per-bucket target names: the online baselines (six_features is the service's own model).
ONLINE_BASELINES: Final[tuple[str, ...]] = ("online_bias", "online_mf")
# Resamples of the users behind each bucket's difference interval (a few milliseconds per bucket).
GAP_RESAMPLES: Final[int] = 2000
# Every model of the replay, in output order: frozen at the history, online baselines, the service's models.
REPLAY_MODELS: Final[tuple[str, ...]] = (
    "global_mean",
    "bias",
    "online_bias",
    "online_mf",
    "six_features",
    "personalized",
)


def bucket_of(n_earlier: npt.ArrayLike) -> IntArray:
    """The learning-curve bucket (an index into BUCKETS) of each count of earlier ratings."""
    lows = np.array([low for low, _ in BUCKETS], dtype=np.int64)
    counts = np.asarray(n_earlier, dtype=np.int64)
    if counts.size and int(counts.min()) < 0:
        raise ValueError("a count of earlier ratings cannot be negative")
    out: IntArray = np.searchsorted(lows, counts, side="right").astype(np.int64) - 1
    return out


def earlier_ratings(users: npt.ArrayLike, timestamps: npt.ArrayLike) -> IntArray:
    """For each rating (rows in time order), how many ratings its user made at strictly earlier timestamps."""
    frame = pd.DataFrame({"u": np.asarray(users), "t": np.asarray(timestamps)})
    out: IntArray = (frame.groupby("u", sort=False)["t"].rank(method="min").to_numpy() - 1).astype(np.int64)
    return out


def history_cut(timestamps: npt.ArrayLike, fraction: float = TEMPORAL_TRAIN_FRACTION) -> int:
    """The first row after the history: ``round(n * fraction)``, moved back to the first rating of its timestamp."""
    ts = np.asarray(timestamps)
    n = len(ts)
    cut = round(n * fraction)
    if not 0 < cut < n:
        raise EvaluationError(f"the replay needs ratings on both sides of the history cut; {n} ratings give {cut}")
    cut = int(np.searchsorted(ts, ts[cut], side="left"))
    if cut == 0:
        raise EvaluationError("every rating has the same timestamp: there is no history to start from")
    return cut


def group_starts(timestamps: npt.ArrayLike, cut: int) -> IntArray:
    """The first row of each distinct timestamp from ``cut`` on, and the end (len)."""
    ts = np.asarray(timestamps)
    later = ts[cut:]
    starts = cut + np.flatnonzero(np.r_[True, later[1:] != later[:-1]])
    out: IntArray = np.append(starts, len(ts)).astype(np.int64)
    return out


def model_metrics(
    truth: FloatArray, pred: FloatArray, users: npt.ArrayLike, cold: npt.NDArray[np.bool_], bucket: IntArray
) -> dict[str, Any]:
    """RMSE, MAE, NDCG@10 over every test rating, RMSE of cold and warm users, and RMSE per learning-curve bucket
    (None for an empty bucket)."""
    curve = {}
    for b, label in enumerate(BUCKET_LABELS):
        sel = bucket == b
        curve[label] = _round(rmse(truth[sel], pred[sel])) if sel.any() else None
    return {
        "rmse": _round(rmse(truth, pred)),
        "mae": _round(mae(truth, pred)),
        "ndcg@10": _round(ndcg_at_k(users, truth, pred)),
        "rmse_cold_users": _round(rmse(truth[cold], pred[cold])) if cold.any() else None,
        "rmse_warm_users": _round(rmse(truth[~cold], pred[~cold])) if (~cold).any() else None,
        "learning_curve_rmse": curve,
    }


def bucket_gaps(
    truth: FloatArray,
    preds: dict[str, FloatArray],
    users: npt.ArrayLike,
    bucket: IntArray,
    *,
    model: str = "personalized",
    peers: Sequence[str] = ONLINE_BASELINES,
    resamples: int = GAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, Any] | None]:
    """For each learning-curve bucket from 1 earlier rating up: ``model``'s RMSE minus the best peer's (the peer
    with the lowest RMSE in that bucket), with a 95 % interval from resampling the bucket's users with
    replacement. A user's ratings move together (one user's errors are not independent), so resampling ratings
    would make the interval too narrow; buckets 1 and 2 hold one rating per user, where both are the same.
    None for an empty bucket."""
    rng = np.random.default_rng(seed)
    who = np.asarray(users)
    out: dict[str, dict[str, Any] | None] = {}
    for b, label in enumerate(BUCKET_LABELS):
        if b == 0:  # no earlier rating: nobody to personalise
            continue
        sel = np.flatnonzero(bucket == b)
        if not len(sel):
            out[label] = None
            continue
        inverse = np.unique(who[sel], return_inverse=True)[1].reshape(-1)
        n = np.bincount(inverse).astype(np.float64)
        sse = {
            name: np.bincount(inverse, weights=(preds[name][sel] - truth[sel]) ** 2).astype(np.float64)
            for name in (model, *peers)
        }
        best = min(peers, key=lambda name: float(sse[name].sum()))
        k = len(n)
        w = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples).astype(np.float64)
        count = w @ n
        diff = np.sqrt((w @ sse[model]) / count) - np.sqrt((w @ sse[best]) / count)
        point = math.sqrt(sse[model].sum() / n.sum()) - math.sqrt(sse[best].sum() / n.sum())
        low, high = np.percentile(diff, [2.5, 97.5])
        out[label] = {
            "best_peer": best,
            "difference": _round(point),
            "ci95": [_round(float(low)), _round(float(high))],
            "users": k,
        }
    return out


def _round(x: float) -> float:
    return round(x, 4) if np.isfinite(x) else x


def replay_online(models: Sequence[OnlineModel], stream: Stream, cut: int) -> tuple[dict[str, FloatArray], float]:
    """Every model's predictions of the stream's rows [cut, n), one timestamp at a time: each model refits when
    it is due (on the rows before that timestamp), predicts the timestamp's rows, and is shown their ratings only
    after that. Returns the predictions by model name and the seconds spent in ``reveal`` (all models)."""
    starts = group_starts(stream.timestamp, cut)
    preds = {model.name: np.full(len(stream) - cut, np.nan) for model in models}
    revealing = 0.0
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        now = float(stream.timestamp[a])
        rows = np.arange(a, b, dtype=np.int64)
        for model in models:
            if model.due(now):
                model.fit(a, now)
            preds[model.name][a - cut : b - cut] = model.predict(rows)
        t0 = time.perf_counter()
        for model in models:  # only now, after every model predicted them
            model.reveal(rows)
        revealing += time.perf_counter() - t0
    return preds, revealing


async def replay_served(served: ServedModels, cut: int) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """``replay_online`` for the service's models: (the service's answers, the six-feature model's, whether the
    personalised model answered) of the rows [cut, n) of ``served.frame``; each timestamp's ratings go through
    /feedback after every one of them was predicted."""
    ts = served.frame["timestamp"].to_numpy(dtype=np.float64)
    starts = group_starts(ts, cut)
    n = len(ts) - cut
    answers, six, personal = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=bool)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        now = float(ts[a])
        if served.due(now):
            served.fit(a, now)
        served.now = now
        rows = np.arange(a, b, dtype=np.int64)
        out = slice(a - cut, b - cut)
        answers[out], six[out], personal[out] = await served.predict(rows)
        await served.reveal(rows)
    return answers, six, personal


def replay(
    dataset: Dataset,
    *,
    refit_days: float | None = None,
    config: TrainConfig | None = None,
    personalized: PersonalizedConfig | None = None,
    models: Sequence[str] = REPLAY_MODELS,
    service: ServiceFactory | None = None,
    directory: Path | None = None,
    validation: bool = False,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Run the replay protocol; returns the JSON-ready summary.

    ``refit_days``: the service's models (``six_features``, ``personalized``) are refitted on every earlier rating
    when that many days have begun since their last fit (None: fitted once, on the history); between fits they
    learn only through /feedback. The online baselines keep their own schedules (a day, a week); ``global_mean``
    and ``bias`` stay as fitted on the history. ``service``: makes the service that runs ``six_features`` and
    ``personalized`` (``online.harness.ServiceHarness``; the CLI passes it: offline does not import the online
    layer). ``directory``: where the service's models are written (default: a temporary directory, removed
    afterwards). ``validation``: replay within the history only (its first 80 % as the history, the rest
    replayed; no rating after the history is read): where settings are chosen, never on the replayed part of the
    whole data.
    """
    unknown = set(models) - set(REPLAY_MODELS)
    if unknown:
        raise EvaluationError(f"unknown replay models {sorted(unknown)}; known: {list(REPLAY_MODELS)}")
    if refit_days is not None and refit_days <= 0:
        raise EvaluationError(f"--refit-days must be a positive number of days, got {refit_days}")
    cfg = config or TrainConfig()
    started = time.perf_counter()
    if validation:
        end = history_cut(dataset.ratings["timestamp"].to_numpy(dtype=np.float64))
        logged = None if dataset.logged is None else dataset.logged.iloc[:end]
        dataset = dataclasses.replace(dataset, ratings=dataset.ratings.iloc[:end].reset_index(drop=True), logged=logged)
    ratings = dataset.ratings.loc[:, list(RATING_COLUMNS)].reset_index(drop=True)
    ts = ratings["timestamp"].to_numpy(dtype=np.float64)
    cut = history_cut(ts)
    n_test = len(ratings) - cut
    n_groups = len(group_starts(ts, cut)) - 1
    served_wanted = "six_features" in models or "personalized" in models
    if served_wanted and service is None:
        raise EvaluationError("six_features and personalized run through the service: pass service=")
    online: list[OnlineModel] = []
    stream = Stream.of(ratings)
    if "online_bias" in models:
        online.append(OnlineBias(stream))
    if "online_mf" in models:
        online.append(OnlineMF(stream))
    progress.expect(1 + bool(online) + served_wanted)
    history = ratings.iloc[:cut]
    test = ratings.iloc[cut:].reset_index(drop=True)
    preds: dict[str, FloatArray] = {}
    seconds: dict[str, float] = {}
    with progress.step("baselines frozen at the history"):
        for name in ("global_mean", "bias"):
            if name in models:
                t0 = time.perf_counter()
                frozen = GlobalMean.fit(history) if name == "global_mean" else Bias.fit(history, BaselineConfig())
                preds[name] = frozen.predict(test)
                seconds[name] = time.perf_counter() - t0
    per_rating: dict[str, dict[str, float]] = {}
    if online:
        t0 = time.perf_counter()
        with progress.step(f"online baselines: {n_test:,} ratings at {n_groups:,} timestamps"):
            found, revealing = replay_online(online, stream, cut)
        preds.update(found)
        names = "+".join(model.name for model in online)
        seconds[names] = time.perf_counter() - t0
        per_rating[names] = {"state_update_ms": round(1000 * revealing / n_test, 4)}
    summary_served: dict[str, Any] = {}
    if served_wanted:
        t0 = time.perf_counter()
        with progress.step(f"the service's models: {n_test:,} ratings through /predict and /feedback"):
            frame = pd.concat([ratings, compute_features(dataset, cfg.features)], axis=1)
            with tempfile.TemporaryDirectory(prefix="moviematch-replay-") as tmp:
                assert service is not None
                served = ServedModels(
                    frame,
                    dataset.scale,
                    directory or Path(tmp),
                    service,
                    six_config=cfg,
                    config=personalized or PersonalizedConfig.model_validate({}),
                    refit_seconds=None if refit_days is None else refit_days * SECONDS_PER_DAY,
                )
                try:
                    answers, six, personal = asyncio.run(replay_served(served, cut))
                finally:
                    served.close()
        preds["six_features"], preds["personalized"] = six, answers
        seconds["six_features+personalized"] = time.perf_counter() - t0
        summary_served = {"personalized_answered": int(personal.sum()), "service_fits": served.fits}
        per_rating["personalized"] = {
            # The state update: /feedback storing the rating; the user's view is then rebuilt from the store by
            # their next /predict, whose cost is in predict_ms with the prediction itself.
            "state_update_ms": round(1000 * served.seconds["feedback"] / n_test, 4),
            "predict_ms": round(1000 * served.seconds["predict"] / n_test, 4),
        }

    truth = test["rating"].to_numpy(dtype=np.float64)
    users = test["user_id"].to_numpy()
    cold = ~test["user_id"].isin(set(history["user_id"].tolist())).to_numpy()
    bucket = bucket_of(earlier_ratings(ratings["user_id"].to_numpy(), ts)[cut:])
    results = {}
    for name in [m for m in REPLAY_MODELS if m in preds and m in models]:
        pred = check_predictions(name, preds[name], n_test, allow_missing=False)
        results[name] = model_metrics(truth, pred, users, cold, bucket)
    gaps: dict[str, Any] = {}
    if "personalized" in results and all(name in results for name in ONLINE_BASELINES):
        gaps["personalized_vs_best_online"] = bucket_gaps(truth, preds, users, bucket)
    summary: dict[str, Any] = {
        "protocol": "replay",
        "validation": validation,
        "dataset": dataset.name,
        "n_ratings": len(ratings),
        "n_history": cut,
        "n_test": n_test,
        "timestamps": n_groups,
        "cold_user_test_ratings": int(cold.sum()),
        "refit_days": refit_days,
        "rating_scale": dataset.scale.model_dump(mode="json"),
        "bucket_test_ratings": {label: int((bucket == b).sum()) for b, label in enumerate(BUCKET_LABELS)},
        "models": results,
        **summary_served,
        **gaps,
        "per_rating": per_rating,
    }
    seconds["total"] = time.perf_counter() - started
    summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return summary
