"""Soak: the service's memory before and after a million predictions, every body new and every other one with a
user id never seen before.

    python bench/soak.py [--count 1000000] [--connections 64] [--every 100000] [--workers 1] [--set KEY=VALUE ...]
                         [--json results.json]

Starts ``moviematch-ml serve`` on a free port of 127.0.0.1 (the bundled models, a SQLite store of its own) and sends
``--count`` /predict requests over ``--connections`` kept-alive connections (asyncio on raw sockets): each body
unique (so the answer cache fills and must evict), every second one with a new user id (so each is read from the
store and the users' cache fills and must evict). Prints the resident memory (RSS) of the largest server process
and of the whole process tree once the service is ready, every ``--every`` predictions, and at the end, with the
growth. Bounded by --count (at a few thousand requests a second, a million takes several minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overload import head, read_answer
from run import features, free_port, start, stop, tree_rss_mb, wait_ready


def body(n: int, rng: random.Random) -> bytes:
    """Request ``n``: features no other request has (its popularity carries ``n``), and for odd ``n`` the new user
    ``soak-<n>`` rating movie ``n``."""
    fields: dict[str, object] = {**features(rng), "popularity": round(rng.uniform(0, 500), 3) + n * 1e-7}
    if n % 2:
        fields["user_id"] = f"soak-{n}"
        fields["movie_id"] = n
    return json.dumps(fields, separators=(",", ":")).encode()


class Soak:
    """Sends the requests, counts the answers, and samples the server's memory every ``every`` answers."""

    def __init__(self, port: int, pid: int, count: int, every: int) -> None:
        self.port = port
        self.pid = pid
        self.count = count
        self.every = every
        self.sent = 0
        self.answered = 0
        self.failed = 0
        self.statuses: dict[int, int] = {}
        self.samples: list[tuple[int, float, float]] = []  # (answers so far, largest process MB, tree MB)
        self.rng = random.Random(11)
        self.started = time.monotonic()

    def sample(self) -> None:
        worker, total = tree_rss_mb(self.pid)
        self.samples.append((self.answered, worker, total))
        rate = self.answered / max(time.monotonic() - self.started, 1e-9)
        print(
            f"{self.answered:>10,} predictions: RSS {worker:7.1f} MB (tree {total:7.1f} MB), {rate:,.0f}/s", flush=True
        )

    async def connection(self) -> None:
        host = "127.0.0.1"
        reader, writer = await asyncio.open_connection(host, self.port)
        try:
            while self.sent < self.count:
                payload = body(self.sent, self.rng)
                self.sent += 1
                writer.write(head(host, "/predict", len(payload)) + payload)
                try:
                    status, close = await read_answer(reader)
                except (OSError, asyncio.IncompleteReadError):
                    self.failed += 1
                    close = True
                else:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    self.answered += 1
                    if self.answered % self.every == 0:
                        self.sample()
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, self.port)
        finally:
            writer.close()

    async def run(self, connections: int) -> None:
        await asyncio.gather(*(self.connection() for _ in range(connections)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1_000_000, help="predictions to send (default 1,000,000)")
    ap.add_argument("--connections", type=int, default=64, help="client connections (default 64)")
    ap.add_argument("--every", type=int, default=100_000, help="print the memory every N predictions (default 100,000)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (default 1, as deployed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the service")
    ap.add_argument("--json", type=Path, help="also write the samples as JSON to this file")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mmsoak-"))
    port = free_port()
    env = {**os.environ, "LOG_LEVEL": "warning", "DATABASE_URL": f"sqlite:///{tmp / 'soak.sqlite3'}"}
    env.update(kv.split("=", 1) for kv in args.set)
    cmd = [sys.executable, "-m", "moviematch_ml.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = start([*cmd, "--workers", str(args.workers)], env, tmp / "service.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/health/ready", 60)
        soak = Soak(port, proc.pid, args.count, args.every)
        soak.sample()
        asyncio.run(soak.run(args.connections))
        if soak.samples[-1][0] != soak.answered:
            soak.sample()
        elapsed = time.monotonic() - soak.started
    finally:
        stop(proc)
    (_, worker_before, total_before), (_, worker_after, total_after) = soak.samples[0], soak.samples[-1]
    print(
        f"{soak.answered:,} predictions in {elapsed:.0f} s ({soak.answered / elapsed:,.0f}/s), statuses "
        f"{dict(sorted(soak.statuses.items()))}, {soak.failed} without an answer"
    )
    print(
        f"RSS of the largest process: {worker_before:.1f} MB before, {worker_after:.1f} MB after "
        f"({worker_after - worker_before:+.1f} MB); whole tree {total_before:.1f} -> {total_after:.1f} MB"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"samples": soak.samples, "statuses": soak.statuses, "failed": soak.failed}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
