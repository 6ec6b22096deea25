"""The six features of every training rating, computed only from what was known strictly before it."""

from __future__ import annotations

from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from moviematch_ml.features import FEATURE_NAMES, FEATURES
from moviematch_ml.offline.data import Dataset

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

SECONDS_PER_DAY: Final[int] = 86_400


class FeatureConfig(BaseModel):
    """The choices behind the training-time features (documented in docs/features.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    favourite_rule: Literal["liked_count", "genre_mean"] = Field(
        "genre_mean",
        description=(
            "liked_count: the top genres by number of earlier ratings at or above the user's mean; genre_mean: the "
            "genres whose damped mean of the user's earlier ratings reaches favourite_threshold."
        ),
    )
    top_genre_rule: Literal["top_score", "most_liked"] = Field(
        "top_score",
        description=(
            "The single favourite genre (is_favorite_genre). top_score: the best-scored favourite; most_liked: the "
            "genre of most earlier ratings at or above the user's mean at the time."
        ),
    )
    favourite_genres: int = Field(30, ge=1, le=30, description="At most this many top genres are favourites.")
    favourite_threshold: float = Field(
        0.7, gt=0, le=1, description="genre_mean: a favourite's damped mean is at least this fraction of the scale max."
    )
    relative_margin: float | None = Field(
        0.0,
        description=(
            "genre_mean: if set, a favourite must also beat the user's own earlier mean by this fraction of the "
            "scale max (taste relative to the user, on top of the absolute threshold)."
        ),
    )
    genre_damping: float = Field(
        2.0, ge=0, description="genre_mean: pseudo-ratings at the user's own earlier mean in each genre's mean."
    )
    vote_source: Literal["blend", "ratings", "metadata"] = Field(
        "metadata",
        description=(
            "ratings: the movie's earlier ratings only; metadata: the crowd metadata where known, else ratings; "
            "blend: the earlier ratings damped toward the crowd metadata (or the earlier global mean)."
        ),
    )
    damping: float = Field(10.0, ge=0, description="Pseudo-votes of the prior in the damped earlier-ratings mean.")
    popularity_days: int = Field(365, ge=1, description="Window of the movie's recent-ratings count (days).")
    popularity_scale: float = Field(
        10_000.0, gt=0, description="Popularity = share of all ratings in the window that went to the movie x this."
    )


def _group_keys(groups: IntArray, times: IntArray) -> tuple[IntArray, IntArray, int]:
    """Sort order and the combined (group, time) keys that make 'strictly before, same group' a searchsorted."""
    t0 = int(times.min()) if times.size else 0
    span = (int(times.max()) - t0 + 2) if times.size else 2
    rel = times - t0
    order = np.lexsort((rel, groups))
    keys = groups[order] * span + rel[order]
    return order, keys, span


class _Before:
    """Sums over the rows of the same group with a strictly smaller timestamp, for every row, vectorised.

    Sort by (group, time); a row's 'before' rows are then the contiguous run between its group's first row and
    the first row with the same (group, time) key: two searchsorted calls and a difference of cumulative sums.
    Rows with equal timestamps never see each other, which is what makes the features leak-free.
    ``history`` (optional, one bool per row): only these rows count as earlier rows of anyone (values of the other
    rows are multiplied by 0 before the cumulative sums), so their ratings reach no feature at all.
    """

    def __init__(self, groups: IntArray, times: IntArray, history: BoolArray | None = None) -> None:
        self.order, self.keys, span = _group_keys(groups, times)
        t0 = int(times.min()) if times.size else 0
        self.t0 = t0
        self.span = span
        self.groups = groups
        q = groups * span + (times - t0)
        self.end = np.searchsorted(self.keys, q, side="left")
        self.start = np.searchsorted(self.keys, groups * span, side="left")
        self.weight: FloatArray | None = None
        self.cum_weight: FloatArray | None = None
        if history is not None:
            self.weight = history[self.order].astype(np.float64)
            self.cum_weight = np.concatenate([np.zeros(1), np.cumsum(self.weight)])

    def sums(self, values: FloatArray) -> FloatArray:
        """Per row, the sum of ``values`` (n or n x k) over the same group's strictly earlier (history) rows."""
        v = values[self.order]
        if self.weight is not None:
            v = v * self.weight.reshape(-1, *([1] * (v.ndim - 1)))
        zero = np.zeros((1, *v.shape[1:]), dtype=np.float64)
        cs = np.concatenate([zero, np.cumsum(v, axis=0, dtype=np.float64)])
        out: FloatArray = cs[self.end] - cs[self.start]
        return out

    def _count(self, begin: IntArray) -> FloatArray:
        if self.cum_weight is None:
            return (self.end - begin).astype(np.float64)
        out: FloatArray = self.cum_weight[self.end] - self.cum_weight[begin]
        return out

    def counts(self) -> FloatArray:
        return self._count(self.start)

    def counts_within(self, times: IntArray, seconds: int) -> FloatArray:
        """Per row, how many same-group (history) rows fall in [t - seconds, t)."""
        lo = np.maximum(times - seconds - self.t0, 0)
        begin = np.searchsorted(self.keys, self.groups * self.span + lo, side="left")
        return self._count(np.maximum(begin, self.start))


def genre_matrix(genres: pd.Series) -> tuple[list[str], npt.NDArray[np.bool_]]:
    """One-hot genres of each row (vocabulary sorted by name, so tie-breaks are alphabetical)."""
    vocab = sorted({g for gs in genres for g in gs})
    index = {g: i for i, g in enumerate(vocab)}
    out = np.zeros((len(genres), len(vocab)), dtype=bool)
    for row, gs in enumerate(genres):
        for g in gs:
            out[row, index[g]] = True
    return vocab, out


def compute_features(
    dataset: Dataset, config: FeatureConfig | None = None, history: npt.ArrayLike | None = None
) -> pd.DataFrame:
    """The six features of every rating of ``dataset`` (same row order), columns exactly FEATURE_NAMES.

    Every feature of a rating at time t uses only ratings with timestamp < t plus the static movie metadata,
    so no rating ever reaches its own features (nor those of ratings given in the same second).

    ``history`` (optional, one bool per rating): only the marked ratings may serve as earlier ratings, for every
    row (the "frozen" evaluation features: history = the training ratings). The unmarked ratings still get
    features (from the marked ones before them, their own time setting the age and the popularity window) but
    reach none, not even through the first-rating year that stands in for an unknown release year. ``None``
    (the default) means every rating is history, exactly the online definition.
    """
    cfg = config or FeatureConfig()
    r = dataset.ratings
    n = len(r)
    hist: BoolArray | None = None
    if history is not None:
        hist = np.asarray(history, dtype=bool)
        if hist.shape != (n,):
            raise ValueError(f"history has shape {hist.shape}, expected ({n},)")
    times = r["timestamp"].to_numpy(dtype=np.int64)
    y = r["rating"].to_numpy(dtype=np.float64)
    users = pd.factorize(r["user_id"])[0].astype(np.int64)
    movies = dataset.movies.set_index("movie_id")
    mcodes, muniq = pd.factorize(r["movie_id"])
    mcodes = mcodes.astype(np.int64)
    mrows = movies.loc[np.asarray(muniq)]

    # --- favourite genres ------------------------------------------------------------------------------------
    _vocab, movie_genres = genre_matrix(mrows["genres"].reset_index(drop=True))
    g = movie_genres[mcodes]  # n x G genres of each rated movie
    by_user = _Before(users, times, hist)
    n_prev = by_user.counts()
    sum_prev = by_user.sums(y)
    # A rating is "liked" when it is at least the user's mean of their strictly earlier ratings (a first rating
    # always is): fixed once given, so the counts below are plain cumulative sums.
    with np.errstate(invalid="ignore", divide="ignore"):
        liked = (n_prev == 0) | (y >= sum_prev / np.where(n_prev > 0, n_prev, 1.0))
    gf = g.astype(np.float64)
    liked_counts = by_user.sums(gf * liked[:, None])
    if cfg.favourite_rule == "liked_count":
        score = liked_counts
        eligible = score > 0
    else:
        g_n = by_user.sums(gf)
        g_sum = by_user.sums(gf * y[:, None])
        user_mean = np.where(
            n_prev > 0, sum_prev / np.maximum(n_prev, 1.0), (dataset.scale.min + dataset.scale.max) / 2
        )
        a = cfg.genre_damping
        score = (g_sum + a * user_mean[:, None]) / (g_n + a) if a > 0 else g_sum / np.maximum(g_n, 1.0)
        eligible = (g_n > 0) & (score >= cfg.favourite_threshold * dataset.scale.max)
        if cfg.relative_margin is not None:
            eligible &= score >= user_mean[:, None] + cfg.relative_margin * dataset.scale.max
    k = min(cfg.favourite_genres, g.shape[1])
    if k:
        # Stable sort on -score: ties go to the alphabetically first genre, deterministic and documented.
        ranked = np.argsort(np.where(eligible, -score, np.inf), axis=1, kind="stable")[:, :k]
        has = np.take_along_axis(g & eligible, ranked, axis=1)
        n_shared = has.sum(axis=1).astype(np.float64)
        is_fav = has[:, 0].astype(np.float64)
        if cfg.top_genre_rule == "most_liked":
            top = np.argsort(-liked_counts, axis=1, kind="stable")[:, :1]
            is_fav = (
                np.take_along_axis(g, top, axis=1)[:, 0] & (np.take_along_axis(liked_counts, top, axis=1)[:, 0] > 0)
            ).astype(np.float64)
    else:
        n_shared = np.zeros(n)
        is_fav = np.zeros(n)

    # --- crowd average and count -----------------------------------------------------------------------------
    by_movie = _Before(mcodes, times, hist)
    m_n = by_movie.counts()
    m_sum = by_movie.sums(y)
    everyone = _Before(np.zeros(n, dtype=np.int64), times, hist)
    all_n = everyone.counts()
    all_sum = everyone.sums(y)
    midpoint = (dataset.scale.min + dataset.scale.max) / 2.0
    global_prev = np.where(all_n > 0, all_sum / np.maximum(all_n, 1.0), midpoint)
    to10 = dataset.scale.to_api
    meta_avg = mrows["vote_average"].to_numpy(dtype=np.float64)[mcodes]
    meta_cnt = mrows["vote_count"].to_numpy(dtype=np.float64)[mcodes]
    has_meta = ~np.isnan(meta_avg) & ~np.isnan(meta_cnt)
    # blend: the crowd metadata is the prior the movie's own earlier ratings are damped toward.
    prior = np.where(has_meta, meta_avg / to10, global_prev) if cfg.vote_source == "blend" else global_prev
    damped = (
        (m_sum + cfg.damping * prior) / (m_n + cfg.damping)
        if cfg.damping > 0
        else np.where(m_n > 0, m_sum / np.maximum(m_n, 1.0), prior)
    )
    vote_average = damped * to10
    vote_count = m_n.copy()
    if cfg.vote_source == "metadata":
        vote_average = np.where(has_meta, meta_avg, vote_average)
        vote_count = np.where(has_meta, meta_cnt, vote_count)

    # --- years since release at the time of the rating ---------------------------------------------------------
    rating_year = pd.to_datetime(times, unit="s", utc=True).year.to_numpy().astype(np.float64)
    release = mrows["release_year"].to_numpy(dtype=np.float64)[mcodes]
    # Unknown release year: the year of the movie's first rating in the data stands in for it.
    # With a history mask: the movie's first history rating, or this rating's own year if that is earlier
    # (years are non-decreasing in time, so without a mask this is the same first year as before).
    seen = rating_year if hist is None else np.where(hist, rating_year, np.nan)
    first_seen = pd.Series(seen).groupby(mcodes).transform("min").to_numpy(dtype=np.float64)
    first_seen = np.fmin(first_seen, rating_year)
    release = np.where(np.isnan(release), first_seen, release)
    years = rating_year - release

    # --- popularity: the movie's share of the recent ratings ------------------------------------------------
    window = cfg.popularity_days * SECONDS_PER_DAY
    recent_movie = by_movie.counts_within(times, window)
    recent_all = everyone.counts_within(times, window)
    popularity = cfg.popularity_scale * recent_movie / np.maximum(recent_all, 1.0)
    if cfg.vote_source == "metadata":
        meta_pop = mrows["popularity"].to_numpy(dtype=np.float64)[mcodes]
        popularity = np.where(np.isnan(meta_pop), popularity, meta_pop)

    columns = {
        "n_shared_genres": n_shared,
        "vote_average": vote_average,
        "vote_count": vote_count,
        "is_favorite_genre": is_fav,
        "years_since_release": years,
        "popularity": popularity,
    }
    return clip_to_rules(pd.DataFrame({name: columns[name] for name in FEATURE_NAMES}))


def clip_to_rules(frame: pd.DataFrame) -> pd.DataFrame:
    """Clip every column into its feature's valid range and round the counts, so serving validation accepts it."""
    out = frame.copy()
    for f in FEATURES:
        col = np.nan_to_num(out[f.name].to_numpy(dtype=np.float64), nan=f.minimum)
        col = np.clip(col, f.minimum, f.maximum)
        if f.kind in ("count", "flag"):
            col = np.round(col)
        out[f.name] = col
    return out
