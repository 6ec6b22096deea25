"""The JSON-lines formatter, the buffered stdout handler and the logging configuration handed to uvicorn."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import orjson
import pytest

from moviematch_ml.logs import BufferedStreamHandler, DirectLog, JsonFormatter, log_config


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


@pytest.mark.parametrize(
    ("created", "ts"),
    [
        (0.0, "1970-01-01T00:00:00.000+00:00"),
        (1_700_000_000.0015, "2023-11-14T22:13:20.001+00:00"),
        (1_700_000_000.9994, "2023-11-14T22:13:20.999+00:00"),
        # Within half a microsecond of the next second: rounded up to it, as datetime.fromtimestamp does.
        (1_700_000_000.9999996, "2023-11-14T22:13:21.000+00:00"),
    ],
)
def test_timestamp_is_utc_iso_to_the_millisecond(created: float, ts: str) -> None:
    record = _record("x")
    record.created = created
    assert orjson.loads(JsonFormatter().format(record))["ts"] == ts


def test_timestamp_follows_the_clock_across_seconds() -> None:
    # One formatter, so the date and time of day it keeps for the current second must be replaced, both ways.
    formatter = JsonFormatter()
    stamps = []
    for created in (1_700_000_000.5, 1_700_000_000.75, 1_700_000_001.25, 1_700_003_600.0, 1_700_000_000.125):
        record = _record("x")
        record.created = created
        stamps.append(orjson.loads(formatter.format(record))["ts"])
    assert stamps == [
        "2023-11-14T22:13:20.500+00:00",
        "2023-11-14T22:13:20.750+00:00",
        "2023-11-14T22:13:21.250+00:00",
        "2023-11-14T23:13:20.000+00:00",
        "2023-11-14T22:13:20.125+00:00",
    ]


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
    assert config["handlers"]["stdout"]["class"] == "moviematch_ml.logs.BufferedStreamHandler"


# --- the buffered handler ----------------------------------------------------------------------------------------

# Long enough that no line is written by the timer during a test that is not about the timer.
NEVER: float = 60.0


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def handler(stream: io.StringIO) -> Iterator[BufferedStreamHandler]:
    h = BufferedStreamHandler(stream, flush_interval=NEVER)
    h.setFormatter(JsonFormatter())
    yield h
    h.close()


def _messages(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text == "" or text.endswith("\n")  # only whole lines are ever written
    return [orjson.loads(line)["message"] for line in text.splitlines()]


def test_lines_wait_for_flush_then_come_in_order(handler: BufferedStreamHandler, stream: io.StringIO) -> None:
    for i in range(3):
        handler.handle(_record("line %d", i))
    assert stream.getvalue() == ""
    handler.flush()
    assert _messages(stream) == ["line 0", "line 1", "line 2"]
    handler.handle(_record("line 3"))
    handler.close()
    assert _messages(stream) == ["line 0", "line 1", "line 2", "line 3"]


def test_the_line_is_formatted_when_logged_not_when_written(
    handler: BufferedStreamHandler, stream: io.StringIO
) -> None:
    thing = ["before"]
    handler.handle(_record("%s", thing))
    thing[0] = "after"
    handler.flush()
    assert _messages(stream) == ["['before']"]


def test_a_warning_is_written_at_once_after_the_lines_before_it(
    handler: BufferedStreamHandler, stream: io.StringIO
) -> None:
    handler.handle(_record("info"))
    handler.handle(_record("careful", level=logging.WARNING))
    assert _messages(stream) == ["info", "careful"]
    handler.handle(_record("boom", level=logging.ERROR))
    assert _messages(stream) == ["info", "careful", "boom"]


def test_a_full_buffer_is_written_without_waiting(stream: io.StringIO) -> None:
    h = BufferedStreamHandler(stream, flush_interval=NEVER, buffer_size=300)
    h.setFormatter(JsonFormatter())
    line_size = len(JsonFormatter().format(_record("line 0"))) + 1  # the same length for lines 0 to 9
    try:
        for i in range(10):
            h.handle(_record("line %d", i))
        # Written as soon as more than 300 characters wait: after each 300 // line_size + 1 lines.
        per_batch = 300 // line_size + 1
        assert len(_messages(stream)) == 10 // per_batch * per_batch
    finally:
        h.close()
    assert _messages(stream) == [f"line {i}" for i in range(10)]


def _wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds (polled, not a fixed wait)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def test_a_waiting_line_is_written_after_the_interval(stream: io.StringIO) -> None:
    h = BufferedStreamHandler(stream, flush_interval=0.02)
    h.setFormatter(JsonFormatter())
    try:
        h.handle(_record("first"))
        assert _wait_until(lambda: stream.getvalue() != "")
        assert _messages(stream) == ["first"]
        h.handle(_record("second"))  # the flusher thread goes back to sleep and wakes for the next line too
        assert _wait_until(lambda: len(stream.getvalue().splitlines()) == 2)
        assert _messages(stream) == ["first", "second"]
    finally:
        h.close()


def test_lines_from_many_threads_each_appear_once_and_whole(stream: io.StringIO) -> None:
    # A small buffer and a short interval, so that writes by size, by timer and by level all race with logging.
    h = BufferedStreamHandler(stream, flush_interval=0.001, buffer_size=2000)
    h.setFormatter(JsonFormatter())
    n_threads, n_lines = 8, 200

    def work(t: int) -> None:
        for i in range(n_lines):
            h.handle(_record("t%d-%d", t, i, level=logging.WARNING if i % 50 == 0 else logging.INFO, payload="x" * i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    h.close()
    messages = _messages(stream)  # every line parses as one JSON object
    assert sorted(messages) == sorted(f"t{t}-{i}" for t in range(n_threads) for i in range(n_lines))
    for t in range(n_threads):  # and each thread's lines keep their order
        assert [m for m in messages if m.startswith(f"t{t}-")] == [f"t{t}-{i}" for i in range(n_lines)]


def test_logging_shutdown_writes_what_is_buffered(handler: BufferedStreamHandler, stream: io.StringIO) -> None:
    handler.handle(_record("last words"))
    logging.shutdown([weakref.ref(handler)])  # what runs at interpreter exit, here for this handler only
    assert _messages(stream) == ["last words"]
    handler.handle(_record("after close"))  # nothing is left to write it later, so it is written at once
    assert _messages(stream) == ["last words", "after close"]


class _BrokenStream(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError("disk full")


def test_a_failed_write_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    h = BufferedStreamHandler(_BrokenStream(), flush_interval=NEVER)
    h.setFormatter(JsonFormatter())
    h.handle(_record("lost"))
    h.handle(_record("also lost", level=logging.ERROR))  # the write fails here: reported, not raised
    h.close()
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err
    assert "OSError: disk full" in err
    assert "Arguments: (2,)" in err  # the two lines of the batch that could not be written


_EXIT_SCRIPT = """
import logging
from moviematch_ml.logs import configure_logging
configure_logging("info")
log = logging.getLogger("moviematch_ml.x")
for i in range(100):
    log.info("line %d", i)
"""


def test_interpreter_exit_writes_the_buffered_lines() -> None:
    # uvicorn's SIGTERM path ends the same way: the worker returns and logging.shutdown runs at exit.
    out = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, check=True, timeout=60)
    assert out.stderr == b""
    assert [orjson.loads(line)["message"] for line in out.stdout.splitlines()] == [f"line {i}" for i in range(100)]


# --- the access line without a LogRecord -------------------------------------------------------------------------


@pytest.fixture
def direct_logger(handler: BufferedStreamHandler) -> Iterator[logging.Logger]:
    # A logger of its own, not propagating: the process-wide configuration is left alone.
    logger = logging.getLogger("moviematch_ml.test_direct")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)
    logger.filters.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


FIELDS = {"method": "POST", "path": "/predict", "status": 200, "latency_ms": 0.512, "request_id": "ab" * 16}


def test_direct_log_writes_the_line_logging_would_write(
    direct_logger: logging.Logger, handler: BufferedStreamHandler, stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_764_338_400.1234567)
    monkeypatch.setattr(time, "time_ns", lambda: 1_764_338_400_123_456_700)
    DirectLog(direct_logger).info("request", FIELDS)
    direct_logger.info("request", extra=FIELDS)
    handler.flush()
    direct, through_logging = stream.getvalue().splitlines()
    assert direct == through_logging
    assert orjson.loads(direct) == {
        "ts": "2025-11-28T14:00:00.123+00:00",
        "level": "info",
        "logger": "moviematch_ml.test_direct",
        "message": "request",
        **FIELDS,
    }


def test_direct_log_goes_through_logging_when_anything_else_is_configured(
    direct_logger: logging.Logger, handler: BufferedStreamHandler, stream: io.StringIO
) -> None:
    log = DirectLog(direct_logger)
    # A second handler: both get the record, with its fields.
    seen: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = seen.append  # type: ignore[method-assign, assignment]
    direct_logger.addHandler(extra)
    log.info("request", FIELDS)
    direct_logger.removeHandler(extra)
    assert [(r.getMessage(), getattr(r, "status", None)) for r in seen] == [("request", 200)]
    # A filter on the logger is obeyed (here: it drops everything).
    direct_logger.addFilter(lambda record: False)
    log.info("dropped", FIELDS)
    direct_logger.filters.clear()
    # A level above info: nothing.
    direct_logger.setLevel(logging.WARNING)
    log.info("below the level", FIELDS)
    direct_logger.setLevel(logging.INFO)
    # A formatter of another kind: logging formats the line.
    handler.setFormatter(logging.Formatter("plain %(message)s"))
    log.info("formatted by logging", FIELDS)
    handler.setFormatter(JsonFormatter())
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert [orjson.loads(lines[0])["message"], lines[1]] == ["request", "plain formatted by logging"]
