"""GET /, /health, the probes, each model's state, and the fallback when the model is missing, corrupt or refused."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fastapi.testclient import TestClient

from conftest import TinyVersions
from moviematch_ml import __version__
from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.models import ModelSet
from moviematch_ml.runtime.cards import PERSONALIZED_DIR, ModelCard, content_versioned
from moviematch_ml.settings import Settings

ABSENT = {"status": "absent", "version": None, "reason": None}


def _ok(version: str) -> dict[str, object]:
    return {"status": "ok", "version": version, "reason": None}


def test_root(client: TestClient) -> None:
    body = client.get("/").json()
    assert body["service"] == "moviematch-ml"
    assert body["version"] == __version__
    assert body["docs"] == "/docs"
    assert body["model"]["version"] == "fallback-1"
    assert body["model"]["source"] == "fallback"
    assert body["model"]["status"] == "degraded"
    reason = body["model"]["reason"]
    assert reason.startswith("model not loaded, answering with the fallback rule: ModelNotFoundError")
    assert body["models"] == {
        "six_features": {"status": "fallback", "version": "fallback-1", "reason": reason},
        "personalized": ABSENT,
    }


def test_root_with_a_model(model_client: TestClient, tiny: TinyVersions) -> None:
    body = model_client.get("/").json()
    model = body["model"]
    assert model["version"] == tiny.model
    assert model["source"] == "model"
    assert model["status"] == "ok"
    assert model["reason"] is None
    assert model["name"] == "tiny"
    assert model["rating_scale"] == {"min": 0.5, "max": 5.0, "step": 0.5}
    assert model["features"] == list(EXAMPLE)
    assert body["models"] == {
        "six_features": {**_ok(tiny.six), "name": "tiny", "created_at": "2026-01-01T00:00:00+00:00"},
        "personalized": ABSENT,  # none next to it: normal, the six-feature model answers everyone
    }


def test_health_ok_with_a_model(model_client: TestClient, tiny: TinyVersions) -> None:
    body = model_client.get("/health").json()
    assert body["status"] == "ok"
    assert body["source"] == "model"
    assert body["model_version"] == tiny.model
    assert body["reason"] is None
    assert 0 <= body["uptime_seconds"] < 600
    assert body["models"] == {"six_features": _ok(tiny.six), "personalized": ABSENT}


def test_health_and_root_with_both_models(tiny_personalized_dir: Path, tmp_path: Path, tiny: TinyVersions) -> None:
    settings = Settings(model_path=tiny_personalized_dir, database_url=f"sqlite:///{tmp_path / 'h.sqlite3'}")
    with TestClient(create_app(settings)) as c:
        health = c.get("/health").json()
        root = c.get("/").json()
    personalized = {"status": "ok", "version": tiny.personalized, "reason": None}
    assert (health["status"], health["reason"]) == ("ok", None)
    assert health["models"] == {"six_features": _ok(tiny.six), "personalized": personalized}
    assert root["models"]["personalized"] == {
        **personalized,
        "name": "moviematch-personalized",
        "created_at": "2026-01-01T00:00:00Z",
    }
    assert root["model"]["version"] == tiny.model_with_personalized  # the directory's


def test_a_refused_personalised_model_makes_the_service_degraded(
    tiny_personalized_dir: Path, tmp_path: Path, logs: Any, tiny: TinyVersions
) -> None:
    model_dir = Path(shutil.copytree(tiny_personalized_dir, tmp_path / "model"))
    with (model_dir / PERSONALIZED_DIR / "state.npz").open("ab") as f:
        f.write(b"\0")  # the file no longer has the checksum its card lists
    settings = Settings(model_path=model_dir, database_url=f"sqlite:///{tmp_path / 'h.sqlite3'}")
    with TestClient(create_app(settings)) as c:
        assert c.get("/health/ready").status_code == 200  # the six-feature model answers everyone: ready
        health = c.get("/health").json()
        root = c.get("/").json()
        c.post("/feedback", json={"user_id": 5, "movie_id": 1, "rating": 10})
        prediction = c.post("/predict", json={**EXAMPLE, "user_id": 5, "movie_id": 2}).json()
    reason = health["reason"]
    assert reason.startswith("personalised model not loaded: ModelChecksumError: ")
    assert "state.npz" in reason
    assert health["status"] == "degraded"
    assert (health["source"], health["model_version"]) == ("model", tiny.model_with_personalized)
    assert health["models"] == {
        "six_features": _ok(tiny.six),
        "personalized": {"status": "refused", "version": None, "reason": reason},
    }
    assert (root["model"]["status"], root["model"]["reason"]) == ("degraded", reason)
    assert root["models"]["personalized"] == {"status": "refused", "version": None, "reason": reason}
    assert (prediction["source"], prediction["model_version"]) == ("model", tiny.model_with_personalized)
    [failure] = [r for r in logs.records() if r["message"] == "personalised model not loaded"]
    # The log names the file; /health, which a public URL shows anyone, names the directory MODEL_PATH.
    assert (failure["level"], failure["reason"].replace(str(model_dir), "MODEL_PATH")) == ("error", reason)
    assert str(tmp_path) not in reason
    assert "MODEL_PATH/personalized/state.npz" in reason


def test_live(client: TestClient) -> None:
    r = client.get("/health/live")
    assert (r.status_code, r.json()) == (200, {"status": "alive"})


def test_ready_is_503_before_startup_and_200_after(fallback_settings: Settings) -> None:
    app = create_app(fallback_settings)
    c = TestClient(app)  # without "with": the lifespan (model load + canned prediction) has not run
    r = c.get("/health/ready")
    assert r.status_code == 503
    assert r.json()["error"] == "not_ready"
    assert c.get("/health/live").status_code == 200
    health = c.get("/health").json()
    assert health["reason"].startswith("starting")
    assert {name: m["status"] for name, m in health["models"].items()} == {
        "six_features": "starting",
        "personalized": "starting",
    }
    with c:
        r = c.get("/health/ready")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})


def _degraded(settings: Settings, logs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    with TestClient(create_app(settings)) as c:
        assert c.get("/health/ready").status_code == 200  # the fallback can answer: ready, though degraded
        health = c.get("/health").json()
        prediction = c.post("/predict", json=EXAMPLE).json()
    failures = [r for r in logs.records() if r["message"] == "model load failed"]
    assert len(failures) == 1
    assert failures[0]["level"] == "error"
    # The log names the path; /health, which a public URL shows anyone, names it MODEL_PATH.
    assert settings.model_path is not None
    assert failures[0]["reason"].replace(str(settings.model_path), "MODEL_PATH") == health["reason"]
    assert str(settings.model_path) not in health["reason"]
    return health, prediction


def _assert_fallback(health: dict[str, Any], prediction: dict[str, Any]) -> None:
    assert health["status"] == "degraded"
    assert health["source"] == "fallback"
    assert health["model_version"] == "fallback-1"
    assert health["models"]["six_features"] == {
        "status": "fallback",
        "version": "fallback-1",
        "reason": health["reason"],
    }
    assert prediction["source"] == "fallback"
    assert prediction["predicted_rating"] == 7.909  # the rule by hand: see test_predict.py


def test_missing_model_dir(tmp_path: Path, logs: Any) -> None:
    health, prediction = _degraded(Settings(model_path=tmp_path / "missing"), logs)
    _assert_fallback(health, prediction)
    assert "ModelNotFoundError" in str(health["reason"])
    assert "no model card" in str(health["reason"])


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _edit_card(directory: Path, **changes: object) -> None:
    """Change fields of a card, and its version to the one its new content gives (what a careful forger would do:
    the files' checksums must still catch it)."""
    card_file = directory / "model_card.json"
    card = json.loads(card_file.read_text())
    card.update(changes)
    card_file.write_text(content_versioned(ModelCard.model_validate(card)).model_dump_json())


def test_a_card_edited_by_hand_is_refused(model_copy: Path, logs: Any) -> None:
    # Its version no longer names its content: it would be served, and A/B-tested, under another model's name.
    card_file = model_copy / "model_card.json"
    card = json.loads(card_file.read_text())
    card["metrics"] = {"rmse": 0.1}
    card_file.write_text(json.dumps(card))
    health, prediction = _degraded(Settings(model_path=model_copy), logs)
    _assert_fallback(health, prediction)
    assert "is not the one its content gives" in str(health["reason"])


def test_checksum_mismatch_is_refused(model_copy: Path, logs: Any) -> None:
    _edit_card(model_copy, sha256="0" * 64)
    health, prediction = _degraded(Settings(model_path=model_copy), logs)
    _assert_fallback(health, prediction)
    assert "ModelChecksumError" in str(health["reason"])
    assert "does not match" in str(health["reason"])


def test_tampered_model_file_is_refused(model_copy: Path, logs: Any) -> None:
    with (model_copy / "model.txt").open("a") as f:
        f.write("\n")
    health, prediction = _degraded(Settings(model_path=model_copy), logs)
    _assert_fallback(health, prediction)
    assert "ModelChecksumError" in str(health["reason"])


def test_garbage_with_the_right_checksum_is_refused(model_copy: Path, logs: Any) -> None:
    garbage = b"this is not a LightGBM model\n"
    (model_copy / "garbage.txt").write_bytes(garbage)
    _edit_card(model_copy, model_file="garbage.txt", sha256=hashlib.sha256(garbage).hexdigest())
    health, prediction = _degraded(Settings(model_path=model_copy), logs)
    _assert_fallback(health, prediction)
    assert "ModelFormatError" in str(health["reason"])


def test_card_that_is_not_json_is_refused(model_copy: Path, logs: Any) -> None:
    (model_copy / "model_card.json").write_text("{not json")
    health, prediction = _degraded(Settings(model_path=model_copy), logs)
    _assert_fallback(health, prediction)
    assert "ModelFormatError" in str(health["reason"])


def test_card_file_path_is_accepted(tiny_model_dir: Path) -> None:
    with TestClient(create_app(Settings(model_path=tiny_model_dir / "model_card.json"))) as c:
        assert c.get("/health").json()["status"] == "ok"


class NaNPredictor:
    version = "broken-1"
    source = "model"

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.full(x.shape[0], np.nan)


def test_a_model_whose_canned_prediction_fails_is_replaced_by_the_fallback(tmp_path: Path, logs: Any) -> None:
    settings = Settings(model_path=tmp_path / "model")
    models = ModelSet(tmp_path / "model", load_six=lambda path: NaNPredictor())
    with TestClient(create_app(settings, models=models)) as c:
        assert c.get("/health/ready").status_code == 200
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        assert health["reason"] == "model loaded but its canned prediction failed"
        assert health["models"]["six_features"]["status"] == "fallback"
        assert c.post("/predict", json=EXAMPLE).json()["source"] == "fallback"
    [failure] = [r for r in logs.records() if r["message"] == "model load failed"]
    assert failure["reason"] == health["reason"]


def test_swap_changes_the_answering_model(
    tiny_model_dir: Path, fallback_settings: Settings, tiny: TinyVersions
) -> None:
    assert fallback_settings.model_path is not None
    models = ModelSet(fallback_settings.model_path)
    with TestClient(create_app(fallback_settings, models=models)) as c:
        assert c.post("/predict", json=EXAMPLE).json()["source"] == "fallback"
        models.swap(ModelSet(tiny_model_dir).load())
        body = c.post("/predict", json=EXAMPLE).json()
        assert (body["source"], body["model_version"]) == ("model", tiny.model)
        health = c.get("/health").json()
        assert health["status"] == "ok"
        assert health["models"]["six_features"] == _ok(tiny.six)


def test_a_broken_environment_also_falls_back(fallback_settings: Settings, logs: Any) -> None:
    def loader(path: Path) -> Any:
        raise OSError("libgomp.so.1: cannot open shared object file")

    assert fallback_settings.model_path is not None
    models = ModelSet(fallback_settings.model_path, load_six=loader)
    with TestClient(create_app(fallback_settings, models=models)) as c:
        assert c.get("/health/ready").status_code == 200
        health = c.get("/health").json()
    assert health["status"] == "degraded"
    assert health["reason"].endswith("OSError: libgomp.so.1: cannot open shared object file")
    [failure] = [r for r in logs.records() if r["message"] == "model load failed"]
    assert "Traceback" in failure["exc_info"]


def test_start_up_moves_what_it_built_out_of_the_collectors_sight(fallback_settings: Settings) -> None:
    # The models and modules live as long as the process; full collections no longer walk them.
    app = create_app(fallback_settings)
    before = gc.get_freeze_count()
    with TestClient(app) as c:
        assert gc.get_freeze_count() > before
        assert c.get("/health").status_code == 200


def test_without_noncommercial_models_the_bundled_ones_are_refused(tmp_path: Path) -> None:
    # SERVE_NONCOMMERCIAL_MODELS=false and no MODEL_PATH: the bundled models (MovieLens) are not served.
    db = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    with TestClient(create_app(Settings(serve_noncommercial_models=False, database_url=db))) as c:
        health = c.get("/health").json()
        ready = c.get("/health/ready")
        prediction = c.post("/predict", json={**EXAMPLE, "user_id": 42}).json()
    assert ready.status_code == 200  # refused models never keep the service unready
    assert (health["status"], health["source"], health["model_version"]) == ("degraded", "fallback", "fallback-1")
    six, personal = health["models"]["six_features"], health["models"]["personalized"]
    assert (six["status"], personal["status"]) == ("fallback", "refused")
    assert (
        "ModelTermsError: six-bdafd7ea718c77fd was trained on data whose terms forbid commercial use" in (six["reason"])
    )
    assert "MovieLens ml-latest-small" in personal["reason"]
    assert (prediction["source"], prediction["model_version"], prediction["predicted_rating"]) == (
        "fallback",
        "fallback-1",
        7.909,  # the fallback rule on the example: base 7.409 + taste 0.5 (docs/api.md)
    )


def test_without_noncommercial_models_a_model_of_the_apps_own_data_answers(
    tiny_model_dir: Path, tiny: TinyVersions
) -> None:
    with TestClient(create_app(Settings(model_path=tiny_model_dir, serve_noncommercial_models=False))) as c:
        health = c.get("/health").json()
        prediction = c.post("/predict", json=EXAMPLE).json()
    assert (health["status"], health["models"]) == ("ok", {"six_features": _ok(tiny.six), "personalized": ABSENT})
    assert (prediction["source"], prediction["model_version"]) == ("model", tiny.model)
