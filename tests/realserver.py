"""Start the real server (``moviematch-ml serve``) on a free port and talk HTTP to it: shared by the tests."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log_entries(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.log_path.read_bytes().splitlines() if line.strip()]

    def wait_for_log(self, message: str, timeout: float = 15.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(e["message"] == message for e in self.log_entries()) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"no log line {message!r} within {timeout} s:\n{self.log_path.read_text()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def request(port: int, method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = orjson.dumps(body) if body is not None else None
        all_headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else headers or {}
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), orjson.loads(response.read())
    finally:
        conn.close()


def start(tmp_path: Path, name: str = "server", *, exe: str | None = None, **env: str) -> Server:
    """``moviematch-ml serve`` (this interpreter's, or ``exe``) on a free port, once /health/ready answers 200."""
    port = free_port()
    exe = exe or shutil.which("moviematch-ml", path=str(Path(sys.executable).parent)) or "moviematch-ml"
    full_env = {**os.environ, "HOST": "127.0.0.1", "LOG_LEVEL": "info", "GRACEFUL_TIMEOUT": "20", **env}
    full_env.pop("PORT", None)  # the command line says which port
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log:
        # A session of its own: stop() kills the whole group, workers included.
        proc = subprocess.Popen(
            [exe, "serve", "--port", str(port)],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc, port, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early:\n{log_path.read_text()}"
        try:
            if request(port, "GET", "/health/ready")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server not ready within 30 s:\n{log_path.read_text()}")


def stop(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
