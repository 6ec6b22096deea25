"""Per-call cost of the personalised model's serving path: one user, a batch of movies, as the service calls it.

    python bench/personalized_micro.py [--model DIR] [--batch 1000] [--repeat 300]

Without --model it uses the bundled personalised model. Prints median and p99 per call of
``PersonalizedModel.predict`` (the 20 inputs and one call of the trees) for a batch and for one movie, of
``user_view_of_ratings`` (the fold-in of a user's 50 ratings: what a cache miss costs) and of the movie id lookup.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, PERSONALIZED_DIR
from moviematch_ml.runtime.factors import lookup
from moviematch_ml.runtime.personalized import PersonalizedModel


def _timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    arr = np.array(times) * 1e3
    return float(np.median(arr)), float(np.quantile(arr, 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a saved personalised model directory (default: the bundled one)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    model = PersonalizedModel.load(args.model or BUNDLED_MODEL_DIR / PERSONALIZED_DIR)
    rng = np.random.default_rng(0)
    items = list(model.mf.item_ids)
    rated = [items[k] for k in rng.choice(len(items), 50, replace=False)]
    ratings = (rng.choice(np.arange(1, 11), 50) / 2).tolist()
    times = (np.arange(50, dtype=np.float64) * 60.0 + 1.4e9).tolist()
    view = model.user_view_of_ratings(rated, ratings, times)
    assert view is not None
    table = model.movie_table()
    movies = [items[k] for k in rng.choice(len(items), args.batch, replace=False)]
    x6 = np.column_stack(
        [
            rng.integers(0, 4, args.batch),
            rng.uniform(1, 10, args.batch),
            rng.integers(0, 20000, args.batch),
            rng.integers(0, 2, args.batch),
            rng.uniform(0, 60, args.batch),
            rng.uniform(0, 300, args.batch),
        ]
    ).astype(np.float64)
    now = 1.5e9
    med, p99 = _timed(lambda: model.predict(view, x6, movies, table, now), args.repeat)
    print(f"predict, {args.batch} movies: median {med:.3f} ms, p99 {p99:.3f} ms per call")
    one = x6[:1].copy()
    med, p99 = _timed(lambda: model.predict(view, one, movies[:1], table, now), args.repeat)
    print(f"predict, 1 movie: median {med:.3f} ms, p99 {p99:.3f} ms per call")
    med, p99 = _timed(lambda: model.user_view_of_ratings(rated, ratings, times), args.repeat)
    print(f"user view of 50 ratings (a cache miss's fold-in): median {med:.3f} ms, p99 {p99:.3f} ms")
    med, p99 = _timed(lambda: lookup(model.mf.item_index, movies), args.repeat)
    print(f"movie id lookup, {args.batch} ids: median {med:.3f} ms, p99 {p99:.3f} ms")


if __name__ == "__main__":
    main()
