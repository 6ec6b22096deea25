"""Loading training data: CSV layout and errors, rating scales, title normalisation and the metadata join."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moviematch_ml.errors import DataError, StoreError
from moviematch_ml.offline.data import (
    FEEDBACK_SCALE,
    Dataset,
    detect_scale,
    join_metadata,
    load_csv,
    load_feedback,
    load_movielens_small,
    normalize_title,
    parse_scale,
    title_keys,
)
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.runtime.cards import IMDB_GGPLOT2MOVIES, MOVIELENS_SMALL

RATINGS = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964981247\n2,1,5.0,964982224\n"
MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children\n"
    '2,"American President, The (1995)",Comedy|Drama|Romance\n'
    "3,Untitled,(no genres listed)\n"
)


def _write(tmp_path: Path, ratings: str = RATINGS, movies: str = MOVIES) -> tuple[Path, Path]:
    r, m = tmp_path / "ratings.csv", tmp_path / "movies.csv"
    r.write_text(ratings, encoding="utf-8")
    m.write_text(movies, encoding="utf-8")
    return r, m


# --- title normalisation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("Matrix, The", "the matrix"),
        ("The Matrix", "the matrix"),
        ("Amélie", "amelie"),
        ("Se7en!", "se7en"),
        ("Avventura, L'", "lavventura"),
        ("Lord of the Rings: The Two Towers, The", "the lord of the rings the two towers"),
        ("Dr. Strangelove or: How I Learned", "dr strangelove or how i learned"),
        ("Bonnie & Clyde", "bonnie and clyde"),
    ],
)
def test_normalize_title(title: str, expected: str) -> None:
    assert normalize_title(title) == expected


def test_title_keys_include_aka_and_article_free_forms() -> None:
    assert title_keys("Seven (a.k.a. Se7en)") == ["seven", "se7en"]
    assert title_keys("Matrix, The") == ["the matrix", "matrix"]
    assert title_keys("Milagro Beanfield War") == ["milagro beanfield war"]


def test_join_matches_articles_accents_and_a_one_year_gap() -> None:
    movies = pd.DataFrame(
        {
            "movie_id": [1, 2, 3, 4, 5],
            "title": ["Matrix, The", "Amelie", "Heat", "Jaws", "Unknown Film"],
            "year": [1999.0, 2001.0, 1995.0, 1975.0, 1990.0],
        }
    )
    meta = pd.DataFrame(
        {
            "title": ["Matrix, The", "Amélie", "Heat", "Heat", "Jaws"],
            "year": [1999.0, 2002.0, 1995.0, 1996.0, 1978.0],
            "vote_average": [8.5, 8.4, 7.9, 5.0, 7.7],
            "vote_count": [100.0, 50.0, 80.0, 900.0, 70.0],
        }
    )
    out, report = join_metadata(movies, meta)
    got = dict(zip(out["movie_id"], out["vote_average"], strict=True))
    assert got[1] == 8.5  # "Matrix, The" on both sides
    assert got[2] == 8.4  # accent and +1 year
    assert got[3] == 7.9  # the exact year beats a +1 year match with more votes
    assert np.isnan(got[4])  # 3 years apart: a different film
    assert np.isnan(got[5])
    assert report["joined"] == 3
    assert report["coverage"] == pytest.approx(0.6)
    assert (report["metadata_last_year"], report["movies_up_to_last_year"]) == (2002, 5)


# --- scales -----------------------------------------------------------------------------------------------------


def test_detect_scale() -> None:
    assert detect_scale(np.array([1.0, 2.0, 5.0])).max == 5.0
    assert detect_scale(np.array([1.0, 2.0, 5.0])).step == 1.0
    half = detect_scale(np.array([0.5, 4.5, 3.0]))
    assert (half.min, half.max, half.step) == (0.5, 5.0, 0.5)
    ten = detect_scale(np.array([1.0, 7.0, 10.0]))
    assert (ten.min, ten.max) == (1.0, 10.0)
    assert ten.to_api == 1.0
    with pytest.raises(DataError, match="up to 11"):
        detect_scale(np.array([1.0, 11.0]))


def test_parse_scale() -> None:
    assert parse_scale("1-10").max == 10.0
    with pytest.raises(DataError, match="unknown rating scale"):
        parse_scale("0-100")


# --- CSV loading --------------------------------------------------------------------------------------------------


def test_load_csv_ml_latest_layout(tmp_path: Path) -> None:
    ds = load_csv(*_write(tmp_path))
    assert isinstance(ds, Dataset)
    assert ds.ratings.columns.tolist() == ["user_id", "movie_id", "rating", "timestamp"]
    # Sorted by time.
    assert ds.ratings["timestamp"].tolist() == [964981247, 964982224, 964982703]
    m = ds.movies.set_index("movie_id")
    assert (m.loc[1, "title"], m.loc[1, "year"]) == ("Toy Story", 1995.0)
    assert m.loc[2, "title"] == "American President, The"
    assert m.loc[1, "genres"] == ("Adventure", "Animation", "Children")
    assert m.loc[3, "genres"] == ()
    assert m["year"].isna().tolist() == [False, False, True]
    assert (ds.scale.min, ds.scale.max) == (0.5, 5.0)
    assert len(ds.fingerprint()) == 64
    # Files the user supplied: the tool cannot know their terms, and the card says so instead of guessing.
    [terms] = ds.terms
    assert terms.name == "ratings and movies from ratings.csv, movies.csv"
    assert (terms.publisher, terms.commercial_use) == ("whoever supplied it", None)
    assert "the terms under which you hold this data apply" in terms.terms


def test_fingerprint_changes_with_a_rating(tmp_path: Path) -> None:
    a = load_csv(*_write(tmp_path)).fingerprint()
    b = load_csv(*_write(tmp_path, RATINGS.replace("3.5", "4.5"))).fingerprint()
    assert a != b


def test_given_scale_is_enforced(tmp_path: Path) -> None:
    r, m = _write(tmp_path)
    with pytest.raises(DataError) as exc:
        load_csv(r, m, rating_scale=parse_scale("1-5"))
    assert str(exc.value) == f"{r}, line 3, column 'rating': rating 3.5 is not a step of 1 on the 1-5 scale"
    r.write_text("userId,movieId,rating,timestamp\n1,1,4,1\n1,2,0.5,2\n", encoding="utf-8")
    with pytest.raises(DataError) as exc2:
        load_csv(r, m, rating_scale=parse_scale("1-5"))
    assert str(exc2.value) == f"{r}, line 3, column 'rating': rating 0.5 is outside the rating scale 1-5"


def test_given_scale_accepts_valid_ratings(tmp_path: Path) -> None:
    r, m = _write(tmp_path)
    ds = load_csv(r, m, rating_scale=parse_scale("0.5-5"))
    assert ds.scale.step == 0.5


@pytest.mark.parametrize(
    ("ratings", "line", "column", "fragment"),
    [
        ("userId,movieId,rating,timestamp\n1,1,4.0,9\n1,2,abc,9\n", 3, "rating", "expected a finite number"),
        ("userId,movieId,rating,timestamp\n1,1,4.0,9\n1.5,2,3,9\n", 3, "userId", "expected an integer"),
        ("userId,movieId,rating,timestamp\n1,1,4.0,9\n1,2,3,\n", 3, "timestamp", "expected an integer"),
        ("userId,movieId,rating,timestamp\n1,1,nan,9\n", 2, "rating", "expected a finite number"),
        ("userId,movieId,rating,timestamp\n1,1,4,9\n1,99,3,9\n", 3, "movieId", "is not in"),
        ("userId,movieId,rating\n1,1,4\n", 1, None, "missing column 'timestamp'"),
    ],
)
def test_malformed_ratings_name_file_line_and_column(
    tmp_path: Path, ratings: str, line: int, column: str | None, fragment: str
) -> None:
    r, m = _write(tmp_path, ratings)
    with pytest.raises(DataError) as exc:
        load_csv(r, m)
    err = exc.value
    assert err.path == str(r)
    assert err.line == line
    assert err.column == column
    assert fragment in str(err)
    assert str(err).startswith(f"{r}, line {line}")


def test_ragged_row_names_its_line(tmp_path: Path) -> None:
    r, m = _write(tmp_path, "userId,movieId,rating,timestamp\n1,1,4,9\n1,1,4,9\n1,2,3,9,7,8\n")
    with pytest.raises(DataError) as exc:
        load_csv(r, m)
    assert exc.value.line == 4
    assert str(r) in str(exc.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    r, m = _write(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_csv(tmp_path / "nope.csv", m)
    r.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_csv(r, m)
    r.write_text("userId,movieId,rating,timestamp\n", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows"):
        load_csv(r, m)


def test_duplicate_movie_id(tmp_path: Path) -> None:
    r, m = _write(tmp_path, movies=MOVIES + "2,Again (1990),Drama\n")
    with pytest.raises(DataError) as exc:
        load_csv(r, m)
    assert (exc.value.line, exc.value.column) == (5, "movieId")


def test_metadata_file(tmp_path: Path) -> None:
    r, m = _write(tmp_path)
    meta = tmp_path / "meta.csv"
    meta.write_text(
        "movieId,vote_average,vote_count,popularity,release_year\n1,7.9,17000,80.5,1995\n2,,,,\n", encoding="utf-8"
    )
    ds = load_csv(r, m, meta)
    mv = ds.movies.set_index("movie_id")
    assert (mv.loc[1, "vote_average"], mv.loc[1, "vote_count"], mv.loc[1, "popularity"]) == (7.9, 17000.0, 80.5)
    assert mv["vote_average"].isna().tolist() == [False, True, True]
    assert mv.loc[2, "release_year"] == 1995.0  # falls back to the year in the title
    assert ds.join["joined"] == 1
    meta.write_text("movieId,vote_average,vote_count,popularity,release_year\n1,11,5,1,1995\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_csv(r, m, meta)
    assert (exc.value.line, exc.value.column) == (2, "vote_average")


# --- the service's feedback store ---------------------------------------------------------------------------------


def _store(tmp_path: Path, rows: list[tuple[str, str, float, float]], url: str | None = None) -> FeedbackStore:
    """A feedback store (SQLite unless ``url``) holding ``rows`` (user_id, movie_id, rating 0-10, rated_at), stored
    in this order."""
    store = FeedbackStore.from_url(url or f"sqlite:///{tmp_path / 'feedback.sqlite3'}")
    store.add([Feedback(f"f{i}", u, m, r, t, None) for i, (u, m, r, t) in enumerate(rows)])
    return store


FEEDBACK = [
    ("alice", "1", 8.0, 1000.0),
    ("alice", "2", 6.5, 1002.5),
    ("bob", "1", 9.0, 1001.0),
    ("bob", "3", 4.0, 1003.0),
    ("alice", "1", 3.0, 1005.0),  # alice changes her mind about movie 1: only this rating counts
    ("carol", "2", 7.0, 999.0),
    ("carol", "3", 5.0, 1004.0),
    ("dave", "1", 10.0, 1006.0),
    ("dave", "2", 0.0, 1007.9),
    ("erin", "3", 6.0, 1008.0),
    ("erin", "99", 2.0, 1009.0),  # movie 99 is not in movies.csv: 1 of 11 ratings, dropped
]


def test_load_feedback_keeps_the_latest_rating_of_known_movies(tmp_path: Path, db_url: str) -> None:
    _, movies = _write(tmp_path)
    store = _store(tmp_path, FEEDBACK, db_url)
    ds = load_feedback(store, movies, min_ratings=5)
    r = ds.ratings
    assert ds.name == "feedback"
    assert ds.scale == FEEDBACK_SCALE
    assert (ds.scale.min, ds.scale.max, ds.scale.to_api) == (0.0, 10.0, 1.0)
    # Sorted by time (whole seconds); 11 rows less the unknown movie and alice's first rating of movie 1.
    assert r["timestamp"].tolist() == [999, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008]
    assert r["user_id"].tolist() == ["carol", "bob", "alice", "bob", "carol", "alice", "dave", "dave", "erin"]
    assert r["movie_id"].tolist() == [2, 1, 2, 3, 3, 1, 1, 2, 3]
    assert r["movie_id"].dtype == np.int64
    assert r["rating"].tolist() == [7.0, 9.0, 6.5, 4.0, 5.0, 3.0, 10.0, 0.0, 6.0]
    assert ds.source == {
        "feedback_rows": 11,
        "last_feedback_row_id": 11,
        "last_rated_at": 1008.0,
        "unmatched_ratings": 1,
        "unmatched_movie_ids": 1,
        "superseded_ratings": 1,
        "logged_feature_ratings": 0,  # no prediction log given: computed features only
    }
    assert ds.movies["movie_id"].tolist() == [1, 2, 3]
    # Text user ids are fingerprinted by their characters: the same store gives the same fingerprint.
    assert ds.fingerprint() == load_feedback(store, movies, min_ratings=5).fingerprint()
    store.close()


def test_load_feedback_a_re_rating_counts_by_arrival_not_by_its_timestamp(tmp_path: Path) -> None:
    _, movies = _write(tmp_path)
    # bob's second rating of movie 3 arrives last but says it was given earlier (a client replaying history):
    # the service's online state takes the last-arrived rating, and so does training.
    store = _store(tmp_path, [*FEEDBACK[:10], ("bob", "3", 2.0, 990.0)])
    r = load_feedback(store, movies, min_ratings=5).ratings
    bob3 = r[(r["user_id"] == "bob") & (r["movie_id"] == 3)]
    assert (bob3["rating"].tolist(), bob3["timestamp"].tolist()) == ([2.0], [990])
    assert r["timestamp"].iloc[0] == 990  # still sorted by time
    store.close()


def test_load_feedback_fingerprint_follows_the_ratings(tmp_path: Path) -> None:
    _, movies = _write(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _store(tmp_path / "a", FEEDBACK)
    b = _store(tmp_path / "b", [("zed" if u == "erin" else u, m, r, t) for u, m, r, t in FEEDBACK])
    assert (
        load_feedback(a, movies, min_ratings=5).fingerprint() != load_feedback(b, movies, min_ratings=5).fingerprint()
    )
    a.close()
    b.close()


def test_load_feedback_with_metadata(tmp_path: Path) -> None:
    _, movies = _write(tmp_path)
    meta = tmp_path / "meta.csv"
    meta.write_text("movieId,vote_average,vote_count,popularity,release_year\n3,6.1,40,2.5,1990\n", encoding="utf-8")
    store = _store(tmp_path, FEEDBACK)
    ds = load_feedback(store, movies, meta, min_ratings=5)
    mv = ds.movies.set_index("movie_id")
    assert (mv.loc[3, "vote_average"], mv.loc[3, "release_year"]) == (6.1, 1990.0)
    assert ds.join["joined"] == 1
    store.close()


def test_load_feedback_too_few_ratings(tmp_path: Path) -> None:
    _, movies = _write(tmp_path)
    store = _store(tmp_path, FEEDBACK)
    with pytest.raises(DataError) as exc:
        load_feedback(store, movies, min_ratings=12)
    assert str(exc.value) == "feedback store: 11 ratings stored; training needs at least 12 ratings"
    # Enough rows, but not once the unknown movie and the replaced rating are left out.
    with pytest.raises(DataError) as exc2:
        load_feedback(store, movies, min_ratings=10)
    assert str(exc2.value) == (
        "feedback store: 9 usable ratings (11 stored, 1 of unknown movies, 1 replaced by a later rating of the same "
        "movie); training needs at least 10 ratings"
    )
    store.close()


def test_load_feedback_refuses_a_movies_file_that_does_not_match(tmp_path: Path) -> None:
    _, movies = _write(tmp_path)
    rows = [*FEEDBACK, ("erin", "98", 5.0, 1010.0)]  # 2 of 12 ratings unknown: 83% match, below 90%
    store = _store(tmp_path, rows)
    with pytest.raises(DataError) as exc:
        load_feedback(store, movies, min_ratings=5)
    msg = str(exc.value)
    assert msg.startswith(f"{movies}, column 'movieId': 2 of 12 feedback ratings (16.7%) are of 2 movie ids not in")
    assert "'98', '99'" in msg
    assert "at least 90% of the ratings to match" in msg
    store.close()


def test_load_feedback_from_a_database_without_the_feedback_table(tmp_path: Path) -> None:
    _, movies = _write(tmp_path)
    store = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'empty.sqlite3'}", migrate=False)
    with pytest.raises(StoreError, match="could not read feedback"):
        load_feedback(store, movies)
    store.close()


@pytest.mark.slow
def test_movielens_small_and_its_join() -> None:
    ds = load_movielens_small()
    assert len(ds.ratings) == 100_004
    assert ds.ratings["user_id"].nunique() == 671
    assert ds.ratings["movie_id"].nunique() == 9066  # as MOVIELENS_SMALL's name says
    assert ds.terms == (MOVIELENS_SMALL, IMDB_GGPLOT2MOVIES)
    assert [s.commercial_use for s in ds.terms] == [False, None]
    assert ds.ratings["timestamp"].is_monotonic_increasing
    # The issue expects about 88% of the movies released up to 2005 to find their IMDB entry.
    assert ds.join["coverage_up_to_last_year"] >= 0.86
    matrix = ds.movies[ds.movies["title"] == "Matrix, The"]
    assert matrix["vote_average"].notna().all()


def test_load_feedback_trains_on_the_features_the_backend_sent(tmp_path: Path) -> None:
    from moviematch_ml.features import FEATURE_NAMES
    from moviematch_ml.offline.boosting import TrainConfig
    from moviematch_ml.offline.evaluation import feature_frame
    from moviematch_ml.online.journal import Entry, PredictionLog, read

    _, movies = _write(tmp_path)
    store = _store(tmp_path, FEEDBACK)
    sent = np.array([[3.0, 9.9, 1234.0, 1.0, 7.0, 42.0]])
    log = PredictionLog(max_rows=10)
    store.log_predictions(
        log.rows(
            [
                # alice's rating of movie 2 (at 1002.5) follows this prediction: its features are these.
                Entry("a" * 32, 1002.0, "predict", "champion", "v", "alice", [2], sent, [7.0], "model", None),
                # bob rated movie 3 at 1003, before this prediction: computed features.
                Entry("b" * 32, 1010.0, "predict", "champion", "v", "bob", [3], sent, [7.0], "model", None),
                # a prediction whose features could not be decoded (NaN): computed features.
                Entry(
                    "c" * 32,
                    1000.0,
                    "predict",
                    "champion",
                    "v",
                    "dave",
                    [1],
                    np.full((1, 6), np.nan),
                    [5.0],
                    "model",
                    None,
                ),
            ]
        )
    )
    ds = load_feedback(store, movies, min_ratings=5, logged=read(store))
    plain = load_feedback(store, movies, min_ratings=5)  # no log given: every rating's features computed
    store.close()
    assert (ds.source["logged_feature_ratings"], plain.source["logged_feature_ratings"]) == (1, 0)
    cols = list(FEATURE_NAMES)
    frame, computed = feature_frame(ds, TrainConfig()), feature_frame(plain, TrainConfig())
    alice2 = ((frame["user_id"] == "alice") & (frame["movie_id"] == 2)).to_numpy()
    assert alice2.sum() == 1
    np.testing.assert_array_equal(frame.loc[alice2, cols].to_numpy(), sent)
    assert not np.array_equal(computed.loc[alice2, cols].to_numpy(), sent)
    # Every other rating keeps the features computed from the movie files.
    np.testing.assert_array_equal(
        frame.loc[~alice2, cols].to_numpy(dtype=np.float64), computed.loc[~alice2, cols].to_numpy(dtype=np.float64)
    )
    assert frame["rating"].tolist() == computed["rating"].tolist()


def test_logged_features_out_of_line_with_the_ratings_are_refused(tmp_path: Path) -> None:
    import dataclasses

    from moviematch_ml.features import FEATURE_NAMES
    from moviematch_ml.offline.boosting import TrainConfig
    from moviematch_ml.offline.evaluation import EvaluationError, feature_frame

    _, movies = _write(tmp_path)
    store = _store(tmp_path, FEEDBACK)
    ds = load_feedback(store, movies, min_ratings=5)
    store.close()
    short = pd.DataFrame(np.zeros((3, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))  # 3 rows for 9 ratings
    with pytest.raises(EvaluationError, match="not aligned with the ratings"):
        feature_frame(dataclasses.replace(ds, logged=short), TrainConfig())
