"""Variants, reloads and the prediction log through the app: POST /admin/reload, SIGHUP, the registry's changes."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from moviematch_ml.online.lifecycle import Lifecycle
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.online.tables import prediction_log_table
from moviematch_ml.runtime.registry import Registry, assign
from moviematch_ml.settings import Settings

ADMIN = "admin-secret-0123456789"
PREDICT = "predict-secret-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
USERS = [f"u{i}" for i in range(40)]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.01)


@pytest.fixture
def registry(tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.register(tiny_model_dir)
    reg.register(other_model_dir)
    return reg


def _settings(tmp_path: Path, registry: Registry, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "model_registry": registry.root,
        "database_url": f"sqlite:///{tmp_path / 'admin.sqlite3'}",
        "api_keys": f"{ADMIN}:admin,{PREDICT}:predict+feedback",
        "registry_poll_seconds": 0,
    }
    return Settings(**{**values, **changes})


@pytest.fixture
def client(tmp_path: Path, registry: Registry) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path, registry))) as c:
        yield c


def _predict(c: TestClient, user: str | None) -> dict[str, Any]:
    body = dict(EXAMPLE) if user is None else {**EXAMPLE, "user_id": user, "movie_id": 1}
    r = c.post("/predict", json=body, headers={"Authorization": f"Bearer {PREDICT}"})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_admin_routes_need_an_admin_key(client: TestClient, tmp_path: Path, tiny_model_dir: Path) -> None:
    assert client.post("/admin/reload").status_code == 401
    refused = client.post("/admin/reload", headers={"Authorization": f"Bearer {PREDICT}"})
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
    # Without API_KEYS nobody holds an admin key: the route refuses everyone.
    with TestClient(
        create_app(Settings(model_path=tiny_model_dir, database_url=f"sqlite:///{tmp_path / 'o.db'}"))
    ) as c:
        open_service = c.post("/admin/reload")
        assert (open_service.status_code, open_service.json()["error"]) == (403, "forbidden")
        assert "API_KEYS" in open_service.json()["message"]


def test_a_reload_serves_the_registry_s_new_challenger_to_its_users(client: TestClient, registry: Registry) -> None:
    champion = registry.read().champion
    assert champion is not None
    before = {u: _predict(client, u) for u in USERS}
    assert {(a["variant"], a["model_version"]) for a in before.values()} == {("champion", champion)}
    other = next(m.version for m in registry.models() if m.version != champion)
    registry.challenge("b", other, 0.5)
    r = client.post("/admin/reload", headers=AS_ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert (body["reloaded"], body["reason"], body["revision"]) == (True, None, registry.read().revision)
    assert body["variants"] == [
        {"name": "champion", "weight": 0.5, "model_version": champion, "status": "ok"},
        {"name": "b", "weight": 0.5, "model_version": other, "status": "ok"},
    ]
    assert client.get("/health", headers=AS_ADMIN).json()["variants"] == body["variants"]
    salt = registry.read().salt
    after = {u: _predict(client, u) for u in USERS}
    for user, answer in after.items():
        # Each user gets the variant the hash assigns them, and that variant's model answers.
        variant = ["champion", "b"][assign(user, [("champion", 0.5), ("b", 0.5)], salt)]
        assert (answer["variant"], answer["model_version"]) == (variant, champion if variant == "champion" else other)
    # Both variants answer someone (the shares themselves are tests/runtime/test_registry.py's: the salt is random,
    # so a count here is a binomial draw).
    assert 0 < sum(a["variant"] == "b" for a in after.values()) < len(USERS)
    # The other model's answers are its own (a star lower: two points on 0-10), not the champion's.
    b_user = next(u for u, a in after.items() if a["variant"] == "b")
    assert after[b_user]["predicted_rating"] < before[b_user]["predicted_rating"] - 1.0
    # Requests without a user id go to the champion.
    assert {_predict(client, None)["variant"] for _ in range(5)} == {"champion"}


def test_a_model_that_does_not_load_is_refused_and_the_old_ones_keep_serving(
    client: TestClient, registry: Registry
) -> None:
    champion = registry.read().champion
    other = next(m.version for m in registry.models() if m.version != champion)
    with (registry.model_dir(other) / "model.txt").open("a") as f:
        f.write("\n")  # the registered copy was damaged on disk after it was registered
    registry.promote(other)
    r = client.post("/admin/reload", headers=AS_ADMIN)
    assert r.status_code == 409
    body = r.json()
    assert body["reloaded"] is False
    assert "ModelChecksumError" in body["reason"]
    assert str(registry.root) not in body["reason"]  # the registry is named, not the machine's directories
    assert body["variants"] == [{"name": "champion", "weight": 1.0, "model_version": champion, "status": "ok"}]
    assert _predict(client, "u1")["model_version"] == champion
    metrics = client.get("/metrics", headers=AS_ADMIN).text
    assert 'moviematch_model_reloads_total{outcome="refused"} 1.0' in metrics


def test_sighup_reloads(tmp_path: Path, registry: Registry) -> None:
    lifecycle = Lifecycle()
    champion = registry.read().champion
    other = next(m.version for m in registry.models() if m.version != champion)
    with TestClient(create_app(_settings(tmp_path, registry), lifecycle=lifecycle)) as c:
        registry.promote(other)
        assert _predict(c, "u1")["model_version"] == champion  # no poll: nothing changes by itself
        assert lifecycle.reload()  # what the worker's SIGHUP handler calls
        wait_until(lambda: _predict(c, "u1")["model_version"] == other)
    assert not lifecycle.reload()  # the app stopped: nothing left to reload


def test_every_worker_picks_a_registry_change_up_by_polling(tmp_path: Path, registry: Registry) -> None:
    champion = registry.read().champion
    other = next(m.version for m in registry.models() if m.version != champion)
    with TestClient(create_app(_settings(tmp_path, registry, registry_poll_seconds=0.05))) as c:
        registry.promote(other)
        wait_until(lambda: _predict(c, "u1")["model_version"] == other)
        registry.rollback()
        wait_until(lambda: _predict(c, "u1")["model_version"] == champion)


def test_every_prediction_served_is_in_the_log(tmp_path: Path, registry: Registry) -> None:
    settings = _settings(tmp_path, registry)
    headers = {"Authorization": f"Bearer {PREDICT}"}
    with TestClient(create_app(settings)) as c:
        one = c.post("/predict", json={**EXAMPLE, "user_id": "u7", "movie_id": "m1"}, headers=headers).json()
        movies = [{"movie_id": 3, **EXAMPLE}, {"movie_id": "x", **EXAMPLE, "vote_average": 2.0}]
        batch = c.post("/predict-batch", json={"movies": movies, "top_k": 1}, headers=headers).json()
        cached = c.post("/predict", json=EXAMPLE, headers=headers).json()
        again = c.post("/predict", json=EXAMPLE, headers=headers).json()  # from the answer cache
    # The app stopped: what was queued is written (the background task writes it every second before that).
    store = FeedbackStore.from_url(settings.database_url)
    try:
        with store.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(prediction_log_table))]
    finally:
        store.close()
    by_id = {r["request_id"]: r for r in rows}
    assert len(rows) == 4
    logged = by_id[one["prediction_id"]]
    assert (logged["endpoint"], logged["user_id"], orjson.loads(logged["movie_ids"])) == ("predict", "u7", ["m1"])
    assert (logged["variant"], logged["model_version"]) == (one["variant"], one["model_version"])
    assert np.frombuffer(logged["predictions"], dtype="<f8").tolist() == [one["predicted_rating"]]
    features = np.frombuffer(logged["features"], dtype="<f8")
    assert features.tolist() == [float(EXAMPLE[n]) for n in FEATURE_NAMES]
    # The batch: one row, every movie (not only the top_k returned), in request order; its ids are <id>-<index>.
    [top] = batch["predictions"]
    request_id, _, index = top["prediction_id"].rpartition("-")
    logged = by_id[request_id]
    assert (logged["n"], logged["ranked"], logged["top_k"]) == (2, True, 1)
    assert orjson.loads(logged["movie_ids"]) == [3, "x"]
    assert np.frombuffer(logged["predictions"], dtype="<f8")[int(index)] == top["predicted_rating"]
    # A cached answer is logged too, with its features (decoded when written).
    for answer in (cached, again):
        row = by_id[answer["prediction_id"]]
        assert np.frombuffer(row["features"], dtype="<f8").tolist() == [float(EXAMPLE[n]) for n in FEATURE_NAMES]


def test_a_model_path_is_reloaded_in_place(tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    settings = Settings(
        model_path=model, database_url=f"sqlite:///{tmp_path / 'p.db'}", api_keys=f"{ADMIN}:admin,{PREDICT}:predict"
    )
    with TestClient(create_app(settings)) as c:
        first = _predict(c, None)["model_version"]
        for f in other_model_dir.iterdir():  # a new model copied over the old one (a mounted volume, say)
            shutil.copy(f, model / f.name)
        assert c.post("/admin/reload", headers=AS_ADMIN).json()["reloaded"] is True
        second = _predict(c, None)["model_version"]
    assert first != second
