"""PredictionService and ModelHolder without HTTP: bytes in, bytes out, the personalizer hook and the swap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from moviematch_ml.errors import FieldError
from moviematch_ml.features import EXAMPLE
from moviematch_ml.model import load_predictor
from moviematch_ml.serving import InvalidJSONError, ModelHolder, PredictionService
from moviematch_ml.settings import Settings


@pytest.fixture
def holder(tmp_path: Path) -> ModelHolder:
    h = ModelHolder(Settings(model_path=tmp_path / "missing"))
    h.load()
    return h


class _LikesEvenMovies:
    """A stand-in personalizer: knows user 7 only, and answers 9.5 for even movie ids."""

    version = "likes-even-1"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[Any], tuple[int, ...]]] = []

    def __call__(
        self, user_id: str | int, movie_ids: Sequence[str | int | None], x: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None:
        self.calls.append((user_id, list(movie_ids), x.shape))
        if user_id != 7:
            return None
        mask = np.array([isinstance(m, int) and m % 2 == 0 for m in movie_ids])
        return np.full(len(movie_ids), 9.5), mask


def test_bytes_in_bytes_out(holder: ModelHolder) -> None:
    service = PredictionService(holder, max_batch_size=10)
    out = service.predict_one(orjson.dumps(EXAMPLE))
    assert isinstance(out, bytes)
    assert orjson.loads(out)["predicted_rating"] == 7.909


def test_errors_are_exceptions_not_responses(holder: ModelHolder) -> None:
    service = PredictionService(holder, max_batch_size=10)
    with pytest.raises(InvalidJSONError):
        service.predict_one(b"{")
    with pytest.raises(FieldError) as info:
        service.predict_batch(orjson.dumps({"movies": [{"movie_id": 1, **EXAMPLE, "vote_count": -3}]}))
    assert (info.value.loc, info.value.value) == ("movies[0].vote_count", -3)


def test_personalizer_answers_the_rows_it_knows(holder: ModelHolder) -> None:
    hook = _LikesEvenMovies()
    service = PredictionService(holder, max_batch_size=10, personalizer=hook)
    movies = [{"movie_id": i, **EXAMPLE} for i in (1, 2, 3, 4)]
    body = orjson.loads(service.predict_batch(orjson.dumps({"movies": movies, "user_id": 7, "rank": True})))
    assert [(p["movie_id"], p["predicted_rating"], p["source"]) for p in body["predictions"]] == [
        (2, 9.5, "personalized"),
        (4, 9.5, "personalized"),
        (1, 7.909, "fallback"),
        (3, 7.909, "fallback"),
    ]
    assert hook.calls == [(7, [1, 2, 3, 4], (4, 6))]  # one call for the whole batch


def test_personalizer_is_not_asked_without_a_user(holder: ModelHolder) -> None:
    hook = _LikesEvenMovies()
    service = PredictionService(holder, max_batch_size=10, personalizer=hook)
    service.predict_batch(orjson.dumps({"movies": [{"movie_id": 2, **EXAMPLE}]}))
    service.predict_one(orjson.dumps({**EXAMPLE, "movie_id": 2}))
    assert hook.calls == []


def test_personalizer_on_single_predictions(holder: ModelHolder) -> None:
    service = PredictionService(holder, max_batch_size=10, personalizer=_LikesEvenMovies())
    known = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 2})))
    assert (known["predicted_rating"], known["source"]) == (9.5, "personalized")
    odd = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 3})))
    assert (odd["predicted_rating"], odd["source"]) == (7.909, "fallback")
    stranger = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 8, "movie_id": 2})))
    assert stranger["source"] == "fallback"


def test_holder_states(tiny_model_dir: Path) -> None:
    h = ModelHolder(Settings(model_path=tiny_model_dir))
    assert (h.status, h.ready, h.active.source) == ("degraded", False, "fallback")
    assert str(h.reason).startswith("starting")
    h.load()
    assert (h.status, h.reason, h.active.version) == ("ok", None, "tiny-1")
    assert h.warm_up() is True
    assert h.ready is True
    h.swap(load_predictor(tiny_model_dir))
    assert h.summary()["name"] == "tiny"
