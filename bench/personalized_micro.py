"""Per-call cost of the personalised scorer: one user, a batch of movies, as the service calls it.

    python bench/personalized_micro.py [--model DIR] [--batch 1000] [--repeat 300]

Without --model it trains on movielens-small first (about half a minute). Prints median and p99 per call of
``predict_user`` (fold-in + features + one LightGBM call), of ``update_user_state`` and of the bulk id lookup.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from moviematch_ml.cf import lookup
from moviematch_ml.personalized import PersonalizedModel, update_user_state, user_state


def _timed(fn: object, repeat: int) -> tuple[float, float]:
    assert callable(fn)
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    arr = np.array(times) * 1e3
    return float(np.median(arr)), float(np.quantile(arr, 0.99))


def _train() -> PersonalizedModel:
    from moviematch_ml.data import load_movielens_small
    from moviematch_ml.evaluation import feature_frame
    from moviematch_ml.features import FEATURE_NAMES
    from moviematch_ml.personalized import PersonalizedConfig
    from moviematch_ml.training import TrainConfig

    ds = load_movielens_small()
    frame = feature_frame(ds, TrainConfig.model_validate({}))
    t0 = time.perf_counter()
    model = PersonalizedModel.fit(
        frame["user_id"].to_numpy(),
        frame["movie_id"].to_numpy(),
        frame["rating"].to_numpy(dtype=np.float64),
        frame["timestamp"].to_numpy(dtype=np.float64),
        frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64),
        PersonalizedConfig.model_validate({}),
        ds.scale,
    )
    print(f"trained on {len(frame)} ratings in {time.perf_counter() - t0:.1f} s")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a saved personalised model directory (default: train one)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    model = PersonalizedModel.load(args.model) if args.model else _train()
    rng = np.random.default_rng(0)
    items = np.asarray(model.mf.item_ids)
    rated = rng.choice(items, 50, replace=False)
    state = user_state(
        model.mf, rated, rng.choice(np.arange(1, 11) / 2, 50), np.arange(50, dtype=np.float64) * 60.0 + 1.4e9
    )
    movies = rng.choice(items, args.batch, replace=False).tolist()
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
    med, p99 = _timed(lambda: model.predict_user(state, movies, x6), args.repeat)
    print(f"predict_user, {args.batch} movies: median {med:.3f} ms, p99 {p99:.3f} ms per call")
    med, p99 = _timed(lambda: model.predict_user(state, movies[:1], x6[:1]), args.repeat)
    print(f"predict_user, 1 movie: median {med:.3f} ms, p99 {p99:.3f} ms per call")
    med, p99 = _timed(lambda: lookup(model.mf.item_index, movies), args.repeat)
    print(f"movie id lookup, {args.batch} ids: median {med:.3f} ms, p99 {p99:.3f} ms")
    one = movies[0]
    med, p99 = _timed(lambda: update_user_state(model.mf, state, one, 4.0, 1.5e9), args.repeat)
    print(f"update_user_state: median {med:.3f} ms, p99 {p99:.3f} ms")


if __name__ == "__main__":
    main()
