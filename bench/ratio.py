"""The personalised cost ratios alone, each side driven in turn in short slices: machine drift cancels out.

    python bench/ratio.py [--slices 10] [--seconds 2] [--workers 2] [--metrics | --log | --keys]

``bench/run.py`` drives each scenario for 10 s, one after the other; on a shared machine whose speed moves by
5-10% over seconds to minutes (and once by a third for 10 s), a ratio of two such runs moves with it. Here the
service is started as ``run.py --as-deployed`` starts it, seeded the same way (200 users x 5 ratings through
/feedback), and each pair is driven alternately, ``--slices`` times ``--seconds`` per side with the same bodies,
connections and wrk script as ``run.py``: "predict, unique bodies" against "personalised predict" (64
connections), and "batch 1000" against "personalised batch 1000" (8 connections). Prints, per pair, the ratio
of the two sides' total requests, and the spread of the per-slice ratios. Only 127.0.0.1.

``--metrics`` measures what the metrics cost instead: two services, one with METRICS_ENABLED=true (the default,
as deployed) and one with false, and the same six-feature bodies ("predict, unique bodies" and "batch 1000")
driven at each in turn; the ratio is metrics on over off (the target: at least 0.95). ``--log`` does the same
with PREDICTION_LOG (the prediction log written to the store, off the request path; target: at least 0.90), and
``--keys`` with API_KEYS set or not (every request sends a valid key either way: the cost of checking it).

``--against DIR`` compares this checkout with another one (DIR, with its own ``.venv`` where the package is
installed, e.g. a ``git worktree`` of an older commit), both on their defaults and seeded alike, over all four
workloads: the ratio is this checkout's requests over DIR's (what a refactoring or a new feature costs end to end).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def in_turn(
    sides: list[tuple[str, Path]], conns: int, args: argparse.Namespace, lua: Path
) -> tuple[list[float], list[float]]:
    """Drive the two (url, bodies) sides in turn, ``args.slices`` slices of ``args.seconds`` each after a second
    of warm-up each: the mean requests/s of each side, and the per-slice ratios of the first to the second."""
    for url, bodies in sides:
        run_wrk(url, bodies, conns, 1, lua)
    totals = [0.0, 0.0]
    ratios = []
    for _ in range(args.slices):
        rps = [run_wrk(url, bodies, conns, args.seconds, lua)[0] for url, bodies in sides]
        totals[0] += rps[0]
        totals[1] += rps[1]
        ratios.append(rps[0] / rps[1])
    return [t / args.slices for t in totals], ratios


KEY = "bench-key-0123456789abcdef"
# What each comparison turns on for one service and off for the other.
SWITCHES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "metrics": ({"METRICS_ENABLED": "true"}, {"METRICS_ENABLED": "false"}),
    "log": ({"PREDICTION_LOG": "true"}, {"PREDICTION_LOG": "false"}),
    "keys": ({"API_KEYS": f"{KEY}:predict"}, {}),
}


def serve(
    sides: list[tuple[str, str, dict[str, str]]],
    args: argparse.Namespace,
    tmp: Path,
    procs: list[Any],
    bases: list[str],
) -> None:
    """Start one service per (name, python, environment), each with a SQLite store of its own, and wait until all
    are ready; their processes and base URLs are appended to ``procs`` and ``bases`` (the caller stops them)."""
    for side, python, side_env in sides:
        port = free_port()
        cmd = [python, "-m", "moviematch_ml.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        side_env = {**side_env, "DATABASE_URL": f"sqlite:///{tmp / f'{side}.sqlite3'}"}
        procs.append(start([*cmd, "--workers", str(args.workers)], side_env, tmp / f"service-{side}.log"))
        bases.append(f"http://127.0.0.1:{port}")
    for base in bases:
        wait_ready(base + "/health/ready", 60)


def compare(
    what: str,
    args: argparse.Namespace,
    env: dict[str, str],
    tmp: Path,
    lua: Path,
    pairs: list[tuple[str, str, int, Path, Path]],
) -> int:
    """--metrics, --log, --keys: the six-feature workloads against a service with the feature on, and one with it
    off, in turn."""
    on, off = SWITCHES[what]
    sides = [("on", sys.executable, {**env, **on}), ("off", sys.executable, {**env, **off})]
    procs: list[Any] = []
    bases: list[str] = []
    try:
        serve(sides, args, tmp, procs, bases)
        for name, path, conns, six, _ in pairs:
            rps, ratios = in_turn([(bases[0] + path, six), (bases[1] + path, six)], conns, args, lua)
            print(
                f"{name}: {what} on {rps[0]:,.0f} req/s, off {rps[1]:,.0f} req/s, on/off {rps[0] / rps[1]:.3f} "
                f"(slices: median {statistics.median(ratios):.3f}, {min(ratios):.3f}-{max(ratios):.3f})"
            )
    finally:
        for proc in procs:
            stop(proc)
    return 0


def against(other: Path, args: argparse.Namespace, env: dict[str, str], tmp: Path, lua: Path, pairs: list[Any]) -> int:
    """--against: this checkout's service and ``other``'s, seeded alike, every workload driven at each in turn."""
    sides = [("this", sys.executable, env), ("other", str(other.resolve() / ".venv" / "bin" / "python"), env)]
    procs: list[Any] = []
    bases: list[str] = []
    try:
        serve(sides, args, tmp, procs, bases)
        for base in bases:
            seed(base, random.Random(7))
        for name, path, conns, six, personal in pairs:
            for label, bodies in (("", six), ("personalised ", personal)):
                rps, ratios = in_turn([(bases[0] + path, bodies), (bases[1] + path, bodies)], conns, args, lua)
                print(
                    f"{label}{name}: this {rps[0]:,.0f} req/s, other {rps[1]:,.0f} req/s, this/other "
                    f"{rps[0] / rps[1]:.3f} (slices: median {statistics.median(ratios):.3f}, "
                    f"{min(ratios):.3f}-{max(ratios):.3f})"
                )
    finally:
        for proc in procs:
            stop(proc)
    return 0


def seed(base: str, rng: random.Random) -> None:
    """200 users x 5 ratings through /feedback: the personalised workloads' users."""
    for u in range(1, 201):
        ratings = [{"user_id": u, "movie_id": rng.randint(1, 2000), "rating": rng.randint(2, 10)} for _ in range(5)]
        post_json(base + "/feedback", {"ratings": ratings})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--metrics", action="store_true", help="metrics on against off (see above)")
    which.add_argument("--log", action="store_true", help="the prediction log on against off")
    which.add_argument("--keys", action="store_true", help="access keys checked against no keys")
    which.add_argument("--against", type=Path, metavar="DIR", help="this checkout against another one (see above)")
    args = ap.parse_args()
    rng = random.Random(42)
    tmp = Path(tempfile.mkdtemp(prefix="mmratio-"))
    lua = tmp / "bodies.lua"
    # With --keys every request carries the key, on both sides: only its check differs.
    header = f', ["Authorization"] = "Bearer {KEY}"' if args.keys else ""
    lua.write_text(
        LUA.replace('{["Content-Type"] = "application/json"}', '{["Content-Type"] = "application/json"' + header + "}")
    )

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
    if args.against is not None:
        return against(args.against, args, env, tmp, lua, pairs)
    for what in SWITCHES:
        if getattr(args, what):
            return compare(what, args, env, tmp, lua, pairs)
    port = free_port()
    cmd = [sys.executable, "-m", "moviematch_ml.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = start([*cmd, "--workers", str(args.workers)], env, tmp / "service.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health/ready", 60)
        seed(base, rng)
        for name, path, conns, six, personal in pairs:
            rps, ratios = in_turn([(base + path, six), (base + path, personal)], conns, args, lua)
            print(
                f"{name}: six-feature {rps[0]:,.0f} req/s, personalised {rps[1]:,.0f} req/s, cost ratio "
                f"{rps[0] / rps[1]:.3f} (slices: median {statistics.median(ratios):.3f}, "
                f"{min(ratios):.3f}-{max(ratios):.3f})"
            )
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
