"""Shared fixtures: a tiny, deterministic LightGBM model with a valid model card, for any test that needs one."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.runtime.cards import ModelCard, RatingScale, content_versioned, model_version, read_card, write_card
from moviematch_ml.runtime.personalized import PersonalizedModel

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/api/golden_api.json from the current answers"
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """Whether the golden test rewrites its recording (``--update-golden``) before comparing."""
    return bool(request.config.getoption("--update-golden"))


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema on the machine's PostgreSQL, as a DATABASE_URL whose search path is that schema; dropped
    afterwards, so tests never see each other's rows."""
    from sqlalchemy import create_engine, text

    schema = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The feedback store's database, once as a SQLite file and once as a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.sqlite3'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    """A feedback store on a SQLite file of the test's own, closed afterwards."""
    s = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    yield s
    s.close()


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A fresh schema on the machine's PostgreSQL (dropped afterwards), as a DATABASE_URL."""
    with postgres_schema() as url:
        yield url


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own empty directory: the default SQLite store (a relative path) lands there."""
    monkeypatch.chdir(tmp_path)


def tiny_training_data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic rows in FEATURES order, and star ratings (0.5-5) that rise with vote_average and shared genres."""
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.integers(0, 6, n),  # n_shared_genres
            rng.uniform(0, 10, n),  # vote_average
            rng.integers(0, 5000, n),  # vote_count
            rng.integers(0, 2, n),  # is_favorite_genre
            rng.uniform(0, 60, n),  # years_since_release
            rng.uniform(0, 500, n),  # popularity
        ]
    ).astype(np.float64)
    y = np.clip(0.4 * x[:, 1] + 0.2 * x[:, 0] + 0.3 * x[:, 3] + rng.normal(0, 0.2, n), 0.5, 5.0)
    return x, y


def write_tiny_model(directory: Path, *, rounds: int = 20, shift: float = 0.0, name: str = "tiny") -> Path:
    """A LightGBM model of the tiny training data, with its content-versioned card, written into ``directory``:
    ``rounds`` boosting rounds, the target moved by ``shift`` stars (another model, other answers)."""
    import lightgbm as lgb

    directory.mkdir(parents=True, exist_ok=True)
    x, y = tiny_training_data()
    params = {
        "objective": "regression",
        "num_leaves": 7,
        "learning_rate": 0.2,
        "min_data_in_leaf": 10,
        "seed": 0,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "verbose": -1,
    }
    target = np.clip(y + shift, 0.5, 5.0)
    booster = lgb.train(params, lgb.Dataset(x, target, feature_name=list(FEATURE_NAMES)), num_boost_round=rounds)
    (directory / "model.txt").write_text(booster.model_to_string(), encoding="utf-8")
    card = ModelCard(
        name=name,
        version="",
        created_at="2026-01-01T00:00:00+00:00",
        model_file="model.txt",
        model_format="lightgbm-text",
        sha256=hashlib.sha256((directory / "model.txt").read_bytes()).hexdigest(),
        features=list(FEATURE_NAMES),
        rating_scale=RatingScale(min=0.5, max=5.0, step=0.5),
        metrics={"note": "synthetic test model"},
    )
    write_card(directory, content_versioned(card))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory (LightGBM text + model_card.json with the right sha256) on a 0.5-5 star scale.

    Session-scoped: treat it as read-only (copy it before corrupting anything).
    """
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model (fewer trees, its answers a star lower): a challenger (read-only, session-wide)."""
    return write_tiny_model(tmp_path_factory.mktemp("other_model"), rounds=8, shift=-1.0, name="tiny-other")


def tiny_ratings(n_users: int = 60, n_movies: int = 30, seed: int = 1) -> dict[str, np.ndarray]:
    """Synthetic ratings (0.5-5) where the user matters: half the users rate 1.5 stars above the rest."""
    rng = np.random.default_rng(seed)
    grid_users, grid_movies = np.meshgrid(np.arange(n_users), np.arange(n_movies), indexing="ij")
    users, movies = grid_users.ravel(), grid_movies.ravel()
    keep = rng.random(users.size) < 0.6
    users, movies = users[keep], movies[keep]
    x, _ = tiny_training_data(users.size, seed)
    movie_effect = np.linspace(-0.5, 0.5, n_movies)[movies]
    user_effect = np.where(users % 2 == 0, 0.75, -0.75)
    ratings = np.clip(np.round((3.0 + user_effect + movie_effect + rng.normal(0, 0.3, users.size)) * 2) / 2, 0.5, 5)
    times = 1_000_000.0 + np.arange(users.size, dtype=np.float64)
    return {"users": users, "movies": movies, "ratings": ratings, "times": times, "x": x}


@pytest.fixture(scope="session")
def tiny_personalized_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny six-feature model plus a tiny personalised model in ``personalized/`` (read-only, session-wide)."""
    import shutil

    from moviematch_ml.offline.stacking import fit_personalized
    from moviematch_ml.runtime.factors import MFConfig
    from moviematch_ml.runtime.personalized import PersonalizedConfig

    directory = tmp_path_factory.mktemp("tiny_personalized")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, directory / f.name)
    d = tiny_ratings()
    config = PersonalizedConfig(
        mf=MFConfig(factors=3, iterations=5), inner_folds=2, n_estimators=40, num_leaves=7, min_child_samples=5
    )
    model = fit_personalized(
        d["users"].tolist(),
        d["movies"].tolist(),
        d["ratings"],
        d["times"],
        d["x"],
        config,
        RatingScale(min=0.5, max=5.0, step=0.5),
    )
    model.save(directory / "personalized", created_at="2026-01-01T00:00:00Z")
    return directory


@dataclass(frozen=True)
class TinyVersions:
    """The versions of the tiny models (content-addressed: computed from their cards, never written down)."""

    six: str  # the six-feature model's card
    personalized: str  # the personalised model's card
    model: str  # tiny_model_dir's: what its answers report
    model_with_personalized: str  # tiny_personalized_dir's


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path, tiny_personalized_dir: Path) -> TinyVersions:
    six = read_card(tiny_model_dir).version
    personal = read_card(tiny_personalized_dir / "personalized").version
    return TinyVersions(six, personal, model_version(six, None), model_version(six, personal))


@pytest.fixture(scope="session")
def synthetic_data() -> dict[str, np.ndarray]:
    """``reference.synthetic_ratings()``: ratings in which the user and the movie matter (read-only)."""
    from reference import synthetic_ratings

    return synthetic_ratings()


@pytest.fixture(scope="session")
def synthetic_model(synthetic_data: dict[str, np.ndarray]) -> PersonalizedModel:
    """A personalised model trained on ``synthetic_data`` with ``reference.SYNTHETIC_CONFIG`` (read-only)."""
    from moviematch_ml.offline.stacking import fit_personalized
    from reference import SCALE, SYNTHETIC_CONFIG

    d = synthetic_data
    return fit_personalized(d["u"], d["i"], d["r"], d["t"], d["x6"], SYNTHETIC_CONFIG, SCALE)


# --- fault injection (tests/faults.py): servers of the test's own, proxies, a small disk; each cleaned up always ------
# Imported here rather than at the top so that this block stays one piece, apart from the fixtures above.

from faults import PostgresServer, RedisServer, SmallDisk, TcpProxy, start_postgres, start_redis  # noqa: E402


@pytest.fixture
def dedicated_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own on a free port (``.url``), which the test may stop or kill."""
    with start_postgres(tmp_path) as server:
        yield server


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own on a free port (``.url``), which the test may stop or kill."""
    with start_redis(tmp_path) as server:
        yield server


@pytest.fixture
def postgres_proxy() -> Iterator[TcpProxy]:
    """A TCP proxy in front of the machine's PostgreSQL (reach it with ``faults.with_port(url, proxy.port)``)."""
    with TcpProxy(5432) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    """A TCP proxy in front of the machine's Redis (reach it with ``faults.with_port(url, proxy.port)``)."""
    with TcpProxy(6379) as proxy:
        yield proxy


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 1 MiB tmpfs mounted on ``tmp_path / "disk"`` (root only), unmounted afterwards."""
    with SmallDisk(tmp_path / "disk", size=1 << 20) as disk:
        yield disk
