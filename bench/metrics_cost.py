"""What the metrics cost a request: each update the hot path makes, against prometheus_client's own metrics.

    python bench/metrics_cost.py [--number 200000]

Times, in one process (the minimum of five repeats, robust to a busy machine), every update a /predict or a
1,000-movie /predict-batch makes with METRICS_ENABLED (online/telemetry.py: a counter increment, a histogram
observation, the drift bins of one row and of 1,000 rows), in memory and in a METRICS_DIR file, and the same
updates with prometheus_client's Counter and Histogram (pre-bound children; then its multiprocess mode). Prints
nanoseconds per update. The whole request's cost with metrics on and off: ``bench/ratio.py --metrics``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import batch_body, features

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.online.counters import Registry
from moviematch_ml.online.telemetry import DRIFT_INPUTS, FAMILIES, HTTP_SECONDS, PREDICTIONS, DriftCounter, Telemetry
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, read_card
from moviematch_ml.runtime.drift import feature_bins


def ns(stmt: Any, number: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e9


def ours(directory: Path | None, number: int, one: np.ndarray, batch: np.ndarray) -> dict[str, float]:
    registry = Registry([*FAMILIES, DRIFT_INPUTS], directory)
    counter = registry.counter(PREDICTIONS, "predict", "default", "v", "model")
    histogram = registry.histogram(HTTP_SECONDS, "/predict", "POST", "2xx")
    card = read_card(BUNDLED_MODEL_DIR)
    bins = feature_bins(card.feature_stats)
    every = DriftCounter(registry, card.version, bins)
    sampled = DriftCounter(registry, card.version, bins, share=0.01)  # the default METRICS_DRIFT_SHARE
    return {
        "counter inc": ns(counter.inc, number),
        "histogram observe": ns(lambda: histogram.observe(0.0031), number),
        "drift, 1 row": ns(lambda: every.add(one), number // 10),
        "drift, 1,000 rows": ns(lambda: every.add(batch), number // 1000),
        # Back to back, nearly every call falls in the pause that follows a counted one: the cost of a request
        # whose inputs are not counted. A busy worker pays that, plus at most the share of its time counting.
        "drift, skipped request": ns(lambda: sampled.add(batch), number // 10),
    }


def one_predict(directory: Path | None, number: int, one: np.ndarray) -> dict[str, float]:
    """Every update a /predict answer makes, through the service's own objects, in the order it makes them."""
    telemetry = Telemetry(directory, drift_share=0.01)
    http = telemetry.serve_routes(["/predict"])
    _, miss = telemetry.cache_lookups("memory")
    inference = telemetry.inference["model"]
    card = read_card(BUNDLED_MODEL_DIR)
    drift = DriftCounter(telemetry.registry, card.version, feature_bins(card.feature_stats), share=0.01)
    every = DriftCounter(telemetry.registry, card.version + "-every", feature_bins(card.feature_stats))

    def request(drift: DriftCounter) -> None:
        miss.inc()
        drift.add(one)
        start = time.perf_counter()
        inference.observe(time.perf_counter() - start)
        telemetry.predicted("predict", "model", card.version, 1)
        http.observe("/predict", "POST", 200, 0.002)

    return {
        "a /predict's updates, its drift skipped": ns(lambda: request(drift), number // 10),
        "a /predict's updates, its drift counted": ns(lambda: request(every), number // 10),
    }


def prometheus(number: int) -> dict[str, float]:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    counter = Counter("c", "c", ["a"], registry=registry).labels("x")
    histogram = Histogram("h", "h", ["a"], buckets=HTTP_SECONDS.buckets, registry=registry).labels("x")
    return {
        "counter inc": ns(counter.inc, number),
        "histogram observe": ns(lambda: histogram.observe(0.0031), number),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=200_000)
    args = ap.parse_args()
    rng = random.Random(3)
    one = np.array([[features(rng)[n] for n in FEATURE_NAMES]], dtype=np.float64)
    movies: Any = batch_body(rng, 1000)["movies"]
    batch = np.array([[m[n] for n in FEATURE_NAMES] for m in movies], dtype=np.float64)
    rows: dict[str, dict[str, float]] = {
        "ours, in memory": ours(None, args.number, one, batch),
        "ours, METRICS_DIR file": ours(Path(tempfile.mkdtemp(prefix="mmcost-")), args.number, one, batch),
        "ours, one /predict, in memory": one_predict(None, args.number, one),
        "prometheus_client": prometheus(args.number),
    }
    # prometheus_client's multiprocess mode is chosen when its module is imported: a fresh interpreter.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mmcost-prom-")
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); from metrics_cost import prometheus; import json; "
        f"print(json.dumps(prometheus({args.number // 4})))"
    )

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rows["prometheus_client, multiprocess"] = json.loads(done.stdout.splitlines()[-1])
    for name, row in rows.items():
        print(f"{name}: " + ", ".join(f"{k} {v:,.0f} ns" for k, v in row.items()))


if __name__ == "__main__":
    main()
