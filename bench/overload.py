"""Overload: hold the service at 1,000 connections on loopback and print what its clients and its probe see.

    python bench/overload.py [--duration 60] [--connections 1000] [--workers 1] [--user-share 0.1]
                             [--client-nice 0] [--url http://127.0.0.1:PORT] [--set KEY=VALUE ...] [--json results.json]

Starts ``moviematch-ml serve`` on a free port of 127.0.0.1 (as ``bench/run.py`` starts it, with the bundled models
and a SQLite store of its own) unless ``--url`` names a service already running. Every connection sends /predict
requests one after the other on a kept-alive connection (a new one when the server closes it), each body new (the
answer cache cannot help), a ``--user-share`` of them with one of 2,000 user ids (those read the store on a miss).
The client is asyncio on raw sockets, in one process; a second process probes ``GET /health/live`` every 100 ms on
a new connection each time, as a platform's liveness probe does, for the whole run. ``--client-nice N`` runs the
load generator (not the probe, not the service) at that niceness: its clients stand for other machines, but here it
shares the service's two cores, and at the same priority it takes the CPU from the worker it measures (the worker's
loop then stops for the scheduler's 20-30 ms slices, whatever the worker does).

Prints: the requests answered, the share of 503s (``overloaded``: past MAX_CONCURRENCY), requests left without an
answer (reset or closed), p50/p99 of the answers other than 503, /health/live's p50/p99/max and failures, and the
predictions the prediction log wrote and dropped (it spends at most PREDICTION_LOG_SHARE of the worker's time).
Bounded by --duration (plus the server's start and the connections' close).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import socket
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prometheus_client.parser import text_string_to_metric_families
from run import features, free_port, start, stop, tree_rss_mb, wait_ready

PROBE_EVERY = 0.1  # seconds between two liveness probes
PROBE_TIMEOUT = 10.0  # a probe that takes longer has failed (a platform's would have given up well before)
USERS = 2000


@dataclass
class Tally:
    """What the clients saw: answers by status, the latency of every answer that is not a 503, and requests sent
    that got no answer (the connection reset or closed under them)."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    unanswered: int = 0
    connect_errors: int = 0


def bodies(user_share: float, seed: int = 7) -> Iterator[bytes]:
    """Request bodies, each new: the features of bench/run.py with a popularity no other body has; a ``user_share``
    of them with one of USERS user ids and a movie id."""
    rng = random.Random(seed)
    for n in itertools.count():
        body: dict[str, object] = {**features(rng), "popularity": round(rng.uniform(0, 500), 3) + n * 1e-6}
        if rng.random() < user_share:
            body["user_id"] = rng.randrange(USERS)
            body["movie_id"] = rng.randint(1, 2000)
        yield json.dumps(body, separators=(",", ":")).encode()


def head(host: str, path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes the connection after it) of one response, its body read and dropped."""
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    length = 0
    close = False
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    await reader.readexactly(length)
    return status, close


async def connection(host: str, port: int, until: float, source: Iterator[bytes], tally: Tally) -> None:
    """One client connection: requests back to back until ``until`` (monotonic), reconnecting when closed."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            tally.connect_errors += 1
            await asyncio.sleep(0.1)
            continue
        try:
            while time.monotonic() < until:
                body = next(source)
                writer.write(head(host, "/predict", len(body)) + body)
                sent = time.perf_counter()
                try:
                    status, close = await read_answer(reader)
                except (OSError, asyncio.IncompleteReadError):
                    tally.unanswered += 1
                    break
                tally.statuses[status] += 1
                if status != 503:
                    tally.latencies.append(time.perf_counter() - sent)
                if close:
                    break
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def load(host: str, port: int, connections: int, duration: float, user_share: float) -> Tally:
    tally = Tally()
    source = bodies(user_share)
    until = time.monotonic() + duration
    await asyncio.gather(*(connection(host, port, until, source, tally) for _ in range(connections)))
    return tally


def probe(host: str, port: int, duration: float, out: Connection) -> None:
    """In a process of its own: GET /health/live every PROBE_EVERY seconds on a new connection; sends back the
    latencies (seconds) and the number of probes that failed or took over PROBE_TIMEOUT."""
    request = f"GET /health/live HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    latencies: list[float] = []
    failed = 0
    until = time.monotonic() + duration
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            if answer.startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1
        except OSError:
            failed += 1
        time.sleep(max(0.0, PROBE_EVERY - (time.perf_counter() - started)))
    out.send((latencies, failed))
    out.close()


def prediction_log(host: str, port: int) -> dict[str, float]:
    """The worker's prediction-log counts (``moviematch_prediction_log_total`` by outcome, from /metrics): how much
    of what was answered the log kept under this load. Empty when /metrics cannot be read (keys, metrics off)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "moviematch_prediction_log_total":
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
    return counts


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--connections", type=int, default=1000, help="client connections held open (default 1000)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (default 1, as deployed)")
    ap.add_argument("--user-share", type=float, default=0.1, help="share of requests with a user id (default 0.1)")
    ap.add_argument("--client-nice", type=int, default=0, help="niceness of the load generator (default 0)")
    ap.add_argument("--url", help="a running service to load instead of starting one")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the service")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = ap.parse_args()

    proc = None
    tmp = Path(tempfile.mkdtemp(prefix="mmoverload-"))
    if args.url:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        env = {**os.environ, "LOG_LEVEL": "warning", "DATABASE_URL": f"sqlite:///{tmp / 'overload.sqlite3'}"}
        env.update(kv.split("=", 1) for kv in args.set)
        cmd = [sys.executable, "-m", "moviematch_ml.cli", "serve", "--host", host, "--port", str(port)]
        proc = start([*cmd, "--workers", str(args.workers)], env, tmp / "service.log")
    try:
        wait_ready(f"http://{host}:{port}/health/ready", 60)
        receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
        prober = multiprocessing.get_context("fork").Process(target=probe, args=(host, port, args.duration, sender))
        prober.start()
        if args.client_nice:
            os.nice(args.client_nice)  # this process only: the service and the probe were started before
        started = time.monotonic()
        tally = asyncio.run(load(host, port, args.connections, args.duration, args.user_share))
        elapsed = time.monotonic() - started
        live, failed_probes = receiver.recv()
        prober.join()
        logged = prediction_log(host, port)
        rss = tree_rss_mb(proc.pid) if proc is not None else (float("nan"), float("nan"))
    finally:
        if proc is not None:
            stop(proc)

    answered = sum(tally.statuses.values())
    share_503 = tally.statuses[503] / answered if answered else float("nan")
    figures = {
        "connections": args.connections,
        "client_nice": args.client_nice,
        "seconds": round(elapsed, 1),
        "requests": answered,
        "requests_per_s": round(answered / elapsed, 1),
        "share_503": share_503,
        "statuses": dict(sorted(tally.statuses.items())),
        "unanswered": tally.unanswered,
        "connect_errors": tally.connect_errors,
        "p50_ms": quantile(tally.latencies, 0.5) * 1000,
        "p99_ms": quantile(tally.latencies, 0.99) * 1000,
        "live_probes": len(live) + failed_probes,
        "live_failed": failed_probes,
        "live_p50_ms": quantile(live, 0.5) * 1000,
        "live_p99_ms": quantile(live, 0.99) * 1000,
        "live_max_ms": max(live, default=float("nan")) * 1000,
        "worker_rss_mb": rss[0],
        "prediction_log": logged,
    }
    print(
        f"{args.connections} connections for {elapsed:.1f} s: {answered:,} answers ({answered / elapsed:,.0f}/s), "
        f"503: {share_503:.1%}, statuses {figures['statuses']}, unanswered {tally.unanswered}, "
        f"connect errors {tally.connect_errors}"
    )
    print(f"answers other than 503: p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms")
    print(
        f"/health/live every {PROBE_EVERY * 1000:.0f} ms ({figures['live_probes']} probes, {failed_probes} failed): "
        f"p50 {figures['live_p50_ms']:.1f} ms, p99 {figures['live_p99_ms']:.1f} ms, max {figures['live_max_ms']:.1f} ms"
    )
    if logged:
        total = sum(logged.values())
        print(
            f"prediction log: {logged.get('written', 0):,.0f} written, {logged.get('dropped', 0):,.0f} dropped "
            f"({logged.get('written', 0) / total if total else float('nan'):.1%} kept)"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
