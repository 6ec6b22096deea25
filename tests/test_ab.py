"""The model lifecycle end to end, on a real server and the real command line: two variants served from a registry,
movielens-small users replayed through /predict-batch and /feedback, ``ab-report`` naming the better variant, a
model retrained on that feedback (``train --from-feedback``), then ``models end / register / promote / rollback``
picked up by the running service without a restart (README's "Ship a new model")."""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from conftest import write_tiny_model
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR
from moviematch_ml.runtime.registry import Registry
from realserver import Server, request, start, stop

pytestmark = pytest.mark.slow

BACKEND = "backend-secret-0123456789"
ADMIN = "admin-secret-0123456789"
USERS = 40  # replayed users
PER_USER = 30  # each one's first ratings, in time order
SESSION = 10  # ratings per /predict-batch (then one /feedback quoting its prediction ids)


def _cli(*args: str, env: dict[str, str]) -> str:
    """``moviematch-ml ARGS`` in a subprocess (this interpreter's install); its stdout. It must succeed."""
    exe = shutil.which("moviematch-ml", path=str(Path(sys.executable).parent)) or "moviematch-ml"
    done = subprocess.run([exe, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"moviematch-ml {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def _post(server: Server, path: str, body: object, key: str = BACKEND) -> Any:
    status, _, answer = request(server.port, "POST", path, body, {"Authorization": f"Bearer {key}"})
    assert status in (200, 201), (path, status, answer)
    return answer


def _reload(server: Server) -> None:
    answer = _post(server, "/admin/reload", None, ADMIN)
    assert answer["reloaded"] is True, answer


def _predict(server: Server, user: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"movies": [{"movie_id": 1, **EXAMPLE}]}
    if user is not None:
        body["user_id"] = user
    answer: dict[str, Any] = _post(server, "/predict-batch", body)
    return answer


def _number(name: str, value: float) -> float | int:
    """A feature as the app sends it: counts and flags as integers."""
    return int(value) if name != "vote_average" and float(value).is_integer() else float(value)


def _write_movies(movies: Any, path: Path) -> None:
    """The app's movies as movies.csv (ml-latest layout), for ``train --from-feedback``."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        for m in movies.itertuples():
            title = m.title if np.isnan(m.year) else f"{m.title} ({int(m.year)})"
            w.writerow([int(m.movie_id), title, "|".join(m.genres) or "(no genres listed)"])


def _sessions(frame: Any) -> list[tuple[str, Any]]:
    """(user id, ratings) of every replayed session, in the order of each session's first rating."""
    counts = frame.groupby("user_id").size()
    rng = np.random.default_rng(7)
    users = sorted(rng.choice(counts[counts >= PER_USER].index.to_numpy(), USERS, replace=False).tolist())
    sessions = []
    for user in users:
        rows = frame[frame["user_id"] == user].sort_values("timestamp", kind="stable").iloc[:PER_USER]
        # Ids the bundled personalised model has never seen: what it learns of them comes through /feedback.
        sessions += [(f"replay-{user}", rows.iloc[i : i + SESSION]) for i in range(0, PER_USER, SESSION)]
    sessions.sort(key=lambda s: int(s[1]["timestamp"].iloc[0]))
    return sessions


def _logged_batches(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        n: int = conn.execute("SELECT count(*) FROM prediction_log WHERE endpoint = 'predict_batch'").fetchone()[0]
    return n


def test_a_b_test_report_then_promote_and_roll_back_without_a_restart(tmp_path: Path) -> None:
    from moviematch_ml.offline.boosting import TrainConfig
    from moviematch_ml.offline.data import load_movielens_small
    from moviematch_ml.offline.evaluation import feature_frame

    dataset = load_movielens_small()
    frame = feature_frame(dataset, TrainConfig())
    to_api = 10.0 / dataset.scale.max
    movies_csv = tmp_path / "movies.csv"
    _write_movies(dataset.movies, movies_csv)

    # The registry: the bundled model as champion, a deliberately weaker one (trained on a few hundred synthetic
    # rows, its answers a star low) as challenger "weak" for half the users.
    env = {"MODEL_REGISTRY": str(tmp_path / "registry")}
    _cli("models", "register", str(BUNDLED_MODEL_DIR), env=env)
    weak_dir = write_tiny_model(tmp_path / "weak", rounds=8, shift=-1.0, name="weak")
    _cli("models", "register", str(weak_dir), "--challenger", "weak", "--weight", "0.5", env=env)
    registry = Registry(tmp_path / "registry")
    bundled = registry.read().champion
    weak = registry.read().challengers["weak"].version
    db = tmp_path / "ab.sqlite3"
    url = f"sqlite:///{db}"
    server = start(
        tmp_path,
        **env,
        DATABASE_URL=url,
        API_KEYS=f"{BACKEND}:predict+feedback,{ADMIN}:admin",
        EXPERIMENT_SALT="ab-test",  # the same users in each variant on every run (the registry draws a new salt)
        REGISTRY_POLL_SECONDS="0",  # every change below reaches the service through POST /admin/reload only
        PREDICTION_LOG_SHARE="1",  # log every prediction, however slow this shared machine is at the moment
    )
    try:
        # --- the replay: each session's movies predicted, then rated, quoting the prediction ids ---------------
        variants: dict[str, str] = {}
        sessions = _sessions(frame)
        for user, rows in sessions:
            movies = [
                {"movie_id": int(m), **dict(zip(FEATURE_NAMES, map(_number, FEATURE_NAMES, f), strict=True))}
                for m, f in zip(rows["movie_id"], rows.loc[:, list(FEATURE_NAMES)].to_numpy().tolist(), strict=True)
            ]
            answer = _post(server, "/predict-batch", {"user_id": user, "movies": movies})
            variants[user] = answer["variant"]
            assert answer["model_version"] == (bundled if answer["variant"] == "champion" else weak)
            ids = {p["movie_id"]: p["prediction_id"] for p in answer["predictions"]}
            ratings = [
                {"user_id": user, "movie_id": int(m), "rating": float(r) * to_api, "timestamp": int(t),
                 "prediction_id": ids[int(m)]}
                for m, r, t in zip(rows["movie_id"], rows["rating"], rows["timestamp"], strict=True)
            ]  # fmt: skip
            assert _post(server, "/feedback", {"ratings": ratings})["accepted"] == len(ratings)
        assert set(variants.values()) == {"champion", "weak"}
        deadline = time.monotonic() + 30
        while _logged_batches(db) < len(sessions):  # the log is written off the request path, every second
            assert time.monotonic() < deadline, "the prediction log was not written"
            time.sleep(0.2)

        # --- the report names the better variant, with a significant difference ------------------------------
        out = tmp_path / "ab"
        data = orjson.loads(_cli("ab-report", "--database-url", url, "--json", "--out", str(out), env=env))
        (c,) = data["comparisons"]
        by_name = {v["name"]: v for v in data["variants"]}
        print(
            f"ab-report: {data['ratings']['joined']} ratings joined; champion RMSE {by_name['champion']['rmse']}, "
            f"weak RMSE {by_name['weak']['rmse']}; {c['verdict']}"
        )
        assert data["ratings"]["joined_by_id"] == data["ratings"]["read"] == USERS * PER_USER
        assert (c["challenger"], c["better"], c["significant"]) == ("weak", "champion", True)
        assert c["rmse"]["low"] > 0
        assert c["rmse"]["p_value"] < 0.05
        assert c["verdict"].startswith("champion better: RMSE +")
        assert (out / "ab_report.md").is_file()
        assert (out / "ab_report.png").is_file()

        # --- the weak challenger ends: its users go back to the champion, at once ------------------------------
        weak_user = next(u for u, v in variants.items() if v == "weak")
        _cli("models", "end", "weak", env=env)
        _reload(server)
        answer = _predict(server, weak_user)
        assert (answer["variant"], answer["model_version"]) == ("champion", bundled)

        # --- a model trained on the feedback (and the features the backend sent), registered as a challenger ---
        trained = tmp_path / "retrained"
        done = subprocess.run(
            [shutil.which("moviematch-ml", path=str(Path(sys.executable).parent)) or "moviematch-ml", "train",
             "--from-feedback", "--database-url", url, "--movies", str(movies_csv), "--no-personalized",
             "--out", str(trained), "--quiet"],
            capture_output=True, text=True, timeout=300, env={**os.environ, **env},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"{USERS * PER_USER:,} of them with the features the backend sent" in done.stderr
        _cli("models", "register", str(trained), "--challenger", "fresh", "--weight", "0.5", env=env)
        fresh = registry.read().challengers["fresh"].version
        _reload(server)
        served = {_predict(server, f"probe-{i}")["model_version"] for i in range(40)}
        assert served == {bundled, fresh}

        # --- promoted: it answers everyone; rolled back: the bundled model again ------------------------------
        _cli("models", "promote", "fresh", env=env)
        _reload(server)
        assert (_predict(server, None)["model_version"], _predict(server, weak_user)["model_version"]) == (fresh, fresh)
        _cli("models", "rollback", env=env)
        _reload(server)
        answer = _predict(server, None)
        assert (answer["variant"], answer["model_version"]) == ("champion", bundled)
        listing = orjson.loads(_cli("models", "list", "--json", env=env))
        assert listing["variants"] == [{"name": "champion", "model_version": bundled, "weight": 1.0}]
        assert {m["version"] for m in listing["models"]} == {bundled, weak, fresh}
        assert server.proc.poll() is None  # the same process all along
    finally:
        stop(server)
    # README's "Ship a new model" block (tests/test_docs.py) names this file for its commands: "register",
    # "promote", "end", "rollback", train and ab-report all ran above.
