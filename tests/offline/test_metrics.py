"""Accuracy metrics: RMSE, MAE and NDCG@10 against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moviematch_ml.offline.metrics import mae, ndcg_at_k, rmse


def test_rmse_and_mae() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([2.0, 2.0, 1.0, 4.0])
    assert rmse(y, p) == pytest.approx(math.sqrt((1 + 0 + 4 + 0) / 4))
    assert mae(y, p) == pytest.approx((1 + 0 + 2 + 0) / 4)


def test_ndcg_by_hand() -> None:
    users = ["a"] * 5 + ["b"] * 4 + ["c"] * 5
    truth = np.array([5, 4, 3, 2, 1, 5, 1, 1, 1, 3, 2, 5, 4, 1], dtype=float)
    pred = np.array([1, 2, 3, 4, 5, 0, 9, 9, 9, 3, 2, 5, 4, 1], dtype=float)
    # User a is ranked exactly backwards; b has 4 ratings (< 5, skipped); c is ranked perfectly (NDCG 1).
    dcg_a = 1 / math.log2(2) + 2 / math.log2(3) + 3 / math.log2(4) + 4 / math.log2(5) + 5 / math.log2(6)
    idcg_a = 5 / math.log2(2) + 4 / math.log2(3) + 3 / math.log2(4) + 2 / math.log2(5) + 1 / math.log2(6)
    assert ndcg_at_k(users, truth, pred) == pytest.approx((dcg_a / idcg_a + 1.0) / 2)


def test_ndcg_cuts_at_k_and_ties_keep_row_order() -> None:
    truth = np.array([1.0] * 10 + [5.0, 5.0])
    pred = np.array([2.0] * 10 + [1.0, 1.0])
    dcg = sum(1 / math.log2(i + 1) for i in range(1, 11))
    idcg = 5 + 5 / math.log2(3) + sum(1 / math.log2(i + 1) for i in range(3, 11))
    assert ndcg_at_k(["u"] * 12, truth, pred, k=10) == pytest.approx(dcg / idcg)
    # Equal predictions: rows keep their order, so the two 5s at the end fall outside the top 10 too.
    assert ndcg_at_k(["u"] * 12, truth, np.zeros(12), k=10) == pytest.approx(dcg / idcg)
    assert math.isnan(ndcg_at_k(["u"] * 4, truth[:4], pred[:4]))
