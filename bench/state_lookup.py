"""How long looking up a user's state costs on the embedded default (SQLite), cache missed and hit, and how many
bytes a cached user takes.

    python bench/state_lookup.py [--users 2000] [--ratings-per-user 50] [--lookups 2000] [--cached-users 20000]

Fills a fresh SQLite store with feedback, loads the bundled personalised model, then times
``UserViews.user_view`` (a miss reads the user's ratings and folds them in; a hit is the in-process cache),
the miss's two parts (the read, ``FeedbackStore.user_ratings``; the view built from the rows) and the movie table
with the store's totals (one bulk query), printing p50 / p99 / max in milliseconds. Last, the memory of
``--cached-users`` views of users with ``--ratings-per-user`` ratings each (tracemalloc): per view, and per entry
of the users' views cache (the view, its user id and the cache's bookkeeping).
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from moviematch_ml.online.caches import TTLCache
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.models import load_personalized
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.online.user_views import UserViews
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR
from moviematch_ml.runtime.personalized import PersonalizedModel, UserView


def _pct(samples: list[float]) -> str:
    a = np.asarray(samples) * 1000
    return f"p50 {np.percentile(a, 50):.3f} ms  p99 {np.percentile(a, 99):.3f} ms  max {a.max():.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--ratings-per-user", type=int, default=50)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--cached-users", type=int, default=20_000, help="views whose memory is measured (0: skip)")
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

    cold = UserViews(store, ttl=0)  # every lookup reads the database
    warm = UserViews(store, ttl=3600)
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
    _miss_parts(cold, model, users)
    # What building views ahead costs a worker (keep_warm): one poll of the change feed naming every user, then warm
    # until the queue is empty. The views every worker builds for each user who rates, instead of on their request.
    ahead = UserViews(store, ttl=1e-9, max_users=args.users)
    ahead.warm_ahead = True
    # The first poll queues the users of the latest rows (as many as the cache holds: here, every user).
    t = time.perf_counter()
    ahead.sync()
    polled = time.perf_counter() - t
    queued = ahead.to_warm
    t = time.perf_counter()
    ahead.warm(model, 3600.0)
    built = time.perf_counter() - t
    print(
        f"warm ahead, {queued:,} users: the poll {polled * 1000:.1f} ms, their views {built * 1000:.1f} ms "
        f"({built / max(queued, 1) * 1e6:.1f} us each)"
    )
    for name, fresh in (("refresh (one query)", True), ("cached", False)):
        samples = []
        for _ in range(200):
            # A fresh personaliser reads every movie's totals, as one does every MOVIE_TTL_SECONDS.
            p = UserViews(store, ttl=3600) if fresh else warm
            t = time.perf_counter()
            p.movie_table(model)
            samples.append(time.perf_counter() - t)
        print(f"movie table, {name:<29} {_pct(samples)}")
    if args.cached_users:
        _view_bytes(model, movies, args.cached_users, args.ratings_per_user)


def _miss_parts(p: UserViews, model: PersonalizedModel, users: list[str]) -> None:
    """A miss, taken apart: the store read, then the view from the rows it returned."""
    read, build = [], []
    to_api = model.scale.to_api
    for u in users:
        t = time.perf_counter()
        rows = p.store.user_ratings(u)
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        ids, ratings, times = zip(*rows, strict=True)
        model.user_view_of_ratings(model.store_keys(list(ids)), [r / to_api for r in ratings], list(times))
        build.append(time.perf_counter() - t)
    print(f"  of which the read          {_pct(read)}")
    print(f"  of which the view          {_pct(build)}")


def _view_bytes(model: PersonalizedModel, movies: list[str], n_users: int, per_user: int) -> None:
    rng = random.Random(1)
    key = int if isinstance(next(iter(model.mf.item_index)), int) else str
    inputs = [
        ([key(rng.choice(movies)) for _ in range(per_user)], [rng.randint(1, 10) / 2 for _ in range(per_user)])
        for _ in range(n_users)
    ]
    times = [1e9 + k for k in range(per_user)]
    cache: TTLCache[str, UserView | None] = TTLCache(3600.0, n_users)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    views = [model.user_view_of_ratings(ids, ratings, times) for ids, ratings in inputs]
    gc.collect()
    built = tracemalloc.get_traced_memory()[0]
    for k, view in enumerate(views):
        cache.put(f"user{k}", view)
    del views
    gc.collect()
    cached = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(
        f"memory, {n_users:,} users of {per_user} ratings: {(built - before) / n_users:,.0f} bytes per view, "
        f"{(cached - before) / n_users:,.0f} per cached user (view, user id, cache entry)"
    )


if __name__ == "__main__":
    main()
