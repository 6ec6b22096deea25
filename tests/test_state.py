"""Online state: the personalizer reads users' ratings from the store and folds them into the personalised model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.errors import StoreError
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from moviematch_ml.feedback import Feedback
from moviematch_ml.personalized import PersonalizedModel
from moviematch_ml.state import StatePersonalizer, TTLCache, load_personalized
from moviematch_ml.store import Counts, FeedbackStore

X = np.array([[float(EXAMPLE[n]) for n in FEATURE_NAMES]] * 3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ttl_cache_expires_bounds_and_forgets() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(ttl=2.0, max_entries=2, clock=clock)
    cache.put("a", 1)
    assert cache.get("a") == (True, 1)
    clock.now = 2.5
    assert cache.get("a") == (False, None)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)  # over the bound: the oldest entry goes
    assert cache.get("a") == (False, None)
    assert cache.get("c") == (True, 3)
    cache.discard(["c"])
    assert cache.get("c") == (False, None)


def test_zero_ttl_never_caches() -> None:
    cache: TTLCache[str, int] = TTLCache(ttl=0.0, max_entries=10)
    cache.put("a", 1)
    assert cache.get("a") == (False, None)


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore.from_url(f"sqlite:///{tmp_path / 's.sqlite3'}")


@pytest.fixture
def personalized(tiny_personalized_dir: Path) -> PersonalizedModel:
    model = load_personalized(tiny_personalized_dir)
    assert model is not None
    return model


def _rate(store: FeedbackStore, user: str, ratings: dict[int, float], t0: float = 2_000_000.0) -> None:
    store.add([Feedback(f"{user}-{m}", user, str(m), r, t0 + i, None) for i, (m, r) in enumerate(ratings.items())])


def test_unknown_user_and_no_model_answer_nothing(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = StatePersonalizer(store, ttl=0)
    assert p(1, [1, 2, 3], X) is None  # no model yet
    p.set_model(personalized)
    assert p("nobody", [1, 2, 3], X) is None  # no ratings in the store


def test_a_generous_user_is_predicted_higher_than_a_harsh_one(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    p = StatePersonalizer(store, ttl=0)
    p.set_model(personalized)
    _rate(store, "generous", {m: 10.0 for m in range(0, 10)})
    _rate(store, "harsh", {m: 2.0 for m in range(0, 10)})
    high = p("generous", [20, 21, 22], X)
    low = p("harsh", ["20", "21", "22"], X)  # ids as text or integers are the same movies
    assert high is not None
    assert low is not None
    assert high[1].all()
    assert low[1].all()
    assert ((high[0] - low[0]) > 1.0).all()  # on the 0-10 scale
    assert ((high[0] >= 0) & (high[0] <= 10)).all()


def test_cached_state_is_forgotten_when_this_replica_stores_a_rating(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    clock = FakeClock()
    p = StatePersonalizer(store, ttl=60, clock=clock)
    p.set_model(personalized)
    _rate(store, "u", {1: 2.0})
    first = p("u", [5], X[:1])
    _rate(store, "u", {m: 10.0 for m in range(2, 12)})
    assert p("u", [5], X[:1]) == first  # still cached: another replica's write shows up after the ttl
    p.forget(["u"])
    after = p("u", [5], X[:1])
    assert after is not None
    assert first is not None
    assert after[0][0] > first[0][0]


def test_movie_totals_are_read_in_bulk_and_scaled(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = StatePersonalizer(store, ttl=0)
    p.set_model(personalized)
    _rate(store, "a", {7: 8.0})
    _rate(store, "b", {7: 6.0})
    extra = p.movie_extra(personalized, [7, "8", None, "7"])
    # Two ratings (8 and 6 on 0-10) are 4 and 3 stars: count 2, sum 7, sum of squares 25.
    assert extra.tolist() == [[2.0, 7.0, 25.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 7.0, 25.0]]


class BrokenStore(FeedbackStore):
    def __init__(self) -> None:
        pass

    def user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
        raise StoreError("database is down")

    def movie_counts(self, movie_ids: object) -> dict[str, Counts]:
        raise StoreError("database is down")


def test_store_failure_falls_back_to_the_six_feature_model(personalized: PersonalizedModel) -> None:
    p = StatePersonalizer(BrokenStore(), ttl=0)
    p.set_model(personalized)
    assert p("u", [1], X[:1]) is None


def test_no_personalized_directory_means_none(tiny_model_dir: Path) -> None:
    assert load_personalized(tiny_model_dir) is None
