"""Accuracy metrics of rating predictions: RMSE, MAE and NDCG@10, each in its textbook form."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

FloatArray = npt.NDArray[np.float64]

NDCG_K = 10
NDCG_MIN_RATINGS = 5


def rmse(truth: FloatArray, pred: FloatArray) -> float:
    """sqrt(mean((ŷ - y)²))."""
    return float(np.sqrt(np.mean((pred - truth) ** 2))) if truth.size else float("nan")


def mae(truth: FloatArray, pred: FloatArray) -> float:
    """mean(|ŷ - y|)."""
    return float(np.mean(np.abs(pred - truth))) if truth.size else float("nan")


def ndcg_at_k(
    users: npt.ArrayLike, truth: FloatArray, pred: FloatArray, k: int = NDCG_K, min_ratings: int = NDCG_MIN_RATINGS
) -> float:
    """Mean over users with at least ``min_ratings`` rows of NDCG@k, gain = true rating.

    Per user: order their rows by prediction (descending; ties keep row order), DCG@k = Σ_{i=1..k} y_(i) / log2(i+1);
    IDCG@k is the same sum with the rows ordered by true rating; NDCG = DCG / IDCG (users with IDCG = 0 are
    skipped). NaN if no user qualifies.
    """
    codes = pd.factorize(pd.Series(users))[0].astype(np.int64)
    counts = np.bincount(codes)
    keep = counts[codes] >= min_ratings
    if not keep.any():
        return float("nan")
    codes, truth, pred = codes[keep], truth[keep], pred[keep]
    rows = np.arange(codes.size)

    def dcg(score: FloatArray) -> FloatArray:
        order = np.lexsort((rows, -score, codes))
        c = codes[order]
        start = np.searchsorted(c, c, side="left")
        rank = np.arange(c.size) - start  # 0-based rank within the user
        top = rank < k
        gains = truth[order][top] / np.log2(rank[top] + 2.0)
        sums: FloatArray = np.bincount(c[top], weights=gains, minlength=int(codes.max()) + 1).astype(np.float64)
        return sums

    actual, ideal = dcg(pred), dcg(truth)
    users_kept = np.unique(codes)
    ok = ideal[users_kept] > 0
    return float(np.mean(actual[users_kept][ok] / ideal[users_kept][ok])) if ok.any() else float("nan")
