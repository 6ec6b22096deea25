"""Personalised answers through the HTTP API: known users get the personalised model, others the six features."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import TinyVersions
from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.store import FeedbackStore, make_engine
from moviematch_ml.settings import Settings


@pytest.fixture
def pclient(tiny_personalized_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_path=tiny_personalized_dir,
        database_url=f"sqlite:///{tmp_path / 'p.sqlite3'}",
        state_ttl_seconds=60,  # long on purpose: this replica must forget a user it just stored ratings for
    )
    with TestClient(create_app(settings)) as c:
        yield c


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def test_third_prediction_reflects_the_first_two_ratings(pclient: TestClient, tiny: TinyVersions) -> None:
    body = {**EXAMPLE, "user_id": 77, "movie_id": 5}
    first = pclient.post("/predict", json=body).json()
    assert first["source"] == "model"
    pclient.post("/feedback", json={"user_id": 77, "movie_id": 1, "rating": 10})
    second = pclient.post("/predict", json=body).json()
    pclient.post("/feedback", json={"user_id": 77, "movie_id": 2, "rating": 10})
    third = pclient.post("/predict", json=body).json()
    assert second["source"] == third["source"] == "personalized"
    # One model, whichever of its parts answered: its version names both parts' bytes.
    assert first["model_version"] == third["model_version"] == tiny.model_with_personalized
    assert first["variant"] == third["variant"] == "champion"
    # Two ratings of 10 pull the prediction up further than one.
    assert third["predicted_rating"] > second["predicted_rating"]


def test_batch_mixes_sources_and_keeps_order(pclient: TestClient, tiny: TinyVersions) -> None:
    pclient.post("/feedback", json={"ratings": [{"user_id": "u1", "movie_id": m, "rating": 2} for m in range(5)]})
    movies = [{"movie_id": m, **EXAMPLE} for m in (3, 4, 5)]
    known = pclient.post("/predict-batch", json={"user_id": "u1", "movies": movies}).json()
    assert [p["movie_id"] for p in known["predictions"]] == [3, 4, 5]
    assert {p["source"] for p in known["predictions"]} == {"personalized"}
    assert (known["model_version"], known["variant"]) == (tiny.model_with_personalized, "champion")
    assert "personalized_model_version" not in known
    anonymous = pclient.post("/predict-batch", json={"movies": movies}).json()
    assert {p["source"] for p in anonymous["predictions"]} == {"model"}
    assert anonymous["model_version"] == tiny.model_with_personalized
    # A harsh user is predicted below what the six features alone say.
    for k, a in zip(known["predictions"], anonymous["predictions"], strict=True):
        assert k["predicted_rating"] < a["predicted_rating"]


def test_root_reports_the_personalised_model(pclient: TestClient, tiny: TinyVersions) -> None:
    personalized = pclient.get("/").json()["models"]["personalized"]
    assert (personalized["status"], personalized["version"]) == ("ok", tiny.personalized)
    assert pclient.get("/health").json()["models"]["personalized"]["version"] == tiny.personalized


class WatchedStore(FeedbackStore):
    """The feedback store, noting whose ratings were read (a user's view being built) and the change feed's polls."""

    def __init__(self, url: str) -> None:
        super().__init__(make_engine(url))
        self.read_for: list[str] = []
        self.polls = 0
        self.lock = threading.Lock()

    def user_ratings(self, user_id: str) -> list[tuple[str, float, float]]:
        with self.lock:
            self.read_for.append(user_id)
        return super().user_ratings(user_id)

    def last_row_id(self) -> int:
        with self.lock:
            self.polls += 1
        return super().last_row_id()

    def changed_rows(self, after_id: int) -> list[tuple[int, str]]:
        with self.lock:
            self.polls += 1
        return super().changed_rows(after_id)


@pytest.mark.parametrize("share", [0.5, 0.0], ids=["warm-ahead", "off"])
def test_each_worker_builds_the_state_of_users_who_just_rated(
    tiny_personalized_dir: Path, tmp_path: Path, share: float
) -> None:
    # A rating stored by another replica (here: straight into the database) reaches this one through the change
    # feed, which the worker's background task polls; with STATE_WARM_SHARE above 0 the task also builds the user's
    # state before any request asks for it. Off, nothing is built until a request does.
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    settings = Settings(
        model_path=tiny_personalized_dir, database_url=url, state_ttl_seconds=0.02, state_warm_share=share
    )
    store = WatchedStore(url)
    app = create_app(settings, store=store)
    personalizer = app.state.user_views
    with TestClient(app) as c:
        assert wait_until(lambda: personalizer.warm_ahead, timeout=5.0)  # the background task runs
        assert wait_until(lambda: store.polls > 0, timeout=5.0)  # its first poll: where the feed starts
        FeedbackStore.from_url(url).add([Feedback("other-1", "9", "1", 8.0, 1_000.0, None)])
        built_ahead = wait_until(lambda: "9" in store.read_for, timeout=5.0 if share > 0 else 0.3)
        assert built_ahead is (share > 0)
        # The next request for the user finds the view built ahead, or builds it now.
        answer = c.post("/predict", json={**EXAMPLE, "user_id": 9, "movie_id": 5}).json()
        assert answer["source"] == "personalized"
        assert store.read_for.count("9") == 1
    assert personalizer.warm_ahead is False  # the lifespan stopped the task at shutdown
