"""GET /, /health, the probes, and the fallback path when the model is missing, corrupt or refused."""

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

from moviematch_ml import __version__
from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.serving import ModelHolder
from moviematch_ml.settings import Settings


def test_root(client: TestClient) -> None:
    body = client.get("/").json()
    assert body["service"] == "moviematch-ml"
    assert body["version"] == __version__
    assert body["docs"] == "/docs"
    assert body["model"]["version"] == "fallback-1"
    assert body["model"]["source"] == "fallback"
    assert body["model"]["status"] == "degraded"


def test_root_with_a_model(model_client: TestClient) -> None:
    model = model_client.get("/").json()["model"]
    assert model["version"] == "tiny-1"
    assert model["source"] == "model"
    assert model["status"] == "ok"
    assert model["reason"] is None
    assert model["name"] == "tiny"
    assert model["rating_scale"] == {"min": 0.5, "max": 5.0, "step": 0.5}
    assert model["features"] == list(EXAMPLE)


def test_health_ok_with_a_model(model_client: TestClient) -> None:
    body = model_client.get("/health").json()
    assert body["status"] == "ok"
    assert body["source"] == "model"
    assert body["model_version"] == "tiny-1"
    assert body["reason"] is None
    assert 0 <= body["uptime_seconds"] < 600


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
    assert c.get("/health").json()["reason"].startswith("starting")
    with c:
        r = c.get("/health/ready")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})


def _degraded(settings: Settings, logs: Any) -> tuple[dict[str, object], dict[str, object]]:
    with TestClient(create_app(settings)) as c:
        assert c.get("/health/ready").status_code == 200  # the fallback can answer: ready, though degraded
        health = c.get("/health").json()
        prediction = c.post("/predict", json=EXAMPLE).json()
    failures = [r for r in logs.records() if r["message"] == "model load failed"]
    assert len(failures) == 1
    assert failures[0]["level"] == "error"
    assert failures[0]["reason"] == health["reason"]
    return health, prediction


def _assert_fallback(health: dict[str, object], prediction: dict[str, object]) -> None:
    assert health["status"] == "degraded"
    assert health["source"] == "fallback"
    assert health["model_version"] == "fallback-1"
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
    card_file = directory / "model_card.json"
    card = json.loads(card_file.read_text())
    card.update(changes)
    card_file.write_text(json.dumps(card))


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


class _NaNPredictor:
    version = "broken-1"
    source = "model"

    def predict(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.full(x.shape[0], np.nan)


class _BrokenModelHolder(ModelHolder):
    def load(self) -> None:
        self.swap(_NaNPredictor())


def test_a_model_whose_canned_prediction_fails_is_replaced_by_the_fallback(fallback_settings: Settings) -> None:
    holder = _BrokenModelHolder(fallback_settings)
    with TestClient(create_app(fallback_settings, holder=holder)) as c:
        assert c.get("/health/ready").status_code == 200
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        assert health["reason"] == "model loaded but its canned prediction failed"
        assert c.post("/predict", json=EXAMPLE).json()["source"] == "fallback"


def test_swap_changes_the_answering_model(tiny_model_dir: Path, fallback_settings: Settings) -> None:
    from moviematch_ml.model import load_predictor

    with TestClient(create_app(fallback_settings)) as c:
        holder: ModelHolder = c.app.state.holder  # type: ignore[attr-defined]
        assert c.post("/predict", json=EXAMPLE).json()["source"] == "fallback"
        holder.swap(load_predictor(tiny_model_dir))
        body = c.post("/predict", json=EXAMPLE).json()
        assert (body["source"], body["model_version"]) == ("model", "tiny-1")
        assert c.get("/health").json()["status"] == "ok"


def test_a_broken_environment_also_falls_back(fallback_settings: Settings, logs: Any) -> None:
    def loader(path: Path) -> Any:
        raise OSError("libgomp.so.1: cannot open shared object file")

    with TestClient(create_app(fallback_settings, holder=ModelHolder(fallback_settings, loader=loader))) as c:
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
