"""Online state: the personalizer reads users' ratings from the store and folds them into the personalised model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.cf import lookup
from moviematch_ml.errors import StoreError
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from moviematch_ml.feedback import Feedback
from moviematch_ml.personalized import PersonalizedModel, user_state
from moviematch_ml.state import MOVIE_TTL_SECONDS, StatePersonalizer, TTLCache, keep_warm, load_personalized
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
    _rate(store, "a", {7: 8.0, 999_999: 10.0})
    _rate(store, "b", {7: 6.0})
    assert 7 in personalized.mf.item_index
    assert 999_999 not in personalized.mf.item_index  # rated through the app, unknown to the model
    extra = p.movie_extra(personalized, [7, "8", None, "7", 999_999, 1_000_000, "999999"])
    # Two ratings (8 and 6 on 0-10) are 4 and 3 stars: count 2, sum 7, sum of squares 25.
    assert extra.tolist() == [
        [2.0, 7.0, 25.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [2.0, 7.0, 25.0],
        [1.0, 5.0, 25.0],
        [0.0, 0.0, 0.0],
        [1.0, 5.0, 25.0],  # an unknown movie's id as text is the same movie, as for the movies the model knows
    ]


def test_one_movie_and_a_batch_give_the_same_answer(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    # /predict takes a path on Python floats, /predict-batch a vectorised one: same features, same trees.
    p = StatePersonalizer(store, ttl=0)
    p.set_model(personalized)
    _rate(store, "u", {1: 9.0, 2: 3.0, 3: 7.0, 4: 8.0})
    _rate(store, "v", {3: 4.0, 999_999: 6.0})  # movie 3 also has a rating from someone else
    assert 999_999 not in personalized.mf.item_index  # rated through the app, unknown to the model
    # rated, rated by two, unrated, text id, unknown, unknown but rated, no id
    movies: list[int | str | None] = [1, 3, 5, "7", 123456, 999_999, None]
    x = np.repeat(X[:1], len(movies), axis=0)
    x[:, 1] = np.linspace(3.0, 9.0, len(movies))
    batch = p("u", movies, x)
    assert batch is not None
    assert batch[1].all()
    # The batch takes the movies' inputs from the table built at each totals refresh; computed per request from
    # the totals instead, they are the same numbers.
    keys = p._keys(movies)
    view = p.user_view(personalized, "u")
    now = 2_000_100.0
    index, columns = p.movie_inputs(personalized, keys)
    assert index.tolist() == lookup(personalized.mf.item_index, keys).tolist()  # -1 for the three unknown movies
    assert (index < 0).sum() == 3
    from_table, _ = personalized.predict_view(view, keys, x, now, index=index, movie_columns=columns)
    per_request, _ = personalized.predict_view(view, keys, x, now, movie_extra=p.movie_extra(personalized, movies))
    np.testing.assert_array_equal(from_table, per_request)
    for k, m in enumerate(movies):
        one = p("u", [m], x[k : k + 1])
        assert one is not None
        np.testing.assert_allclose(one[0], batch[0][k : k + 1], rtol=0, atol=1e-9)


def test_a_batch_is_built_in_one_pass_and_equals_the_column_by_column_build(
    store: FeedbackStore, personalized: PersonalizedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch path writes the whole input matrix in C (predict_table); predict_view builds the same matrix
    # column by column in numpy. Same inputs, same trees: the same answers, whatever the path.
    p = StatePersonalizer(store, ttl=0)
    p.set_model(personalized)
    _rate(store, "u", {1: 9.0, 2: 3.0, 3: 7.0})
    _rate(store, "v", {3: 4.0, 999_999: 6.0})
    movies: list[int | str | None] = [1, 2, 3, 999_999, 123_456, 4, 5]
    x = np.repeat(X[:1], len(movies), axis=0)
    x[:, 1] = np.linspace(2.0, 9.5, len(movies))
    now = 2_000_100.0
    view = p.user_view(personalized, "u")
    assert view is not None
    totals = p.movie_totals(personalized)
    assert totals.dense is not None  # the tiny model's ids are ints
    rows = p._rows(totals, movies)
    n = len(personalized.mf.item_ids)
    # The rated unknown movie gets its own row after the model's movies; a movie nobody knows takes the last.
    assert rows[3] == n
    assert rows[4] == len(totals.table) - 1
    assert rows[[0, 1, 2, 5, 6]].tolist() == lookup(personalized.mf.item_index, [1, 2, 3, 4, 5]).tolist()
    one_pass = personalized.predict_table(view, x, rows, totals.table, now)
    index, columns = p.movie_inputs(personalized, movies)
    by_columns, mask = personalized.predict_view(view, p._keys(movies), x, now, index=index, movie_columns=columns)
    assert mask.all()
    np.testing.assert_allclose(one_pass, by_columns, rtol=0, atol=1e-12)
    # A model our evaluator does not cover runs on LightGBM's own booster, which takes the whole matrix.
    import lightgbm as lgb

    monkeypatch.setattr(personalized, "booster", lgb.Booster(model_str=personalized.booster.model_to_string()))
    np.testing.assert_allclose(personalized.predict_table(view, x, rows, totals.table, now), one_pass, atol=1e-12)
    # Without the C extension the matrix is built in numpy: the same answers again.
    monkeypatch.setattr("moviematch_ml.personalized._codec", None)
    np.testing.assert_allclose(personalized.predict_table(view, x, rows, totals.table, now), one_pass, atol=1e-12)


def test_ids_of_another_spelling_find_the_same_rows(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = StatePersonalizer(store, ttl=0)
    p.set_model(personalized)
    _rate(store, "v", {999_999: 6.0})
    totals = p.movie_totals(personalized)
    ints = p._rows(totals, [1, 999_999, 5, 424_242])
    # Text ids (as a client may send them) and None take the dict lookup after _keys, and land on the same rows.
    assert p._rows(totals, ["1", "999999", 5, "424242"]).tolist() == ints.tolist()
    assert p._rows(totals, [None, 1])[0] == len(totals.table) - 1
    assert p._rows(totals, (1, 999_999, 5, 424_242)).tolist() == ints.tolist()  # a tuple: not the C path


def test_dense_rows_cover_the_int_ids_only() -> None:
    from moviematch_ml.state import DENSE_IDS_MAX, _dense_rows

    dense = _dense_rows({3: 0, 1: 2, "x": 1})
    assert dense is not None
    assert dense.tolist() == [-1, 2, -1, 0]
    assert _dense_rows({"a": 0}) is None
    assert _dense_rows({DENSE_IDS_MAX: 0, 1: 1}) is None  # too wide an array: the dict alone


def test_a_model_that_skips_unknown_movies_takes_the_column_by_column_path(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    strict = PersonalizedModel(
        personalized.config.model_copy(update={"personalize": "known_user_and_movie"}),
        personalized.state,
        personalized.booster,
        personalized.scale,
    )
    p = StatePersonalizer(store, ttl=0)
    p.set_model(strict)
    _rate(store, "u", {1: 9.0, 2: 3.0})
    view = p.user_view(strict, "u")
    assert view is not None
    with pytest.raises(ValueError, match="known_user"):
        strict.predict_table(view, X[:2], np.array([0, 1]), p.movie_totals(strict).table)
    answer = p("u", [1, 123_456, 2], X)
    assert answer is not None
    assert answer[1].tolist() == [True, False, True]  # the unknown movie is left to the six-feature model


def test_a_miss_builds_the_view_the_state_gives(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    # The miss builds the view straight from the stored rows; user_state + user_view is the reference. The user
    # re-rates movie 2, rates a movie id that is not a number (kept as text, unknown to the int-keyed model) and
    # sends three ratings at one second.
    p = StatePersonalizer(store, ttl=0)
    p.set_model(personalized)
    _rate(store, "u", {1: 9.0, 2: 3.0})
    store.add(
        [
            Feedback(f"later-{k}", "u", m, r, 2_000_100.0, None)
            for k, (m, r) in enumerate([("2", 8.0), ("x7", 5.0), ("4", 1.0)])
        ]
    )
    view = p.user_view(personalized, "u")
    scale = personalized.scale.to_api
    want = personalized.user_view(
        user_state(
            personalized.mf,
            [1, 2, "x7", 4],
            [9.0 / scale, 8.0 / scale, 5.0 / scale, 1.0 / scale],
            [2_000_000.0, 2_000_100.0, 2_000_100.0, 2_000_100.0],
        )
    )
    assert view is not None
    assert want is not None
    assert (view.count, view.mean, view.std) == pytest.approx((want.count, want.mean, want.std), rel=1e-12)
    assert view.bias == pytest.approx(want.bias, rel=1e-9)
    assert want.bias != 0.0  # the known movies were folded in despite the text id
    np.testing.assert_allclose(view.factors, want.factors, rtol=1e-9)
    assert view.recent_times == want.recent_times
    np.testing.assert_allclose(view.recent_resid, want.recent_resid, rtol=0, atol=1e-12)


def test_predict_one_is_the_one_movie_call_on_floats(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = StatePersonalizer(store, ttl=0)
    p.set_model(personalized)
    _rate(store, "u", {1: 9.0, 2: 3.0})
    row = X[0].tolist()
    assert p.predict_one("nobody", 1, row) is None
    for movie in (1, "2", 5, 123_456, None):
        one = p.predict_one("u", movie, row)
        call = p("u", [movie], X[:1])
        assert one is not None
        assert call is not None
        assert type(one) is float
        assert 0.0 <= one <= 10.0
        assert call[0].tolist() == [one]


class CountingStore(FeedbackStore):
    """The real store, counting the reads the personalizer makes."""

    def __init__(self, inner: FeedbackStore) -> None:
        self.inner = inner
        self.reads: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.reads[what] = self.reads.get(what, 0) + 1

    def user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
        self._count(f"user {user_id}")
        return self.inner.user_ratings(user_id)

    def all_movie_counts(self) -> dict[str, Counts]:
        self._count("movies")
        return self.inner.all_movie_counts()

    def last_row_id(self) -> int:
        self._count("feed")
        return self.inner.last_row_id()

    def changed_rows(self, after_id: int) -> list[tuple[int, str]]:
        self._count("feed")
        return [row for row in self.inner.changed_rows(after_id) if row[0] not in self.uncommitted]

    uncommitted: frozenset[int] = frozenset()  # row ids the feed does not show yet (a transaction committed late)


def test_movie_totals_are_one_query_per_movie_ttl(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    clock = FakeClock()
    counting = CountingStore(store)
    p = StatePersonalizer(counting, ttl=0, clock=clock)
    p.set_model(personalized)
    _rate(store, "a", {7: 8.0})
    assert p.movie_extra(personalized, [7, 8]).tolist() == [[1.0, 4.0, 16.0], [0.0, 0.0, 0.0]]
    _rate(store, "b", {7: 6.0})
    clock.now = MOVIE_TTL_SECONDS - 1  # still within the movie TTL: the same totals, no new query
    assert p.movie_extra_one(personalized, 7) == (1.0, 4.0, 16.0)
    assert counting.reads == {"movies": 1}
    clock.now = MOVIE_TTL_SECONDS + 1
    assert p.movie_extra_one(personalized, "7") == (2.0, 7.0, 25.0)
    assert counting.reads == {"movies": 2}


def test_other_replicas_ratings_arrive_through_the_change_feed(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    clock = FakeClock()
    counting = CountingStore(store)
    p = StatePersonalizer(counting, ttl=1.0, clock=clock)
    p.set_model(personalized)
    _rate(store, "u", {1: 2.0})
    _rate(store, "w", {1: 9.0})
    first, other = p("u", [5], X[:1]), p("w", [5], X[:1])
    assert first is not None
    assert other is not None
    assert counting.reads == {"feed": 1, "user u": 1, "user w": 1, "movies": 1}
    _rate(store, "u", {m: 10.0 for m in range(2, 12)})  # stored by another replica: this one was not told
    clock.now = 0.5
    assert p("u", [5], X[:1]) == first  # within the ttl: the cached state, no query at all
    assert counting.reads["feed"] == 1
    clock.now = 1.2  # one poll of the feed: it names u (not w), whose state is read again
    after = p("u", [5], X[:1])
    assert after is not None
    assert after[0][0] > first[0][0]
    assert p("w", [5], X[:1]) == other
    assert counting.reads == {"feed": 2, "user u": 2, "user w": 1, "movies": 1}
    clock.now = 1.5
    p("u", [5], X[:1])
    assert counting.reads["feed"] == 2  # at most one poll per ttl


def test_a_failed_poll_drops_every_cached_state(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    clock = FakeClock()
    counting = CountingStore(store)
    p = StatePersonalizer(counting, ttl=1.0, clock=clock)
    p.set_model(personalized)
    _rate(store, "u", {1: 2.0})
    assert p("u", [5], X[:1]) is not None

    def down(after_id: int) -> list[tuple[int, str]]:
        raise StoreError("database is down")

    counting.changed_rows = down  # type: ignore[method-assign]
    clock.now = 2.0
    assert p("u", [5], X[:1]) is None  # the six-feature model answers while the store is unreadable
    del counting.changed_rows
    clock.now = 4.0
    assert p("u", [5], X[:1]) is not None
    assert counting.reads["user u"] == 2  # read again: what was cached before the failure was not trusted


def _polling(
    store: FeedbackStore, personalized: PersonalizedModel, **kw: int
) -> tuple[StatePersonalizer, CountingStore, FakeClock]:
    """A personalizer on a counting store and a fake clock, polling the change feed once per second."""
    clock = FakeClock()
    counting = CountingStore(store)
    p = StatePersonalizer(counting, ttl=1.0, clock=clock, **kw)
    p.set_model(personalized)
    return p, counting, clock


def test_a_rating_is_news_once_not_at_every_poll_of_the_overlap(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    # Each poll reads the rows after the mark of five polls ago (a late commit is still seen): the user is
    # forgotten for the rows the poll before did not return, not again at each of the next four polls.
    p, counting, clock = _polling(store, personalized)
    p.sync()  # the first look: where the feed starts
    _rate(store, "u", {1: 2.0})
    for second in range(1, 7):
        clock.now = float(second)
        assert p("u", [5], X[:1]) is not None
    assert counting.reads["feed"] == 7  # the first look and six polls
    assert counting.reads["user u"] == 1  # read once: at the first request after the poll that named the rating
    _rate(store, "u", {2: 9.0})
    clock.now = 7.0
    assert p("u", [5], X[:1]) is not None
    assert counting.reads["user u"] == 2  # a new row is news again


def test_a_row_committed_late_is_news_when_it_shows(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    # Row 3 (user v) commits after row 4 (user w) was seen: a poll that saw row 4 must still report row 3 later.
    p, counting, clock = _polling(store, personalized)
    _rate(store, "u", {1: 2.0})
    _rate(store, "v", {1: 4.0})
    p.sync()
    assert p("v", [5], X[:1]) is not None
    _rate(store, "v", {2: 9.0})  # row 3
    _rate(store, "w", {1: 8.0})  # row 4
    counting.uncommitted = frozenset({3})
    clock.now = 1.0
    p.sync()
    assert p("v", [5], X[:1]) is not None
    assert counting.reads["user v"] == 1  # the feed did not show row 3 yet: v's view stands
    counting.uncommitted = frozenset()
    clock.now = 2.0
    p.sync()
    assert p("v", [5], X[:1]) is not None
    assert counting.reads["user v"] == 2


def _warming(
    store: FeedbackStore, personalized: PersonalizedModel, **kw: int
) -> tuple[StatePersonalizer, CountingStore, FakeClock]:
    p, counting, clock = _polling(store, personalized, **kw)
    p.warm_ahead = True
    p.sync()  # the first look
    return p, counting, clock


def test_warm_builds_the_views_the_feed_names_before_they_are_asked_for(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    p, counting, clock = _warming(store, personalized)
    _rate(store, "u", {1: 2.0, 3: 4.0})
    _rate(store, "w", {1: 9.0})
    clock.now = 1.0
    p.sync()
    assert p.to_warm == 2
    assert p.warm(10.0) == 0
    assert counting.reads == {"feed": 3, "user u": 1, "user w": 1}  # the first look reads the mark and the latest rows
    got = p("u", [5, 7], X[:2])
    assert counting.reads["user u"] == 1  # the request found the view built
    cold = StatePersonalizer(store, ttl=1.0)
    cold.set_model(personalized)
    want = cold("u", [5, 7], X[:2])
    assert got is not None
    assert want is not None
    np.testing.assert_array_equal(got[0], want[0])  # the same view as a request would have built


def test_warm_stops_after_its_budget_and_is_bounded_by_the_cache(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    p, counting, clock = _warming(store, personalized, max_users=30)
    for k in range(50):
        _rate(store, f"u{k}", {1: 5.0})
    clock.now = 1.0
    p.sync()
    assert p.to_warm == 30  # no more than the cache holds: the 30 latest
    assert p.warm(0.0) == 29  # at least one view per call, whatever the budget
    assert counting.reads.get("user u19", 0) == 0
    assert counting.reads["user u20"] == 1


def test_a_worker_that_starts_queues_the_users_of_the_latest_rows(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    # Ratings stored before the worker started (a deploy, a restart): the first look queues the users of the latest
    # rows, as many rows as the cache holds users (here 4: rows 3-6), by their latest row.
    for user, movie in (("a", 1), ("b", 1), ("c", 1), ("d", 1), ("c", 2), ("e", 1)):
        _rate(store, user, {movie: 5.0})
    p, counting, _ = _warming(store, personalized, max_users=4)
    assert p.to_warm == 3
    assert p.warm(10.0) == 0
    assert sorted(k for k in counting.reads if k.startswith("user")) == ["user c", "user d", "user e"]
    cold, _, _ = _polling(store, personalized, max_users=4)
    cold.sync()  # without warm_ahead, the first look only marks where the feed starts
    assert cold.to_warm == 0


def test_a_new_model_rebuilds_the_users_that_were_cached(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p, counting, _ = _warming(store, personalized)
    _rate(store, "u", {1: 2.0})
    _rate(store, "w", {1: 9.0})
    assert p("u", [5], X[:1]) is not None
    assert p("w", [5], X[:1]) is not None
    p.set_model(personalized)  # a model swapped in: the views were built against the old one
    assert p.to_warm == 2
    assert p.warm(10.0) == 0
    assert counting.reads["user u"] == counting.reads["user w"] == 2
    assert p("u", [5], X[:1]) is not None
    assert counting.reads["user u"] == 2  # built ahead for the new model


def test_warm_without_a_model_or_with_the_store_down(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p, counting, clock = _warming(store, personalized)
    _rate(store, "u", {1: 2.0})
    clock.now = 1.0
    p.sync()

    def down(user_id: str) -> list[tuple[str, float, float]]:
        raise StoreError("database is down")

    counting.user_ratings = down  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        p.warm(1.0)
    assert p.to_warm == 1  # still to do
    del counting.user_ratings
    p.set_model(None)
    assert p.warm(1.0) == 0
    assert p.to_warm == 0


def test_a_user_named_again_while_warmed_is_not_kept(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    # A poll on another thread names the user again while their ratings are read for warm: the view warm built may
    # predate that rating, so it is not kept, and the user stays queued.
    p, counting, clock = _warming(store, personalized)
    _rate(store, "u", {1: 2.0})
    clock.now = 1.0
    p.sync()
    inner_read = counting.user_ratings

    def read_then_poll(user_id: str) -> list[tuple[str, float, float]]:
        rows = inner_read(user_id)
        _rate(store, "u", {2: 9.0})
        clock.now = 2.0
        p.sync()
        return rows

    counting.user_ratings = read_then_poll  # type: ignore[method-assign]
    assert p.warm(0.0) == 1
    del counting.user_ratings
    before = counting.reads["user u"]
    assert p("u", [5], X[:1]) is not None
    assert counting.reads["user u"] == before + 1  # not cached: read again, with the new rating


def test_keep_warm_polls_and_builds_in_the_background(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    async def scenario() -> tuple[int, int]:
        counting = CountingStore(store)
        p = StatePersonalizer(counting, ttl=0.02)
        p.set_model(personalized)
        task = asyncio.create_task(keep_warm(p, 0.5))
        await asyncio.sleep(0.05)  # its first poll: where the feed starts
        _rate(store, "u", {1: 2.0})
        for _ in range(200):
            await asyncio.sleep(0.01)
            if counting.reads.get("user u"):
                break
        assert p.warm_ahead  # requests leave the polls to the task
        polls = counting.reads["feed"]
        assert p("w", [5], X[:1]) is None
        assert counting.reads["feed"] == polls
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not p.warm_ahead
        reads = counting.reads["user u"]
        assert p("u", [5], X[:1]) is not None
        return reads, counting.reads["user u"]

    assert asyncio.run(scenario()) == (1, 1)  # built by the task; the request found it cached


def test_keep_warm_reads_nothing_without_a_personalised_model(store: FeedbackStore) -> None:
    async def scenario() -> dict[str, int]:
        counting = CountingStore(store)
        p = StatePersonalizer(counting, ttl=0.01)
        task = asyncio.create_task(keep_warm(p, 0.5))
        _rate(store, "u", {1: 2.0})
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return counting.reads

    assert asyncio.run(scenario()) == {}


class BrokenStore(FeedbackStore):
    def __init__(self) -> None:
        pass

    def user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
        raise StoreError("database is down")

    def movie_counts(self, movie_ids: object) -> dict[str, Counts]:
        raise StoreError("database is down")

    def all_movie_counts(self) -> dict[str, Counts]:
        raise StoreError("database is down")


def test_store_failure_falls_back_to_the_six_feature_model(personalized: PersonalizedModel) -> None:
    p = StatePersonalizer(BrokenStore(), ttl=0)
    p.set_model(personalized)
    assert p("u", [1], X[:1]) is None


def test_no_personalized_directory_means_none(tiny_model_dir: Path) -> None:
    assert load_personalized(tiny_model_dir) is None
