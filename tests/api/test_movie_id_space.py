"""Movie id spaces: the bundled personalised model learnt MovieLens ids; the app sends its own. With the app's space
(the default) no MovieLens movie state reaches an answer: only the user's own feedback and the store's movies."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, PERSONALIZED_DIR, read_card
from moviematch_ml.settings import Settings

MOVIES = (1, 318, 999999)  # MovieLens: Toy Story, The Shawshank Redemption, no movie at all


def _answers(client: TestClient, user: str) -> list[float]:
    out = []
    for movie in MOVIES:
        answer = client.post("/predict", json={"user_id": user, "movie_id": movie, **EXAMPLE})
        assert answer.status_code == 200, answer.text
        assert answer.json()["source"] == "personalized"
        out.append(answer.json()["predicted_rating"])
    return out


def _client(tmp_path: Path, **settings: object) -> TestClient:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return TestClient(create_app(Settings(database_url=url, **settings)))  # type: ignore[arg-type]


def _rate(client: TestClient, user: str, ratings: dict[int, float]) -> None:
    body = {"ratings": [{"user_id": user, "movie_id": m, "rating": r} for m, r in ratings.items()]}
    assert client.post("/feedback", json=body).is_success


def test_the_bundled_model_declares_movielens_ids() -> None:
    assert read_card(BUNDLED_MODEL_DIR / PERSONALIZED_DIR).movie_id_space == "movielens"


def test_movielens_state_never_answers_for_the_apps_ids(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        _rate(client, "u1", {2: 8.0, 3: 6.0, 4: 9.0})
        first = _answers(client, "u1")
        # The same user and features: the app's movies 1, 318 and 999999 are three unknown movies alike.
        assert first[0] == first[1] == first[2]
        # What the store's movies received still counts: other users' ratings of 318 move its answer (read by the
        # next worker to start: a running one reads the movies' totals at most every 30 seconds).
        _rate(client, "u2", {318: 2.0})
        _rate(client, "u3", {318: 2.0})
    with _client(tmp_path) as client:
        second = _answers(client, "u1")
        assert second[0] == second[2] == first[0]
        assert second[1] != second[0]


def test_in_the_models_own_space_its_movie_state_applies(tmp_path: Path) -> None:
    with _client(tmp_path, movie_id_space="movielens") as client:
        _rate(client, "u1", {2: 8.0, 3: 6.0, 4: 9.0})
        answers = _answers(client, "u1")
        # The MovieLens movie state tells these movies apart (the collision the app's ids would fall into).
        assert len(set(answers)) == 3
