"""Loading training data: CSV layout and errors, rating scales, title normalisation and the metadata join."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moviematch_ml.data import (
    Dataset,
    detect_scale,
    join_metadata,
    load_csv,
    load_movielens_small,
    normalize_title,
    parse_scale,
    title_keys,
)
from moviematch_ml.errors import DataError

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


@pytest.mark.slow
def test_movielens_small_and_its_join() -> None:
    ds = load_movielens_small()
    assert len(ds.ratings) == 100_004
    assert ds.ratings["user_id"].nunique() == 671
    assert ds.ratings["timestamp"].is_monotonic_increasing
    # The issue expects about 88% of the movies released up to 2005 to find their IMDB entry.
    assert ds.join["coverage_up_to_last_year"] >= 0.86
    matrix = ds.movies[ds.movies["title"] == "Matrix, The"]
    assert matrix["vote_average"].notna().all()
