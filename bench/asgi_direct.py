"""Per-request CPU cost of the whole ASGI stack (middleware, fast path or FastAPI, logging), without a network.

    python bench/asgi_direct.py [--model DIR|bundled] [--requests 20000] [--workload W] [--set KEY=VALUE ...]

Calls the app's ASGI entry point directly in a loop with in-memory receive/send, over bodies made as bench/run.py
makes them; the access log goes to a temporary file. Isolates our per-request work from the HTTP server and the
load generator (useful on a machine too noisy for wrk). Workloads: ``predict`` (5000 different bodies),
``batch1000`` (40 bodies of 1,000 movies), ``ppredict`` and ``pbatch1000`` (the same, with the user_id of one of
200 users who each have 5 ratings, or ``--users N`` with 3 ratings each; needs a model with a personalised part,
e.g. ``--model bundled``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_model import make
from run import batch_body, features

from moviematch_ml.api.app import create_app
from moviematch_ml.logs import configure_logging
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR
from moviematch_ml.settings import Settings


async def drive(app: Any, bodies: list[bytes], path: str, n: int) -> float:
    """CPU seconds per request over ``n`` requests (CPU time, not wall time: robust to other processes' load)."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    start = time.process_time()
    for i in range(n):
        body = bodies[i % len(bodies)]
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 8000),
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive(messages: list[Any] = messages) -> Any:
            return messages.pop() if messages else {"type": "http.disconnect"}

        await app(scope, receive, send)
        sent.clear()
    return (time.process_time() - start) / n


async def main_async(args: argparse.Namespace) -> None:
    if args.model == "bundled":
        model_dir = BUNDLED_MODEL_DIR
    else:
        model_dir = Path(args.model) if args.model else make(Path(tempfile.mkdtemp(prefix="mmmodel-")))
    tmp = Path(tempfile.mkdtemp(prefix="mmasgi-"))
    env: dict[str, Any] = dict(kv.split("=", 1) for kv in args.set)
    settings = Settings(model_path=model_dir, database_url=f"sqlite:///{tmp / 'db.sqlite3'}", **env)
    log_file = (tmp / "access.log").open("w")
    configure_logging(settings.log_level, stream=log_file if not args.log_to_memory else io.StringIO())
    app = create_app(settings)
    rng = random.Random(7)
    users = list(range(1, args.users + 1))
    workload = args.workload
    path = "/predict-batch" if workload.endswith("batch1000") else "/predict"
    if workload == "predict":
        # The 5000 different bodies of bench/run.py, or (--unique) one body per request: no repeats at all.
        n_bodies = args.requests + 2000 if args.unique else 5000
        bodies = [orjson.dumps(features(rng)) for _ in range(n_bodies)]
    elif workload == "ppredict":
        bodies = [
            orjson.dumps({**features(rng), "user_id": rng.choice(users), "movie_id": rng.randint(1, 2000)})
            for _ in range(max(5000, args.requests + 2000) if args.users > 200 else 5000)
        ]
    else:
        user = (lambda: rng.choice(users)) if workload == "pbatch1000" else (lambda: None)
        bodies = [orjson.dumps(batch_body(rng, 1000, user())) for _ in range(40)]
    async with app.router.lifespan_context(app):
        if workload.startswith("p"):
            # As bench/run.py seeds them: 5 ratings for each of the 200 users (3 each for --users above 200).
            per_user = 5 if args.users <= 200 else 3
            ratings = [
                {"user_id": u, "movie_id": rng.randint(1, 2000), "rating": rng.randint(2, 10)}
                for u in users
                for _ in range(per_user)
            ]
            for at in range(0, len(ratings), 1000):
                await drive(app, [orjson.dumps({"ratings": ratings[at : at + 1000]})], "/feedback", 1)
        await drive(app, bodies[-2000:], path, min(2000, args.requests))  # warm-up
        if args.warm and workload == "ppredict":
            # One request per user first: every user's view is cached when the timed requests start.
            warm = [orjson.dumps({**features(rng), "user_id": u, "movie_id": 5}) for u in users]
            await drive(app, warm, path, len(warm))
        per = await drive(app, bodies, path, args.requests)
        cache = app.state.service.cache
        if cache is not None:
            print(f"cache: {cache.hits} hits, {cache.misses} misses, {len(cache)} entries")
    if workload == "predict":
        workload = "unique bodies" if args.unique else "5000 bodies"
    rate = f"{1 / per:,.0f} req/s on one core"
    print(f"{env or 'defaults'}, {workload}: {per * 1e6:.1f} us CPU per {path} request ({rate})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model directory, or 'bundled' (default: a synthetic six-feature model)")
    ap.add_argument("--workload", choices=["predict", "batch1000", "ppredict", "pbatch1000"], default="predict")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a Settings field, e.g. FAST_PATH=false"
    )
    ap.add_argument(
        "--users",
        type=int,
        default=200,
        help="users of the personalised workloads; above 200, ppredict bodies are drawn for every request (the "
        "'20k users' scenario of bench/run.py is --users 20000: most requests then miss the state cache)",
    )
    ap.add_argument(
        "--warm", action="store_true", help="ppredict: one request per user before timing (every user cached)"
    )
    ap.add_argument("--unique", action="store_true", help="a different body for every request (no repeats)")
    ap.add_argument("--log-to-memory", action="store_true", help="write the log lines to memory, not a file")
    args = ap.parse_args()
    args.set = [f"{k.lower()}={v}" for k, v in (kv.split("=", 1) for kv in args.set)]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
