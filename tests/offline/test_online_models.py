"""The replay protocol's pieces: the learning-curve buckets, the history cut, the online baselines (hand-computed),
and the rule that a rating's prediction never sees that rating or a later one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moviematch_ml.offline.baselines import BaselineConfig
from moviematch_ml.offline.evaluation import EvaluationError
from moviematch_ml.offline.online_models import OnlineBias, OnlineMF, OnlineModel, Stream
from moviematch_ml.offline.replay import (
    BUCKET_LABELS,
    bucket_of,
    earlier_ratings,
    group_starts,
    history_cut,
    replay_online,
)
from moviematch_ml.runtime.factors import MFConfig, fold_in

DAY = 86_400.0


def _stream(rows: list[tuple[int, int, float, float]]) -> Stream:
    return Stream.of(pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"]))


def test_buckets_of_earlier_ratings() -> None:
    counts = [0, 1, 2, 3, 5, 6, 10, 11, 20, 21, 50, 51, 1000]
    labels = [BUCKET_LABELS[b] for b in bucket_of(counts)]
    assert labels == ["0", "1", "2", "3-5", "3-5", "6-10", "6-10", "11-20", "11-20", "21-50", "21-50", "51+", "51+"]
    with pytest.raises(ValueError, match="negative"):
        bucket_of([-1])


def test_earlier_ratings_count_strictly_earlier_timestamps_only() -> None:
    # User 7 rates twice at t=2: neither of those two counts the other.
    users = [7, 8, 7, 7, 8, 7]
    times = [1, 1, 2, 2, 3, 4]
    assert earlier_ratings(users, times).tolist() == [0, 0, 1, 1, 1, 3]


def test_history_cut_never_splits_a_timestamp() -> None:
    assert history_cut([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == 8
    # round(10 * 0.8) = 8 falls inside the ratings of t=7 (rows 6-8): they all go to the replayed part.
    assert history_cut([1, 2, 3, 4, 5, 6, 7, 7, 7, 8]) == 6
    with pytest.raises(EvaluationError, match="no history"):
        history_cut([5] * 10)
    assert group_starts([1, 2, 3, 3, 4], 2).tolist() == [2, 4, 5]


def test_online_bias_by_hand() -> None:
    # mu = 3; one sweep with reg 1 on both sides:
    #   b_u = 0 for both users (b_m = 0 first: u0 (1 - 1)/3, u1 0/2);
    #   b_m0 = ((4-3) + (3-3)) / (1+2) = 1/3, b_m1 = (2-3) / (1+1) = -1/2;
    # then each user's bias is the ridge step over their ratings against those b_m:
    #   b_u0 = ((4-3-1/3) + (2-3+1/2)) / (1+2) = (1/6)/3 = 1/18, b_u1 = (3-3-1/3) / (1+1) = -1/6.
    stream = _stream(
        [
            (0, 0, 4.0, 0.0),
            (0, 1, 2.0, 1.0),
            (1, 0, 3.0, 2.0),
            (0, 0, 1.0, DAY + 10),  # user 0 again (movie 0), user 2 (new, movie 1), user 1 on a new movie 2
            (2, 1, 5.0, DAY + 10),
            (1, 2, 5.0, DAY + 10),
            (1, 1, 5.0, DAY + 20),  # the same day: user 1 on movie 1
            (1, 0, 4.0, DAY + 30),
        ]
    )
    model = OnlineBias(stream, BaselineConfig(reg_user=1.0, reg_movie=1.0, epochs=1))
    assert model.due(DAY + 10)
    model.fit(3, DAY + 10)
    assert not model.due(DAY + 20)
    assert model.due(2 * DAY)
    got = model.predict(np.array([3, 4, 5]))
    assert got == pytest.approx([3 + 1 / 18 + 1 / 3, 3 + 0 - 1 / 2, 3 - 1 / 6 + 0])
    model.reveal(np.array([3, 4, 5]))
    # u1 saw movie 2 (unknown to the fit, b = 0): (-1/3 + (5-3-0)) / (1+2) = 5/9.
    assert model.predict(np.array([6])) == pytest.approx([3 + 5 / 9 - 1 / 2])
    model.reveal(np.array([6]))
    # and movie 1 (b = -1/2): (-1/3 + 2 + 5-3+1/2) / (1+3) = (25/6)/4 = 25/24.
    assert model.predict(np.array([7])) == pytest.approx([3 + 25 / 24 + 1 / 3])


def _random_ratings(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, 25, n),
            "movie_id": rng.integers(0, 40, n),
            "rating": rng.integers(1, 11, n) / 2,
            # a few ratings share a timestamp, and the ratings span several days and weeks
            "timestamp": np.sort(rng.integers(0, 40, n)) * (DAY / 2),
        }
    )


def test_online_mf_keeps_every_user_folded_in_from_all_their_ratings() -> None:
    frame = _random_ratings(500, seed=3)
    stream = Stream.of(frame)
    model = OnlineMF(stream, MFConfig(factors=4, iterations=5))
    model.fit(300, float(stream.timestamp[300]))
    model.reveal(np.arange(300, 500, dtype=np.int64))
    mf = model.mf
    assert mf is not None
    for user in range(stream.n_users):
        mine = stream.user == user
        bias, factors = fold_in(mf, stream.movie[mine].tolist(), stream.rating[mine].tolist())
        assert model.user_weights(user) == pytest.approx(np.r_[bias, factors], abs=1e-9)


def _models(stream: Stream) -> list[OnlineModel]:
    return [OnlineBias(stream), OnlineMF(stream, MFConfig(factors=4, iterations=5), refit_seconds=3 * DAY)]


@pytest.mark.parametrize("k", [405, 433, 470])
def test_a_prediction_never_sees_its_rating_or_a_later_one(k: int) -> None:
    frame = _random_ratings(500, seed=5)
    cut = history_cut(frame["timestamp"].to_numpy())
    stream = Stream.of(frame)
    assert k >= cut  # a rating of the replayed part
    before, _ = replay_online(_models(stream), stream, cut)
    # Every rating from the timestamp of row k on is changed: the predictions of the ratings made before it and at
    # it (a rating never sees its own instant) stay exactly the same; the later ones move.
    ts = frame["timestamp"].to_numpy()
    first = int(np.searchsorted(ts, ts[k], side="left"))
    same = int(np.searchsorted(ts, ts[k], side="right")) - cut
    changed = frame.copy()
    changed.loc[first:, "rating"] = 5.5 - changed.loc[first:, "rating"]
    other = Stream.of(changed)
    after, _ = replay_online(_models(other), other, cut)
    for name in before:
        assert np.array_equal(before[name][:same], after[name][:same]), name
        assert not np.allclose(before[name][same:], after[name][same:]), name
