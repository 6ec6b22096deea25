"""Training-time features: hand-computed tiny cases, the serving rules, and no leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moviematch_ml.features import FEATURE_NAMES, FEATURES
from moviematch_ml.offline.data import Dataset
from moviematch_ml.offline.point_in_time import FeatureConfig, compute_features
from moviematch_ml.runtime.cards import RatingScale

T0 = 978_307_200  # 2001-01-01 00:00:00 UTC
STARS = RatingScale(min=1.0, max=5.0, step=1.0)


def _movies(meta: dict[int, tuple[float, float]] | None = None) -> pd.DataFrame:
    meta = meta or {}
    rows = [
        (1, "A", 2000.0, ("Drama",)),
        (2, "B", 2001.0, ("Comedy", "Drama")),
        (3, "C", np.nan, ("Comedy",)),
    ]
    return pd.DataFrame(
        {
            "movie_id": [r[0] for r in rows],
            "title": [r[1] for r in rows],
            "year": [r[2] for r in rows],
            "genres": [r[3] for r in rows],
            "vote_average": [meta.get(r[0], (np.nan, np.nan))[0] for r in rows],
            "vote_count": [meta.get(r[0], (np.nan, np.nan))[1] for r in rows],
            "popularity": [np.nan] * 3,
            "release_year": [r[2] for r in rows],
        }
    )


def _tiny(meta: dict[int, tuple[float, float]] | None = None) -> Dataset:
    ratings = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 1, 2],
            "movie_id": [1, 2, 1, 3, 2],
            "rating": [5.0, 2.0, 3.0, 4.0, 4.0],
            "timestamp": [T0, T0 + 10, T0 + 10, T0 + 100, T0 + 100],
        }
    )
    return Dataset("tiny", ratings, _movies(meta), STARS)


SIMPLE = FeatureConfig(
    vote_source="ratings",
    damping=1.0,
    favourite_rule="genre_mean",
    favourite_threshold=0.7,  # 3.5 stars
    genre_damping=0.0,
    popularity_days=1,
    popularity_scale=1.0,
)


def test_columns_are_the_serving_features_in_order() -> None:
    feats = compute_features(_tiny(), SIMPLE)
    assert tuple(feats.columns) == FEATURE_NAMES
    assert len(feats) == 5


def test_hand_computed_features() -> None:
    f = compute_features(_tiny(), SIMPLE)
    # Row 0: nothing earlier. Prior = scale midpoint 3 -> 6.0 on 0-10; release 2000, rated in 2001.
    # Row 1: user 1 rated Drama 5 before -> Drama is a favourite (5 >= 3.5); movie 2 is Comedy+Drama -> 1 shared,
    #        and Drama is the top genre -> is_favorite_genre 1. Earlier global mean 5 -> 10.0.
    # Row 2: same second as row 1, so row 1 is not "before" it; movie 1 has row 0 (5): (5 + 1*5) / 2 = 5 -> 10.0;
    #        one rating of movie 1 in the last day out of one rating overall -> popularity 1.
    # Row 3: user 1's Drama mean is (5 + 2) / 2 = 3.5 (favourite), Comedy 2 (not); movie 3 is Comedy only.
    #        Global earlier mean (5+2+3)/3; movie 3 has no year -> its first rating's year (2001) -> 0 years.
    # Row 4: user 2 rated Drama 3 < 3.5 -> no favourites. Movie 2 had one rating (2): (2 + 10/3) / 2 = 8/3 -> 16/3.
    #        Popularity: 1 of the 3 ratings in the last day was of movie 2.
    expected = pd.DataFrame(
        {
            "n_shared_genres": [0, 1, 0, 0, 0],
            "vote_average": [6.0, 10.0, 10.0, 20 / 3, 16 / 3],
            "vote_count": [0, 0, 1, 0, 1],
            "is_favorite_genre": [0, 1, 0, 0, 0],
            "years_since_release": [1, 0, 1, 0, 0],
            "popularity": [0.0, 0.0, 1.0, 0.0, 1 / 3],
        },
        dtype="float64",
    )
    pd.testing.assert_frame_equal(f, expected, check_exact=False, atol=1e-9)


def test_metadata_replaces_the_ratings_average_where_known() -> None:
    ds = _tiny({1: (8.1, 1000.0)})
    meta = compute_features(ds, SIMPLE.model_copy(update={"vote_source": "metadata"}))
    assert meta["vote_average"].tolist()[0] == 8.1
    assert meta["vote_count"].tolist()[0] == 1000
    assert meta["vote_average"].tolist()[2] == 8.1
    # Movies without metadata keep the damped earlier-ratings average.
    assert meta["vote_average"].tolist()[4] == pytest.approx(16 / 3)


def test_blend_damps_toward_the_metadata_average() -> None:
    ds = _tiny({1: (8.0, 1000.0)})
    f = compute_features(ds, SIMPLE.model_copy(update={"vote_source": "blend"}))
    # Row 2: movie 1's one earlier rating (5 stars) damped by one pseudo-rating at 8.0/2 = 4 stars: 4.5 -> 9.0.
    assert f["vote_average"].tolist()[2] == pytest.approx(9.0)
    assert f["vote_average"].tolist()[0] == pytest.approx(8.0)


def test_liked_count_rule_keeps_the_top_genres() -> None:
    cfg = SIMPLE.model_copy(update={"favourite_rule": "liked_count", "favourite_genres": 1})
    f = compute_features(_tiny(), cfg)
    # Row 3: user 1's liked ratings before it: row 0 (first rating, liked) Drama; row 1 (2 < 5) not liked.
    # Top-1 favourite Drama; movie 3 is Comedy -> 0 shared. Row 1: Drama liked once -> movie 2 shares it.
    # Row 4: user 2's only earlier rating (3 stars, Drama) is their first, so it counts as liked -> movie 2 shares
    # Drama; the genre_mean rule (3 < 3.5) says no there, which is the difference between the two rules.
    assert f["n_shared_genres"].tolist() == [0, 1, 0, 0, 1]
    assert f["is_favorite_genre"].tolist() == [0, 1, 0, 0, 1]


def _random_dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    movies = pd.DataFrame(
        {
            "movie_id": np.arange(40),
            "title": [f"m{i}" for i in range(40)],
            "year": rng.integers(1950, 2010, 40).astype(float),
            "genres": [tuple(rng.choice(genres, rng.integers(0, 4), replace=False)) for _ in range(40)],
            "vote_average": np.where(rng.random(40) < 0.5, rng.uniform(2, 9, 40), np.nan),
            "vote_count": rng.integers(0, 5000, 40).astype(float),
            "popularity": np.nan,
            "release_year": np.nan,
        }
    )
    movies["release_year"] = movies["year"]
    ratings = pd.DataFrame(
        {
            "user_id": rng.integers(0, 30, n),
            "movie_id": rng.integers(0, 40, n),
            "rating": rng.integers(1, 11, n) / 2.0,
            # Coarse timestamps so that many ratings share a second (ties must not leak either).
            "timestamp": T0 + rng.integers(0, 400, n) * 86_400 // 7,
        }
    ).sort_values("timestamp", kind="stable", ignore_index=True)
    return Dataset("random", ratings, movies, RatingScale(min=0.5, max=5.0, step=0.5))


@pytest.mark.parametrize("vote_source", ["blend", "ratings", "metadata"])
def test_no_rating_reaches_its_own_features(vote_source: str) -> None:
    ds = _random_dataset(1500, seed=3)
    cfg = FeatureConfig.model_validate({"vote_source": vote_source})
    before = compute_features(ds, cfg)
    times = ds.ratings["timestamp"].to_numpy()
    changed_later = 0
    for i in (0, 400, 777, 1200):
        ratings = ds.ratings.copy()
        old = float(ratings["rating"].iloc[i])
        # Move the rating far away (1 <-> 4.5 and so on) so every statistic it feeds must change.
        ratings.loc[i, "rating"] = 5.5 - old if old != 2.75 else 0.5
        after = compute_features(Dataset(ds.name, ratings, ds.movies, ds.scale), cfg)
        diff = (after != before).any(axis=1).to_numpy()
        # Its own row and every row at or before its second are untouched; only later rows may change.
        assert not diff[i]
        assert not diff[times <= times[i]].any()
        changed_later += int(diff[times > times[i]].sum())
    assert changed_later > 0  # the change does reach later ratings, so the check above can fail


def test_every_value_passes_the_serving_rules() -> None:
    ds = _random_dataset(800, seed=5)
    feats = compute_features(ds)
    for f in FEATURES:
        for v in feats[f.name].tolist():
            value: float | int = int(v) if f.kind != "number" else v
            assert f.parse(value, f.name) == v


def test_hundred_thousand_rows_shape() -> None:
    # Not a timing test (benchmarks do that): a large input goes through the vectorised path in one piece.
    ds = _random_dataset(100_000, seed=9)
    assert compute_features(ds).shape == (100_000, 6)


# --- frozen features: a history mask says which ratings may serve as earlier ratings ----------------------------


def test_all_history_is_exactly_the_online_features() -> None:
    ds = _random_dataset(1500, seed=4)
    pd.testing.assert_frame_equal(compute_features(ds), compute_features(ds, history=np.ones(1500, dtype=bool)))


def test_hand_computed_frozen_features_differ_from_online_exactly_where_expected() -> None:
    # Row 0 (user 1 rates movie 1 Drama 5 stars) is not history: it must reach no feature, even of later rows.
    history = np.array([False, True, True, True, True])
    online = compute_features(_tiny(), SIMPLE)
    frozen = compute_features(_tiny(), SIMPLE, history=history)
    # Row 0: nothing earlier either way (midpoint 3 -> 6.0); years from its own time as before.
    # Row 1: user 1 has no history -> no favourites (online: Drama from row 0 -> 1 shared, is_favorite 1);
    #        no earlier history rating at all -> prior = midpoint 3 -> 6.0 (online: global mean 5 -> 10.0).
    # Row 2: movie 1's only earlier rating is row 0 -> count 0, (0 + 1*3) / 1 = 3 -> 6.0, popularity 0 / max(0, 1).
    # Row 3: user 1's history is row 1 only (Comedy+Drama, 2 stars < 3.5) -> no favourites; global history mean
    #        before it (2 + 3) / 2 = 2.5 -> 5.0 (online 20/3).
    # Row 4: movie 2 had row 1 (2 stars): (2 + 1*2.5) / 2 = 2.25 -> 4.5, count 1; popularity: 1 of the 2 history
    #        ratings in the last day (online: 1 of 3, since row 0 counted).
    expected = pd.DataFrame(
        {
            "n_shared_genres": [0, 0, 0, 0, 0],
            "vote_average": [6.0, 6.0, 6.0, 5.0, 4.5],
            "vote_count": [0, 0, 0, 0, 1],
            "is_favorite_genre": [0, 0, 0, 0, 0],
            "years_since_release": [1, 0, 1, 0, 0],
            "popularity": [0.0, 0.0, 0.0, 0.0, 0.5],
        },
        dtype="float64",
    )
    pd.testing.assert_frame_equal(frozen, expected, check_exact=False, atol=1e-9)
    assert online["n_shared_genres"].tolist() == [0, 1, 0, 0, 0]
    assert online["vote_average"].tolist() == pytest.approx([6.0, 10.0, 10.0, 20 / 3, 16 / 3])
    assert online["popularity"].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0, 1 / 3])


def test_first_rating_year_comes_from_history_ratings_only() -> None:
    # Movie 3 has no release year. Its first rating (2001) is not history; its second (2002) and third (2003) are.
    ratings = pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "movie_id": [3, 3, 3],
            "rating": [4.0, 4.0, 4.0],
            "timestamp": [T0, T0 + 366 * 86_400, T0 + 2 * 366 * 86_400],
        }
    )
    ds = Dataset("tiny", ratings, _movies(), STARS)
    assert compute_features(ds, SIMPLE)["years_since_release"].tolist() == [0, 1, 2]
    # Frozen: the first history rating is in 2002; the non-history row itself falls back on its own year.
    frozen = compute_features(ds, SIMPLE, history=[False, True, True])
    assert frozen["years_since_release"].tolist() == [0, 0, 1]


@pytest.mark.parametrize("vote_source", ["blend", "ratings", "metadata"])
def test_ratings_outside_the_history_reach_no_feature(vote_source: str) -> None:
    ds = _random_dataset(1500, seed=6)
    cfg = FeatureConfig.model_validate({"vote_source": vote_source})
    history = np.random.default_rng(1).random(1500) < 0.8
    before = compute_features(ds, cfg, history=history)
    ratings = ds.ratings.copy()
    # Every non-history rating moves far away (1 <-> 4.5 ...): no feature row may change at all.
    ratings.loc[~history, "rating"] = 5.5 - ratings.loc[~history, "rating"]
    changed = Dataset(ds.name, ratings, ds.movies, ds.scale)
    pd.testing.assert_frame_equal(compute_features(changed, cfg, history=history), before, check_exact=True)
    # The same change does reach the online features (so the check above can fail).
    assert (compute_features(changed, cfg) != compute_features(ds, cfg)).any(axis=None)


def test_history_must_have_one_flag_per_rating() -> None:
    with pytest.raises(ValueError, match="history has shape"):
        compute_features(_tiny(), SIMPLE, history=[True, False])
