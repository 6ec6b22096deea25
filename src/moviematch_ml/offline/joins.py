"""Each stored rating joined to the prediction served before it: what ``ab-report`` measures and what
``train --from-feedback`` learns from.

The join, rating by rating:

1. **By id.** A rating that quotes a ``prediction_id`` found in the prediction log, for the same movie (and the same
   user, when the prediction had one), is joined to that prediction, whatever the two clocks say.
2. **By user, movie and time.** Otherwise, the latest prediction logged for the same user and movie at or before the
   rating's time (``rated_at``, the time the app sent, else the time the service received it).
3. Otherwise the rating is not joined: no prediction of that movie was served to that user before it (a rating
   before any prediction, a prediction the log dropped or pruned, or one served without a user id and not quoted).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import pandas as pd

from moviematch_ml.features import FEATURE_NAMES

BY_ID: Final[str] = "id"
BY_TIME: Final[str] = "time"
FEEDBACK_COLUMNS: Final[tuple[str, ...]] = ("row_id", "user_id", "movie_id", "rating", "rated_at", "prediction_id")
# The joined frame: the rating's columns, then how and to what it was joined, the logged features last.
JOINED_COLUMNS: Final[tuple[str, ...]] = (
    *FEEDBACK_COLUMNS,
    "joined_by",
    "served_id",
    "logged_at",
    "variant",
    "model_version",
    "prediction",
    "source",
    *FEATURE_NAMES,
)


@dataclass(frozen=True)
class Joined:
    """Ratings joined to predictions: ``frame`` holds the joined ones (JOINED_COLUMNS, in the ratings' arrival
    order), the counts say what happened to the others."""

    frame: pd.DataFrame
    ratings: int  # ratings read
    log_predictions: int  # predictions in the log read
    by_id: int
    by_time: int

    @property
    def unjoined(self) -> int:
        return self.ratings - self.by_id - self.by_time


class Logged(Protocol):
    """One logged prediction (``online.journal.Served``, which reads them from the store: training code does not
    import the service's)."""

    @property
    def prediction_id(self) -> str: ...
    @property
    def logged_at(self) -> float: ...
    @property
    def variant(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def movie_id(self) -> str | None: ...
    @property
    def features(self) -> tuple[float, ...]: ...
    @property
    def prediction(self) -> float: ...
    @property
    def source(self) -> str: ...


Rating = tuple[int, str, str, float, float, str | None]  # row id, user, movie, rating, rated_at, prediction_id


class LoggedIndex:
    """The logged predictions, findable by prediction id and by (user, movie) in time order."""

    def __init__(self, predictions: Iterable[Logged]) -> None:
        self.by_id: dict[str, Logged] = {}
        times: dict[tuple[str, str], list[tuple[float, int, Logged]]] = {}
        for i, p in enumerate(predictions):
            self.by_id[p.prediction_id] = p
            if p.user_id is not None and p.movie_id is not None:
                # i breaks ties of equal times: the one logged later (a later row) wins, as it was served later.
                times.setdefault((p.user_id, p.movie_id), []).append((p.logged_at, i, p))
        for rows in times.values():
            rows.sort(key=lambda r: (r[0], r[1]))
        self._times = {k: ([r[0] for r in rows], [r[2] for r in rows]) for k, rows in times.items()}

    def find(
        self, user_id: str, movie_id: str, rated_at: float, prediction_id: str | None
    ) -> tuple[str, Logged] | None:
        """(how, prediction) of one rating, by the rules of the module; None when it joins nothing."""
        if prediction_id is not None:
            p = self.by_id.get(prediction_id)
            if p is not None and p.movie_id == movie_id and p.user_id in (None, user_id):
                return BY_ID, p
        found = self._times.get((user_id, movie_id))
        if found is None:
            return None
        times, rows = found
        i = bisect.bisect_right(times, rated_at)
        return None if i == 0 else (BY_TIME, rows[i - 1])


def join_ratings(ratings: Iterable[Rating], predictions: Iterable[Logged]) -> Joined:
    """Join ratings (``FeedbackStore.iter_feedback``'s tuples, in arrival order) to logged predictions
    (``journal.read``), by the rules of the module.

    Only the predictions a rating could join are kept (quoted ids, rated (user, movie) pairs): memory follows the
    ratings, not the log, which holds every prediction served and is far larger."""
    rows = list(ratings)
    quoted = {r[5] for r in rows if r[5] is not None}
    pairs = {(r[1], r[2]) for r in rows}
    read = 0

    def candidates() -> Iterator[Logged]:
        nonlocal read
        for p in predictions:
            read += 1
            if p.prediction_id in quoted or (p.user_id, p.movie_id) in pairs:
                yield p

    index = LoggedIndex(candidates())
    out: list[tuple[object, ...]] = []
    by_id = by_time = 0
    for row_id, user_id, movie_id, rating, rated_at, prediction_id in rows:
        hit = index.find(user_id, movie_id, rated_at, prediction_id)
        if hit is None:
            continue
        how, p = hit
        if how == BY_ID:
            by_id += 1
        else:
            by_time += 1
        out.append(
            (
                row_id,
                user_id,
                movie_id,
                rating,
                rated_at,
                prediction_id,
                how,
                p.prediction_id,
                p.logged_at,
                p.variant,
                p.model_version,
                p.prediction,
                p.source,
                *p.features,
            )
        )
    frame = pd.DataFrame(out, columns=list(JOINED_COLUMNS))
    numeric = ["rating", "rated_at", "logged_at", "prediction", *FEATURE_NAMES]
    frame = frame.astype({"row_id": np.int64, **dict.fromkeys(numeric, np.float64)})
    return Joined(frame, len(rows), read, by_id, by_time)
