"""A 1,000-movie batch in process, six-feature against personalised: the model calls alone, and their trees alone.

    python bench/batch_trees.py [--rounds 5] [--batches 40]

Builds what ``bench/run.py`` sends in its "batch 1000" and "personalised batch 1000" scenarios (movie ids drawn
from 1-200,000, so most are movies the model does not know; one user with 5 ratings, seeded through /feedback as
the benchmark does), on the bundled models, then times, per batch and best of ``--rounds`` passes over
``--batches`` different batches:

- ``six-feature predict``: the six-feature model's ``predict`` on the batch's (1000, 6) features;
- ``user views call``: ``UserViews.predict(model, user, ids, x)``, what the service calls for a known user (the id
  lookup, the 20-input matrix, the trees, the clip and the conversion to 0-10);
- ``trees``: ``Forest.predict`` alone, on the (1000, 6) matrices and on what the users' views give its trees (the
  (1000, 12) inputs that differ between movies, and the user's own).

Different batches in turn, not one batch repeated: one batch over and over keeps its table rows in the cache and
its branches predicted, and runs 30% faster than the service ever sees.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from asgi_direct import drive
from run import batch_body

from moviematch_ml.api.app import create_app
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.logs import configure_logging
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR
from moviematch_ml.settings import Settings


def best(fn: Callable[[], object], batches: int, rounds: int) -> float:
    """Best of ``rounds`` timings of ``fn`` (one pass over the batches), in us per batch."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / batches * 1e6


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mmtrees-"))
    settings = Settings(model_path=BUNDLED_MODEL_DIR, database_url=f"sqlite:///{tmp / 'db.sqlite3'}")
    configure_logging("warning", stream=io.StringIO())
    app = create_app(settings)
    rng = random.Random(7)
    async with app.router.lifespan_context(app):
        ratings = [{"user_id": 1, "movie_id": rng.randint(1, 2000), "rating": rng.randint(2, 10)} for _ in range(5)]
        await drive(app, [orjson.dumps({"ratings": ratings})], "/feedback", 1)
        views = app.state.user_views
        models = app.state.models.current
        six, model = models.six, models.personalized
        batches = []
        for _ in range(args.batches):
            movies: Any = batch_body(rng, 1000, 1)["movies"]
            x = np.array([[m[name] for name in FEATURE_NAMES] for m in movies], dtype=np.float64)
            batches.append(([m["movie_id"] for m in movies], x))
        ensemble = model.booster.ensemble
        captured: list[tuple[Any, Any, Any]] = []  # what the users' views give the trees: (x, columns, values)
        ensemble.predict_raw_columns = lambda *a: (
            captured.append(a),
            type(ensemble).predict_raw_columns(ensemble, *a),
        )[1]
        for ids, x in batches:
            views.predict(model, 1, ids, x)
        del ensemble.predict_raw_columns
        personal_forest = ensemble.forest
        six_forest = six.ensemble.forest
        out = np.empty(1000)
        n, r = len(batches), args.rounds
        print(f"{n} batches of 1,000 movies, best of {r} rounds, us per batch:")
        print(f"  six-feature predict   {best(lambda: [six.predict(x) for _, x in batches], n, r):8.1f}")
        call = best(lambda: [views.predict(model, 1, ids, x) for ids, x in batches], n, r)
        print(f"  user views call       {call:8.1f}")
        print(f"  trees, six-feature    {best(lambda: [six_forest.predict(x, out) for _, x in batches], n, r):8.1f}")
        personal = best(lambda: [personal_forest.predict(a[0], out, a[1], a[2]) for a in captured], n, r)
        print(f"  trees, personalised   {personal:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=40)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
