"""Training: determinism, the model cards and the train/evaluate commands (tiny and real data)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from moviematch_ml import cli
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.offline.boosting import LightGBMParams, TrainConfig, feature_stats
from moviematch_ml.offline.data import MIN_FEEDBACK_RATINGS, Dataset
from moviematch_ml.offline.stacking import predict_pairs
from moviematch_ml.offline.training import (
    min_training_ratings,
    movie_id_space,
    personalized_config,
    remove_personalized,
    train_models,
    train_six_feature_model,
    write_model,
)
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.runtime.cards import (
    BUNDLED_MODEL_DIR,
    CARD_NAME,
    PERSONALIZED_DIR,
    RatingScale,
    content_version,
    model_version,
    read_card,
)
from moviematch_ml.runtime.inputs import MODEL_FEATURES
from moviematch_ml.runtime.personalized import PersonalizedModel
from moviematch_ml.runtime.predictor import load_six_features
from reference import synthetic_dataset, write_csvs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_config_refuses_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"seed": 1, "learning_rate": 0.1})
    assert TrainConfig(seed=1).digest() != TrainConfig(seed=2).digest()


def test_same_data_and_seed_give_the_same_model_file_byte_for_byte(tmp_path: Path) -> None:
    ds = synthetic_dataset()
    a = train_six_feature_model(ds, TrainConfig(seed=3))
    b = train_six_feature_model(ds, TrainConfig(seed=3))
    assert a.model_text == b.model_text
    assert a.card == b.card
    write_model(tmp_path / "a", a)
    write_model(tmp_path / "b", b)
    for name in ("model.txt", "model_card.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_card_describes_the_model(tmp_path: Path) -> None:
    ds = synthetic_dataset()
    result = train_six_feature_model(ds, TrainConfig(seed=1), created_at="2026-01-01T00:00:00Z")
    card = result.card
    card_file = write_model(tmp_path, result)
    assert card.sha256 == _sha256(tmp_path / "model.txt")
    assert card.features == list(FEATURE_NAMES)
    assert card.rating_scale == ds.scale
    assert card.data["fingerprint_sha256"] == ds.fingerprint()
    # Named by its content (every file it loads, by checksum, and its card), not by the clock.
    assert card.version == content_version(card)
    assert card.version.startswith("six-")
    assert card.format_version == 2
    assert set(card.metrics["models"]) >= {"global_mean", "movie_mean", "bias", "fallback", "six_features"}
    assert set(card.feature_stats) == set(FEATURE_NAMES)
    assert card.training["num_trees"] >= 1
    # The service loads it: the same numbers as the booster, mapped from stars to 0-10.
    predictor = load_six_features(card_file)
    x = pd.DataFrame(
        [
            {
                "n_shared_genres": 2,
                "vote_average": 8.0,
                "vote_count": 500,
                "is_favorite_genre": 1,
                "years_since_release": 5,
                "popularity": 3.0,
            }
        ]
    )[list(FEATURE_NAMES)].to_numpy(dtype=float)
    import lightgbm as lgb

    raw = np.asarray(lgb.Booster(model_str=result.model_text).predict(x), dtype=np.float64)
    assert predictor.predict(x) == pytest.approx(np.clip(raw * 2.0, 0, 10))
    # The synthetic truth rewards vote_average: the model must have learnt that direction.
    lo, hi = x.copy(), x.copy()
    lo[0, 1], hi[0, 1] = 3.0, 9.0
    assert predictor.predict(hi)[0] > predictor.predict(lo)[0]


def test_feature_stats_by_hand() -> None:
    frame = pd.DataFrame({name: np.arange(101, dtype=float) for name in FEATURE_NAMES})
    stats = feature_stats(frame)["vote_average"]
    assert (stats.min, stats.max, stats.mean) == (0.0, 100.0, 50.0)
    assert stats.quantiles == {"p01": 1.0, "p05": 5.0, "p25": 25.0, "p50": 50.0, "p75": 75.0, "p95": 95.0, "p99": 99.0}
    # The drift bins' training shares: of the 101 values 0..100, [0,1) holds 0, [1,5) holds 1-4, ..., [100,100] 100.
    counts = {"[0,1)": 1, "[1,5)": 4, "[5,25)": 20, "[25,50)": 25, "[50,75)": 25, "[75,95)": 20, "[95,99)": 4}
    counts |= {"[99,100)": 1, "[100,100]": 1, "below": 0, "above": 0}
    assert stats.bin_shares == {k: round(v / 101, 6) for k, v in counts.items()}


def test_cli_train_and_evaluate_on_csv_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r, m = write_csvs(tmp_path, synthetic_dataset())
    out = tmp_path / "out"
    assert cli.main(["train", "--ratings", str(r), "--movies", str(m), "--out", str(out), "--seed", "5"]) == 0
    assert {"model.txt", "model_card.json", "report.md", "feature_importance.png"} <= {p.name for p in out.iterdir()}
    assert load_six_features(out).version.startswith("six-")
    # Both models by default; the report has a section for the personalised one; the run is timed.
    assert PersonalizedModel.load(out / PERSONALIZED_DIR).version.startswith("personalized-")
    assert "## Personalised model: personalized-" in (out / "report.md").read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    assert "trained in " in printed
    assert "personalized " in printed.rsplit("trained in ", 1)[1]
    # --no-personalized trains the six-feature model only and removes the personalised model left in --out,
    # which was trained for the previous six-feature model.
    argv = ["train", "--ratings", str(r), "--movies", str(m), "--out", str(out), "--seed", "6", "--no-personalized"]
    assert cli.main(argv) == 0
    assert not (out / PERSONALIZED_DIR).exists()
    assert "## Personalised model" not in (out / "report.md").read_text(encoding="utf-8")
    assert "removed the earlier personalised model" in capsys.readouterr().err
    argv = ["evaluate", "--ratings", str(r), "--movies", str(m), "--protocol", "kfold", "--folds", "3", "--json"]
    assert cli.main(argv) == 0
    payload = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert payload["protocol"] == "kfold"
    assert payload["rating_scale"]["max"] == 5.0
    assert payload["n_test"] == 1000
    for name in ("global_mean", "movie_mean", "bias", "fallback", "six_features"):
        assert set(payload["models"][name]) >= {"rmse", "mae", "ndcg@10"}
    assert payload["models"]["global_mean"]["rmse_cold_users"] is None  # JSON has no NaN


def test_cli_bad_data_exits_1_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r, m = write_csvs(tmp_path, synthetic_dataset(50))
    lines = r.read_text(encoding="utf-8").splitlines()
    lines[5] = "1,2,four,3"
    r.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli.main(["evaluate", "--ratings", str(r), "--movies", str(m), "--json"]) == 1
    err = capsys.readouterr().err
    assert f"{r}, line 6, column 'rating'" in err
    assert cli.main(["evaluate", "--ratings", str(r)]) == 1
    assert "--ratings and --movies go together" in capsys.readouterr().err


# --- the personalised model -----------------------------------------------------------------------------------------


def test_train_models_writes_both_models_and_they_load(tmp_path: Path) -> None:
    ds = synthetic_dataset(1500)
    cfg, pcfg = TrainConfig(seed=2), personalized_config(2)
    result = train_models(ds, cfg, pcfg, created_at="2026-01-01T00:00:00Z")
    assert result.personalized is not None
    write_model(tmp_path, result)
    six = load_six_features(tmp_path)
    assert six.card.kind == "six_features"
    pm = PersonalizedModel.load(tmp_path / PERSONALIZED_DIR)
    card = pm.card
    assert card is not None
    assert card.kind == "personalized"
    assert card.features == list(MODEL_FEATURES)
    assert card.version == content_version(card)
    assert card.version.startswith("personalized-")
    assert card.created_at == six.card.created_at == "2026-01-01T00:00:00Z"
    assert card.data == six.card.data
    assert card.data["fingerprint_sha256"] == ds.fingerprint()
    # Every file of the personalised model is checksummed in its card.
    folder = tmp_path / PERSONALIZED_DIR
    assert {card.model_file, *card.extra_files} == {p.name for p in folder.iterdir()} - {CARD_NAME}
    for name, sha in card.extra_files.items():
        assert _sha256(folder / name) == sha
    assert card.training["config"]["seed"] == 2
    assert card.training["config"]["mf"]["seed"] == 2
    # Hold-out figures against the six-feature and bias models, from the same temporal split as the six's card.
    m = card.metrics
    assert set(m["models"]) == {"personalized", "six_features", "bias"}
    for name in m["models"]:
        assert m["models"][name]["rmse"] == result.card.metrics["models"][name]["rmse"]
    cold = int(result.holdout.cold.sum())
    assert m["n_test"] == 300
    assert m["personalized_test_ratings"] == m["n_test"] - cold  # it answers every warm user (min 1 rating)
    assert set(m["personalized_rows"]) == {"personalized", "six_features", "bias"}
    # The loaded model predicts what the trained one does.
    users, movies = ds.ratings["user_id"].to_numpy()[:20], ds.ratings["movie_id"].to_numpy()[:20]
    t = np.full(20, float(ds.ratings["timestamp"].max()) + 1.0)
    x6 = np.tile([2.0, 7.0, 100.0, 1.0, 10.0, 5.0], (20, 1))
    want, mask = predict_pairs(result.personalized.model, users, movies, t, x6)
    got, mask2 = predict_pairs(pm, users, movies, t, x6)
    assert mask.all()
    assert mask2.all()
    # Loaded, the trees run in runtime.trees.TreeEnsemble; trained, in LightGBM: equal to float rounding of the sum.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_personalized_files_are_the_same_byte_for_byte_for_the_same_data_and_seed(tmp_path: Path) -> None:
    ds = synthetic_dataset(1200)
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        write_model(tmp_path / name, train_models(ds, TrainConfig(seed=seed), personalized_config(seed)))
    a, b, c = (tmp_path / n / PERSONALIZED_DIR for n in "abc")
    names = sorted(p.name for p in a.iterdir())
    assert names == ["cf.json", "cf.npz", "model_card.json", "personalized.txt", "state.npz"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # Another seed is another model, with another version; the data are the same (their fingerprint too).
    assert (a / "personalized.txt").read_bytes() != (c / "personalized.txt").read_bytes()
    ca, cc = read_card(a), read_card(c)
    assert ca.version != cc.version
    assert ca.data["fingerprint_sha256"] == cc.data["fingerprint_sha256"]


def test_remove_personalized_only_removes_a_personalised_model(tmp_path: Path) -> None:
    assert remove_personalized(tmp_path) is False
    folder = tmp_path / PERSONALIZED_DIR
    folder.mkdir()
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    assert remove_personalized(tmp_path) is False  # no card: not a model, left alone
    for name in ("model_card.json", "personalized.txt", "state.npz", "cf.npz", "cf.json"):
        (folder / name).write_bytes(b"x")
    assert remove_personalized(tmp_path) is True
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_min_training_ratings_by_hand() -> None:
    # One split needs 2 leaves of min_data_in_leaf ratings among the 80% x 90% the hold-out's trees are fitted on.
    assert min_training_ratings(TrainConfig()) == MIN_FEEDBACK_RATINGS == 556  # 400 / 0.72 = 555.6
    small = TrainConfig(lightgbm=LightGBMParams(min_data_in_leaf=9), validation_fraction=0.2)
    assert min_training_ratings(small) == 29  # 18 / 0.64 = 28.1


# --- training from the service's own feedback ------------------------------------------------------------------------


def _feedback_store(tmp_path: Path, ds: Dataset, extra: list[Feedback] | None = None) -> str:
    """A SQLite store holding ``ds``'s ratings as the app would send them (0-10 scale, text ids), in time order."""
    url = f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
    store = FeedbackStore.from_url(url)
    rows = [
        Feedback(f"f{i}", f"user-{u}", str(m), 2.0 * r, float(t), None)
        for i, (u, m, r, t) in enumerate(ds.ratings.itertuples(index=False))
    ]
    store.add(rows + (extra or []))
    store.close()
    return url


def test_cli_train_from_feedback_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = synthetic_dataset(800)
    _, movies = write_csvs(tmp_path, ds)
    stray = [Feedback(f"x{i}", "user-1", "9999", 5.0, 2_000_000_000.0 + i, None) for i in range(5)]
    url = _feedback_store(tmp_path, ds, stray)
    out = tmp_path / "v2"
    argv = ["train", "--from-feedback", "--database-url", url, "--movies", str(movies), "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    # The synthetic users rated some movies twice: the store keeps both, training the later one only.
    n_twice = int(ds.ratings.duplicated(["user_id", "movie_id"]).sum())
    assert n_twice > 0
    n = 800 - n_twice
    assert f"read 805 feedback ratings (up to row 805); training on {n} (5 of movies not in" in captured.err
    six = load_six_features(out)
    card = six.card
    assert card.rating_scale == RatingScale(min=0.0, max=10.0)
    d = card.data
    assert (d["dataset"], d["n_ratings"], d["n_users"]) == ("feedback", n, ds.ratings["user_id"].nunique())
    assert d["last_feedback_row_id"] == 805
    assert d["last_rated_at"] == float(ds.ratings["timestamp"].max())
    assert (d["unmatched_ratings"], d["unmatched_movie_ids"], d["superseded_ratings"]) == (5, 1, n_twice)
    pm = PersonalizedModel.load(out / PERSONALIZED_DIR)
    assert pm.card is not None
    assert pm.card.data == d
    # Its movie state is keyed by the app's own movie ids: served as such under MOVIE_ID_SPACE=app (the default).
    assert (pm.card.movie_id_space, pm.card.id_space()) == ("app", "app")
    # The app's own data: the cards say so, with no terms the tool could know, and no commercial restriction.
    [terms] = card.data_terms
    assert terms.name == f"the app's own users' ratings (POST /feedback), with the movies of {movies.name}"
    assert (terms.obtained, terms.commercial_use) == ("the service's feedback store (--from-feedback)", None)
    assert pm.card.data_terms == card.data_terms
    assert pm.scale.max == 10.0
    # The app's ids: users as the text it sent, movies as the movies.csv integers the service matches.
    assert all(isinstance(u, str) and u.startswith("user-") for u in pm.mf.user_ids)
    assert pm.mf.item_ids == sorted(ds.ratings["movie_id"].unique().tolist())
    # Predictions come back on the 0-10 scale the ratings were stored in.
    x = np.array([[2, 8.0, 5000, 1, 3, 40.0]])
    assert 0.0 <= six.predict(x)[0] <= 10.0
    pred, mask = predict_pairs(pm, ["user-3"], [int(ds.ratings["movie_id"].iloc[0])], [2e9], x)
    assert mask.all()
    assert 0.0 <= pred[0] <= 10.0
    # evaluate reads the same data.
    capsys.readouterr()
    argv = ["evaluate", "--from-feedback", "--database-url", url, "--movies", str(movies), "--json"]
    assert cli.main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert (payload["dataset"], payload["n_ratings"], payload["rating_scale"]["max"]) == ("feedback", n, 10.0)
    assert "personalized" in payload["models"]


def test_cli_train_from_feedback_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = synthetic_dataset(300)
    _, movies = write_csvs(tmp_path, ds)
    base = ["train", "--from-feedback", "--movies", str(movies), "--out", str(tmp_path / "out")]
    url = _feedback_store(tmp_path, ds)
    assert cli.main([*base, "--database-url", url]) == 1
    assert capsys.readouterr().err.strip() == (
        "moviematch-ml train: feedback store: 300 ratings stored; training needs at least 556 ratings"
    )
    (tmp_path / "many").mkdir()
    big = synthetic_dataset(700)
    wrong = [Feedback(f"w{i}", "user-2", f"m{i}", 6.0, 2e9 + i, None) for i in range(100)]
    url2 = _feedback_store(tmp_path / "many", big, wrong)  # 100 of 800 (12.5%) not in movies.csv
    assert cli.main([*base, "--database-url", url2]) == 1
    err = capsys.readouterr().err
    assert "100 of 800 feedback ratings (12.5%) are of 100 movie ids not in this file" in err
    assert not (tmp_path / "out").exists()
    missing = f"sqlite:///{tmp_path / 'nope.sqlite3'}"
    assert cli.main([*base, "--database-url", missing]) == 1
    assert f"no SQLite database at {tmp_path / 'nope.sqlite3'}" in capsys.readouterr().err
    assert not (tmp_path / "nope.sqlite3").exists()
    assert cli.main(["train", "--from-feedback", "--database-url", url]) == 1
    assert "--from-feedback needs --movies" in capsys.readouterr().err
    assert cli.main([*base, "--database-url", url, "--dataset", "movielens-small"]) == 1
    assert "--dataset: does not go with --from-feedback" in capsys.readouterr().err


# --- real data ------------------------------------------------------------------------------------------------------

# The targets for this six-feature model (RMSE on the 0.5-5 scale, NDCG@10 on 5-fold).
TARGETS = {"kfold": 0.945, "temporal": 1.024}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["temporal", "kfold"])
def test_real_data_six_features_beat_the_baselines(protocol: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "--dataset", "movielens-small", "--protocol", protocol, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    models = out["models"]
    six = models["six_features"]["rmse"]
    assert out["n_train"] + out["n_test"] == 100_004
    for baseline in ("global_mean", "movie_mean", "fallback"):
        assert six < models[baseline]["rmse"], baseline
    assert six <= TARGETS[protocol]
    if protocol == "kfold":
        assert models["six_features"]["ndcg@10"] >= 0.905


def test_bundled_model_loads_and_is_small() -> None:
    predictor = load_six_features(BUNDLED_MODEL_DIR)
    card = predictor.card
    assert card.data["dataset"] == "movielens-small"
    assert card.rating_scale.max == 5.0
    assert (BUNDLED_MODEL_DIR / card.model_file).stat().st_size < 1_000_000
    # Its own hold-out numbers meet the temporal target and beat the movie mean.
    models = card.metrics["models"]
    assert models["six_features"]["rmse"] <= TARGETS["temporal"]
    assert models["six_features"]["rmse"] < models["movie_mean"]["rmse"]
    x = np.array([[2, 8.0, 5000, 1, 3, 40.0], [0, 4.0, 20, 0, 40, 0.0]])
    y = predictor.predict(x)
    assert 0.0 <= y[1] < y[0] <= 10.0


def test_bundled_personalized_model_loads_and_is_small() -> None:
    folder = BUNDLED_MODEL_DIR / PERSONALIZED_DIR
    pm = PersonalizedModel.load(folder)
    card, six = pm.card, load_six_features(BUNDLED_MODEL_DIR).card
    assert card is not None
    assert card.kind == "personalized"
    # Trained from the same data as the six-feature model next to it, in the same run.
    assert card.data == six.data
    assert card.created_at == six.created_at
    assert card.version == content_version(card)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5_000_000
    # On its own hold-out it beats the six-feature model and the bias model it is measured against.
    models = card.metrics["models"]
    assert models["personalized"]["rmse"] < models["six_features"]["rmse"] < models["bias"]["rmse"]
    rows = card.metrics["personalized_rows"]
    assert rows["personalized"]["rmse"] < rows["bias"]["rmse"]


@pytest.mark.slow
def test_bundled_model_was_trained_on_the_built_in_data() -> None:
    from moviematch_ml.offline.data import load_movielens_small

    card = load_six_features(BUNDLED_MODEL_DIR).card
    ds = load_movielens_small()
    assert card.data["fingerprint_sha256"] == ds.fingerprint()
    assert card.training["config_sha256"] == TrainConfig().digest()
    personalized = read_card(BUNDLED_MODEL_DIR / PERSONALIZED_DIR)
    assert personalized.training["config"] == personalized_config().model_dump(mode="json")
    # Training on the built-in data states the terms the bundled cards state.
    assert list(ds.terms) == card.data_terms == personalized.data_terms


def test_two_different_models_never_share_a_version(tmp_path: Path) -> None:
    # The same ratings with other movie metadata (another --movies / --movie-metadata): the data's fingerprint,
    # which covers the ratings only, is the same; the models are not, nor are their versions.
    ds = synthetic_dataset(1500)
    other = replace(ds, movies=ds.movies.assign(vote_average=ds.movies["vote_average"].to_numpy()[::-1].copy()))
    assert ds.fingerprint() == other.fingerprint()
    cfg = TrainConfig(seed=3)
    a, b = (train_six_feature_model(d, cfg, created_at="2026-01-01T00:00:00Z") for d in (ds, other))
    assert a.model_text != b.model_text
    assert a.card.version != b.card.version
    # Same data, same config: the same bytes, the same version, whenever it is trained (the date is not part of it).
    again = train_six_feature_model(ds, cfg, created_at="2027-06-01T00:00:00Z")
    assert (again.model_text, again.card.version) == (a.model_text, a.card.version)
    # The model directory's version (what answers and the answer cache's keys carry) names both parts.
    assert model_version(a.card.version, None) != model_version(b.card.version, None)
    assert model_version(a.card.version, None) != model_version(a.card.version, "personalized-0")


def test_movie_id_space_of_the_training_data() -> None:
    assert movie_id_space("feedback") == "app"
    assert movie_id_space("movielens-small") == "movielens"
    assert movie_id_space("ratings") is None  # a CSV file: whose ids they are is not known
