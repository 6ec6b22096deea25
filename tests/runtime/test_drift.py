"""Drift bins: edges from a card's statistics, the bin of a value, the training shares, and PSI, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, FeatureStats, read_card
from moviematch_ml.runtime.drift import PSI_FLOOR, DriftBins, feature_bins, training_shares

# Repeated quantiles (p01 = p05, p50 = p75) collapse: the edges are 0, 1, 2, 5, 8, 9 and 10.
STATS = FeatureStats(
    min=0.0,
    max=10.0,
    mean=4.0,
    quantiles={"p01": 1.0, "p05": 1.0, "p25": 2.0, "p50": 5.0, "p75": 5.0, "p95": 8.0, "p99": 9.0},
)
LABELS = ("below", "[0,1)", "[1,2)", "[2,5)", "[5,8)", "[8,9)", "[9,10)", "[10,10]", "above")


def test_bins_are_the_distinct_edges_with_the_range_around_them() -> None:
    bins = DriftBins.of("x", STATS)
    assert bins.edges == (0.0, 1.0, 2.0, 5.0, 8.0, 9.0, 10.0)
    assert bins.labels == LABELS


def test_each_value_falls_in_one_bin() -> None:
    bins = DriftBins.of("x", STATS)
    values = np.array([-1.0, 0.0, 0.5, 1.0, 4.99, 5.0, 9.5, 10.0, 10.0001, 1e9])
    assert bins.index(values).tolist() == [0, 1, 1, 2, 3, 4, 6, 7, 8, 8]
    assert bins.counts(values).tolist() == [1, 2, 1, 1, 1, 0, 1, 1, 2]


def test_shares_read_off_the_quantile_levels_without_recorded_ones() -> None:
    # An edge's level is the lowest at which it appears: 0 -> 0 (min), 1 -> 0.01, 2 -> 0.25, 5 -> 0.50, 8 -> 0.95,
    # 9 -> 0.99, 10 -> 1 (the max, which no quantile reaches). A bin's share is the difference of its edges' levels.
    bins = DriftBins.of("x", STATS)
    assert not bins.exact
    assert bins.shares == pytest.approx((0.0, 0.01, 0.24, 0.25, 0.45, 0.04, 0.01, 0.0, 0.0))
    assert sum(bins.shares) == pytest.approx(1.0)


def test_a_flag_has_one_bin_per_value() -> None:
    flag = FeatureStats(
        min=0.0, max=1.0, mean=0.1, quantiles={"p01": 0, "p05": 0, "p25": 0, "p50": 0, "p75": 0, "p95": 1, "p99": 1}
    )
    bins = DriftBins.of("is_favorite_genre", flag)
    assert bins.labels == ("below", "[0,1)", "[1,1]", "above")
    assert bins.counts(np.array([0.0, 0.0, 1.0])).tolist() == [0, 2, 1, 0]
    # From the levels alone: 1 first appears at p95, so 95% of zeros; the true 90% needs the recorded shares.
    assert bins.shares == pytest.approx((0.0, 0.95, 0.05, 0.0))


def test_recorded_shares_are_used_whatever_their_key_order() -> None:
    recorded = {"above": 0.0, "below": 0.0, "[1,1]": 0.1, "[0,1)": 0.9}  # cards are written with sorted keys
    flag = FeatureStats(
        min=0.0,
        max=1.0,
        mean=0.1,
        quantiles={"p01": 0, "p05": 0, "p25": 0, "p50": 0, "p75": 0, "p95": 1, "p99": 1},
        bin_shares=recorded,
    )
    bins = DriftBins.of("is_favorite_genre", flag)
    assert bins.exact
    assert bins.shares == (0.0, 0.9, 0.1, 0.0)
    # Shares of other bins (a card edited by hand) are not these bins' shares: the levels answer instead.
    wrong = flag.model_copy(update={"bin_shares": {"[0,2)": 1.0}})
    assert not DriftBins.of("is_favorite_genre", wrong).exact


def test_training_shares_count_the_training_column() -> None:
    bins = DriftBins.of("x", STATS)
    shares = training_shares(bins, np.array([0.0, 1.5, 1.5, 3.0, 6.0, 6.0, 6.0, 10.0]))
    assert shares == {
        "below": 0.0,
        "[0,1)": 0.125,
        "[1,2)": 0.25,
        "[2,5)": 0.125,
        "[5,8)": 0.375,
        "[8,9)": 0.0,
        "[9,10)": 0.0,
        "[10,10]": 0.125,
        "above": 0.0,
    }


def test_psi_by_hand() -> None:
    bins = DriftBins.of("x", STATS)
    # 20 inputs: 5 in [1,2), 5 in [2,5), 10 in [5,8). Empty bins are floored at 1e-4 on both sides.
    counts = [0, 0, 5, 5, 10, 0, 0, 0, 0]
    terms = [
        (PSI_FLOOR - 0.01) * math.log(PSI_FLOOR / 0.01),  # [0,1) and [9,10): 0.045591 each
        (0.25 - 0.24) * math.log(0.25 / 0.24),  # [1,2): 0.000408
        (0.50 - 0.45) * math.log(0.50 / 0.45),  # [5,8): 0.005268
        (PSI_FLOOR - 0.04) * math.log(PSI_FLOOR / 0.04),  # [8,9): 0.239059
    ]
    assert bins.psi(counts) == pytest.approx(2 * terms[0] + terms[1] + terms[2] + terms[3])
    assert bins.psi(counts) == pytest.approx(0.335918, abs=1e-6)
    # Inputs spread like the training data: no drift.
    assert bins.psi([0, 1, 24, 25, 45, 4, 1, 0, 0]) == pytest.approx(0.0, abs=1e-12)


def test_the_bundled_card_records_exact_shares_for_every_feature() -> None:
    card = read_card(BUNDLED_MODEL_DIR)
    bins = feature_bins(card.feature_stats)
    assert sorted(b.feature for b in bins) == sorted(FEATURE_NAMES)
    for b in bins:
        assert b.exact, b.feature
        assert sum(b.shares) == pytest.approx(1.0, abs=1e-5), b.feature
        assert b.shares[0] == b.shares[-1] == 0.0  # nothing was outside the training range in training
    flag = next(b for b in bins if b.feature == "is_favorite_genre")
    # The flag's share of ones is its training mean.
    assert dict(zip(flag.labels, flag.shares, strict=True))["[1,1]"] == card.feature_stats["is_favorite_genre"].mean
