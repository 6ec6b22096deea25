"""The JSON-lines formatter and the logging configuration handed to uvicorn."""

from __future__ import annotations

import logging
import subprocess
import sys

import orjson

from moviematch_ml.logs import JsonFormatter, log_config


def _record(msg: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("moviematch_ml.test", level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_one_json_object_with_extra_fields() -> None:
    line = JsonFormatter().format(_record("loaded %s", "tiny", model_version="tiny-1", status=200))
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "loaded tiny"
    assert entry["level"] == "info"
    assert entry["logger"] == "moviematch_ml.test"
    assert (entry["model_version"], entry["status"]) == ("tiny-1", 200)
    assert entry["ts"].endswith("+00:00")
    # Only the fields that mean something: none of LogRecord's internals.
    assert set(entry) == {"ts", "level", "logger", "message", "model_version", "status"}


def test_multiline_messages_and_tracebacks_stay_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = _record("failed:\n%s", "two lines", level=logging.ERROR)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "failed:\ntwo lines"
    assert "ValueError: bad\nthing" in entry["exc_info"]


def test_unserialisable_extra_becomes_a_string() -> None:
    entry = orjson.loads(JsonFormatter().format(_record("x", thing=object())))
    assert entry["thing"].startswith("<object object")


def test_uvicorn_colour_duplicate_is_dropped() -> None:
    entry = orjson.loads(JsonFormatter().format(_record("Started", color_message="\x1b[36mStarted\x1b[0m")))
    assert "color_message" not in entry


_CONFIGURE_SCRIPT = """
import logging
from moviematch_ml.logs import configure_logging
configure_logging("warning")
logging.getLogger("moviematch_ml.x").info("hidden")
logging.getLogger("moviematch_ml.x").warning("shown")
logging.getLogger("uvicorn.error").warning("server says")
logging.getLogger("uvicorn.access").warning("uvicorn access line")
"""


def test_configure_logging_level_and_uvicorn_access_off() -> None:
    # In a child process: logging configuration is process-wide and would leak into other tests.
    out = subprocess.run([sys.executable, "-c", _CONFIGURE_SCRIPT], capture_output=True, check=True, timeout=60)
    assert out.stderr == b""
    entries = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [(e["logger"], e["level"], e["message"]) for e in entries] == [
        ("moviematch_ml.x", "warning", "shown"),
        ("uvicorn.error", "warning", "server says"),
    ]


def test_log_config_is_valid_for_dictconfig_and_names_the_formatter() -> None:
    config = log_config("debug")
    assert config["root"]["level"] == "DEBUG"
    assert config["formatters"]["json"]["()"] == "moviematch_ml.logs.JsonFormatter"
    assert config["loggers"]["uvicorn.access"]["propagate"] is False
