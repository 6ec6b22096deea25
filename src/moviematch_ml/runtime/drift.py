"""Drift bins: each feature's training-quantile intervals, the training share of each, and the bin of any input.

A feature's card statistics (``FeatureStats``: min, the quantiles p01...p99, max) give its distinct edges
e0 < e1 < ... < ek. Every input value falls in exactly one bin:

    below       v < e0                   (under the training range)
    [ei,ei+1)   ei <= v < ei+1           (one bin per pair of neighbouring edges)
    [ek,ek]     v == ek                  (the training maximum itself: a bin of its own for discrete features)
    above       v > ek                   (over the training range)

Repeated quantiles (a 0/1 flag, a small count) collapse into one edge, so a flag has the bins ``[0,1)`` and
``[1,1]``: its two values. The expected share of each bin is the share of training inputs in it: counted at
training time and written in the card (``FeatureStats.bin_shares``), or, for a card without them, read off the
quantile levels (exact for a continuous feature, approximate where quantiles repeat). The service counts live
inputs per bin (``online/telemetry.py``); the population-stability index of a feature is then

    PSI = sum over bins of (actual - expected) * ln(actual / expected)

with both shares floored at PSI_FLOOR (a bin that is empty on one side would otherwise make it infinite).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from moviematch_ml.runtime.cards import FeatureStats

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

# Both shares are floored at this before the logarithm: the customary 1e-4 of PSI implementations.
PSI_FLOOR: Final[float] = 1e-4
BELOW: Final[str] = "below"
ABOVE: Final[str] = "above"
# The quantile level of each quantile the card records (offline/boosting.py writes these names).
QUANTILE_LEVELS: Final[dict[str, float]] = {
    "p01": 0.01,
    "p05": 0.05,
    "p25": 0.25,
    "p50": 0.50,
    "p75": 0.75,
    "p95": 0.95,
    "p99": 0.99,
}


def _num(x: float) -> str:
    """An edge in a bin label: short, and distinct for the 6-decimal values cards hold."""
    return f"{x:.10g}"


@dataclass(frozen=True, slots=True)
class DriftBins:
    """One feature's bins (see the module docstring): edges, labels and expected (training) shares."""

    feature: str
    edges: tuple[float, ...]  # distinct, increasing: e0 (the training minimum) ... ek (the maximum)
    labels: tuple[str, ...]  # len(edges) + 2: below, [e0,e1), ..., [ek,ek], above
    shares: tuple[float, ...]  # the training share of each bin, same order; sums to 1
    exact: bool  # shares counted on the training data (True) or read off the quantile levels (False)

    @classmethod
    def of(cls, feature: str, stats: FeatureStats) -> DriftBins:
        """The bins of a feature's card statistics, with the card's shares when it records them for these bins."""
        edges = tuple(sorted({stats.min, stats.max, *stats.quantiles.values()}))
        labels = (
            BELOW,
            *(f"[{_num(a)},{_num(b)})" for a, b in itertools.pairwise(edges)),
            f"[{_num(edges[-1])},{_num(edges[-1])}]",
            ABOVE,
        )
        recorded = stats.bin_shares
        if recorded is not None and set(recorded) == set(labels):  # cards store keys sorted: order by label
            return cls(feature, edges, labels, tuple(recorded[label] for label in labels), True)
        return cls(feature, edges, labels, _shares_from_levels(edges, stats), False)

    @property
    def search_edges(self) -> FloatArray:
        """Edges for ``np.searchsorted(..., side="right")``: its answer is the bin index (``index``)."""
        top = self.edges[-1]
        return np.array([*self.edges, math.nextafter(top, math.inf)], dtype=np.float64)

    def index(self, values: FloatArray) -> IntArray:
        """The bin of each value (an index into ``labels``)."""
        return np.searchsorted(self.search_edges, values, side="right")

    def counts(self, values: FloatArray) -> npt.NDArray[np.int64]:
        """How many of ``values`` fall in each bin."""
        return np.bincount(self.index(values), minlength=len(self.labels)).astype(np.int64)

    def psi(self, counts: npt.ArrayLike) -> float:
        """The population-stability index of inputs counted per bin against the training shares (the formula of
        the module docstring; the service's PromQL computes the same from its counters)."""
        n = np.asarray(counts, dtype=np.float64)
        actual = np.maximum(n / n.sum(), PSI_FLOOR)
        expected = np.maximum(np.asarray(self.shares), PSI_FLOOR)
        return float(((actual - expected) * np.log(actual / expected)).sum())


def _shares_from_levels(edges: tuple[float, ...], stats: FeatureStats) -> tuple[float, ...]:
    """Expected shares from the quantile levels alone: P(v < q_p) = p, exact for a continuous feature.

    The level of an edge is the lowest level at which it appears (0 for the minimum, 1 for a maximum no quantile
    reaches). Where quantiles repeat (a discrete feature), the true share of a bin lies between neighbouring
    levels: ``FeatureStats.bin_shares``, counted at training time, replaces this estimate.
    """
    level: dict[float, float] = {stats.max: 1.0}
    for name, value in sorted(stats.quantiles.items(), key=lambda kv: QUANTILE_LEVELS.get(kv[0], 1.0), reverse=True):
        level[value] = QUANTILE_LEVELS.get(name, 1.0)
    level[stats.min] = 0.0
    inner = [level[b] - level[a] for a, b in itertools.pairwise(edges)]
    return (0.0, *inner, 1.0 - level[edges[-1]], 0.0)


def training_shares(bins: DriftBins, values: FloatArray) -> dict[str, float]:
    """The share of ``values`` (a feature's training column) in each bin, by label: ``FeatureStats.bin_shares``."""
    counts = bins.counts(values)
    return {label: round(float(c) / len(values), 6) for label, c in zip(bins.labels, counts, strict=True)}


def feature_bins(stats: Mapping[str, FeatureStats]) -> tuple[DriftBins, ...]:
    """The bins of every feature a card has statistics for, in the card's order."""
    return tuple(DriftBins.of(name, s) for name, s in stats.items())
