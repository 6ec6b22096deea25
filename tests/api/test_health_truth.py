"""/health and /health/ready tell the truth (defect 7): a store that cannot write (read-only, its directory missing,
PostgreSQL down) shows as unavailable while predictions go on; REQUIRE_MODEL makes a missing trained model unready;
and on Railway the default SQLite store is reported as ephemeral (defect 10)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Final

import pytest
from fastapi.testclient import TestClient

from faults import TcpProxy, sqlite_read_only_url, with_port
from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.runtime.cards import PERSONALIZED_DIR
from moviematch_ml.settings import Settings, load_settings

RATING: Final[dict[str, Any]] = {"user_id": 7, "movie_id": 1, "rating": 8, "feedback_id": "truth-1"}
BATCH: Final[dict[str, Any]] = {"user_id": 8, "movies": [{"movie_id": 1, **EXAMPLE}, {"movie_id": 2, **EXAMPLE}]}
STORE_UNAVAILABLE: Final[dict[str, str]] = {
    "error": "store_unavailable",
    "message": "the feedback store could not write; retry with the same keys "
    "(a rating stored meanwhile is a duplicate)",
}
NOT_READY: Final[dict[str, str]] = {
    "error": "not_ready",
    "message": "the trained model is not loaded (REQUIRE_MODEL): the fallback rule answers",
}
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s/:'\",;()<>]+/[^\s'\",;()<>]+")


def store_state(c: TestClient) -> tuple[str, str, str | None]:
    health = c.get("/health").json()
    return health["store"], health["store_status"], health["store_reason"]


def assert_refused_but_predicting(c: TestClient, tmp_path: Path) -> None:
    """/feedback is 503 store_unavailable (retry later), /health says why without a path; predictions, personalised
    requests included, are still answered by the six-feature model; the service stays ready."""
    refused = c.post("/feedback", json=RATING)
    assert (refused.status_code, refused.json(), refused.headers["retry-after"]) == (503, STORE_UNAVAILABLE, "1")
    _, status, reason = store_state(c)
    assert status == "unavailable"
    assert reason is not None
    assert str(tmp_path) not in reason
    assert not ABSOLUTE_PATH.search(reason), reason
    one = c.post("/predict", json={**EXAMPLE, "user_id": 8, "movie_id": 1})
    loaded = c.get("/health").json()["model_version"]
    assert (one.status_code, one.json()["source"], one.json()["model_version"]) == (200, "model", loaded)
    batch = c.post("/predict-batch", json=BATCH)
    assert batch.status_code == 200
    assert [p["source"] for p in batch.json()["predictions"]] == ["model", "model"]
    assert c.get("/health/ready").status_code == 200  # the store costs /feedback, not readiness


# --- the store cannot write -------------------------------------------------------------------------------------------


def test_a_read_only_store_refuses_feedback_and_says_so(tiny_personalized_dir: Path, tmp_path: Path) -> None:
    """Defect 7: a read-only store (SQLite's mode=ro) answered 503 to /feedback while /health said nothing of it."""
    FeedbackStore.from_url(f"sqlite:///{tmp_path / 'feedback.sqlite3'}").close()  # a store at head, then read-only
    settings = Settings(
        model_path=tiny_personalized_dir, database_url=sqlite_read_only_url(tmp_path / "feedback.sqlite3")
    )
    with TestClient(create_app(settings)) as c:
        assert_refused_but_predicting(c, tmp_path)
        assert store_state(c) == ("sqlite", "unavailable", "could not store feedback: OperationalError")


def test_a_read_only_store_is_unavailable_before_any_write(tmp_path: Path) -> None:
    FeedbackStore.from_url(f"sqlite:///{tmp_path / 'feedback.sqlite3'}").close()
    settings = Settings(model_path=tmp_path / "none", database_url=sqlite_read_only_url(tmp_path / "feedback.sqlite3"))
    with TestClient(create_app(settings)) as c:
        assert store_state(c)[1] == "unavailable"


def test_a_store_whose_directory_is_missing_is_unavailable_from_the_start(
    tiny_personalized_dir: Path, tmp_path: Path
) -> None:
    """Defect 7 (and 2): ``sqlite:////nonexistent-dir/x.sqlite3`` gave 500s to personalised predictions and an
    'ok' /health."""
    settings = Settings(model_path=tiny_personalized_dir, database_url=f"sqlite:///{tmp_path / 'no-dir' / 'x.sqlite3'}")
    with TestClient(create_app(settings)) as c:
        assert store_state(c)[:2] == ("sqlite", "unavailable")  # before any request
        assert_refused_but_predicting(c, tmp_path)


# --- PostgreSQL down --------------------------------------------------------------------------------------------------


def _pg_settings(model_path: Path, url: str) -> Settings:
    return Settings(model_path=model_path, database_url=url, store_connect_timeout=1, store_write_timeout=3)


@pytest.mark.postgres
def test_postgres_killed_then_back(
    tiny_personalized_dir: Path, tmp_path: Path, pg_schema_url: str, postgres_proxy: TcpProxy
) -> None:
    """Defect 7: with PostgreSQL down /health said 'ok'. Killed under a running service: /feedback is 503, /health
    unavailable, predictions answered; back: the next write succeeds and /health is ok, without a restart; the rating
    stored before is still there."""
    url = with_port(pg_schema_url, postgres_proxy.port)
    with TestClient(create_app(_pg_settings(tiny_personalized_dir, url))) as c:
        assert c.post("/feedback", json={**RATING, "feedback_id": "before"}).status_code == 201
        assert store_state(c) == ("postgresql", "ok", None)
        postgres_proxy.kill()
        assert_refused_but_predicting(c, tmp_path)
        assert store_state(c) == ("postgresql", "unavailable", "could not store feedback: OperationalError")
        postgres_proxy.restart()
        assert c.post("/feedback", json=RATING).status_code == 201
        assert store_state(c) == ("postgresql", "ok", None)
        # The user's ratings are read again (after the service's 2 s back-off from a failed read, during which the
        # six-feature model answers at once): the personalised model answers.
        deadline = time.monotonic() + 10.0
        while c.post("/predict", json={**EXAMPLE, "user_id": 7, "movie_id": 5}).json()["source"] != "personalized":
            assert time.monotonic() < deadline, "the personalised model never answered again"
            time.sleep(0.05)
        again = c.post("/feedback", json={**RATING, "feedback_id": "before"})
        assert (again.status_code, again.json()["duplicates"]) == (200, 1)


@pytest.mark.postgres
def test_postgres_down_at_start_is_unavailable(tmp_path: Path, pg_schema_url: str, postgres_proxy: TcpProxy) -> None:
    postgres_proxy.kill()
    with TestClient(create_app(_pg_settings(tmp_path / "none", with_port(pg_schema_url, postgres_proxy.port)))) as c:
        assert store_state(c)[:2] == ("postgresql", "unavailable")
        assert c.post("/feedback", json=RATING).status_code == 503
        assert c.post("/predict", json={**EXAMPLE, "user_id": 7}).status_code == 200
        assert c.get("/health/ready").status_code == 200


@pytest.mark.postgres
def test_postgres_down_at_start_recovers_when_it_is_back(
    tmp_path: Path, pg_schema_url: str, postgres_proxy: TcpProxy
) -> None:
    postgres_proxy.kill()
    with TestClient(create_app(_pg_settings(tmp_path / "none", with_port(pg_schema_url, postgres_proxy.port)))) as c:
        assert c.post("/feedback", json=RATING).status_code == 503
        postgres_proxy.restart()
        assert c.post("/feedback", json=RATING).status_code == 201


# --- the models -------------------------------------------------------------------------------------------------------


def _probes(settings: Settings) -> tuple[int, dict[str, Any], dict[str, Any], dict[str, Any]]:
    with TestClient(create_app(settings)) as c:
        ready = c.get("/health/ready")
        assert c.get("/health/live").status_code == 200
        prediction = c.post("/predict", json=EXAMPLE)
        assert prediction.status_code == 200  # not ready is not unable: whatever reaches it is answered
        return ready.status_code, ready.json(), c.get("/health").json(), prediction.json()


def test_require_model_makes_a_missing_model_unready(tmp_path: Path) -> None:
    """Defect 7: with MODEL_PATH=/nonexistent readiness was 200, so a typo'd model path replaced a working
    deployment with the fallback rule, green. With REQUIRE_MODEL (set in the Railway and Docker files): 503."""
    status, body, health, prediction = _probes(Settings(model_path=tmp_path / "missing", require_model=True))
    assert (status, body) == (503, NOT_READY)
    assert (health["status"], health["models"]["six_features"]["status"]) == ("degraded", "fallback")
    assert (prediction["source"], prediction["predicted_rating"]) == ("fallback", 7.909)


def test_without_require_model_a_missing_model_is_ready_and_degraded(tmp_path: Path) -> None:
    status, body, health, prediction = _probes(Settings(model_path=tmp_path / "missing"))
    assert (status, body) == (200, {"status": "ready"})
    assert health["status"] == "degraded"
    assert "ModelNotFoundError: no model card at MODEL_PATH" in health["reason"]
    assert prediction["source"] == "fallback"


def test_require_model_with_the_model_is_ready(tiny_model_dir: Path) -> None:
    status, body, health, prediction = _probes(Settings(model_path=tiny_model_dir, require_model=True))
    assert (status, body, health["status"], prediction["source"]) == (200, {"status": "ready"}, "ok", "model")


def test_require_model_refuses_a_model_whose_terms_are_refused(tmp_path: Path) -> None:
    # SERVE_NONCOMMERCIAL_MODELS=false refuses the bundled models: the trained model is not what answers.
    settings = Settings(serve_noncommercial_models=False, require_model=True)
    status, body, health, _ = _probes(settings)
    assert (status, body) == (503, NOT_READY)
    assert "ModelTermsError" in health["reason"]


def test_a_refused_personalised_model_is_degraded_but_ready(tiny_personalized_dir: Path, tmp_path: Path) -> None:
    """Defect 7: /health said 'ok' when the personalised model was refused. REQUIRE_MODEL is about the trained
    six-feature model: the service stays ready, and /health says which model was refused and why."""
    model = Path(shutil.copytree(tiny_personalized_dir, tmp_path / "model"))
    with (model / PERSONALIZED_DIR / "state.npz").open("ab") as f:
        f.write(b"\0")
    status, _, health, prediction = _probes(Settings(model_path=model, require_model=True))
    assert status == 200
    assert health["status"] == "degraded"
    assert health["models"]["personalized"]["status"] == "refused"
    assert health["reason"].startswith("personalised model not loaded: ModelChecksumError: MODEL_PATH/personalized/")
    assert prediction["source"] == "model"


# --- defect 10: Railway -----------------------------------------------------------------------------------------------


def test_on_railway_without_database_url_the_store_is_ephemeral_and_said_so(tmp_path: Path, logs: Any) -> None:
    """Defect 10: every Railway redeploy lost the SQLite file inside the container, silently."""
    with TestClient(create_app(Settings(model_path=tmp_path / "none", railway_environment_id="env-1"))) as c:
        health = c.get("/health").json()
    assert (health["store"], health["store_status"]) == ("sqlite (ephemeral)", "ok")
    warnings = [r for r in logs.records() if r["message"].startswith("the feedback store is a SQLite file")]
    assert [w["level"] for w in warnings] == ["warning"]
    assert "a redeploy loses every rating" in warnings[0]["message"]
    assert "DATABASE_URL" in warnings[0]["message"]
    [started] = [r for r in logs.records() if r["message"] == "service started"]
    assert started["store"] == "sqlite (ephemeral)"


@pytest.mark.parametrize(
    ("database_url", "kind"),
    [("sqlite:///feedback-on-a-volume.sqlite3", "sqlite"), ("postgresql://postgres@127.0.0.1:1/none", "postgresql")],
)
def test_on_railway_with_database_url_the_store_is_not_ephemeral(
    tmp_path: Path, logs: Any, database_url: str, kind: str
) -> None:
    settings = Settings(
        model_path=tmp_path / "none", railway_environment_id="env-1", database_url=database_url, store_connect_timeout=1
    )
    with TestClient(create_app(settings)) as c:
        assert c.get("/health").json()["store"] == kind
    assert not [r for r in logs.records() if r["message"].startswith("the feedback store is a SQLite file")]


def test_off_railway_the_default_store_is_not_called_ephemeral(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(model_path=tmp_path / "none"))) as c:
        assert c.get("/health").json()["store"] == "sqlite"


def test_the_environment_decides_at_the_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    # What Railway sets: RAILWAY_ENVIRONMENT_ID always; DATABASE_URL only when the service's variables reference one.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("RAILWAY_ENVIRONMENT_ID", "0f1e2d3c")
    assert load_settings().ephemeral_store is True
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.internal:5432/railway")
    assert load_settings().ephemeral_store is False
    monkeypatch.delenv("RAILWAY_ENVIRONMENT_ID")
    monkeypatch.delenv("DATABASE_URL")
    assert load_settings().ephemeral_store is False
