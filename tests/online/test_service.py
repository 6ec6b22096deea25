"""PredictionService: request bytes to answer bytes, with the personaliser and the answer cache."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from conftest import TinyVersions
from moviematch_ml.errors import FieldError, InvalidJSONError
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.caches import CACHE_MAX_BODY_BYTES, LRUCache
from moviematch_ml.online.models import ModelReport, Models, ModelSet
from moviematch_ml.online.store import FeedbackStore, make_engine
from moviematch_ml.runtime.cards import PERSONALIZED_DIR, model_version
from moviematch_ml.runtime.personalized import PersonalizedModel
from reference import Knows, Service, StandIn

MOVIE = {"movie_id": 1, **EXAMPLE}
FloatArray = npt.NDArray[np.float64]


class Fixed:
    """A six-feature predictor that answers one rating for every row, and counts its calls and rows."""

    source = "model"

    def __init__(self, version: str, rating: float) -> None:
        self.version = version
        self.rating = rating
        self.calls = 0
        self.rows = 0

    def predict(self, x: FloatArray) -> FloatArray:
        self.calls += 1
        self.rows += x.shape[0]
        return np.full(x.shape[0], self.rating)


def _models(six: Fixed, personalized: PersonalizedModel | None = None) -> Models:
    personal_report = ModelReport("absent", None) if personalized is None else ModelReport("ok", personalized.version)
    return Models(six, personalized, ModelReport("ok", six.version), personal_report)


def _model_set(tmp_path: Path, six: Fixed, personalized: PersonalizedModel | None = None) -> ModelSet:
    models = ModelSet(tmp_path / "missing")
    models.swap(_models(six, personalized))
    return models


@pytest.fixture(scope="module")
def personalized(tiny_personalized_dir: Path) -> PersonalizedModel:
    return PersonalizedModel.load(tiny_personalized_dir / "personalized")


def test_answers_come_from_the_current_six_feature_model(tmp_path: Path) -> None:
    six = Fixed("v1", 6.0)
    service = Service(_model_set(tmp_path, six), max_batch_size=2)
    one = orjson.loads(service.predict_one(orjson.dumps(EXAMPLE)))
    # The model set's version: a hash of its parts' (here a six-feature model "v1" alone).
    assert (one["predicted_rating"], one["model_version"], one["source"]) == (6.0, model_version("v1", None), "model")
    body = orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": "m2"}]})
    batch = orjson.loads(service.predict_batch(body))
    assert [(p["movie_id"], p["predicted_rating"]) for p in batch["predictions"]] == [(1, 6.0), ("m2", 6.0)]
    assert (batch["count"], batch["ranked"], batch["model_version"]) == (2, False, model_version("v1", None))
    assert (six.calls, six.rows) == (2, 3)  # one model call per request, never row by row
    with pytest.raises(FieldError, match="1 to 2 movies"):
        service.predict_batch(orjson.dumps({"movies": [MOVIE] * 3}))  # max_batch_size


def test_ranking_and_top_k_sort_on_the_rounded_ratings(tmp_path: Path) -> None:
    class ByVote(Fixed):
        def predict(self, x: FloatArray) -> FloatArray:
            return np.asarray(x[:, 1] + 0.0001 * x[:, 0], dtype=np.float64)  # vote_average, then a tiny tie

    service = Service(_model_set(tmp_path, ByVote("v1", 0.0)), max_batch_size=10)
    movies = [
        {**MOVIE, "movie_id": 1, "vote_average": 5.0, "n_shared_genres": 0},
        {**MOVIE, "movie_id": 2, "vote_average": 9.0, "n_shared_genres": 0},
        {**MOVIE, "movie_id": 3, "vote_average": 5.0, "n_shared_genres": 4},  # 5.0004: rounded, a tie with 1
    ]
    ranked = orjson.loads(service.predict_batch(orjson.dumps({"movies": movies, "rank": True})))
    assert [(p["movie_id"], p["predicted_rating"]) for p in ranked["predictions"]] == [(2, 9.0), (1, 5.0), (3, 5.0)]
    top = orjson.loads(service.predict_batch(orjson.dumps({"movies": movies, "top_k": 1})))
    assert ([p["movie_id"] for p in top["predictions"]], top["count"], top["ranked"]) == ([2], 1, True)


def test_cache_hits_keep_fresh_ids_and_follow_the_model_version(tmp_path: Path) -> None:
    first = Fixed("v1", 6.0)
    models = _model_set(tmp_path, first)
    service = Service(models, max_batch_size=10, cache_size=2)
    assert isinstance(service.cache, LRUCache)
    body = orjson.dumps(EXAMPLE)
    a, b = orjson.loads(service.predict_one(body)), orjson.loads(service.predict_one(body))
    assert first.calls == 1  # the second answer came from the cache
    assert (a["predicted_rating"], b["predicted_rating"], b["model_version"]) == (6.0, 6.0, model_version("v1", None))
    assert a["prediction_id"] != b["prediction_id"]
    batch = orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": 2}], "top_k": 1})
    c, d = orjson.loads(service.predict_batch(batch)), orjson.loads(service.predict_batch(batch))
    assert first.calls == 2
    assert c["predictions"][0]["movie_id"] == d["predictions"][0]["movie_id"] == 1
    assert c["predictions"][0]["prediction_id"] != d["predictions"][0]["prediction_id"]
    second = Fixed("v2", 3.0)
    models.swap(_models(second))
    assert orjson.loads(service.predict_one(body))["predicted_rating"] == 3.0  # new version: not the old entry
    assert (second.calls, len(service.cache)) == (1, 2)  # bounded: the oldest entry was evicted
    assert (service.cache.hits, service.cache.misses) == (2, 3)


def test_cached_predict_answers_are_out_of_the_garbage_collectors_sight(tmp_path: Path) -> None:
    # Under load thousands of them stay cached for seconds: as objects, every collection of the collector's older
    # generations walked them (docs/operations.md, Overload). Kept as tuples of atomic values, they are untracked.
    service = Service(_model_set(tmp_path, Fixed("v1", 6.0)), max_batch_size=10, cache_size=10)
    for n in range(3):
        service.predict_one(orjson.dumps({**EXAMPLE, "popularity": float(n)}))
    gc.collect()  # untracks the answers' tuples; the cache's (answer, size) pairs holding them, at the next one
    gc.collect()
    assert isinstance(service.cache, LRUCache)
    assert len(service.cache) == 3
    assert not any(gc.is_tracked(value) for value in service.cache._data.values())
    assert orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "popularity": 1.0})))["predicted_rating"] == 6.0


def test_no_cache_without_a_size_and_none_for_big_bodies(tmp_path: Path) -> None:
    six = Fixed("v1", 6.0)
    uncached = Service(_model_set(tmp_path, six), max_batch_size=1000)
    assert uncached.cache is None
    for _ in range(2):
        uncached.predict_one(orjson.dumps(EXAMPLE))
    assert six.calls == 2
    cached = Service(_model_set(tmp_path, six), max_batch_size=1000, cache_size=10)
    assert isinstance(cached.cache, LRUCache)
    big = orjson.dumps({"movies": [{**MOVIE, "movie_id": i} for i in range(200)]})
    assert len(big) > CACHE_MAX_BODY_BYTES
    for _ in range(2):
        cached.predict_batch(big)
    assert (six.calls, len(cached.cache)) == (4, 0)  # computed each time, never stored


def test_personalised_answers_are_not_cached(
    tmp_path: Path, store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    six = Fixed("v1", 6.0)
    personal = Knows(store)
    service = Service(_model_set(tmp_path, six, personalized), max_batch_size=10, cache_size=10, user_views=personal)
    body = orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 1})
    for _ in range(2):
        out = orjson.loads(service.predict_one(body))
        want = (1.25, "personalized", model_version("v1", personalized.version))
        assert (out["predicted_rating"], out["source"], out["model_version"]) == want
    assert personal.calls == 2
    assert six.calls == 0  # a personalised answer does not need the six-feature model at all
    assert isinstance(service.cache, LRUCache)
    assert len(service.cache) == 0
    # Nor a six-feature answer to a user the personaliser does not know (yet): their next answer may be personal.
    personal.known = set()
    for _ in range(2):
        assert orjson.loads(service.predict_one(body))["source"] == "model"
    assert (six.calls, len(service.cache)) == (2, 0)
    # Without a user id, the answer depends on the body alone: cached.
    for _ in range(2):
        service.predict_one(orjson.dumps(EXAMPLE))
    assert (six.calls, len(service.cache)) == (3, 1)


def test_a_batch_mixes_personal_and_six_feature_rows(
    tmp_path: Path, store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    six = Fixed("v1", 6.0)
    personal = Knows(store, known={1, 3})
    service = Service(_model_set(tmp_path, six, personalized), max_batch_size=10, cache_size=10, user_views=personal)
    movies = [{**MOVIE, "movie_id": m} for m in (1, 2, 3, 4)]
    out = orjson.loads(service.predict_batch(orjson.dumps({"movies": movies, "user_id": "u", "rank": True})))
    assert [(p["movie_id"], p["predicted_rating"], p["source"]) for p in out["predictions"]] == [
        (2, 6.0, "model"),
        (4, 6.0, "model"),
        (1, 1.25, "personalized"),
        (3, 1.25, "personalized"),
    ]
    assert out["model_version"] == model_version("v1", personalized.version)
    assert "personalized_model_version" not in out
    assert (six.calls, six.rows) == (1, 2)  # only the rows the personalised model left
    personal.known = None  # every row: one source for the answer, and the six-feature model is not called
    every = orjson.loads(service.predict_batch(orjson.dumps({"movies": movies, "user_id": "u"})))
    assert {p["source"] for p in every["predictions"]} == {"personalized"}
    assert six.calls == 1
    assert isinstance(service.cache, LRUCache)
    assert len(service.cache) == 0


def test_no_personalised_model_means_the_personaliser_is_not_asked(tmp_path: Path, store: FeedbackStore) -> None:
    six = Fixed("v1", 6.0)
    personal = Knows(store)
    service = Service(_model_set(tmp_path, six), max_batch_size=10, user_views=personal)
    out = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 1})))
    assert (out["source"], personal.calls) == ("model", 0)
    batch = orjson.loads(service.predict_batch(orjson.dumps({"movies": [MOVIE], "user_id": 7})))
    assert "personalized_model_version" not in batch
    assert personal.calls == 0


def test_one_request_reads_the_models_once(
    tmp_path: Path, personalized: PersonalizedModel, store: FeedbackStore
) -> None:
    # A swap while a request is answered must not mix two model sets in one answer: the personaliser here swaps
    # the models in the middle of the request; the answer still names the versions of the set it started with.
    old, new = Fixed("v1", 6.0), Fixed("v2", 3.0)
    models = _model_set(tmp_path, old, personalized)

    class SwapsMidway(Knows):
        def predict(self, model: PersonalizedModel, user_id: Any, movie_ids: Any, x: FloatArray) -> Any:
            models.swap(_models(new))
            return super().predict(model, user_id, movie_ids, x)

    service = Service(models, max_batch_size=10, user_views=SwapsMidway(store, known={1}))
    out = orjson.loads(service.predict_batch(orjson.dumps({"movies": [MOVIE, {**MOVIE, "movie_id": 2}], "user_id": 1})))
    assert [p["predicted_rating"] for p in out["predictions"]] == [1.25, 6.0]
    assert out["model_version"] == model_version("v1", personalized.version)
    assert (old.calls, new.calls) == (1, 0)
    assert models.current.six is new  # the swap did happen, for the next request


# --- a stand-in for the users' views: bytes in, bytes out, which rows it answers ----------------------------------


@pytest.fixture
def fallback_models(tmp_path: Path) -> ModelSet:
    """No six-feature model (the fallback rule answers, 7.909 for EXAMPLE) and no personalised model."""
    m = ModelSet(tmp_path / "missing")
    m.load()
    return m


@pytest.fixture
def with_personalized(tmp_path: Path, tiny_personalized_dir: Path) -> ModelSet:
    """The fallback rule for the six features, and the tiny personalised model (which the stand-in below replaces)."""
    m = ModelSet(
        tmp_path / "missing", load_personal=lambda _: PersonalizedModel.load(tiny_personalized_dir / PERSONALIZED_DIR)
    )
    m.load()
    assert m.current.personalized is not None
    return m


class LikesEvenMovies(StandIn):
    """Knows user 7 only, and answers 9.5 for even movie ids."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(FeedbackStore(make_engine(f"sqlite:///{tmp_path / 'unused.sqlite3'}")))
        self.calls: list[tuple[str, Any, list[Any], tuple[int, ...]]] = []

    def predict(
        self,
        model: PersonalizedModel,
        user_id: str | int,
        movie_ids: Sequence[str | int | None],
        x: npt.NDArray[np.float64],
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None:
        self.calls.append((model.version, user_id, list(movie_ids), x.shape))
        if user_id != "7":
            return None
        mask = np.array([isinstance(m, int) and m % 2 == 0 for m in movie_ids])
        # As UserViews.predict: None when the model answered no row at all.
        return (np.full(len(movie_ids), 9.5), mask) if mask.any() else None


def test_bytes_in_bytes_out(fallback_models: ModelSet) -> None:
    service = Service(fallback_models, max_batch_size=10)
    out = service.predict_one(orjson.dumps(EXAMPLE))
    assert isinstance(out, bytes)
    assert orjson.loads(out)["predicted_rating"] == 7.909


def test_errors_are_exceptions_not_responses(fallback_models: ModelSet) -> None:
    service = Service(fallback_models, max_batch_size=10)
    with pytest.raises(InvalidJSONError):
        service.predict_one(b"{")
    with pytest.raises(FieldError) as info:
        service.predict_batch(orjson.dumps({"movies": [{"movie_id": 1, **EXAMPLE, "vote_count": -3}]}))
    assert (info.value.loc, info.value.value) == ("movies[0].vote_count", -3)


def test_personalizer_answers_the_rows_it_knows(
    with_personalized: ModelSet, tmp_path: Path, tiny: TinyVersions
) -> None:
    hook = LikesEvenMovies(tmp_path)
    service = Service(with_personalized, max_batch_size=10, user_views=hook)
    movies = [{"movie_id": i, **EXAMPLE} for i in (1, 2, 3, 4)]
    body = orjson.loads(service.predict_batch(orjson.dumps({"movies": movies, "user_id": 7, "rank": True})))
    assert [(p["movie_id"], p["predicted_rating"], p["source"]) for p in body["predictions"]] == [
        (2, 9.5, "personalized"),
        (4, 9.5, "personalized"),
        (1, 7.909, "fallback"),
        (3, 7.909, "fallback"),
    ]
    # One version for the whole answer: the model set's (its personalised part answered some rows).
    assert (body["model_version"], body["variant"]) == (with_personalized.current.version, "champion")
    assert "personalized_model_version" not in body
    # One call for the whole batch, with the model the set holds.
    assert hook.calls == [(tiny.personalized, "7", [1, 2, 3, 4], (4, 6))]


def test_personalizer_is_not_asked_without_a_user(with_personalized: ModelSet, tmp_path: Path) -> None:
    hook = LikesEvenMovies(tmp_path)
    service = Service(with_personalized, max_batch_size=10, user_views=hook)
    service.predict_batch(orjson.dumps({"movies": [{"movie_id": 2, **EXAMPLE}]}))
    service.predict_one(orjson.dumps({**EXAMPLE, "movie_id": 2}))
    assert hook.calls == []


def test_personalizer_is_not_asked_without_a_personalised_model(fallback_models: ModelSet, tmp_path: Path) -> None:
    hook = LikesEvenMovies(tmp_path)
    service = Service(fallback_models, max_batch_size=10, user_views=hook)
    one = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 2})))
    assert (one["predicted_rating"], one["source"]) == (7.909, "fallback")
    assert hook.calls == []


def test_personalizer_on_single_predictions(with_personalized: ModelSet, tmp_path: Path) -> None:
    service = Service(with_personalized, max_batch_size=10, user_views=LikesEvenMovies(tmp_path))
    known = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 2})))
    assert (known["predicted_rating"], known["source"], known["model_version"]) == (
        9.5,
        "personalized",
        with_personalized.current.version,
    )
    odd = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 7, "movie_id": 3})))
    assert (odd["predicted_rating"], odd["source"]) == (7.909, "fallback")
    stranger = orjson.loads(service.predict_one(orjson.dumps({**EXAMPLE, "user_id": 8, "movie_id": 2})))
    assert stranger["source"] == "fallback"
