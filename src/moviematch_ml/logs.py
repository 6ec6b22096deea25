"""JSON-lines logging: one JSON object per line, for the service and for uvicorn, configured once at the edge."""

from __future__ import annotations

import logging
import logging.config
from datetime import UTC, datetime
from typing import IO, Any, Final

import orjson

# Attributes every LogRecord has (plus uvicorn's ANSI-coloured duplicate of the message); anything else on a
# record came from ``extra=`` and is emitted as a JSON field.
_STANDARD_ATTRS: Final[frozenset[str]] = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName", "color_message"}
)

ACCESS_LOGGER: Final[str] = "moviematch_ml.access"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, message, then the record's ``extra`` fields.

    ``level`` and ``message`` are the keys Railway's log viewer reads from JSON lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
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


def log_config(level: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` for the service, also handed to uvicorn (it applies it in every worker).

    uvicorn's own access log is switched off: the request middleware writes one richer line per request instead.
    """
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "moviematch_ml.logs.JsonFormatter"}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
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
