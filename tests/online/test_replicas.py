"""Two service processes share one store: a rating taken by one replica personalises the other's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moviematch_ml.features import EXAMPLE
from realserver import request, start, stop


def _predict(port: int, user: str) -> Any:
    status, _, answer = request(port, "POST", "/predict", {**EXAMPLE, "user_id": user, "movie_id": 3})
    assert status == 200
    return answer


def test_feedback_on_one_replica_reaches_the_other(tiny_personalized_dir: Path, tmp_path: Path, db_url: str) -> None:
    env = {"MODEL_PATH": str(tiny_personalized_dir), "DATABASE_URL": db_url, "STATE_TTL_SECONDS": "0"}
    a = start(tmp_path, "a", **env)
    b = start(tmp_path, "b", **env)
    try:
        assert _predict(b.port, "fan")["source"] == "model"  # nobody knows this user yet
        fan = [{"user_id": "fan", "movie_id": m, "rating": 10} for m in range(10)]
        critic = [{"user_id": "critic", "movie_id": m, "rating": 1} for m in range(10)]
        status, _, stored = request(a.port, "POST", "/feedback", {"ratings": fan + critic})
        assert (status, stored["accepted"]) == (201, 20)
        on_b = _predict(b.port, "fan"), _predict(b.port, "critic")
        assert [p["source"] for p in on_b] == ["personalized", "personalized"]
        assert on_b[0]["predicted_rating"] > on_b[1]["predicted_rating"]
        # The same ratings sent to the other replica are duplicates there too: one store, one count.
        status, _, again = request(b.port, "POST", "/feedback", {"ratings": fan})
        assert (status, again["duplicates"]) == (200, 10)
    finally:
        stop(a)
        stop(b)
