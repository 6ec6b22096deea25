"""The personalised model at serving time: a user's view from their ratings, the movie table, predictions, and
persistence, each held to the reference implementation of the incremental user state (tests/reference.py).
(Training, leakage and evaluation scoring: tests/offline/test_stacking.py.)"""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.errors import ModelChecksumError, ModelFormatError
from moviematch_ml.runtime import native
from moviematch_ml.runtime.cards import CARD_NAME
from moviematch_ml.runtime.factors import fold_in
from moviematch_ml.runtime.inputs import MODEL_FEATURES, RECENT_RATINGS
from moviematch_ml.runtime.personalized import PersonalizedModel, UserView
from moviematch_ml.runtime.trees import EnsembleBooster
from reference import (
    DAY,
    Data,
    empty_user_state,
    predict_user,
    update_movie_extra,
    update_user_state,
    use_codec,
    user_state,
    user_view,
    with_config,
)


@pytest.fixture(scope="module")
def loaded(synthetic_model: PersonalizedModel, tmp_path_factory: pytest.TempPathFactory) -> PersonalizedModel:
    """The model saved and loaded again: its trees run in TreeEnsemble (the trained one's in LightGBM)."""
    directory = tmp_path_factory.mktemp("personalized")
    synthetic_model.save(directory, created_at="2026-01-01T00:00:00+00:00")
    return PersonalizedModel.load(directory)


# --- the reference user state (tests/reference.py), held to the factorisation --------------------------------------


def test_update_is_pure_and_equals_the_batch_fold_in(synthetic_model: PersonalizedModel, synthetic_data: Data) -> None:
    mf = synthetic_model.mf
    rows = synthetic_data["u"] == 3
    start = empty_user_state(mf)
    s1 = update_user_state(
        mf,
        start,
        int(synthetic_data["i"][rows][0]),
        float(synthetic_data["r"][rows][0]),
        float(synthetic_data["t"][rows][0]),
    )
    assert start.count == 0
    assert start.gram.sum() == 0
    assert s1.count == 1
    full = user_state(mf, synthetic_data["i"][rows], synthetic_data["r"][rows], synthetic_data["t"][rows])
    assert full.count == rows.sum()
    assert full.total == pytest.approx(synthetic_data["r"][rows].sum())
    view = user_view(synthetic_model, full)
    assert view is not None
    want_bias, want_vec = fold_in(mf, synthetic_data["i"][rows].tolist(), synthetic_data["r"][rows].tolist())
    assert view.bias == pytest.approx(want_bias, abs=1e-10)
    np.testing.assert_allclose(view.factors, want_vec, atol=1e-10)
    # ... and a training user's fold-in is their trained factors (the ALS user step).
    k = mf.user_index[3]
    assert view.bias == pytest.approx(mf.user_bias[k], abs=1e-10)
    np.testing.assert_allclose(view.factors, mf.user_factors[k], atol=1e-10)


def test_rerating_replaces_the_old_rating(synthetic_model: PersonalizedModel) -> None:
    mf = synthetic_model.mf
    s = update_user_state(mf, empty_user_state(mf), 100, 2.0, 10.0)
    s = update_user_state(mf, s, 101, 4.0, 20.0)
    s = update_user_state(mf, s, 100, 5.0, 30.0, previous_rating=2.0)
    direct = user_state(mf, [101, 100], [4.0, 5.0], [20.0, 30.0])
    assert s.count == direct.count == 2
    assert s.total == pytest.approx(9.0)
    np.testing.assert_allclose(s.gram, direct.gram, atol=1e-12)
    np.testing.assert_allclose(s.rhs, direct.rhs, atol=1e-12)


def test_recent_buffer_keeps_the_latest_ratings_in_time_order(synthetic_model: PersonalizedModel) -> None:
    mf = synthetic_model.mf
    s = empty_user_state(mf)
    for k in range(RECENT_RATINGS + 3):
        s = update_user_state(mf, s, 100, 3.0, float(1000 - k))  # arriving newest first
    assert len(s.recent_times) == RECENT_RATINGS
    assert list(s.recent_times) == sorted(s.recent_times)
    assert s.recent_times[-1] == 1000.0
    assert s.recent_times[0] == 1000.0 - RECENT_RATINGS + 1


def test_ratings_with_one_timestamp_keep_their_arrival_order(synthetic_model: PersonalizedModel) -> None:
    # A batch of /feedback without timestamps shares the arrival time: the buffer must keep the last ones sent,
    # not the ones with the largest residual (which would make every batch-fed user look like a fan).
    mf = synthetic_model.mf
    s = empty_user_state(mf)
    ratings = [5.0] * RECENT_RATINGS + [1.0] * RECENT_RATINGS
    for r in ratings:
        s = update_user_state(mf, s, 999_999, r, 1000.0)  # a movie the model does not know: residual r - mean
    assert s.recent_resid == tuple([1.0 - mf.global_mean] * RECENT_RATINGS)


def test_bulk_user_state_equals_folding_the_updates(synthetic_model: PersonalizedModel, synthetic_data: Data) -> None:
    mf = synthetic_model.mf
    rows = synthetic_data["u"] == 5
    ids = [*synthetic_data["i"][rows].tolist(), 999_999]  # plus a movie the model does not know...
    rs = [*synthetic_data["r"][rows].tolist(), 4.0]
    ts = [
        *synthetic_data["t"][rows].tolist(),
        float(synthetic_data["t"][rows][0]),
    ]  # ...rated at the same second as the first one
    folded = empty_user_state(mf)
    for m, r, t in zip(ids, rs, ts, strict=True):
        folded = update_user_state(mf, folded, m, r, t)
    bulk = user_state(mf, ids, rs, ts)
    assert (bulk.count, bulk.cf_count) == (folded.count, folded.cf_count)
    assert bulk.total == pytest.approx(folded.total)
    np.testing.assert_allclose(bulk.gram, folded.gram, atol=1e-9)
    np.testing.assert_allclose(bulk.rhs, folded.rhs, atol=1e-9)
    assert bulk.recent_times == folded.recent_times
    np.testing.assert_allclose(bulk.recent_resid, folded.recent_resid, atol=1e-12)


def test_bulk_user_state_counts_a_rerated_movie_once(synthetic_model: PersonalizedModel) -> None:
    mf = synthetic_model.mf
    movie = next(iter(mf.item_index))
    twice = user_state(mf, [movie, movie], [1.0, 5.0], [10.0, 20.0])
    once = user_state(mf, [movie], [5.0], [20.0])
    assert (twice.count, twice.total) == (once.count, once.total) == (1.0, 5.0)
    np.testing.assert_allclose(twice.gram, once.gram)


def test_user_state_keeps_a_mix_of_int_and_str_ids_apart(synthetic_model: PersonalizedModel) -> None:
    # np.asarray turned [100, "x"] into ["100", "x"]: one non-numeric movie id hid every known movie.
    s = user_state(synthetic_model.mf, [100, "x"], [4.0, 2.0], [1.0, 2.0])
    assert (s.count, s.cf_count) == (2.0, 1.0)
    s = user_state(synthetic_model.mf, [100, 101, 999], [4.0, 2.5, 5.0], [1.0, 2.0, 3.0])
    assert (s.count, s.cf_count) == (3.0, 2.0)


# --- a user's view from their ratings ------------------------------------------------------------------------------


def _same_view(got: UserView | None, want: UserView | None) -> None:
    assert (got is None) == (want is None)
    if got is None or want is None:
        return
    assert (got.count, got.mean, got.std) == pytest.approx((want.count, want.mean, want.std), rel=1e-12)
    assert got.bias == pytest.approx(want.bias, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(got.factors, want.factors, rtol=1e-9, atol=1e-12)
    assert got.recent_times == want.recent_times
    np.testing.assert_allclose(got.recent_resid, want.recent_resid, rtol=0, atol=1e-12)
    for now in (*want.recent_times, want.recent_times[-1] + 1.0):  # the means kept with the view, and the others
        np.testing.assert_allclose(got.recent(now), want.recent(now), rtol=1e-12, atol=1e-12)


VIEW_CASES = [
    ([999_001, 999_002], [4.0, 1.0], [1.0, 2.0]),  # no movie the model knows
    ([100], [3.5], [5.0]),  # one rating
    ([100, 101, 100, 102, 101], [1.0, 2.0, 5.0, 3.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]),  # re-rated movies
    ([100, 101, 102, 999_001], [5.0, 1.0, 3.0, 2.0], [7.0, 7.0, 7.0, 7.0]),  # one timestamp: arrival order
    ([103, 104, "x"], [2.0, 4.0, 5.0], [3.0, 1.0, 2.0]),  # out of time order; an id of the other type
    (list(range(100, 125)), [0.5 + (k % 10) / 2 for k in range(25)], [float(25 - k) for k in range(25)]),
]


@pytest.mark.parametrize(("ids", "ratings", "times"), VIEW_CASES)
@pytest.mark.parametrize("compiled", [True, False], ids=["C-cholesky", "numpy-solve"])
def test_the_view_from_the_ratings_equals_the_view_from_the_state(
    synthetic_model: PersonalizedModel,
    ids: list[int | str],
    ratings: list[float],
    times: list[float],
    compiled: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The view is built in C (native.view_data: the fold-in solved by Cholesky), or by its twin without the extension.
    use_codec(compiled, monkeypatch)
    _same_view(
        synthetic_model.user_view_of_ratings(ids, ratings, times),
        user_view(synthetic_model, user_state(synthetic_model.mf, ids, ratings, times)),
    )


def test_the_view_from_the_ratings_by_hand(synthetic_model: PersonalizedModel) -> None:
    mu = synthetic_model.mf.global_mean
    # Movies the model does not know: no fold-in, residuals against the global mean only.
    view = synthetic_model.user_view_of_ratings([999_001, 999_002, 999_001], [4.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert view is not None
    assert (view.count, view.mean, view.std, view.bias) == (2.0, 1.5, 0.5, 0.0)  # 999_001 counts once, as 2.0
    assert view.factors.tolist() == [0.0, 0.0]
    assert view.recent_times.tolist() == [2.0, 3.0]
    assert view.recent_resid.tolist() == pytest.approx([1.0 - mu, 2.0 - mu])
    # Eleven ratings at one second: the ten latest to arrive are the recent ones.
    eleven = synthetic_model.user_view_of_ratings(
        list(range(999_000, 999_011)), [float(k % 5 + 1) for k in range(11)], [9.0] * 11
    )
    assert eleven is not None
    assert eleven.recent_resid.tolist() == pytest.approx([k % 5 + 1 - mu for k in range(1, 11)])
    # Nothing to answer with: no ratings, or fewer than min_user_ratings.
    assert synthetic_model.user_view_of_ratings([], [], []) is None
    picky = with_config(synthetic_model, min_user_ratings=3)
    assert picky.user_view_of_ratings([100, 101, 100], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) is None  # 2 movies
    assert picky.user_view_of_ratings([100, 101, 102], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) is not None


def test_a_user_view_is_one_compact_array() -> None:
    view = UserView(3.0, 2.5, 0.5, -0.25, np.array([1.0, -2.0]), [10.0, 20.0, 30.0], [0.5, -0.5, 1.0])
    assert (view.count, view.mean, view.std, view.bias) == (3.0, 2.5, 0.5, -0.25)
    assert view.columns().tolist() == [3.0, 2.5, 0.5, -0.25]
    assert view.factors.tolist() == [1.0, -2.0]
    assert view.recent_times.tolist() == [10.0, 20.0, 30.0]
    assert view.recent_resid.tolist() == [0.5, -0.5, 1.0]
    assert view.recent(31.0)[:2] == (1.0 / 3, 1.0 / 3)  # every rating before now: the means kept with the view
    with pytest.raises(ValueError, match="read-only"):
        view.factors[0] = 5.0  # a cached view is shared by every request
    with pytest.raises(AttributeError):
        view.count = 4.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="2 recent times for 3 residuals"):
        UserView(3.0, 2.5, 0.5, -0.25, np.zeros(2), [1.0, 2.0], [0.5, -0.5, 1.0])
    # The same view from native.view_data's layout: count, mean, spread, w, two places, the times, the residuals.
    raw = np.array([3.0, 2.5, 0.5, -0.25, 1.0, -2.0, math.nan, math.nan, 10.0, 20.0, 30.0, 0.5, -0.5, 1.0])
    same = UserView.of_data(raw.tobytes(), 3)
    assert repr(same) == repr(view)
    assert same.recent(31.0) == view.recent(31.0)
    # Fields and arrays of floats took 825 bytes for a user with 3 ratings and 16 factors; one array takes
    # 8 bytes per float (4 + 16 + 2 + 2 * 3 of them) plus the two objects' headers.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    views = [UserView(3.0, 2.5, 0.5, -0.25, np.zeros(16), [1.0, 2.0, 3.0], [0.5, -0.5, 1.0]) for _ in range(1000)]
    per_view = (tracemalloc.get_traced_memory()[0] - before) / len(views)
    tracemalloc.stop()
    assert 8 * 28 < per_view < 450


# --- predictions, against the reference ----------------------------------------------------------------------------


def _user_ratings(synthetic_data: Data, user: int) -> tuple[list[int | str], list[float], list[float]]:
    """A training user's ratings (arrival order), plus two of movies the model does not know."""
    rows = synthetic_data["u"] == user
    t = synthetic_data["t"][rows].tolist()
    return (
        [*synthetic_data["i"][rows].tolist(), 555, 777],
        [*synthetic_data["r"][rows].tolist(), 4.5, 1.0],
        [*t, t[0], max(t) - DAY / 2],
    )


@pytest.mark.parametrize("trees", ["lightgbm", "ensemble"])
@pytest.mark.parametrize("compiled", [True, False], ids=["C", "numpy"])
@pytest.mark.parametrize("personalize", ["known_user", "known_user_and_movie"])
def test_predict_equals_the_reference(
    synthetic_model: PersonalizedModel,
    loaded: PersonalizedModel,
    synthetic_data: Data,
    trees: str,
    compiled: bool,
    personalize: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch and each of its movies alone, on the C rows or numpy's; the trees in LightGBM (as trained) or in
    # TreeEnsemble (as loaded); the movies: known ones, known ones that received ratings since training, rated
    # movies the model does not know, and a movie nobody knows.
    use_codec(compiled, monkeypatch)
    base = synthetic_model if trees == "lightgbm" else loaded
    assert isinstance(base.booster, EnsembleBooster) == (trees == "ensemble")
    m = with_config(base, personalize=personalize)
    ids, ratings, times = _user_ratings(synthetic_data, 5)
    view = m.user_view_of_ratings(ids, ratings, times)
    state = user_state(m.mf, ids, ratings, times)
    assert view is not None
    movies: list[int | str] = [100, 101, 555, 102, 888, 124, 103, 555]
    received = {"101": (4.0, 30.0, 230.0), "555": (2.0, 9.0, 41.0), "124": (1.0, 2.0, 4.0)}  # API scale
    extra = np.zeros((len(movies), 3))
    for k, movie in enumerate(movies):
        c, s, ss = received.get(str(movie), (0.0, 0.0, 0.0))
        extra[k] = (c, s / 2.0, ss / 4.0)  # the data's scale: half the API's
    table = m.movie_table(received)
    x6 = synthetic_data["x6"][: len(movies)]
    for now in (max(times) + DAY, float(np.median(times))):  # after every rating, and between them
        pred, mask = m.predict(view, x6, movies, table, now)
        want, want_mask = predict_user(m, state, movies, x6, now, extra)
        assert mask.tolist() == want_mask.tolist()
        assert mask.tolist() == (
            [True] * len(movies) if personalize == "known_user" else [isinstance(i, int) and i < 200 for i in movies]
        )
        np.testing.assert_allclose(pred[mask], m.to_api(want[mask]), rtol=0, atol=1e-9)
        assert ((pred >= 0.0) & (pred <= 10.0)).all()
        for k, movie in enumerate(movies):  # one movie (a /predict)
            one, one_mask = m.predict(view, x6[k : k + 1], [movie], table, now)
            assert one.shape == one_mask.shape == (1,)
            assert bool(one_mask[0]) == bool(mask[k])
            assert one[0] == pytest.approx(pred[k], abs=1e-9)
    # A request's movie id as text is the model's int id; no movie id is a movie nobody knows.
    np.testing.assert_array_equal(
        m.predict(view, x6[:2], ["100", "888"], table, 2e9)[0], m.predict(view, x6[:2], [100, 888], table, 2e9)[0]
    )
    np.testing.assert_array_equal(
        m.predict(view, x6[:1], [None], table, 2e9)[0], m.predict(view, x6[:1], [888], table, 2e9)[0]
    )


def test_min_user_ratings_gates_personalisation(synthetic_model: PersonalizedModel) -> None:
    gated = with_config(synthetic_model, min_user_ratings=3)
    mf = synthetic_model.mf
    s = update_user_state(mf, empty_user_state(mf), 100, 4.0, 1.0)
    s = update_user_state(mf, s, 101, 4.0, 2.0)
    x6 = np.tile([1.0, 7.0, 100.0, 1.0, 3.0, 50.0], (2, 1))
    assert predict_user(gated, s, [102, 103], x6)[1].tolist() == [False, False]
    assert predict_user(synthetic_model, s, [102, 103], x6)[1].tolist() == [True, True]
    assert gated.user_view_of_ratings([100, 101], [4.0, 4.0], [1.0, 2.0]) is None  # the service's way: no view
    assert synthetic_model.user_view_of_ratings([100, 101], [4.0, 4.0], [1.0, 2.0]) is not None
    s = update_user_state(mf, s, 104, 4.0, 3.0)
    assert predict_user(gated, s, [102, 103], x6)[1].tolist() == [True, True]
    view = gated.user_view_of_ratings([100, 101, 104], [4.0, 4.0, 4.0], [1.0, 2.0, 3.0])
    assert view is not None
    pred, mask = gated.predict(view, x6, [102, 103], gated.movie_table(), 10.0)
    assert mask.tolist() == [True, True]
    np.testing.assert_allclose(pred, gated.to_api(predict_user(gated, s, [102, 103], x6, 10.0)[0]), atol=1e-9)


def test_unknown_users_are_left_to_the_six_feature_model(synthetic_model: PersonalizedModel) -> None:
    x6 = np.tile([1.0, 7.0, 100.0, 1.0, 3.0, 50.0], (3, 1))
    pred, mask = predict_user(synthetic_model, None, [100, 101, 424242], x6)
    assert not mask.any()
    assert np.isnan(pred).all()
    pred, mask = predict_user(synthetic_model, empty_user_state(synthetic_model.mf), [100, 101, 424242], x6)
    assert not mask.any()


def test_a_new_users_ratings_move_their_predictions(synthetic_model: PersonalizedModel, synthetic_data: Data) -> None:
    movies: list[int | str] = list(range(100, 125))
    x6 = synthetic_data["x6"][:25]
    table = synthetic_model.movie_table()
    seen = [100, 101, 102]
    times = [1e9 + k for k in range(3)]
    fans = synthetic_model.user_view_of_ratings(seen, [5.0] * 3, times)
    grumps = synthetic_model.user_view_of_ratings(seen, [0.5] * 3, times)
    assert fans is not None
    assert grumps is not None
    high, _ = synthetic_model.predict(fans, x6, movies, table, now=1e9 + 10)
    low, _ = synthetic_model.predict(grumps, x6, movies, table, now=1e9 + 10)
    assert (high > low).mean() > 0.9
    assert high.mean() - low.mean() > 1.0  # API scale: half a star on the data's
    fan_state = user_state(synthetic_model.mf, seen, [5.0] * 3, times)
    np.testing.assert_allclose(
        high, synthetic_model.to_api(predict_user(synthetic_model, fan_state, movies, x6, 1e9 + 10)[0]), atol=1e-9
    )


def test_movie_table_adds_what_movies_received(synthetic_model: PersonalizedModel, synthetic_data: Data) -> None:
    # The reference's per-movie extra: (count, sum, sum of squares) on the data's scale, re-ratings replace.
    extra = update_movie_extra((0.0, 0.0, 0.0), 4.0)
    extra = update_movie_extra(extra, 2.0)
    assert extra == (2.0, 6.0, 20.0)
    assert update_movie_extra(extra, 5.0, previous_rating=2.0) == (2.0, 9.0, 41.0)

    st = synthetic_model.state
    k100 = synthetic_model.mf.item_index[100]
    c0, t0, s0 = st.item_count[k100], st.item_total[k100], st.item_total_sq[k100]
    base = synthetic_model.movie_table()
    assert base.table.shape == (len(synthetic_model.mf.item_ids) + 1, 4)
    np.testing.assert_allclose(
        base.table[k100], [c0, t0 / c0, math.sqrt(s0 / c0 - (t0 / c0) ** 2), synthetic_model.mf.item_bias[k100]]
    )
    assert base.positions([100, 555, "nope"]).tolist() == [
        k100,
        len(synthetic_model.mf.item_ids),
        len(synthetic_model.mf.item_ids),
    ]
    # 200 new ratings of 1 (API scale: half a star) for movies 100 and 101 and the brand-new movie 555.
    received = {"100": (200.0, 200.0, 200.0), "101": (200.0, 200.0, 200.0), "555": (200.0, 200.0, 200.0)}
    moved_table = synthetic_model.movie_table(received)
    c, t, s = c0 + 200, t0 + 100.0, s0 + 50.0  # the data's scale: sum / 2, sum of squares / 4
    np.testing.assert_allclose(
        moved_table.table[k100], [c, t / c, math.sqrt(s / c - (t / c) ** 2), synthetic_model.mf.item_bias[k100]]
    )
    row555 = moved_table.positions([555])[0]
    assert row555 == len(synthetic_model.mf.item_ids)  # a row of its own, after the model's movies
    np.testing.assert_array_equal(moved_table.table[row555], [200.0, 0.5, 0.0, np.nan])
    assert moved_table.positions(["555", 424242]).tolist() == [row555, len(moved_table.table) - 1]
    assert synthetic_model.store_keys(["100", "x"]) == [100, "x"]

    rows = synthetic_data["u"] == 5
    ids, ratings, times = (
        synthetic_data["i"][rows].tolist(),
        synthetic_data["r"][rows].tolist(),
        synthetic_data["t"][rows].tolist(),
    )
    view = synthetic_model.user_view_of_ratings(ids, ratings, times)
    state = user_state(synthetic_model.mf, ids, ratings, times)
    assert view is not None
    movies: list[int | str] = [100, 101, 555]
    x6 = synthetic_data["x6"][:3]
    before, mask = synthetic_model.predict(view, x6, movies, base, 2e9)
    # Nothing received is the trained moments (and a movie nobody rated).
    nothing = synthetic_model.movie_table({"100": (0.0, 0.0, 0.0), "101": (0.0, 0.0, 0.0), "555": (0.0, 0.0, 0.0)})
    np.testing.assert_array_equal(synthetic_model.predict(view, x6, movies, nothing, 2e9)[0], before)
    moved, mask2 = synthetic_model.predict(view, x6, movies, moved_table, 2e9)
    assert mask.tolist() == mask2.tolist() == [True, True, True]
    assert not np.array_equal(before, moved)
    low = np.tile([200.0, 100.0, 50.0], (3, 1))
    np.testing.assert_allclose(
        moved, synthetic_model.to_api(predict_user(synthetic_model, state, movies, x6, 2e9, low)[0]), atol=1e-9
    )


def test_scale_conversion_to_and_from_the_api(synthetic_model: PersonalizedModel) -> None:
    np.testing.assert_array_equal(synthetic_model.to_api(np.array([0.5, 5.0, np.nan])), [1.0, 10.0, np.nan])
    y = np.array([2.5, 6.0, -1.0])
    assert synthetic_model.to_api(y, in_place=True) is y
    assert y.tolist() == [5.0, 10.0, 0.0]  # clipped to the API's range
    assert synthetic_model.from_api(7.0) == 3.5


# --- persistence --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, synthetic_model: PersonalizedModel, synthetic_data: Data) -> None:
    card = synthetic_model.save(tmp_path, created_at="2026-01-01T00:00:00+00:00")
    assert card.kind == "personalized"
    assert card.features == list(MODEL_FEATURES)
    assert set(card.extra_files) == {"cf.npz", "cf.json", "state.npz"}
    assert synthetic_model.version == card.version
    back = PersonalizedModel.load(tmp_path)
    assert back.config == synthetic_model.config
    assert back.version == card.version
    assert not back.counts_store_ratings
    # The loaded trees run in TreeEnsemble, the trained ones in LightGBM: equal to float rounding.
    table, back_table = synthetic_model.movie_table(), back.movie_table()
    np.testing.assert_array_equal(back_table.table, table.table)
    movies: list[int | str] = [*range(100, 125), 555]
    x6 = synthetic_data["x6"][: len(movies)]
    for user in (0, 5, 39):
        rows = synthetic_data["u"] == user
        args = (
            synthetic_data["i"][rows].tolist(),
            synthetic_data["r"][rows].tolist(),
            synthetic_data["t"][rows].tolist(),
        )
        view, back_view = synthetic_model.user_view_of_ratings(*args), back.user_view_of_ratings(*args)
        assert view is not None
        assert back_view is not None
        want = synthetic_model.predict(view, x6, movies, table, 2e9)[0]
        np.testing.assert_allclose(back.predict(back_view, x6, movies, back_table, 2e9)[0], want, rtol=0, atol=1e-9)
    # Saving again gives the same bytes: the card's checksums identify the model.
    again = synthetic_model.save(tmp_path / "again", created_at="2026-01-01T00:00:00+00:00")
    assert again.extra_files == card.extra_files
    assert again.sha256 == card.sha256
    # A model trained from the service's own store already counts every stored rating: they are not added again.
    synthetic_model.save(tmp_path / "store", data={"dataset": "feedback"})
    from_store = PersonalizedModel.load(tmp_path / "store")
    assert from_store.counts_store_ratings
    received = {"100": (200.0, 200.0, 200.0), "555": (3.0, 6.0, 12.0)}
    np.testing.assert_array_equal(from_store.movie_table(received).table, table.table)


@pytest.mark.parametrize("name", ["personalized.txt", "cf.npz", "cf.json", "state.npz"])
def test_load_refuses_any_tampered_file(tmp_path: Path, synthetic_model: PersonalizedModel, name: str) -> None:
    synthetic_model.save(tmp_path)
    path = tmp_path / name
    synthetic_data = bytearray(path.read_bytes())
    synthetic_data[len(synthetic_data) // 2] ^= 1
    path.write_bytes(bytes(synthetic_data))
    with pytest.raises(ModelChecksumError):
        PersonalizedModel.load(tmp_path)


def test_load_refuses_a_six_feature_card(tmp_path: Path, synthetic_model: PersonalizedModel) -> None:
    synthetic_model.save(tmp_path)
    card = json.loads((tmp_path / CARD_NAME).read_text())
    card["kind"] = "six_features"
    (tmp_path / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelFormatError):
        PersonalizedModel.load(tmp_path)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_table_without_movie_state_finds_ids_as_key_spells_them(
    synthetic_model: PersonalizedModel, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without movie state every movie's row comes from the store, keyed by its text: a request's 42 is the store's
    # "42" (not "042"), a text id is looked up as it is. The batch lookup (by position for ints, C kernel or its
    # twin) answers what ``position``, one id at a time through ``key``, answers.
    if not compiled:
        monkeypatch.setattr(native, "positions", native.positions_py)
    movieless = synthetic_model.without_movie_state()
    one = (1.0, 8.0, 64.0)
    table = movieless.movie_table({"42": one, "042": one, "7": one, "tt1": one, "100": one})
    ids: list[int | str | None] = [42, "42", "042", 7, "7", "tt1", 100, 8, "8", 43, 10**30, None, "x"]
    expected = [table.position(m) for m in ids]
    assert table.positions(ids).tolist() == expected
    assert len(set(expected[:7])) == 5  # 42, "042", 7, "tt1", 100 have rows of their own
    assert expected[7:] == [len(table.table) - 1] * 6  # nobody rated the others
    empty = movieless.movie_table()
    assert empty.positions([1, "1", None]).tolist() == [0, 0, 0]
