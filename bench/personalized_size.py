"""What a smaller personalised model costs in accuracy and saves per prediction, on validation data only.

    python bench/personalized_size.py [--configs 300:0.05,200:0.075:15,...] [--leaves 31] [--repeat 15] [--json PATH]

The validation split is built as docs/personalized.md describes the one behind its "What did not help" table:
fold 1's training part of ``moviematch-ml evaluate --protocol kfold`` (movielens-small, 5 folds, seed 42, online
features), of which a seeded 20% is held out (``validation_split``); the test fold is never read. The code that
made that table is not in the repository, so its absolute figures need not match these; compare configs with the
paired column. Each config (trees:learning rate) is trained on the other 80% as evaluation trains it
(``stacking.fit_frame``) and scored on the held-out rows (``predict_pairs``): RMSE on the rows it
personalises, overall with the six-feature model (fitted on the same 80%) answering the others as
``PersonalizedCandidate`` does, and the overall RMSE minus the first config's on the same rows with its standard
error over users. It is then saved, loaded back with ``PersonalizedModel.load`` (the serving path: the trees run in
``model.TreeEnsemble``) and its ``booster.predict`` timed on 1,000 and on 1 validation row, together with the
bundled six-feature model, the reference of the speed target. About 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.boosting import TrainConfig
from moviematch_ml.offline.candidates import SixFeatureCandidate
from moviematch_ml.offline.data import load_movielens_small
from moviematch_ml.offline.evaluation import kfold_split, split_frames
from moviematch_ml.offline.metrics import rmse
from moviematch_ml.offline.stacking import fit_frame, predict_pairs, state_inputs
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, RatingScale
from moviematch_ml.runtime.factors import lookup
from moviematch_ml.runtime.personalized import PersonalizedConfig, PersonalizedModel
from moviematch_ml.runtime.predictor import load_six_features
from moviematch_ml.runtime.trees import EnsembleBooster

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

SEED = 42
FOLDS = 5
DEFAULT_CONFIGS = "300:0.05,200:0.075,150:0.1,120:0.12,100:0.15,80:0.2,60:0.25"
BATCH_ROWS = 1000
BOOTSTRAP_DRAWS = 1000


@dataclass(frozen=True)
class Result:
    """One config's validation accuracy and serving cost."""

    n_estimators: int
    learning_rate: float
    num_leaves: int
    rmse_known_users: float
    rmse_overall: float
    delta_vs_first: float
    delta_se: float
    us_per_batch: float
    us_per_row: float
    train_seconds: float
    runtime: str


def parse_configs(text: str) -> list[tuple[int, float, int | None]]:
    """``"300:0.05,200:0.075:15"`` -> [(300, 0.05, None), (200, 0.075, 15)]: trees, learning rate, and leaves
    (None: ``--leaves``)."""
    out: list[tuple[int, float, int | None]] = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3):
            raise argparse.ArgumentTypeError(
                f"config {item!r}: expected TREES:LEARNING_RATE[:LEAVES], e.g. 300:0.05 or 200:0.1:15"
            )
        out.append((int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return out


def validation_split(seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame, RatingScale]:
    """(fit rows, validation rows, scale): fold 1's training part of the k-fold protocol, cut 80/20 at random.

    The frame and fold come from ``evaluation.split_frames`` with the arguments ``evaluate --protocol kfold``
    passes, so every row's six features are the ones evaluation gives it (online: from all earlier ratings).
    """
    dataset = load_movielens_small()
    frame, train_idx, _test_idx = next(
        iter(split_frames(dataset, "kfold", "online", folds=FOLDS, seed=seed, config=TrainConfig(seed=seed)))
    )
    # One fold of evaluation's own splitter over the training part: a seeded 20% (1 of 5), the rest to fit on.
    fit_pos, valid_pos = kfold_split(len(train_idx), FOLDS, seed)[0]
    fit_idx, valid_idx = train_idx[fit_pos], train_idx[valid_pos]
    fit = frame.iloc[fit_idx].reset_index(drop=True)
    valid = frame.iloc[valid_idx].reset_index(drop=True)
    return fit, valid, dataset.scale


def model_inputs(model: PersonalizedModel, valid: pd.DataFrame, mask: npt.NDArray[np.bool_]) -> FloatArray:
    """The 20 inputs of the personalised rows, as ``predict_pairs`` builds them for the trees."""
    rows = valid.loc[mask]
    u = lookup(model.mf.user_index, rows["user_id"].to_numpy())
    i = lookup(model.mf.item_index, rows["movie_id"].to_numpy())
    t = rows["timestamp"].to_numpy(dtype=np.float64)
    x6 = rows.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    return state_inputs(model.state, x6, u, i, t)


def paired_delta(truth: FloatArray, base: FloatArray, pred: FloatArray, users: npt.ArrayLike) -> tuple[float, float]:
    """RMSE(pred) - RMSE(base) on the same rows, and its standard error from a bootstrap over users.

    Users, not rows, are resampled: a user's rows share their state, so their errors are not independent.
    """
    codes = pd.factorize(pd.Series(users))[0]
    n_users = int(codes.max()) + 1
    count = np.bincount(codes, minlength=n_users).astype(np.float64)
    sq_base = np.bincount(codes, weights=(base - truth) ** 2, minlength=n_users)
    sq_pred = np.bincount(codes, weights=(pred - truth) ** 2, minlength=n_users)
    rng = np.random.default_rng(SEED)
    draws = np.stack(
        [np.bincount(rng.integers(0, n_users, n_users), minlength=n_users) for _ in range(BOOTSTRAP_DRAWS)]
    )
    n = draws @ count
    boot = np.sqrt(draws @ sq_pred / n) - np.sqrt(draws @ sq_base / n)
    return rmse(truth, pred) - rmse(truth, base), float(np.std(boot, ddof=1))


def median_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Median over ``repeat`` timeit runs of the time per call, in microseconds."""
    fn()  # warm-up: the evaluator allocates its per-thread buffers on the first batch
    return float(np.median(timeit.repeat(fn, number=number, repeat=repeat))) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", type=parse_configs, default=parse_configs(DEFAULT_CONFIGS), help="TREES:LR[:LEAVES],..."
    )
    parser.add_argument("--leaves", type=int, default=31, help="num_leaves of every config (default 31)")
    parser.add_argument("--repeat", type=int, default=15, help="timeit runs per measurement (default 15)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    t0 = time.perf_counter()
    fit, valid, scale = validation_split()
    truth = valid["rating"].to_numpy(dtype=np.float64)
    blind = valid.drop(columns=["rating"])
    print(f"validation split: fit {len(fit):,} rows, validation {len(valid):,} rows ({time.perf_counter() - t0:.0f} s)")
    # The rows no personalised model answers get the six-feature model, as in PersonalizedCandidate; it does not
    # depend on the personalised config, so it is fitted once.
    six_pred = SixFeatureCandidate(TrainConfig(seed=SEED)).fit_predict(fit, blind, scale)

    results: list[Result] = []
    predictions: list[FloatArray] = []
    timed: list[tuple[Callable[[], object], Callable[[], object]]] = []
    mask: npt.NDArray[np.bool_] | None = None
    batch: FloatArray | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for k, (trees, lr, config_leaves) in enumerate(args.configs):
            leaves = args.leaves if config_leaves is None else config_leaves
            config = PersonalizedConfig(n_estimators=trees, learning_rate=lr, num_leaves=leaves)
            t1 = time.perf_counter()
            model = fit_frame(fit, scale, config)
            train_seconds = time.perf_counter() - t1
            pred, mask = predict_pairs(
                model,
                blind["user_id"].to_numpy(),
                blind["movie_id"].to_numpy(),
                blind["timestamp"].to_numpy(dtype=np.float64),
                blind.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64),
            )
            overall = np.where(mask, pred, six_pred)
            predictions.append(overall)
            directory = Path(tmp) / str(k)
            model.save(directory)
            loaded = PersonalizedModel.load(directory)
            x = model_inputs(loaded, blind, mask)
            # The loaded trees must be the trees that were scored, or the timing would describe another model.
            if not np.allclose(np.clip(loaded.booster.predict(x), scale.min, scale.max), pred[mask], atol=1e-9):
                raise SystemExit(f"{trees} trees: the loaded model predicts differently from the trained one")
            if batch is None:
                batch = x[:BATCH_ROWS]
            booster = loaded.booster
            timed.append((partial(booster.predict, batch), partial(booster.predict, batch[:1])))
            results.append(
                Result(
                    trees,
                    lr,
                    leaves,
                    rmse(truth[mask], pred[mask]),
                    rmse(truth, overall),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    float("nan"),
                    train_seconds,
                    "numpy" if isinstance(booster, EnsembleBooster) else "lightgbm",
                )
            )
            print(
                f"  {trees} trees, lr {lr}, {leaves} leaves: known-user RMSE {results[-1].rmse_known_users:.4f} "
                f"(trained in {train_seconds:.0f} s)",
                flush=True,
            )
    if mask is None or batch is None:
        raise SystemExit("no config given")

    # Timed last and round-robin, so load from other jobs on the shared machine falls on every config alike.
    six = load_six_features(BUNDLED_MODEL_DIR)
    x6 = np.ascontiguousarray(batch[:, : len(FEATURE_NAMES)])
    timed.append((partial(six.predict_raw, x6), partial(six.predict_raw, x6[:1])))
    per_batch: list[list[float]] = [[] for _ in timed]
    per_row: list[list[float]] = [[] for _ in timed]
    for _ in range(3):
        for k, (fn_batch, fn_row) in enumerate(timed):
            per_batch[k].append(median_us(fn_batch, 20, args.repeat))
            per_row[k].append(median_us(fn_row, 500, args.repeat))
    deltas = [paired_delta(truth, predictions[0], p, blind["user_id"].to_numpy()) for p in predictions]
    results = [
        replace(
            r,
            delta_vs_first=deltas[k][0],
            delta_se=deltas[k][1],
            us_per_batch=float(np.median(per_batch[k])),
            us_per_row=float(np.median(per_row[k])),
        )
        for k, r in enumerate(results)
    ]
    six_batch, six_row = float(np.median(per_batch[-1])), float(np.median(per_row[-1]))
    n_trees_six = six.ensemble.n_trees if six.ensemble is not None else 0

    n_known = int(mask.sum())
    print(
        f"\nvalidation: {len(valid):,} rows of fold 1's training part, {n_known:,} with a known user; "
        f"six-feature model on them: known-user RMSE {rmse(truth[mask], six_pred[mask]):.4f}, "
        f"overall {rmse(truth, six_pred):.4f}"
    )
    header = (
        f"{'trees':>5} {'lr':>6} {'leaves':>6} {'RMSE known':>10} {'RMSE all':>9} {'vs first ± se':>16} "
        f"{'us/1000 rows':>12} {'us/row':>7}"
    )
    print(header)
    for r in results:
        print(
            f"{r.n_estimators:>5} {r.learning_rate:>6g} {r.num_leaves:>6} {r.rmse_known_users:>10.4f} "
            f"{r.rmse_overall:>9.4f} {r.delta_vs_first:>+8.4f} ± {r.delta_se:.4f} "
            f"{r.us_per_batch:>12.0f} {r.us_per_row:>7.1f}"
        )
    print(
        f"six-feature bundled model ({n_trees_six} trees, 6 inputs): {six_batch:.0f} us/1000 rows, {six_row:.1f} us/row"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        out: dict[str, Any] = {
            "split": {
                "protocol": "kfold",
                "folds": FOLDS,
                "fold": 1,
                "seed": SEED,
                "validation_fraction": 1 / FOLDS,
                "n_fit": len(fit),
                "n_validation": len(valid),
                "n_known_user": n_known,
            },
            "six_features": {
                "rmse_known_users": rmse(truth[mask], six_pred[mask]),
                "rmse_overall": rmse(truth, six_pred),
                "bundled_trees": n_trees_six,
                "us_per_batch": six_batch,
                "us_per_row": six_row,
            },
            "batch_rows": BATCH_ROWS,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
