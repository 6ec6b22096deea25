"""Several workers: each has its own listening socket, so the kernel spreads connections over all of them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from moviematch_ml.features import EXAMPLE
from realserver import Server, start, stop

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads sockets from /proc")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The parent pid is the second field after the parenthesised command name.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _established_connections(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections on local ``port`` each process holds (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                    inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        held = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
            except OSError:
                continue
        counts[pid] = held
    return counts


@pytest.fixture
def two_workers(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Server]:
    server = start(tmp_path, WORKERS="2", MODEL_PATH=str(tiny_model_dir), DATABASE_URL=f"sqlite:///{tmp_path}/f.db")
    server.wait_for_log("service started", count=2)
    yield server
    stop(server)


def test_connections_are_spread_over_the_workers(two_workers: Server) -> None:
    # 16 keep-alive connections opened in one burst, as a proxy's pool or wrk opens them: with one shared socket
    # the first worker to wake accepts all that wait (this test failed in 1 of 5 runs with uvicorn's shared
    # socket); with a socket per worker the kernel spreads them (all 16 on one: a chance of 2 in 65,536).
    body = orjson.dumps(EXAMPLE)
    head = f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", two_workers.port), timeout=10) for _ in range(16)]
    try:
        for s in socks:
            s.sendall(head.encode() + body)
        for s in socks:
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        counts = _established_connections(_children(two_workers.proc.pid), two_workers.port)
        assert sum(counts.values()) == 16, counts
        assert len([pid for pid, n in counts.items() if n > 0]) == 2, counts
    finally:
        for s in socks:
            s.close()


def test_sigterm_stops_every_worker_cleanly(two_workers: Server) -> None:
    workers = _children(two_workers.proc.pid)
    two_workers.proc.send_signal(signal.SIGTERM)
    assert two_workers.proc.wait(timeout=30) == 0
    # The workers (and multiprocessing's helper process, which follows its parent out) are gone soon after.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if _running(pid)]


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_a_port_in_use_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MODEL_PATH": str(tiny_model_dir), "DATABASE_URL": f"sqlite:///{tmp_path}/f.db"}
        command = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
        done = subprocess.run(
            [sys.executable, "-m", "moviematch_ml.cli", *command],
            env=env,
            capture_output=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in (done.stdout + done.stderr).decode()


def test_workers_stop_when_their_supervisor_is_killed(two_workers: Server) -> None:
    # SIGKILL (or the OOM killer) on the supervisor alone: its workers must not go on serving the port unsupervised.
    workers = [pid for pid in _children(two_workers.proc.pid) if _listening(pid, two_workers.port)]
    assert len(workers) == 2
    os.kill(two_workers.proc.pid, signal.SIGKILL)
    two_workers.proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)]


def _listening(pid: int, port: int) -> bool:
    """Whether the process holds a listening TCP socket on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return bool(inodes & held)
