"""The personalised model: online user state, leak-free training features, scoring, persistence, real-data targets."""

from __future__ import annotations

import json
import tracemalloc
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moviematch_ml.cf import MFConfig
from moviematch_ml.errors import ModelChecksumError, ModelFormatError
from moviematch_ml.model import CARD_NAME, RatingScale
from moviematch_ml.personalized import (
    MODEL_FEATURES,
    RECENT_RATINGS,
    STATE_FEATURES,
    PersonalizedConfig,
    PersonalizedModel,
    RatingState,
    UserState,
    UserView,
    empty_user_state,
    fold_in_state,
    out_of_fold_state_features,
    recent_features,
    update_movie_extra,
    update_user_state,
    user_state,
)

SCALE = RatingScale(min=0.5, max=5.0, step=0.5)
DAY = 86_400.0


def _data(seed: int = 0, n_users: int = 40, n_items: int = 25) -> dict[str, np.ndarray]:
    """Synthetic ratings with user and movie effects plus a rank-1 taste, and six made-up features."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.5, n_users)
    c = rng.normal(0, 0.5, n_items)
    p, q = rng.normal(0, 0.7, n_users), rng.normal(0, 0.7, n_items)
    # Users from a handful of ratings to most movies, as in real data (and so that new users are in range).
    density = np.linspace(0.12, 0.9, n_users)[:, None]
    u, i = np.nonzero(rng.random((n_users, n_items)) < density)
    r = np.clip(np.round((3.2 + a[u] + c[i] + p[u] * q[i] + rng.normal(0, 0.3, len(u))) * 2) / 2, 0.5, 5.0)
    t = 1_000_000_000 + rng.integers(0, 400, len(u)) * DAY
    x6 = np.column_stack(
        [
            rng.integers(0, 3, len(u)),
            np.clip((3.2 + c[i]) * 2, 0, 10),
            rng.integers(0, 500, len(u)),
            rng.integers(0, 2, len(u)),
            rng.uniform(0, 40, len(u)),
            rng.uniform(0, 100, len(u)),
        ]
    ).astype(np.float64)
    return {"u": u.astype(np.int64), "i": i.astype(np.int64) + 100, "r": r, "t": t, "x6": x6}


CFG = PersonalizedConfig(
    mf=MFConfig(factors=2, iterations=5),
    n_estimators=60,
    learning_rate=0.1,
    num_leaves=7,
    min_child_samples=5,
    inner_folds=3,
)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return _data()


@pytest.fixture(scope="module")
def model(data: dict[str, np.ndarray]) -> PersonalizedModel:
    return PersonalizedModel.fit(data["u"], data["i"], data["r"], data["t"], data["x6"], CFG, SCALE)


# --- online user state -------------------------------------------------------------------------------------------


def test_update_is_pure_and_equals_the_batch_fold_in(model: PersonalizedModel, data: dict[str, np.ndarray]) -> None:
    mf = model.mf
    rows = data["u"] == 3
    start = empty_user_state(mf)
    s1 = update_user_state(mf, start, int(data["i"][rows][0]), float(data["r"][rows][0]), float(data["t"][rows][0]))
    assert start.count == 0
    assert start.gram.sum() == 0
    assert s1.count == 1
    full = user_state(mf, data["i"][rows], data["r"][rows], data["t"][rows])
    assert full.count == rows.sum()
    assert full.total == pytest.approx(data["r"][rows].sum())
    bias, vec = fold_in_state(mf, full)
    want_bias, want_vec = mf.fold_in(data["i"][rows], data["r"][rows])
    assert bias == pytest.approx(want_bias, abs=1e-10)
    np.testing.assert_allclose(vec, want_vec, atol=1e-10)
    # ... and a training user's fold-in is their trained factors (the ALS user step).
    k = mf.user_index[3]
    assert bias == pytest.approx(mf.user_bias[k], abs=1e-10)


def test_rerating_replaces_the_old_rating(model: PersonalizedModel) -> None:
    mf = model.mf
    s = update_user_state(mf, empty_user_state(mf), 100, 2.0, 10.0)
    s = update_user_state(mf, s, 101, 4.0, 20.0)
    s = update_user_state(mf, s, 100, 5.0, 30.0, previous_rating=2.0)
    direct = user_state(mf, [101, 100], [4.0, 5.0], [20.0, 30.0])
    assert s.count == direct.count == 2
    assert s.total == pytest.approx(9.0)
    np.testing.assert_allclose(s.gram, direct.gram, atol=1e-12)
    np.testing.assert_allclose(s.rhs, direct.rhs, atol=1e-12)


def test_recent_buffer_keeps_the_latest_ratings_in_time_order(model: PersonalizedModel) -> None:
    mf = model.mf
    s = empty_user_state(mf)
    for k in range(RECENT_RATINGS + 3):
        s = update_user_state(mf, s, 100, 3.0, float(1000 - k))  # arriving newest first
    assert len(s.recent_times) == RECENT_RATINGS
    assert list(s.recent_times) == sorted(s.recent_times)
    assert s.recent_times[-1] == 1000.0
    assert s.recent_times[0] == 1000.0 - RECENT_RATINGS + 1


def test_ratings_with_one_timestamp_keep_their_arrival_order(model: PersonalizedModel) -> None:
    # A batch of /feedback without timestamps shares the arrival time: the buffer must keep the last ones sent,
    # not the ones with the largest residual (which would make every batch-fed user look like a fan).
    mf = model.mf
    s = empty_user_state(mf)
    ratings = [5.0] * RECENT_RATINGS + [1.0] * RECENT_RATINGS
    for r in ratings:
        s = update_user_state(mf, s, 999_999, r, 1000.0)  # a movie the model does not know: residual r - mean
    assert s.recent_resid == tuple([1.0 - mf.global_mean] * RECENT_RATINGS)


def test_bulk_user_state_equals_folding_the_updates(model: PersonalizedModel, data: dict[str, np.ndarray]) -> None:
    mf = model.mf
    rows = data["u"] == 5
    ids = [*data["i"][rows].tolist(), 999_999]  # plus a movie the model does not know...
    rs = [*data["r"][rows].tolist(), 4.0]
    ts = [*data["t"][rows].tolist(), float(data["t"][rows][0])]  # ...rated at the same second as the first one
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


def test_bulk_user_state_counts_a_rerated_movie_once(model: PersonalizedModel) -> None:
    mf = model.mf
    movie = next(iter(mf.item_index))
    twice = user_state(mf, [movie, movie], [1.0, 5.0], [10.0, 20.0])
    once = user_state(mf, [movie], [5.0], [20.0])
    assert (twice.count, twice.total) == (once.count, once.total) == (1.0, 5.0)
    np.testing.assert_allclose(twice.gram, once.gram)


def test_user_state_json_round_trip(model: PersonalizedModel) -> None:
    s = user_state(model.mf, [100, 101, 999], [4.0, 2.5, 5.0], [1.0, 2.0, 3.0])
    assert s.count == 3
    assert s.cf_count == 2
    back = UserState.from_json(json.loads(json.dumps(s.to_json())))
    assert back.count == s.count
    assert back.recent_times == s.recent_times
    np.testing.assert_array_equal(back.gram, s.gram)


def test_user_state_keeps_a_mix_of_int_and_str_ids_apart(model: PersonalizedModel) -> None:
    # np.asarray turned [100, "x"] into ["100", "x"]: one non-numeric movie id hid every known movie.
    s = user_state(model.mf, [100, "x"], [4.0, 2.0], [1.0, 2.0])
    assert (s.count, s.cf_count) == (2.0, 1.0)


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


@pytest.mark.parametrize(
    ("ids", "ratings", "times"),
    [
        ([999_001, 999_002], [4.0, 1.0], [1.0, 2.0]),  # no movie the model knows
        ([100], [3.5], [5.0]),  # one rating
        ([100, 101, 100, 102, 101], [1.0, 2.0, 5.0, 3.0, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]),  # re-rated movies
        ([100, 101, 102, 999_001], [5.0, 1.0, 3.0, 2.0], [7.0, 7.0, 7.0, 7.0]),  # one timestamp: arrival order
        ([103, 104, "x"], [2.0, 4.0, 5.0], [3.0, 1.0, 2.0]),  # out of time order; an id of the other type
        (list(range(100, 125)), [0.5 + (k % 10) / 2 for k in range(25)], [float(25 - k) for k in range(25)]),
    ],
)
@pytest.mark.parametrize("compiled", [True, False], ids=["C-cholesky", "numpy-solve"])
def test_the_view_from_the_ratings_equals_the_view_from_the_state(
    model: PersonalizedModel,
    ids: list[int | str],
    ratings: list[float],
    times: list[float],
    compiled: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The view is built in C (_codec.view_data, the fold-in solved by Cholesky), or by numpy without the extension.
    if not compiled:
        monkeypatch.setattr("moviematch_ml.personalized._codec", None)
    _same_view(
        model.user_view_of_ratings(ids, ratings, times), model.user_view(user_state(model.mf, ids, ratings, times))
    )


def test_the_view_from_the_ratings_by_hand(model: PersonalizedModel) -> None:
    mu = model.mf.global_mean
    # Movies the model does not know: no fold-in, residuals against the global mean only.
    view = model.user_view_of_ratings([999_001, 999_002, 999_001], [4.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert view is not None
    assert (view.count, view.mean, view.std, view.bias) == (2.0, 1.5, 0.5, 0.0)  # 999_001 counts once, as 2.0
    assert view.factors.tolist() == [0.0, 0.0]
    assert view.recent_times.tolist() == [2.0, 3.0]
    assert view.recent_resid.tolist() == pytest.approx([1.0 - mu, 2.0 - mu])
    # Eleven ratings at one second: the ten latest to arrive are the recent ones.
    eleven = model.user_view_of_ratings(
        list(range(999_000, 999_011)), [float(k % 5 + 1) for k in range(11)], [9.0] * 11
    )
    assert eleven is not None
    assert eleven.recent_resid.tolist() == pytest.approx([k % 5 + 1 - mu for k in range(1, 11)])
    # Nothing to answer with: no ratings, or fewer than min_user_ratings.
    assert model.user_view_of_ratings([], [], []) is None
    picky = PersonalizedModel(CFG.model_copy(update={"min_user_ratings": 3}), model.state, model.booster, SCALE)
    assert picky.user_view_of_ratings([100, 101, 100], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) is None  # 2 movies
    assert picky.user_view_of_ratings([100, 101, 102], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) is not None


def test_a_user_view_is_one_compact_array() -> None:
    view = UserView(3.0, 2.5, 0.5, -0.25, np.array([1.0, -2.0]), [10.0, 20.0, 30.0], [0.5, -0.5, 1.0])
    assert (view.count, view.mean, view.std, view.bias) == (3.0, 2.5, 0.5, -0.25)
    assert view.columns().tolist() == [3.0, 2.5, 0.5, -0.25]
    assert view.factors.tolist() == [1.0, -2.0]
    assert view.dot(np.array([3.0, 1.0])) == 1.0  # 1 * 3 - 2 * 1
    assert view.recent_times.tolist() == [10.0, 20.0, 30.0]
    assert view.recent_resid.tolist() == [0.5, -0.5, 1.0]
    assert view.recent(31.0)[:2] == (1.0 / 3, 1.0 / 3)  # every rating before now: the means kept with the view
    with pytest.raises(ValueError, match="read-only"):
        view.factors[0] = 5.0  # a cached view is shared by every request
    with pytest.raises(AttributeError):
        view.count = 4.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="2 recent times for 3 residuals"):
        UserView(3.0, 2.5, 0.5, -0.25, np.zeros(2), [1.0, 2.0], [0.5, -0.5, 1.0])
    same = UserView.of_solution(3.0, 2.5, 0.5, np.array([-0.25, 1.0, -2.0]), [10.0, 20.0, 30.0], [0.5, -0.5, 1.0])
    assert repr(same) == repr(view)
    # Fields and arrays of floats took 825 bytes for a user with 3 ratings and 16 factors; one array takes
    # 8 bytes per float (4 + 16 + 2 + 2 * 3 of them) plus the two objects' headers.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    views = [UserView(3.0, 2.5, 0.5, -0.25, np.zeros(16), [1.0, 2.0, 3.0], [0.5, -0.5, 1.0]) for _ in range(1000)]
    per_view = (tracemalloc.get_traced_memory()[0] - before) / len(views)
    tracemalloc.stop()
    assert 8 * 28 < per_view < 450


def test_recent_features_by_hand() -> None:
    # One user, ratings at days 0, 1, 1.5 with residuals 1, -1, 0.5; query at day 2 sees all three.
    times = np.array([0.0, 1.0, 1.5]) * DAY
    resid = np.array([1.0, -1.0, 0.5])
    out = recent_features(times, resid, np.array([0, 0]), np.array([3, 1]), np.array([2.0, 2.0]) * DAY)
    # last-10 mean, last-3 mean, days since last, ratings within the last day
    np.testing.assert_allclose(out[0], [0.5 / 3, 0.5 / 3, 0.5, 2.0])
    np.testing.assert_allclose(out[1], [1.0, 1.0, 2.0, 0.0])  # only the first rating is before the query
    none = recent_features(times, resid, np.array([0]), np.array([0]), np.array([0.0]))
    assert np.isnan(none[0, :3]).all()
    assert none[0, 3] == 0.0
    # The service's one-user twin on Python floats gives the same figures.
    view = UserView(3.0, 0.0, 0.0, 0.0, np.zeros(2), array("d", times), array("d", resid))
    np.testing.assert_allclose(view.recent(2.0 * DAY), out[0])
    np.testing.assert_allclose(view.recent(0.5 * DAY), [1.0, 1.0, 0.5, 1.0])  # only the first rating, half a day ago
    assert np.isnan(view.recent(0.0)[:3]).all()
    assert view.recent(0.0)[3] == 0.0
    # Every rating before now (the means kept with the view) and some after it (computed per call) give the
    # vectorised figures, at times on either side of each rating and of each rating plus a day.
    rng = np.random.default_rng(3)
    many_times = np.sort(rng.uniform(0.0, 5.0, 14)) * DAY
    many_resid = rng.normal(0.0, 1.0, 14)
    tail = slice(14 - RECENT_RATINGS, 14)  # the view keeps the latest RECENT_RATINGS, as user_state does
    busy = UserView(14.0, 0.0, 0.0, 0.0, np.zeros(2), array("d", many_times[tail]), array("d", many_resid[tail]))
    edges = np.concatenate([many_times[tail], many_times[tail] + DAY])
    queries = np.sort(np.concatenate([edges - 1.0, edges, edges + 1.0, [10.0 * DAY]]))
    start = np.full(len(queries), 14 - RECENT_RATINGS)
    end = np.searchsorted(many_times, queries, side="left")
    want = recent_features(many_times, many_resid, start, np.maximum(end, start), queries)
    for q, expected in zip(queries.tolist(), want, strict=True):
        np.testing.assert_allclose(busy.recent(q), expected, rtol=0, atol=1e-12, err_msg=str(q))


# --- no leakage --------------------------------------------------------------------------------------------------


def test_a_training_rows_state_features_never_see_its_own_rating(data: dict[str, np.ndarray]) -> None:
    base = out_of_fold_state_features(data["u"], data["i"], data["r"], data["t"], CFG)
    assert base.shape == (len(data["r"]), len(STATE_FEATURES))
    for j in (0, 17, len(data["r"]) - 1):
        changed = data["r"].copy()
        changed[j] = 5.0 if changed[j] < 3 else 0.5
        again = out_of_fold_state_features(data["u"], data["i"], changed, data["t"], CFG)
        assert again[j].tobytes() == base[j].tobytes()
        # The change does reach other rows (so this test could fail): the rows it was state for.
        assert not np.array_equal(np.nan_to_num(again), np.nan_to_num(base))


# --- scoring -----------------------------------------------------------------------------------------------------


def test_online_scoring_of_a_training_user_matches_evaluation_scoring(
    model: PersonalizedModel, data: dict[str, np.ndarray]
) -> None:
    rows = data["u"] == 5
    state = user_state(model.mf, data["i"][rows], data["r"][rows], data["t"][rows])
    movies = np.array([100, 101, 102, 103])
    x6 = data["x6"][:4]
    now = float(data["t"].max()) + DAY
    online, mask = model.predict_user(state, movies, x6, now=now)
    offline, mask2 = model.predict_pairs(np.full(4, 5), movies, np.full(4, now), x6)
    assert mask.all()
    assert mask2.all()
    np.testing.assert_allclose(online, offline, atol=1e-9)


def test_unknown_users_are_left_to_the_six_feature_model(model: PersonalizedModel) -> None:
    x6 = np.tile([1.0, 7.0, 100.0, 1.0, 3.0, 50.0], (3, 1))
    pred, mask = model.predict_user(None, [100, 101, 424242], x6)
    assert not mask.any()
    assert np.isnan(pred).all()
    pred, mask = model.predict_pairs([9999, 0, 0], [100, 424242, 100], [0.0, 0.0, 0.0], x6)
    # Known user: personalised even for a movie the state has never seen (measured better than the fallback).
    assert mask.tolist() == [False, True, True]
    assert np.isnan(pred[0])
    assert np.isfinite(pred[1:]).all()
    strict = PersonalizedModel(CFG.model_copy(update={"personalize": "known_user_and_movie"}), *_parts(model))
    assert strict.predict_pairs([0, 0], [100, 424242], [0.0, 0.0], x6[:2])[1].tolist() == [True, False]


def test_min_user_ratings_gates_personalisation(model: PersonalizedModel) -> None:
    gated = PersonalizedModel(CFG.model_copy(update={"min_user_ratings": 3}), *_parts(model))
    mf = model.mf
    s = update_user_state(mf, empty_user_state(mf), 100, 4.0, 1.0)
    s = update_user_state(mf, s, 101, 4.0, 2.0)
    x6 = np.tile([1.0, 7.0, 100.0, 1.0, 3.0, 50.0], (2, 1))
    assert gated.predict_user(s, [102, 103], x6)[1].tolist() == [False, False]
    assert model.predict_user(s, [102, 103], x6)[1].tolist() == [True, True]
    s = update_user_state(mf, s, 104, 4.0, 3.0)
    assert gated.predict_user(s, [102, 103], x6)[1].tolist() == [True, True]


def _parts(model: PersonalizedModel) -> tuple[RatingState, Any, RatingScale]:
    return model.state, model.booster, model.scale


def test_a_new_users_ratings_move_their_predictions(model: PersonalizedModel, data: dict[str, np.ndarray]) -> None:
    mf = model.mf
    movies = np.arange(100, 125)
    x6 = data["x6"][:25]
    fans, grumps = empty_user_state(mf), empty_user_state(mf)
    for k, m in enumerate((100, 101, 102)):
        fans = update_user_state(mf, fans, m, 5.0, 1e9 + k)
        grumps = update_user_state(mf, grumps, m, 0.5, 1e9 + k)
    high, _ = model.predict_user(fans, movies, x6, now=1e9 + 10)
    low, _ = model.predict_user(grumps, movies, x6, now=1e9 + 10)
    assert (high > low).mean() > 0.9
    assert high.mean() - low.mean() > 0.5


def test_movie_extra_updates_and_reaches_the_movie_features(
    model: PersonalizedModel, data: dict[str, np.ndarray]
) -> None:
    extra = update_movie_extra((0.0, 0.0, 0.0), 4.0)
    extra = update_movie_extra(extra, 2.0)
    assert extra == (2.0, 6.0, 20.0)
    assert update_movie_extra(extra, 5.0, previous_rating=2.0) == (2.0, 9.0, 41.0)
    rows = data["u"] == 5
    state = user_state(model.mf, data["i"][rows], data["r"][rows], data["t"][rows])
    movies, x6 = [100, 101, 555], data["x6"][:3]
    base, mask = model.predict_user(state, movies, x6, now=2e9)
    same, _ = model.predict_user(state, movies, x6, now=2e9, movie_extra=np.zeros((3, 3)))
    np.testing.assert_array_equal(base, same)
    # 200 new half-star ratings for each movie since training, including the brand-new movie 555.
    low = np.tile([200.0, 100.0, 50.0], (3, 1))
    moved, mask2 = model.predict_user(state, movies, x6, now=2e9, movie_extra=low)
    assert mask.tolist() == mask2.tolist() == [True, True, True]
    assert not np.array_equal(base, moved)


def test_scale_conversion_to_and_from_the_api(model: PersonalizedModel) -> None:
    np.testing.assert_array_equal(model.to_api(np.array([0.5, 5.0, np.nan])), [1.0, 10.0, np.nan])
    assert model.from_api(7.0) == 3.5


def test_fit_is_deterministic(data: dict[str, np.ndarray], model: PersonalizedModel) -> None:
    again = PersonalizedModel.fit(data["u"], data["i"], data["r"], data["t"], data["x6"], CFG, SCALE)
    assert again.booster.model_to_string() == model.booster.model_to_string()
    assert again.mf.user_factors.tobytes() == model.mf.user_factors.tobytes()


# --- persistence -------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, model: PersonalizedModel, data: dict[str, np.ndarray]) -> None:
    card = model.save(tmp_path, created_at="2026-01-01T00:00:00+00:00")
    assert card.kind == "personalized"
    assert card.features == list(MODEL_FEATURES)
    assert set(card.extra_files) == {"cf.npz", "cf.json", "state.npz"}
    back = PersonalizedModel.load(tmp_path)
    args = (data["u"][:50], data["i"][:50], data["t"][:50], data["x6"][:50])
    # The loaded trees run in model.TreeEnsemble, the trained ones in LightGBM: equal to float rounding.
    np.testing.assert_allclose(back.predict_pairs(*args)[0], model.predict_pairs(*args)[0], rtol=0, atol=1e-9)
    assert back.config == model.config
    # Saving again gives the same bytes: the card's checksums identify the model.
    again = model.save(tmp_path / "again", created_at="2026-01-01T00:00:00+00:00")
    assert again.extra_files == card.extra_files
    assert again.sha256 == card.sha256


@pytest.mark.parametrize("name", ["personalized.txt", "cf.npz", "cf.json", "state.npz"])
def test_load_refuses_any_tampered_file(tmp_path: Path, model: PersonalizedModel, name: str) -> None:
    model.save(tmp_path)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ModelChecksumError):
        PersonalizedModel.load(tmp_path)


def test_load_refuses_a_six_feature_card(tmp_path: Path, model: PersonalizedModel) -> None:
    model.save(tmp_path)
    card = json.loads((tmp_path / CARD_NAME).read_text())
    card["kind"] = "six_features"
    (tmp_path / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelFormatError):
        PersonalizedModel.load(tmp_path)


# --- real data ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_data_targets() -> None:
    """The issue's targets on movielens-small (5-fold and temporal), as `moviematch-ml evaluate` computes them."""
    from moviematch_ml.data import load_movielens_small
    from moviematch_ml.evaluation import evaluate
    from moviematch_ml.personalized import PersonalizedCandidate
    from moviematch_ml.training import TrainConfig

    ds = load_movielens_small()
    cfg = TrainConfig.model_validate({})
    kfold = evaluate(ds, "kfold", config=cfg, candidates=[PersonalizedCandidate(six_config=cfg)])
    k = kfold["models"]["personalized"]
    assert k["rmse"] <= 0.845
    assert k["ndcg@10"] >= 0.915
    temporal = evaluate(ds, "temporal", config=cfg, candidates=[PersonalizedCandidate(six_config=cfg)])
    t = temporal["models"]["personalized"]
    assert t["rmse"] <= 1.005
    assert t["rmse_warm_users"] <= 0.866  # SVD++ on the same split
