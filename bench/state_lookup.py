"""How long looking up a user's state costs on the embedded default (SQLite), cache missed and hit.

    python bench/state_lookup.py [--users 2000] [--ratings-per-user 50] [--lookups 2000]

Fills a fresh SQLite store with feedback, loads the bundled personalised model, then times
``StatePersonalizer.user_state`` (a miss reads the user's ratings and folds them in; a hit is the in-process cache)
and ``movie_extra`` for a 1,000-movie batch (one bulk query), printing p50 / p99 / max in milliseconds.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from moviematch_ml.feedback import Feedback
from moviematch_ml.model import BUNDLED_MODEL_DIR
from moviematch_ml.state import StatePersonalizer, load_personalized
from moviematch_ml.store import FeedbackStore


def _pct(samples: list[float]) -> str:
    a = np.asarray(samples) * 1000
    return f"p50 {np.percentile(a, 50):.3f} ms  p99 {np.percentile(a, 99):.3f} ms  max {a.max():.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--ratings-per-user", type=int, default=50)
    ap.add_argument("--lookups", type=int, default=2000)
    args = ap.parse_args()

    model = load_personalized(BUNDLED_MODEL_DIR)
    if model is None:
        raise SystemExit("no bundled personalised model")
    movies = [str(m) for m in list(model.mf.item_index)[:5000]]
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="mmstate-"))
    store = FeedbackStore.from_url(f"sqlite:///{tmp / 'state.sqlite3'}")
    t0 = time.perf_counter()
    for u in range(args.users):
        store.add(
            [
                Feedback(f"{u}-{k}", f"user{u}", rng.choice(movies), float(rng.randint(1, 10)), 1e9 + k, None)
                for k in range(args.ratings_per_user)
            ]
        )
    print(
        f"store: {args.users * args.ratings_per_user:,} ratings of {args.users:,} users "
        f"in {time.perf_counter() - t0:.1f} s"
    )

    cold = StatePersonalizer(store, ttl=0)  # every lookup reads the database
    cold.set_model(model)
    warm = StatePersonalizer(store, ttl=3600)
    warm.set_model(model)
    users = [f"user{rng.randrange(args.users)}" for _ in range(args.lookups)]
    for u in users:  # fill the cache, so the "hit" line times hits only
        warm.user_view(model, u)
    for name, p in (("miss (read + fold-in)", cold), ("hit (cached)", warm)):
        samples = []
        for u in users:
            t = time.perf_counter()
            p.user_view(model, u)
            samples.append(time.perf_counter() - t)
        print(f"user state, {name:<22} {_pct(samples)}")
    batch = [rng.choice(movies) for _ in range(1000)]
    for name, refresh in (("refresh (one query)", True), ("cached", False)):
        samples = []
        for _ in range(200):
            if refresh:
                warm._movies = None  # what happens every MOVIE_TTL_SECONDS: all movies' totals read again
            t = time.perf_counter()
            warm.movie_extra(model, batch)
            samples.append(time.perf_counter() - t)
        print(f"movie totals x1000, {name:<22} {_pct(samples)}")


if __name__ == "__main__":
    main()
