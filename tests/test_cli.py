"""``moviematch-ml serve``: its options and settings, its exit codes, and the deployment files that run it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from moviematch_ml import cli
from moviematch_ml.api.app import create_app
from moviematch_ml.errors import MissingExtraError
from moviematch_ml.online import supervisor
from moviematch_ml.settings import ENV_ONLY, Settings
from realserver import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVE_ENV = (
    "HOST",
    "PORT",
    "WORKERS",
    "LOG_LEVEL",
    "GRACEFUL_TIMEOUT",
    "CORS_ORIGINS",
    "CORS_ALLOW_CREDENTIALS",
    "DATABASE_URL",
    "PREDICTION_CACHE_BACKEND",
    "REDIS_URL",
)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """``serve`` without a server: what it would hand the supervisor (``supervisor.run``'s arguments), one dict a call.

    The command installs a SIGTERM handler for the process; it is put back afterwards.
    """
    for name in SERVE_ENV:
        monkeypatch.delenv(name, raising=False)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(supervisor, "run", lambda **kwargs: calls.append(kwargs))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_serve_takes_host_port_and_workers_from_the_command_line(served: list[dict[str, Any]]) -> None:
    assert cli.main(["serve", "--host", "127.0.0.1", "--port", "8123", "--workers", "3"]) == 0
    [call] = served
    assert (call["app"], call["host"], call["port"], call["workers"]) == (
        "moviematch_ml.api.app:app_from_env",
        "127.0.0.1",
        8123,
        3,
    )
    # uvicorn's own access log is off (the middleware writes one JSON line per request); JSON logging throughout.
    assert call["access_log"] is False
    assert call["log_config"]["formatters"]["json"]["()"] == "moviematch_ml.logs.JsonFormatter"
    assert call["timeout_graceful_shutdown"] == 30  # GRACEFUL_TIMEOUT's default, whole seconds
    assert call["proxy_headers"] is True


def test_serve_falls_back_on_the_environment_then_the_defaults(
    served: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["serve"]) == 0
    monkeypatch.setenv("HOST", "::1")
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("WORKERS", "2")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    monkeypatch.setenv("GRACEFUL_TIMEOUT", "2.5")
    assert cli.main(["serve"]) == 0
    assert cli.main(["serve", "--port", "9002"]) == 0  # the command line wins over the environment
    defaults, from_env, overridden = served
    assert (defaults["host"], defaults["port"], defaults["workers"], defaults["log_level"]) == (
        "0.0.0.0",
        8000,
        1,
        "info",
    )
    assert (from_env["host"], from_env["port"], from_env["workers"], from_env["log_level"]) == (
        "::1",
        9001,
        2,
        "warning",
    )
    assert from_env["timeout_graceful_shutdown"] == 3  # rounded up: never cut a request's grace short
    assert (overridden["host"], overridden["port"], overridden["workers"]) == ("::1", 9002, 2)


def test_serve_refuses_bad_options_and_settings(
    served: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--workers", "0"]) == 1
    assert "moviematch-ml serve: --workers must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("PORT", "70000")
    assert cli.main(["serve"]) == 1
    assert "invalid settings" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli.main(["serve", "--port", "eighty"])
    assert usage.value.code == 2  # bad command-line usage
    assert served == []  # nothing was started


def test_serve_runs_uvloop_and_httptools(served: list[dict[str, Any]]) -> None:
    # Declared dependencies now (not through uvicorn[standard]): "auto" must still find both.
    import uvloop
    from uvicorn.config import HTTP_PROTOCOLS, Config
    from uvicorn.importer import import_from_string
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert cli.main(["serve"]) == 0
    [call] = served
    assert (call["loop"], call["http"]) == ("auto", "auto")
    config = Config(call["app"], loop=call["loop"], http=call["http"], factory=True)
    loop_factory = config.get_loop_factory()
    assert loop_factory is not None
    loop = loop_factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert import_from_string(HTTP_PROTOCOLS[call["http"]]) is HttpToolsProtocol


@pytest.mark.parametrize(
    ("env", "module", "message"),
    [
        (
            {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test"},
            "psycopg",
            "DATABASE_URL=postgresql://... needs psycopg, which is not installed: "
            "pip install 'moviematch-ml[postgres]'",
        ),
        (
            {"PREDICTION_CACHE_BACKEND": "redis", "REDIS_URL": "redis://127.0.0.1:6379/0"},
            "redis",
            "PREDICTION_CACHE_BACKEND=redis needs redis, which is not installed: pip install 'moviematch-ml[redis]'",
        ),
    ],
    ids=["postgres", "redis"],
)
def test_serve_names_the_extra_a_setting_needs(
    served: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    module: str,
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve"]) == 0  # installed (the test set has both drivers): it serves
    monkeypatch.setitem(sys.modules, module, None)  # as if installed without the extra
    assert cli.main(["serve"]) == 1
    assert capsys.readouterr().err.startswith(f"moviematch-ml serve: {message}")
    assert len(served) == 1  # the second time nothing was started
    with pytest.raises(MissingExtraError, match=re.escape(message)):
        create_app(Settings(**ENV_ONLY))  # the app factory (each worker, or uvicorn --factory) says the same


def test_serve_refuses_invalid_settings(tmp_path: Path) -> None:
    # The installed command, in a process of its own: the exit code and the message a deploy log shows.
    exe = shutil.which("moviematch-ml", path=str(Path(sys.executable).parent)) or "moviematch-ml"
    env = {**os.environ, "CORS_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true"}
    out = subprocess.run([exe, "serve", "--port", str(free_port())], env=env, capture_output=True, timeout=60)
    assert out.returncode == 1
    assert b"CORS_ALLOW_CREDENTIALS" in out.stderr


# --- the deployment files agree with the code -------------------------------------------------------------------


def test_railway_json(served: list[dict[str, Any]]) -> None:
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
    assert cli.main(deploy["startCommand"].split()[1:]) == 0
    assert served[0]["port"] == 8000  # without PORT; Railway sets it


def test_procfile_and_dockerfile_run_the_serve_command(served: list[dict[str, Any]]) -> None:
    procfile = (ROOT / "Procfile").read_text().strip()
    assert procfile == "web: moviematch-ml serve --port $PORT"
    assert cli.main(procfile.removeprefix("web: moviematch-ml ").replace("$PORT", "8123").split()) == 0
    assert (served[0]["app"], served[0]["port"]) == ("moviematch_ml.api.app:app_from_env", 8123)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("# ")
    assert "\nFROM python:3.11-slim\n" in dockerfile
    # The compiled tree evaluator is built in a stage of its own; the final image gets the wheel, not the compiler.
    build, _, final = dockerfile.partition("\nFROM python:3.11-slim\n")
    assert "AS build" in build
    assert "gcc" in build
    assert "gcc" not in final
    assert "COPY --from=build /wheels" in final
    # Both C extensions must be in the wheel, or the build stops; the final stage installs the service's lock.
    assert "_trees\\..*\\.so" in build
    assert "_codec\\..*\\.so" in build
    assert "pip install --require-hashes -r requirements.txt" in final
    assert '\nCMD ["moviematch-ml", "serve"]\n' in dockerfile  # exec form: the server is PID 1 and gets SIGTERM
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
