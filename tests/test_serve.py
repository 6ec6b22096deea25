"""The real server: ``moviematch-ml serve`` on a free port, spoken to over HTTP, and a graceful SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import orjson
import pytest

from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from realserver import Server, free_port, request, start


@pytest.fixture
def model_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Server]:
    server = start(tmp_path, MODEL_PATH=str(tiny_model_dir))
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(timeout=10)


def _expected_rating(tiny_model_dir: Path, row: dict[str, Any]) -> float:
    booster = lgb.Booster(model_file=str(tiny_model_dir / "model.txt"))
    stars = float(booster.predict(np.array([[float(row[n]) for n in FEATURE_NAMES]]))[0])
    return round(stars * 10.0 / 5.0, 3)  # the tiny model's scale tops at 5 stars


def test_real_server_answers_every_endpoint(model_server: Server, tiny_model_dir: Path) -> None:
    port = model_server.port
    status, _, root = request(port, "GET", "/")
    assert (status, root["service"], root["model"]["version"]) == (200, "moviematch-ml", "tiny-1")
    status, _, health = request(port, "GET", "/health")
    assert (status, health["status"], health["source"]) == (200, "ok", "model")
    assert request(port, "GET", "/health/live")[2] == {"status": "alive"}
    status, headers, body = request(port, "POST", "/predict", EXAMPLE, {"X-Request-ID": "real-1"})
    assert status == 200
    assert headers["x-request-id"] == "real-1"
    assert body["source"] == "model"
    assert body["predicted_rating"] == _expected_rating(tiny_model_dir, EXAMPLE)
    status, _, batch = request(port, "POST", "/predict-batch", {"movies": [{"movie_id": 9, **EXAMPLE}]})
    assert (status, batch["predictions"][0]["movie_id"]) == (200, 9)
    status, _, error = request(port, "POST", "/predict", {**EXAMPLE, "vote_average": 11})
    assert (status, error["error"]) == (422, "validation_error")

    model_server.proc.send_signal(signal.SIGTERM)
    assert model_server.proc.wait(timeout=20) == 0
    entries = model_server.log_entries()  # every line of the server's output is one JSON object
    access = [e for e in entries if e["logger"] == "moviematch_ml.access"]
    assert [(a["path"], a["status"]) for a in access if a["path"] != "/health/ready"] == [
        ("/", 200),
        ("/health", 200),
        ("/health/live", 200),
        ("/predict", 200),
        ("/predict-batch", 200),
        ("/predict", 422),
    ]
    assert any(e["message"] == "model loaded" and e["model_version"] == "tiny-1" for e in entries)


def test_sigterm_lets_an_in_flight_request_finish(model_server: Server, tiny_model_dir: Path) -> None:
    body = orjson.dumps(EXAMPLE)
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: in-flight\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", model_server.port), timeout=20) as sock:
        sock.sendall(head + body[:10])  # the request has started: headers and part of the body
        time.sleep(0.5)
        model_server.proc.send_signal(signal.SIGTERM)
        model_server.wait_for_log("Shutting down")
        time.sleep(0.3)
        assert model_server.proc.poll() is None  # still waiting for our request
        with pytest.raises(ConnectionRefusedError):  # ...but no longer taking new connections
            socket.create_connection(("127.0.0.1", model_server.port), timeout=2).close()
        sock.sendall(body[10:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head_part, _, payload = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert status_line.startswith("HTTP/1.1 200"), response
    assert headers["x-request-id"] == "in-flight"
    assert headers["connection"] == "close"
    answer = orjson.loads(payload)
    assert answer["source"] == "model"
    assert answer["predicted_rating"] == _expected_rating(tiny_model_dir, EXAMPLE)
    assert model_server.proc.wait(timeout=20) == 0
    access = [e for e in model_server.log_entries() if e.get("request_id") == "in-flight"]
    assert [(a["path"], a["status"]) for a in access] == [("/predict", 200)]


def test_real_server_starts_degraded_without_a_model(tmp_path: Path) -> None:
    server = start(tmp_path, MODEL_PATH=str(tmp_path / "missing"))
    try:
        status, _, health = request(server.port, "GET", "/health")
        assert (status, health["status"], health["source"]) == (200, "degraded", "fallback")
        assert "ModelNotFoundError" in health["reason"]
        assert request(server.port, "POST", "/predict", EXAMPLE)[2]["predicted_rating"] == 7.909
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)
    failed = [e for e in server.log_entries() if e["message"] == "model load failed"]
    assert len(failed) == 1
    assert failed[0]["level"] == "error"


def test_serve_refuses_invalid_settings(tmp_path: Path) -> None:
    exe = shutil.which("moviematch-ml", path=str(Path(sys.executable).parent)) or "moviematch-ml"
    env = {**os.environ, "CORS_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true"}
    out = subprocess.run([exe, "serve", "--port", str(free_port())], env=env, capture_output=True, timeout=60)
    assert out.returncode == 1
    assert b"CORS_ALLOW_CREDENTIALS" in out.stderr


# --- the deployment files agree with the code -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_railway_json() -> None:
    from moviematch_ml.settings import Settings

    deploy = orjson.loads((ROOT / "railway.json").read_bytes())["deploy"]
    assert deploy["healthcheckPath"] == "/health/ready"
    assert deploy["restartPolicyType"] == "ON_FAILURE"
    # Railway's SIGKILL must come after the server's own graceful window, which covers the client's 30 s timeout.
    graceful = Settings.model_fields["graceful_timeout"].default
    assert isinstance(deploy["drainingSeconds"], int)  # Railway refuses a string here
    assert deploy["drainingSeconds"] >= max(35, graceful + 5)
    assert 10 <= deploy["healthcheckTimeout"] <= 300
    # Exec form for Dockerfile builds: no shell would expand $PORT, so the command must not need one.
    assert "$" not in deploy["startCommand"]
    assert deploy["startCommand"].split() == ["moviematch-ml", "serve"]


def test_procfile_and_dockerfile_run_the_serve_command() -> None:
    from moviematch_ml.cli import _build_parser

    procfile = (ROOT / "Procfile").read_text().strip()
    assert procfile == "web: moviematch-ml serve --port $PORT"
    args = _build_parser().parse_args(procfile.removeprefix("web: moviematch-ml ").replace("$PORT", "8123").split())
    assert (args.command, args.port) == ("serve", 8123)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("# ")
    assert "\nFROM python:3.11-slim\n" in dockerfile
    # The compiled tree evaluator is built in a stage of its own; the final image gets the wheel, not the compiler.
    build, _, final = dockerfile.partition("\nFROM python:3.11-slim\n")
    assert "AS build" in build
    assert "gcc" in build
    assert "gcc" not in final
    assert "COPY --from=build /wheels" in final
    assert '\nCMD ["moviematch-ml", "serve"]\n' in dockerfile  # exec form: the server is PID 1 and gets SIGTERM
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")


def test_requirements_pin_every_runtime_dependency() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    assert "moviematch-ml" not in pins
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in core:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not pinned in requirements.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {spec}"
