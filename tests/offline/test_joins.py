"""Joining stored ratings to the predictions served before them: by prediction id, else by user, movie and time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.joins import BY_ID, BY_TIME, Joined, join_ratings
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.journal import Entry, PredictionLog, read, served
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.online.tables import PREDICTION_LOG_COLUMNS

A, B = "a" * 32, "b" * 32
XA = np.array([[1.0, 7.5, 100.0, 0.0, 3.0, 9.5], [2.0, 6.0, 50.0, 1.0, 10.0, 1.25]])
XB = np.array([[0.0, 8.0, 10.0, 1.0, 1.0, 2.0]])


def _store(
    tmp_path: Path, entries: list[Entry], ratings: list[tuple[str, str, float, float, str | None]]
) -> FeedbackStore:
    """A SQLite store holding the log rows of ``entries`` and ``ratings`` (user, movie, rating, rated_at,
    prediction_id), written through the store's own API."""
    store = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'ab.sqlite3'}")
    store.log_predictions(PredictionLog(max_rows=1000).rows(entries))
    store.add([Feedback(f"f{i}", u, m, r, t, p) for i, (u, m, r, t, p) in enumerate(ratings)])
    return store


def join_store(store: FeedbackStore, *, since: float | None = None, until: float | None = None) -> Joined:
    """What ab-report joins: the ratings rated in [since, until] and the predictions logged up to ``until``."""
    return join_ratings(store.iter_feedback(since=since, until=until), read(store, until=until))


# A batch for u1 (movies 10 and 20) at t=100 by the champion, then a /predict of movie 10 for u1 at t=200 by b.
LOG = [
    Entry(A, 100.0, "predict_batch", "champion", "v1", "u1", [10, 20], XA, [7.0, 5.0], "model", None, True, None),
    Entry(B, 200.0, "predict", "b", "v2", "u1", [10], XB, [8.0], "personalized", None),
]


def test_a_log_row_unpacks_into_its_predictions_with_their_ids() -> None:
    rows = [dict(zip(PREDICTION_LOG_COLUMNS, r, strict=True)) for r in PredictionLog(max_rows=10).rows(LOG)]
    first, second = served(rows[0])
    assert (first.prediction_id, second.prediction_id) == (f"{A}-0", f"{A}-1")  # batch row i: <request id>-<i>
    assert (first.movie_id, second.movie_id, first.user_id) == ("10", "20", "u1")
    assert (first.prediction, second.prediction, first.variant, first.model_version) == (7.0, 5.0, "champion", "v1")
    assert (first.features, second.features) == (tuple(XA[0]), tuple(XA[1]))
    (one,) = served(rows[1])
    assert (one.prediction_id, one.source, one.logged_at, one.prediction) == (B, "personalized", 200.0, 8.0)


def test_the_join_rules(tmp_path: Path) -> None:
    store = _store(
        tmp_path,
        LOG,
        [
            ("u1", "10", 9.0, 250.0, f"{A}-0"),  # 0: quotes the batch's row 0: by id, though b's is later
            ("u1", "10", 6.0, 250.0, None),  # 1: the latest prediction of u1/10 before 250: b's
            ("u1", "20", 4.0, 50.0, None),  # 2: before any prediction of u1/20: not joined
            ("u1", "20", 3.0, 100.0, None),  # 3: at the prediction's very time: joined ("at or before")
            ("u2", "10", 5.0, 300.0, None),  # 4: nothing was served to u2: not joined
            ("u1", "20", 2.0, 120.0, f"{A}-0"),  # 5: quotes a prediction of another movie: by time instead
            ("u1", "10", 1.0, 190.0, "unknown-id"),  # 6: an unknown id: by time (b's is after 190)
            ("u9", "10", 7.0, 500.0, B),  # 7: quotes a prediction made for another user: by time, nothing
        ],
    )
    joined = join_store(store)
    store.close()
    f = joined.frame
    assert (joined.ratings, joined.log_predictions, joined.by_id, joined.by_time, joined.unjoined) == (8, 3, 1, 4, 3)
    assert f["row_id"].tolist() == [1, 2, 4, 6, 7]  # row ids start at 1, in arrival order
    assert f["joined_by"].tolist() == [BY_ID, BY_TIME, BY_TIME, BY_TIME, BY_TIME]
    assert f["served_id"].tolist() == [f"{A}-0", B, f"{A}-1", f"{A}-1", f"{A}-0"]
    assert f["variant"].tolist() == ["champion", "b", "champion", "champion", "champion"]
    assert f["prediction"].tolist() == [7.0, 8.0, 5.0, 5.0, 7.0]
    assert f["rating"].tolist() == [9.0, 6.0, 3.0, 2.0, 1.0]
    np.testing.assert_array_equal(f.loc[:, list(FEATURE_NAMES)].to_numpy(), [XA[0], XB[0], XA[1], XA[1], XA[0]])


def test_the_window_reads_ratings_rated_in_it_and_predictions_logged_before_its_end(tmp_path: Path) -> None:
    store = _store(tmp_path, LOG, [("u1", "10", 9.0, 150.0, None), ("u1", "10", 6.0, 250.0, None)])
    early = join_store(store, until=150.0)
    late = join_store(store, since=200.0)
    store.close()
    assert (early.ratings, early.log_predictions, early.frame["served_id"].tolist()) == (1, 2, [f"{A}-0"])
    assert (late.ratings, late.log_predictions, late.frame["served_id"].tolist()) == (1, 3, [B])
