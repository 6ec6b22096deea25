"""The service's core driven directly, without HTTP or background tasks, on a clock of the caller's: what the replay
protocol (``offline/replay.py``) runs the service's models through."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool

from moviematch_ml.errors import ModelError
from moviematch_ml.online.models import ModelSet
from moviematch_ml.online.service import Services, wire_services
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.settings import Settings

FloatArray = npt.NDArray[np.float64]


def harness_settings(model_path: Path) -> Settings:
    """The service's defaults with the model directory, for a harness. The store read timeout is raised: on a busy
    machine a slow read would hand a row to the six-feature model, which measures the machine, not the model."""
    return Settings(
        model_path=model_path,
        database_url="sqlite://",
        store_read_timeout=60.0,
        store_write_timeout=60.0,
        prediction_cache_size=0,
        metrics_enabled=False,
        prediction_log=False,
    )


class ServiceHarness:
    """The models of ``model_dir`` (loaded by ``ModelSet``, as the service loads them), a feedback store in
    in-memory SQLite, and the services ``create_app`` wires (``wire_services``) with ``now`` as their clock.

    The store is one connection shared by the service's worker threads: the harness awaits each call before the
    next, so they never use it at once. The store's classes and queries are the service's; only the disk (its fsync
    per ``/feedback``) is left out.
    """

    def __init__(self, model_dir: Path, now: Callable[[], float], settings: Settings | None = None) -> None:
        self.settings = settings or harness_settings(model_dir)
        engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        self.store = FeedbackStore(engine)
        self.store.migrate()
        self.model_set = ModelSet(model_dir, movie_id_space=self.settings.movie_id_space)
        self.services: Services = wire_services(self.settings, self.model_set, self.store, clock=now, now=now)
        self._loaded = False

    def load(self) -> None:
        """Load the models of the directory (the first time), or reload them as ``POST /admin/reload`` does.
        Raises ModelError unless both models load."""
        if not self._loaded:
            self.model_set.load()
            self._loaded = True
        else:
            outcome = self.model_set.reload()
            if not outcome.reloaded:
                raise ModelError(f"the models did not reload: {outcome.reason}")
        current = self.model_set.current
        for report in (current.six_report, current.personalized_report):
            if report.status != "ok":
                raise ModelError(f"a model did not load: {report.reason}")

    async def predict_one(self, body: bytes) -> bytes:
        """``POST /predict``."""
        return await self.services.predictions.predict_one(body)

    async def record(self, body: bytes) -> None:
        """``POST /feedback``."""
        await self.services.feedback.record(body, None)

    def record_now(self, body: bytes) -> None:
        """``POST /feedback``, blocking (without the worker thread)."""
        self.services.feedback.record_now(body, None)

    def six_features(self, x: FloatArray) -> FloatArray:
        """The six-feature model's answers (0-10), as ``/predict`` without a user id gives them (unrounded)."""
        return self.model_set.current.six.predict(x)

    def close(self) -> None:
        self.store.close()
