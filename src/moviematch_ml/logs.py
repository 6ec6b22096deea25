"""JSON-lines logging: one JSON object per line, for the service and for uvicorn, configured once at the edge."""

from __future__ import annotations

import logging
import logging.config
import math
import os
import sys
import threading
import time
import weakref
from typing import IO, Any, Final

import orjson

# Attributes every LogRecord has (plus uvicorn's ANSI-coloured duplicate of the message); anything else on a
# record came from ``extra=`` and is emitted as a JSON field.
_STANDARD_ATTRS: Final[frozenset[str]] = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName", "color_message"}
)

ACCESS_LOGGER: Final[str] = "moviematch_ml.access"

FLUSH_INTERVAL: Final[float] = 0.1
"""Seconds a line may wait in a :class:`BufferedStreamHandler` before it is written."""
BUFFER_SIZE: Final[int] = 64 * 1024
"""Characters a :class:`BufferedStreamHandler` holds before it writes them without waiting."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, message, then the record's ``extra`` fields.

    ``level`` and ``message`` are the keys Railway's log viewer reads from JSON lines.
    """

    def __init__(self) -> None:
        super().__init__()
        # (whole second, its "YYYY-MM-DDTHH:MM:SS"): one tuple, so a reader in another thread never sees a torn pair.
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # default=str: an unexpected object in ``extra`` must not make the log line itself fail.
        return orjson.dumps(entry, default=str).decode("utf-8")

    def _timestamp(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``, at under half the cost.

        Rounds to the microsecond as ``fromtimestamp`` does, then truncates to milliseconds as ``isoformat`` does,
        so the text is the same; only the date and time of day are cached, and they change once a second.
        """
        frac, whole = math.modf(created)
        micros = round(frac * 1e6)
        if micros >= 1_000_000:
            whole += 1.0
            micros -= 1_000_000
        elif micros < 0:  # before 1970
            whole -= 1.0
            micros += 1_000_000
        second = int(whole)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        return f"{cached[1]}.{micros // 1000:03d}+00:00"


class BufferedStreamHandler(logging.StreamHandler[IO[str]]):
    """A StreamHandler that writes its lines in batches: one ``write`` and ``flush`` for many lines.

    Each record is formatted when it is logged, so its line is exactly what StreamHandler would write; the lines are
    written, in order, once more than ``buffer_size`` characters wait, at the latest ``flush_interval`` seconds after
    they were logged (a daemon thread wakes that often), at once for a record at ``flush_level`` or above (errors are
    never delayed), and on ``flush()``/``close()``, which ``logging.shutdown()`` calls at interpreter exit. Only a
    process that dies without exiting (SIGKILL, ``os._exit``) loses the lines of its last ``flush_interval``.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        flush_interval: float = FLUSH_INTERVAL,
        buffer_size: int = BUFFER_SIZE,
        flush_level: int = logging.WARNING,
    ) -> None:
        super().__init__(sys.stderr if stream is None else stream)  # StreamHandler's default, spelled out for mypy
        self.flush_interval = flush_interval
        self.buffer_size = buffer_size
        self.flush_level = flush_level
        self._closed = False
        self._reset()
        _live_handlers.add(self)

    def _reset(self) -> None:
        """An empty buffer and no flusher thread (yet): the start, and a forked child's state (its parent writes
        the lines it had buffered; the child has none of the parent's threads)."""
        # On the handler's own lock, which ``handle()`` already holds around ``emit()``; used as the lock below.
        self._wakeup = threading.Condition(self.lock)
        self._lines: list[str] = []
        self._size = 0
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add_line(self.format(record), record.levelno)
        except RecursionError:  # as StreamHandler does: see CPython issue 36272
            raise
        except Exception:
            self.handleError(record)

    def add_line(self, line: str, levelno: int) -> None:
        """Buffer one formatted line of a record at ``levelno`` (``emit``, and ``DirectLog`` without a record)."""
        with self._wakeup:  # handle() holds the lock already; this is for emit() and DirectLog
            if self._flusher is None and not self._closed:
                self._flusher = threading.Thread(target=self._run, name="log-flusher", daemon=True)
                self._flusher.start()
            self._lines.append(line)
            self._size += len(line) + 1
            # Once closed (a record logged during interpreter shutdown) no thread is left to write it later.
            if levelno >= self.flush_level or self._size > self.buffer_size or self._closed:
                self._write()

    def flush(self) -> None:
        """Write every buffered line now."""
        with self._wakeup:
            self._write()

    def close(self) -> None:
        """Write what is left and stop the flusher thread; later records are written straight through."""
        with self._wakeup:
            self._closed = True
            self._write()
            # No join: logging.shutdown() calls close() holding the lock, which the woken thread needs to finish.
            self._wakeup.notify()
        super().close()

    def _write(self) -> None:
        """Write and flush the buffered lines as one string; called with the lock held."""
        if not self._lines:
            return
        lines = self._lines
        self._lines = []
        self._size = 0
        try:
            lines.append("")  # the terminator after the last line
            self.stream.write(self.terminator.join(lines))
            super().flush()
        except RecursionError:
            raise
        except Exception:
            # The batch is dropped, as StreamHandler drops a line it cannot write: keeping it would grow without
            # bound behind a broken stream. handleError reports it on stderr (when logging.raiseExceptions).
            self.handleError(logging.makeLogRecord({"msg": "%d buffered log lines lost", "args": (len(lines) - 1,)}))

    def _run(self) -> None:
        """The flusher thread: writes what waits every ``flush_interval`` seconds, until the handler is closed."""
        # A fixed beat rather than a wake-up from emit() when a batch starts: notified under the lock, the thread
        # fought the logging thread for that lock and the GIL: a context switch and CPU on every request.
        # Idle, it costs a few wake-ups a second.
        with self._wakeup:
            while not self._closed:
                self._wakeup.wait(self.flush_interval)
                self._write()


_live_handlers: weakref.WeakSet[BufferedStreamHandler] = weakref.WeakSet()


class DirectLog:
    """``logger.info(message, extra=fields)`` for the hot path (the access line of every request).

    With the service's logging configuration, a record's only destination is one ``BufferedStreamHandler`` with a
    ``JsonFormatter``; then the line is built here, the same text the formatter would write (tested), without
    the ``LogRecord``, the caller lookup and the handler chain, which cost a quarter of a ``/predict`` request's
    CPU (docs/performance-history.md, section 8). In any other configuration (a filter, another
    handler, pytest's ``caplog``...) it is a plain ``logger.info``.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def _handler(self, levelno: int) -> BufferedStreamHandler | None:
        """The one handler a record at ``levelno`` would reach, if that is all it would do; else None."""
        logger = self.logger
        if logger.filters or not logger.isEnabledFor(levelno):
            return None
        found: BufferedStreamHandler | None = None
        current: logging.Logger | None = logger
        while current is not None:
            for handler in current.handlers:
                if (
                    found is not None
                    or not isinstance(handler, BufferedStreamHandler)
                    or type(handler.formatter) is not JsonFormatter
                    or handler.filters
                    or levelno < handler.level
                ):
                    return None
                found = handler
            if not current.propagate:
                break
            current = current.parent
        return found

    def info(self, message: str, fields: dict[str, Any]) -> None:
        handler = self._handler(logging.INFO)
        if handler is None:
            self.logger.info(message, extra=fields)
            return
        formatter = handler.formatter
        assert isinstance(formatter, JsonFormatter)  # checked by _handler
        # JsonFormatter.format's entry, in its order: the four fixed keys, then the extra fields as given.
        entry: dict[str, Any] = {
            "ts": formatter._timestamp(time.time()),
            "level": "info",
            "logger": self.logger.name,
            "message": message,
        }
        entry.update(fields)
        handler.add_line(orjson.dumps(entry, default=str).decode("utf-8"), logging.INFO)


def _after_fork_in_child() -> None:
    for handler in list(_live_handlers):
        handler._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def log_config(level: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` for the service, also handed to uvicorn (it applies it in every worker).

    uvicorn's own access log is switched off: the request middleware writes one richer line per request instead.
    """
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "moviematch_ml.logs.JsonFormatter"}},
        "handlers": {
            "stdout": {
                "class": "moviematch_ml.logs.BufferedStreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"level": upper, "handlers": ["stdout"]},
        "loggers": {
            "uvicorn": {"level": upper, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": upper, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
    }


def configure_logging(level: str, stream: IO[str] | None = None) -> None:
    """Send every log record, as JSON lines, to ``stream`` (standard output by default) at ``level`` and above."""
    config = log_config(level)
    if stream is not None:
        config["handlers"]["stdout"]["stream"] = stream
    logging.config.dictConfig(config)
