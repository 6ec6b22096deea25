"""The prediction log's cost: objects its queue keeps in the garbage collector's sight, and the writer's CPU time.

    python bench/journal_write.py [--entries 3000] [--rounds 5] [--database-url URL]

Queues ``--entries`` /predict entries as the request path does (one movie id, the six features, one prediction), then
writes them as the background writer does, ``--rounds`` times, on a SQLite file of its own unless ``--database-url``
names another store. Prints:

- the objects the garbage collector still tracks per queued entry, after a collection: each is walked by every later
  collection of the generation it sits in, and under load (thousands queued for up to a second) they made the
  collections that paused a saturated worker long (docs/operations.md, Overload);
- the writer's CPU time per prediction (median of the rounds), spent in a worker thread holding the GIL, away from
  the event loop.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from moviematch_ml.features import example_matrix
from moviematch_ml.online.journal import Entry, PredictionLog
from moviematch_ml.online.store import FeedbackStore


def entries(n: int, seed: int) -> list[Entry]:
    rng = np.random.default_rng(seed)
    x = example_matrix()
    out = []
    for i in range(n):
        row = x + rng.normal(0.0, 0.01, x.shape)
        user = None if i % 10 else f"user-{i % 2000}"
        rating = round(float(rng.uniform(0, 10)), 3)
        out.append(
            Entry(
                uuid.uuid4().hex,
                time.time(),
                "predict",
                "champion",
                "v",
                user,
                (i % 2000,),
                row,
                (rating,),
                "model",
                None,
            )
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=3000, help="entries queued and written per round (default 3000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--database-url", help="the store (default: a SQLite file of its own)")
    args = ap.parse_args()
    url = args.database_url or f"sqlite:///{Path(tempfile.mkdtemp(prefix='mmjournal-')) / 'log.sqlite3'}"
    store = FeedbackStore.from_url(url)
    store.migrate()
    log = PredictionLog(max_rows=args.entries, share=1.0)
    tracked: list[float] = []
    cpu: list[float] = []
    try:
        for r in range(args.rounds):
            gc.collect()
            before = len(gc.get_objects())
            made = entries(args.entries, seed=r)
            for e in made:
                log.add(e)
            del made, e
            gc.collect()
            tracked.append((len(gc.get_objects()) - before) / args.entries)
            queued = log.take()
            start = time.thread_time()
            log.write(store, queued)
            cpu.append((time.thread_time() - start) / args.entries)
    finally:
        store.close()
    print(f"{args.entries:,} /predict entries a round, {args.rounds} rounds, {store.engine.dialect.name}")
    print(f"objects tracked by the garbage collector per queued entry: {statistics.median(tracked):.2f}")
    print(f"writer CPU per prediction: {statistics.median(cpu) * 1e6:.1f} us (median of the rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
