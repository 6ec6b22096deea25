"""The service's own models in the replay protocol: fitted and written as ``train`` writes them, then run by the
service itself (a ``ReplayService``: ``online/harness.py``'s, which the CLI hands in) and fed the ratings through
``/feedback`` and ``/predict``.

Nothing here re-implements the personalised model: each prediction is a ``/predict`` body handed to the service,
each revealed rating a ``/feedback`` body, with the replay's time as the service's clock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.boosting import TrainConfig, fit_booster
from moviematch_ml.offline.stacking import fit_frame
from moviematch_ml.runtime.cards import (
    APP_SPACE,
    PERSONALIZED_DIR,
    ModelCard,
    RatingScale,
    content_versioned,
    write_card,
)
from moviematch_ml.runtime.personalized import PersonalizedConfig

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

MODEL_FILE: Final[str] = "model.txt"
# What the replay's models say they were trained on: the store's ratings, which the store then holds (so the
# service counts no stored rating twice in the movies' statistics: PersonalizedModel.counts_store_ratings).
REPLAY_DATASET: Final[str] = "feedback"


# The most ratings in one /feedback body (the service's FEEDBACK_BATCH).
FEEDBACK_BATCH: Final[int] = 1000
PERSONALIZED: Final[str] = "personalized"  # the source of a personalised answer


class ReplayService(Protocol):
    """The service as the replay drives it: the models of a directory, /predict and /feedback, on a clock."""

    def load(self) -> None:
        """Load the directory's models (the first time) or reload them."""
        ...

    async def predict_one(self, body: bytes) -> bytes: ...

    async def record(self, body: bytes) -> None: ...

    def record_now(self, body: bytes) -> None: ...

    def six_features(self, x: FloatArray) -> FloatArray:
        """The six-feature model's answers (0-10)."""
        ...

    def close(self) -> None: ...


# Makes the service of a model directory, on a clock (unix seconds).
ServiceFactory = Callable[[Path, Callable[[], float]], ReplayService]


def request_body(user_id: object, movie_id: object, x: Sequence[float]) -> bytes:
    """The /predict body of one rating: the user, the movie and its six features."""
    body: dict[str, Any] = {"user_id": user_id, "movie_id": movie_id}
    body.update(zip(FEATURE_NAMES, x, strict=True))
    return orjson.dumps(body)


def feedback_body(rows: pd.DataFrame, to_api: float) -> bytes:
    """The /feedback body of these ratings (API scale, with their own timestamps)."""
    columns = ("user_id", "movie_id", "rating", "timestamp")
    return _feedback_body(*(rows[c].tolist() for c in columns), to_api=to_api)


def _feedback_body(
    users: Sequence[Any], movies: Sequence[Any], ratings: Sequence[float], times: Sequence[float], *, to_api: float
) -> bytes:
    body = [
        {"user_id": u, "movie_id": m, "rating": r * to_api, "timestamp": t}
        for u, m, r, t in zip(users, movies, ratings, times, strict=True)
    ]
    return orjson.dumps({"ratings": body})


def write_six_features(directory: Path, text: str, scale: RatingScale, data: dict[str, Any]) -> ModelCard:
    """The six-feature model's files as ``train`` writes them (its text and a content-versioned card)."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = text.encode("utf-8")
    (directory / MODEL_FILE).write_bytes(raw)
    card = content_versioned(
        ModelCard(
            name="moviematch-replay",
            version="",
            kind="six_features",
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(data["last_timestamp"])),
            model_file=MODEL_FILE,
            model_format="lightgbm-text",
            sha256=hashlib.sha256(raw).hexdigest(),
            features=list(FEATURE_NAMES),
            rating_scale=scale,
            data=data,
        )
    )
    write_card(directory, card)
    return card


@dataclass
class ServedModels:
    """``six_features`` and ``personalized`` as the service runs them, on the replay's clock.

    ``frame``: every rating in time order with its six features (from the ratings strictly before it);
    ``refit_seconds``: None = fitted once on the history, else refitted on every earlier rating when a new period
    begins (and reloaded by the model set, as ``POST /admin/reload`` does).
    """

    frame: pd.DataFrame
    scale: RatingScale
    directory: Path
    make_service: ServiceFactory
    six_config: TrainConfig = field(default_factory=TrainConfig)
    config: PersonalizedConfig = field(default_factory=lambda: PersonalizedConfig.model_validate({}))
    refit_seconds: float | None = None
    now: float = 0.0  # the replay's clock: the time of the ratings being predicted
    fitted_period: int | None = None
    fits: int = 0
    service: ReplayService | None = None
    stored: int = 0  # the frame's rows [0, stored) went through /feedback
    seconds: dict[str, float] = field(
        default_factory=lambda: {"fit": 0.0, "seed": 0.0, "feedback": 0.0, "predict": 0.0}
    )

    def __post_init__(self) -> None:
        # The frame's columns as Python lists and one matrix, taken once: a replay slices them at every timestamp.
        frame = self.frame
        self._users: list[Any] = frame["user_id"].tolist()
        self._movies: list[Any] = frame["movie_id"].tolist()
        self._ratings: list[float] = frame["rating"].tolist()
        self._times: list[float] = frame["timestamp"].tolist()
        self._x = frame.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)

    def clock(self) -> float:
        return self.now

    def due(self, now: float) -> bool:
        if self.fits == 0:
            return True
        return self.refit_seconds is not None and int(now // self.refit_seconds) > (self.fitted_period or 0)

    def fit(self, n_seen: int, now: float) -> None:
        """Fit both models on rows [0, n_seen), write them, and load them into the service (the first time, with
        the store holding those ratings as /feedback wrote them)."""
        t0 = time.perf_counter()
        train = self.frame.iloc[:n_seen]
        x = train.loc[:, list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
        fitted = fit_booster(
            x, train["rating"].to_numpy(dtype=np.float64), train["timestamp"].to_numpy(dtype=np.int64), self.six_config
        )
        data = {
            "dataset": REPLAY_DATASET,
            "n_ratings": n_seen,
            "last_timestamp": int(train["timestamp"].max()),
        }
        write_six_features(self.directory, fitted.text, self.scale, data)
        model = fit_frame(train, self.scale, self.config)
        model.save(self.directory / PERSONALIZED_DIR, created_at="replay", data=data, movie_id_space=APP_SPACE)
        self.now = now
        if self.service is None:
            self.service = self.make_service(self.directory, self.clock)
        self.service.load()
        self.fitted_period = None if self.refit_seconds is None else int(now // self.refit_seconds)
        self.fits += 1
        self.seconds["fit"] += time.perf_counter() - t0
        if self.stored < n_seen:
            self.reveal_sync(np.arange(self.stored, n_seen, dtype=np.int64))

    def reveal_sync(self, rows: IntArray) -> None:
        """``reveal``, blocking (the store write without its worker thread): the history, before the replay."""
        assert self.service is not None
        t0 = time.perf_counter()
        for body in self._feedback_bodies(rows):
            self.service.record_now(body)
        self.seconds["seed"] += time.perf_counter() - t0

    async def reveal(self, rows: IntArray) -> None:
        """These rows' ratings go through /feedback (in bodies of at most FEEDBACK_BATCH ratings)."""
        assert self.service is not None
        t0 = time.perf_counter()
        for body in self._feedback_bodies(rows):
            await self.service.record(body)
        self.seconds["feedback"] += time.perf_counter() - t0

    def _feedback_bodies(self, rows: IntArray) -> list[bytes]:
        if len(rows) and (int(rows[0]) != self.stored or int(rows[-1]) - int(rows[0]) + 1 != len(rows)):
            first, last = int(rows[0]), int(rows[-1])
            raise ValueError(f"ratings must be revealed in order: rows {first}-{last} after {self.stored}")
        self.stored += len(rows)
        out = []
        for k in range(int(rows[0]), int(rows[-1]) + 1, FEEDBACK_BATCH) if len(rows) else ():
            end = min(k + FEEDBACK_BATCH, int(rows[-1]) + 1)
            out.append(
                _feedback_body(
                    self._users[k:end],
                    self._movies[k:end],
                    self._ratings[k:end],
                    self._times[k:end],
                    to_api=self.scale.to_api,
                )
            )
        return out

    async def predict(self, rows: IntArray) -> tuple[FloatArray, FloatArray, BoolArray]:
        """(the service's answers, the six-feature model's, whether the personalised model answered) of these rows,
        on the data's scale: one /predict per row, with the user id, as the app sends it."""
        service = self.service
        if service is None:
            raise RuntimeError("ServedModels.predict before fit")
        t0 = time.perf_counter()
        x = self._x[rows]
        out = np.empty(len(rows))
        personal = np.zeros(len(rows), dtype=bool)
        for k, row in enumerate(rows.tolist()):
            body = request_body(self._users[row], self._movies[row], x[k].tolist())
            answer = orjson.loads(await service.predict_one(body))
            out[k] = answer["predicted_rating"]
            personal[k] = answer["source"] == PERSONALIZED
        # Without a user id the service answers with the six-feature model alone (as /predict does).
        six = service.six_features(x)
        self.seconds["predict"] += time.perf_counter() - t0
        to_api = self.scale.to_api
        return out / to_api, six / to_api, personal

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
