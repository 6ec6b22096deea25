"""The personalised cost ratios alone, each side driven in turn in short slices: machine drift cancels out.

    python bench/ratio.py [--slices 10] [--seconds 2] [--workers 2]

``bench/run.py`` drives each scenario for 10 s, one after the other; on a shared machine whose speed moves by
5-10% over seconds to minutes (and once by a third for 10 s), a ratio of two such runs moves with it. Here the
service is started as ``run.py --as-deployed`` starts it, seeded the same way (200 users x 5 ratings through
/feedback), and each pair is driven alternately, ``--slices`` times ``--seconds`` per side with the same bodies,
connections and wrk script as ``run.py``: "predict, unique bodies" against "personalised predict" (64
connections), and "batch 1000" against "personalised batch 1000" (8 connections). Prints, per pair, the ratio
of the two sides' total requests, and the spread of the per-slice ratios. Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    LUA,
    batch_body,
    features,
    free_port,
    hide_packages,
    post_json,
    run_wrk,
    start,
    stop,
    wait_ready,
    write_bodies,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(42)
    tmp = Path(tempfile.mkdtemp(prefix="mmratio-"))
    lua = tmp / "bodies.lua"
    lua.write_text(LUA)

    def bodies(name: str, items: list[object]) -> Path:
        return write_bodies(tmp, name, items)

    users = list(range(1, 201))
    movies = [rng.randint(1, 2000) for _ in range(5000)]
    pairs = [
        (
            "predict",
            "/predict",
            64,
            bodies("unique", [features(rng) for _ in range(200_000)]),
            bodies("psingle", [{**features(rng), "user_id": rng.choice(users), "movie_id": m} for m in movies]),
        ),
        (
            "batch 1000",
            "/predict-batch",
            8,
            bodies("batch", [batch_body(rng, 1000) for _ in range(40)]),
            bodies("pbatch", [batch_body(rng, 1000, rng.choice(users)) for _ in range(40)]),
        ),
    ]
    env = {**os.environ, "LOG_LEVEL": "info", "DATABASE_URL": f"sqlite:///{tmp / 'ratio.sqlite3'}"}
    hide_packages(env, tmp)
    port = free_port()
    cmd = [sys.executable, "-m", "moviematch_ml.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = start([*cmd, "--workers", str(args.workers)], env, tmp / "service.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health/ready", 60)
        for u in users:
            ratings = [{"user_id": u, "movie_id": rng.randint(1, 2000), "rating": rng.randint(2, 10)} for _ in range(5)]
            post_json(base + "/feedback", {"ratings": ratings})
        for name, path, conns, six, personal in pairs:
            run_wrk(base + path, six, conns, 1, lua)  # warm-up of both sides
            run_wrk(base + path, personal, conns, 1, lua)
            totals = [0.0, 0.0]
            ratios = []
            for _ in range(args.slices):
                rps = [run_wrk(base + path, side, conns, args.seconds, lua)[0] for side in (six, personal)]
                totals[0] += rps[0]
                totals[1] += rps[1]
                ratios.append(rps[0] / rps[1])
            print(
                f"{name}: six-feature {totals[0] / args.slices:,.0f} req/s, personalised "
                f"{totals[1] / args.slices:,.0f} req/s, cost ratio {totals[0] / totals[1]:.3f} "
                f"(slices: median {statistics.median(ratios):.3f}, {min(ratios):.3f}-{max(ratios):.3f})"
            )
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
