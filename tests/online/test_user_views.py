"""The personaliser: users' stored ratings folded into the personalised model, kept fresh by the change feed."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.errors import StoreError
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.store import Counts, FeedbackStore
from moviematch_ml.online.user_views import MOVIE_TTL_SECONDS, UserViews, maintain
from moviematch_ml.runtime import native
from moviematch_ml.runtime.factors import lookup
from moviematch_ml.runtime.personalized import DENSE_IDS_MAX, PersonalizedModel
from reference import predict_user, user_state, user_view

X = np.array([[float(EXAMPLE[n]) for n in FEATURE_NAMES]] * 3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def personalized(tiny_personalized_dir: Path) -> PersonalizedModel:
    return PersonalizedModel.load(tiny_personalized_dir / "personalized")


def _rate(store: FeedbackStore, user: str, ratings: dict[int, float], t0: float = 2_000_000.0) -> None:
    store.add([Feedback(f"{user}-{m}", user, str(m), r, t0 + i, None) for i, (m, r) in enumerate(ratings.items())])


def test_an_unknown_user_gets_no_answer(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = UserViews(store, ttl=0)
    assert p.predict(personalized, "nobody", [1, 2, 3], X) is None  # no ratings in the store
    assert p.user_view(personalized, "nobody") is None


def test_a_generous_user_is_predicted_higher_than_a_harsh_one(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    p = UserViews(store, ttl=0)
    _rate(store, "generous", {m: 10.0 for m in range(0, 10)})
    _rate(store, "harsh", {m: 2.0 for m in range(0, 10)})
    high = p.predict(personalized, "generous", [20, 21, 22], X)
    low = p.predict(personalized, "harsh", ["20", "21", "22"], X)  # ids as text or integers are the same movies
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
    p = UserViews(store, ttl=60, clock=clock)
    _rate(store, "u", {1: 2.0})
    first = p.predict(personalized, "u", [5], X[:1])
    _rate(store, "u", {m: 10.0 for m in range(2, 12)})
    assert p.predict(personalized, "u", [5], X[:1]) == first  # still cached: another replica's write shows later
    p.forget(["u"])
    after = p.predict(personalized, "u", [5], X[:1])
    assert after is not None
    assert first is not None
    assert after[0][0] > first[0][0]


def test_movie_totals_are_read_in_bulk_and_scaled(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = UserViews(store, ttl=0)
    _rate(store, "a", {7: 8.0, 999_999: 10.0})
    _rate(store, "b", {7: 6.0})
    mf, st = personalized.mf, personalized.state
    assert 7 in mf.item_index
    assert 999_999 not in mf.item_index  # rated through the app, unknown to the model
    table = p.movie_table(personalized)
    got = table.table[table.positions([7, "8", None, "7", 999_999, 1_000_000, "999999"])]
    i7, i8 = mf.item_index[7], mf.item_index[8]
    # Two ratings (8 and 6 on 0-10) are 4 and 3 stars: count 2, sum 7, sum of squares 25 on top of the trained ones.
    n7, s7, ss7 = st.item_count[i7] + 2, st.item_total[i7] + 7.0, st.item_total_sq[i7] + 25.0
    mean7 = s7 / n7
    n8 = st.item_count[i8]
    mean8 = st.item_total[i8] / n8
    unrated = [0.0, math.nan, math.nan, math.nan]  # the last row: a movie nobody rated and the model does not know
    one_rating = [1.0, 5.0, 0.0, math.nan]  # 10 on 0-10: one rating of 5 stars; no factorisation bias
    want = [
        [n7, mean7, math.sqrt(ss7 / n7 - mean7**2), mf.item_bias[i7]],
        [n8, mean8, math.sqrt(max(st.item_total_sq[i8] / n8 - mean8**2, 0.0)), mf.item_bias[i8]],
        unrated,
        [n7, mean7, math.sqrt(ss7 / n7 - mean7**2), mf.item_bias[i7]],
        one_rating,
        unrated,
        one_rating,  # an unknown movie's id as text is the same movie, as for the movies the model knows
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)


def test_a_model_trained_from_the_store_is_not_given_its_ratings_twice(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    assert personalized.card is not None
    from_store = PersonalizedModel(personalized.config, personalized.state, personalized.booster, personalized.scale)
    from_store.card = personalized.card.model_copy(update={"data": {"dataset": "feedback"}})
    counting = CountingStore(store)
    p = UserViews(counting, ttl=0)
    _rate(store, "a", {7: 8.0})
    table = p.movie_table(from_store)
    assert counting.reads == {}  # nothing to read: its movie moments already count every stored rating
    np.testing.assert_array_equal(table.table, from_store.movie_table().table)
    assert (
        p.movie_table(personalized).table[personalized.mf.item_index[7], 0]
        == table.table[personalized.mf.item_index[7], 0] + 1
    )  # another model: read, and the rating added
    assert counting.reads == {"movies": 1}


def test_one_movie_and_a_batch_give_the_same_answer(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = UserViews(store, ttl=0)
    _rate(store, "u", {1: 9.0, 2: 3.0, 3: 7.0, 4: 8.0})
    _rate(store, "v", {3: 4.0, 999_999: 6.0})  # movie 3 also has a rating from someone else
    assert 999_999 not in personalized.mf.item_index  # rated through the app, unknown to the model
    # rated, rated by two, unrated, text id, unknown, unknown but rated, no id
    movies: list[int | str | None] = [1, 3, 5, "7", 123456, 999_999, None]
    x = np.repeat(X[:1], len(movies), axis=0)
    x[:, 1] = np.linspace(3.0, 9.0, len(movies))
    assert p.predict(personalized, "nobody", movies, x) is None
    batch = p.predict(personalized, "u", movies, x)
    assert batch is not None
    assert batch[1].all()
    table = p.movie_table(personalized)
    rows = table.positions(movies)
    n, last = table.n_known, len(table.table) - 1
    assert rows[[0, 1, 2, 3]].tolist() == lookup(personalized.mf.item_index, [1, 3, 5, 7]).tolist()
    assert (rows[4], rows[6]) == (last, last)  # known to nobody
    assert n <= rows[5] < last  # the rated unknown movie has a row of its own
    # The batch takes the movies' inputs from the table built at each totals refresh; the reference computes them
    # per request from the user's ratings and the movies' totals (here by hand, data scale): the same numbers.
    now = 2_000_100.0
    view = p.user_view(personalized, "u")
    assert view is not None
    from_table, _ = personalized.predict(view, x, movies, table, now=now)
    state = user_state(personalized.mf, [1, 2, 3, 4], [4.5, 1.5, 3.5, 4.0], [2e6, 2e6 + 1, 2e6 + 2, 2e6 + 3])
    received = [(1, 4.5, 20.25), (2, 5.5, 16.25), (0, 0, 0), (0, 0, 0), (0, 0, 0), (1, 3.0, 9.0), (0, 0, 0)]
    keys: list[int | str] = [1, 3, 5, 7, 123456, 999_999, ""]
    per_request, mask = predict_user(personalized, state, keys, x, now=now, movie_extra=np.array(received))
    assert mask.all()
    np.testing.assert_allclose(from_table, personalized.to_api(per_request), rtol=0, atol=1e-9)
    # One movie at a time (as /predict asks), in every spelling of its id: the batch's answers.
    for k, m in enumerate(movies):
        one = p.predict(personalized, "u", [m], x[k : k + 1])
        assert one is not None
        assert one[1].tolist() == [True]
        assert 0.0 <= float(one[0][0]) <= 10.0
        np.testing.assert_allclose(one[0], batch[0][k : k + 1], rtol=0, atol=1e-9)


def test_the_table_rows_and_every_way_to_run_the_trees_agree(
    store: FeedbackStore, personalized: PersonalizedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch path writes the model's inputs in C (native.codec.user_rows) and runs our tree evaluator; without
    # the extension the inputs are built in numpy (inputs.model_inputs); a model our evaluator does not cover runs
    # on LightGBM's own booster. Same inputs, same trees: the same answers, whatever the path.
    p = UserViews(store, ttl=0)
    _rate(store, "u", {1: 9.0, 2: 3.0, 3: 7.0})
    _rate(store, "v", {3: 4.0, 999_999: 6.0})
    movies: list[int | str | None] = [1, 2, 3, 999_999, 123_456, 4, 5]
    x = np.repeat(X[:1], len(movies), axis=0)
    x[:, 1] = np.linspace(2.0, 9.5, len(movies))
    now = 2_000_100.0
    view = p.user_view(personalized, "u")
    assert view is not None
    table = p.movie_table(personalized)
    assert table.dense is not None  # the tiny model's ids are ints
    rows = table.positions(movies)
    n = len(personalized.mf.item_ids)
    # The rated unknown movie gets its own row after the model's movies; a movie nobody knows takes the last.
    assert rows[3] == n
    assert rows[4] == len(table.table) - 1
    assert rows[[0, 1, 2, 5, 6]].tolist() == lookup(personalized.mf.item_index, [1, 2, 3, 4, 5]).tolist()
    one_pass, mask = personalized.predict(view, x, movies, table, now=now)
    assert mask.all()
    import lightgbm as lgb

    monkeypatch.setattr(personalized, "booster", lgb.Booster(model_str=personalized.booster.model_to_string()))
    np.testing.assert_allclose(personalized.predict(view, x, movies, table, now=now)[0], one_pass, atol=1e-12)
    monkeypatch.setattr(native, "codec", None)
    np.testing.assert_allclose(personalized.predict(view, x, movies, table, now=now)[0], one_pass, atol=1e-12)
    monkeypatch.undo()
    monkeypatch.setattr(native, "codec", None)  # our evaluator again, on the numpy-built inputs
    np.testing.assert_allclose(personalized.predict(view, x, movies, table, now=now)[0], one_pass, atol=1e-12)


def test_ids_of_another_spelling_find_the_same_rows(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p = UserViews(store, ttl=0)
    _rate(store, "v", {999_999: 6.0})
    table = p.movie_table(personalized)
    ints = table.positions([1, 999_999, 5, 424_242])
    # Text ids (as a client may send them) and None take the dict lookup, and land on the same rows.
    assert table.positions(["1", "999999", 5, "424242"]).tolist() == ints.tolist()
    assert table.positions([None, 1])[0] == len(table.table) - 1
    assert table.positions((1, 999_999, 5, 424_242)).tolist() == ints.tolist()  # a tuple: not the C path


def test_dense_rows_cover_the_int_ids_only(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    _rate(store, "v", {999_999: 6.0})
    table = UserViews(store, ttl=0).movie_table(personalized)
    dense = table.dense
    assert dense is not None
    ints = {k: row for k, row in table.rows.items() if type(k) is int and k >= 0}
    assert len(dense) == max(ints) + 1 == 1_000_000
    assert {k: int(dense[k]) for k in ints} == ints
    assert int((dense >= 0).sum()) == len(ints)  # -1 everywhere else
    # A rated id at DENSE_IDS_MAX would make too wide an array: the dict alone, and the same rows.
    _rate(store, "w", {DENSE_IDS_MAX: 5.0})
    wide = UserViews(store, ttl=0).movie_table(personalized)
    assert wide.dense is None
    assert wide.positions([DENSE_IDS_MAX, 1, 999_999]).tolist() == [
        wide.rows[DENSE_IDS_MAX],
        personalized.mf.item_index[1],
        wide.rows[999_999],
    ]
    # A model whose ids are text has no int ids: the dict alone, where a request's 7 is the model's "7".
    mf = dataclasses.replace(
        personalized.mf,
        item_ids=[str(i) for i in personalized.mf.item_ids],
        item_index={str(i): k for i, k in personalized.mf.item_index.items()},
    )
    text = PersonalizedModel(
        personalized.config, dataclasses.replace(personalized.state, mf=mf), personalized.booster, personalized.scale
    )
    by_text = UserViews(store, ttl=0).movie_table(text)
    assert by_text.dense is None
    assert by_text.positions([7, "7", 999_999]).tolist() == [
        personalized.mf.item_index[7],
        personalized.mf.item_index[7],
        by_text.rows["999999"],
    ]


def test_a_model_that_skips_unknown_movies_leaves_them_to_the_six_feature_model(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    strict = PersonalizedModel(
        personalized.config.model_copy(update={"personalize": "known_user_and_movie"}),
        personalized.state,
        personalized.booster,
        personalized.scale,
    )
    p = UserViews(store, ttl=0)
    _rate(store, "u", {1: 9.0, 2: 3.0})
    answer = p.predict(strict, "u", [1, 123_456, 2], X)
    assert answer is not None
    assert answer[1].tolist() == [True, False, True]  # the unknown movie is left to the six-feature model
    everyone = p.predict(personalized, "u", [1, 123_456, 2], X)
    assert everyone is not None
    np.testing.assert_array_equal(answer[0][answer[1]], everyone[0][[0, 2]])
    assert p.predict(strict, "u", [123_456], X[:1]) is None  # nothing it answers: no answer at all


def test_a_miss_builds_the_view_the_state_gives(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    # The miss builds the view straight from the stored rows; user_state + user_view is the reference. The user
    # re-rates movie 2, rates a movie id that is not a number (kept as text, unknown to the int-keyed model) and
    # sends three ratings at one second.
    p = UserViews(store, ttl=0)
    _rate(store, "u", {1: 9.0, 2: 3.0})
    store.add(
        [
            Feedback(f"later-{k}", "u", m, r, 2_000_100.0, None)
            for k, (m, r) in enumerate([("2", 8.0), ("x7", 5.0), ("4", 1.0)])
        ]
    )
    view = p.user_view(personalized, "u")
    scale = personalized.scale.to_api
    want = user_view(
        personalized,
        user_state(
            personalized.mf,
            [1, 2, "x7", 4],
            [9.0 / scale, 8.0 / scale, 5.0 / scale, 1.0 / scale],
            [2_000_000.0, 2_000_100.0, 2_000_100.0, 2_000_100.0],
        ),
    )
    assert view is not None
    assert want is not None
    assert (view.count, view.mean, view.std) == pytest.approx((want.count, want.mean, want.std), rel=1e-12)
    assert view.bias == pytest.approx(want.bias, rel=1e-9)
    assert want.bias != 0.0  # the known movies were folded in despite the text id
    np.testing.assert_allclose(view.factors, want.factors, rtol=1e-9)
    assert view.recent_times == want.recent_times
    np.testing.assert_allclose(view.recent_resid, want.recent_resid, rtol=0, atol=1e-12)


class CountingStore(FeedbackStore):
    """The real store, counting the reads the users' views make."""

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
    p = UserViews(counting, ttl=0, clock=clock)
    i7 = personalized.mf.item_index[7]
    trained = personalized.state.item_count[i7]
    _rate(store, "a", {7: 8.0})
    first = p.movie_table(personalized)
    assert first.table[i7, 0] == trained + 1
    _rate(store, "b", {7: 6.0})
    clock.now = MOVIE_TTL_SECONDS - 1  # still within the movie TTL: the same totals, no new query
    assert p.movie_table(personalized) is first
    assert counting.reads == {"movies": 1}
    clock.now = MOVIE_TTL_SECONDS + 1
    assert p.movie_table(personalized).table[i7, 0] == trained + 2
    assert counting.reads == {"movies": 2}


def test_other_replicas_ratings_arrive_through_the_change_feed(
    store: FeedbackStore, personalized: PersonalizedModel
) -> None:
    clock = FakeClock()
    counting = CountingStore(store)
    p = UserViews(counting, ttl=1.0, clock=clock)
    _rate(store, "u", {1: 2.0})
    _rate(store, "w", {1: 9.0})
    first, other = p.predict(personalized, "u", [5], X[:1]), p.predict(personalized, "w", [5], X[:1])
    assert first is not None
    assert other is not None
    assert counting.reads == {"feed": 1, "user u": 1, "user w": 1, "movies": 1}
    _rate(store, "u", {m: 10.0 for m in range(2, 12)})  # stored by another replica: this one was not told
    clock.now = 0.5
    assert p.predict(personalized, "u", [5], X[:1]) == first  # within the ttl: the cached state, no query at all
    assert counting.reads["feed"] == 1
    clock.now = 1.2  # one poll of the feed: it names u (not w), whose state is read again
    after = p.predict(personalized, "u", [5], X[:1])
    assert after is not None
    assert after[0][0] > first[0][0]
    assert p.predict(personalized, "w", [5], X[:1]) == other
    assert counting.reads == {"feed": 2, "user u": 2, "user w": 1, "movies": 1}
    clock.now = 1.5
    p.predict(personalized, "u", [5], X[:1])
    assert counting.reads["feed"] == 2  # at most one poll per ttl


def test_a_failed_poll_drops_every_cached_state(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    clock = FakeClock()
    counting = CountingStore(store)
    p = UserViews(counting, ttl=1.0, clock=clock)
    _rate(store, "u", {1: 2.0})
    assert p.predict(personalized, "u", [5], X[:1]) is not None

    def down(after_id: int) -> list[tuple[int, str]]:
        raise StoreError("database is down")

    counting.changed_rows = down  # type: ignore[method-assign]
    clock.now = 2.0
    assert p.predict(personalized, "u", [5], X[:1]) is None  # the six-feature model answers meanwhile
    del counting.changed_rows
    clock.now = 4.0
    assert p.predict(personalized, "u", [5], X[:1]) is not None
    assert counting.reads["user u"] == 2  # read again: what was cached before the failure was not trusted


def _polling(
    store: FeedbackStore, personalized: PersonalizedModel, max_users: int = 20_000
) -> tuple[UserViews, CountingStore, FakeClock]:
    """Users' views on a counting store and a fake clock, polling the change feed once per second."""
    clock = FakeClock()
    counting = CountingStore(store)
    p = UserViews(counting, ttl=1.0, clock=clock, max_users=max_users)
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
        assert p.predict(personalized, "u", [5], X[:1]) is not None
    assert counting.reads["feed"] == 7  # the first look and six polls
    assert counting.reads["user u"] == 1  # read once: at the first request after the poll that named the rating
    _rate(store, "u", {2: 9.0})
    clock.now = 7.0
    assert p.predict(personalized, "u", [5], X[:1]) is not None
    assert counting.reads["user u"] == 2  # a new row is news again


def test_a_row_committed_late_is_news_when_it_shows(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    # Row 3 (user v) commits after row 4 (user w) was seen: a poll that saw row 4 must still report row 3 later.
    p, counting, clock = _polling(store, personalized)
    _rate(store, "u", {1: 2.0})
    _rate(store, "v", {1: 4.0})
    p.sync()
    assert p.predict(personalized, "v", [5], X[:1]) is not None
    _rate(store, "v", {2: 9.0})  # row 3
    _rate(store, "w", {1: 8.0})  # row 4
    counting.uncommitted = frozenset({3})
    clock.now = 1.0
    p.sync()
    assert p.predict(personalized, "v", [5], X[:1]) is not None
    assert counting.reads["user v"] == 1  # the feed did not show row 3 yet: v's view stands
    counting.uncommitted = frozenset()
    clock.now = 2.0
    p.sync()
    assert p.predict(personalized, "v", [5], X[:1]) is not None
    assert counting.reads["user v"] == 2


def _warming(
    store: FeedbackStore, personalized: PersonalizedModel, max_users: int = 20_000
) -> tuple[UserViews, CountingStore, FakeClock]:
    p, counting, clock = _polling(store, personalized, max_users)
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
    assert p.warm(personalized, 10.0) == 0
    assert counting.reads == {"feed": 3, "user u": 1, "user w": 1}  # the first look reads the mark and the latest rows
    got = p.predict(personalized, "u", [5, 7], X[:2])
    assert counting.reads["user u"] == 1  # the request found the view built
    cold = UserViews(store, ttl=1.0)
    want = cold.predict(personalized, "u", [5, 7], X[:2])
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
    assert p.warm(personalized, 0.0) == 29  # at least one view per call, whatever the budget
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
    assert p.warm(personalized, 10.0) == 0
    assert sorted(k for k in counting.reads if k.startswith("user")) == ["user c", "user d", "user e"]
    cold, _, _ = _polling(store, personalized, max_users=4)
    cold.sync()  # without warm_ahead, the first look only marks where the feed starts
    assert cold.to_warm == 0


def test_a_new_model_rebuilds_the_users_that_were_cached(
    store: FeedbackStore, personalized: PersonalizedModel, tiny_personalized_dir: Path
) -> None:
    p, counting, _ = _warming(store, personalized)
    _rate(store, "u", {1: 2.0})
    _rate(store, "w", {1: 9.0})
    assert p.predict(personalized, "u", [5], X[:1]) is not None
    assert p.predict(personalized, "w", [5], X[:1]) is not None
    reloaded = PersonalizedModel.load(tiny_personalized_dir / "personalized")  # a model swapped in (a reload)
    # The first request with it: the user's view was built against the old model, so it is built again.
    assert p.predict(reloaded, "u", [5], X[:1]) is not None
    assert counting.reads["user u"] == 2
    # The first warm-up with it (maintain's next period) queues the users cached before, and builds them.
    assert p.warm(reloaded, 10.0) == 0
    assert counting.reads["user u"] == counting.reads["user w"] == 2  # u was built already: a look-up
    assert p.predict(reloaded, "w", [5], X[:1]) is not None
    assert counting.reads["user w"] == 2  # built ahead for the new model


def test_warm_with_the_store_down_keeps_the_user_queued(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    p, counting, clock = _warming(store, personalized)
    _rate(store, "u", {1: 2.0})
    clock.now = 1.0
    p.sync()

    def down(user_id: str) -> list[tuple[str, float, float]]:
        raise StoreError("database is down")

    counting.user_ratings = down  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        p.warm(personalized, 1.0)
    assert p.to_warm == 1  # still to do
    del counting.user_ratings
    assert p.warm(personalized, 1.0) == 0
    assert counting.reads["user u"] == 1
    p.forget_queue()
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
    assert p.warm(personalized, 0.0) == 1
    del counting.user_ratings
    before = counting.reads["user u"]
    assert p.predict(personalized, "u", [5], X[:1]) is not None
    assert counting.reads["user u"] == before + 1  # not cached: read again, with the new rating


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, the event loop free, until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


def test_maintain_polls_and_builds_in_the_background(store: FeedbackStore, personalized: PersonalizedModel) -> None:
    async def scenario() -> tuple[int, int]:
        counting = CountingStore(store)
        p = UserViews(counting, ttl=0.02)
        task = asyncio.create_task(maintain(p, lambda: [personalized], warm_share=0.5, timeout=5.0))
        await _until(lambda: counting.reads.get("feed", 0) >= 1)  # its first poll: where the feed starts
        _rate(store, "u", {1: 2.0})
        await _until(lambda: counting.reads.get("user u", 0) >= 1)
        assert p.warm_ahead  # requests leave the polls to the task
        polls = counting.reads["feed"]
        assert p.predict(personalized, "w", [5], X[:1]) is None
        assert counting.reads["feed"] == polls
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not p.warm_ahead
        reads = counting.reads["user u"]
        assert p.predict(personalized, "u", [5], X[:1]) is not None
        return reads, counting.reads["user u"]

    assert asyncio.run(scenario()) == (1, 1)  # built by the task; the request found it cached


def test_maintain_reads_nothing_without_a_personalised_model(store: FeedbackStore) -> None:
    _rate(store, "u", {1: 2.0})  # stored before the worker started

    async def scenario() -> tuple[dict[str, int], int]:
        counting = CountingStore(store)
        p = UserViews(counting, ttl=0.01)
        p.warm_ahead = True
        p.sync()  # the first look queues u
        assert p.to_warm == 1
        counting.reads.clear()
        asked = 0

        def no_model() -> list[PersonalizedModel]:
            nonlocal asked
            asked += 1
            return []

        task = asyncio.create_task(maintain(p, no_model, warm_share=0.5, timeout=5.0))
        _rate(store, "v", {1: 2.0})
        await _until(lambda: asked >= 3)  # three periods of the task
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return counting.reads, p.to_warm

    assert asyncio.run(scenario()) == ({}, 0)  # no read at all, and nothing left to build


class BrokenStore(FeedbackStore):
    def __init__(self) -> None:
        pass

    def user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
        raise StoreError("database is down")

    def all_movie_counts(self) -> dict[str, Counts]:
        raise StoreError("database is down")


def test_store_failure_falls_back_to_the_six_feature_model(
    store: FeedbackStore, personalized: PersonalizedModel, caplog: pytest.LogCaptureFixture
) -> None:
    assert UserViews(BrokenStore(), ttl=0).predict(personalized, "u", [1], X[:1]) is None
    # The user's view read, the movies' totals not: no answer either.
    _rate(store, "u", {1: 2.0})

    class NoTotals(FeedbackStore):
        def __init__(self) -> None:
            pass

        def user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
            return store.user_ratings(user_id)

        def all_movie_counts(self) -> dict[str, Counts]:
            raise StoreError("database is down")

    assert UserViews(NoTotals(), ttl=0).predict(personalized, "u", [1], X[:1]) is None
    assert [r.getMessage() for r in caplog.records] == ["user state unavailable"] * 2
