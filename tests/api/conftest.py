"""Fixtures for the HTTP tests: apps built from Settings, in-process clients, and captured JSON log lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from moviematch_ml.api.app import create_app
from moviematch_ml.logs import JsonFormatter
from moviematch_ml.settings import Settings


@pytest.fixture
def fallback_settings(tmp_path: Path) -> Settings:
    """Settings whose MODEL_PATH does not exist: the service starts degraded and answers with the fallback."""
    return Settings(model_path=tmp_path / "no-such-model")


@pytest.fixture
def client(fallback_settings: Settings) -> Iterator[TestClient]:
    """A started (lifespan run) fallback service."""
    with TestClient(create_app(fallback_settings)) as c:
        yield c


@pytest.fixture
def model_client(tiny_model_dir: Path) -> Iterator[TestClient]:
    """A started service answering with the tiny LightGBM model."""
    with TestClient(create_app(Settings(model_path=tiny_model_dir))) as c:
        yield c


class LogCapture:
    """The JSON lines the package's loggers wrote during a test, parsed."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines()]

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["logger"] == "moviematch_ml.access"]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Route the package's log records through the JSON formatter into a buffer, and undo it afterwards."""
    capture = LogCapture()
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("moviematch_ml")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
