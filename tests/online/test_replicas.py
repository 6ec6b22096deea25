"""Two service processes share one store: a rating taken by one replica personalises the other's answers."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from faults import RoundRobinProxy
from moviematch_ml.features import EXAMPLE
from probes import Answer, call
from realserver import request, start, stop

STATE_TTL_SECONDS = 1.0


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


class Balanced:
    """Requests through a round-robin proxy, each on a new connection, and which replica answered each."""

    def __init__(self, proxy: RoundRobinProxy) -> None:
        self.proxy = proxy
        self.lock = threading.Lock()  # one request at a time: the replica of each is told by the proxy's counts

    def call(self, method: str, path: str, body: object) -> tuple[Answer, int]:
        with self.lock:
            before = list(self.proxy.forwarded)
            answer = call(self.proxy.port, method, path, body)
            changed = [i for i, (was, now) in enumerate(zip(before, self.proxy.forwarded, strict=True)) if now != was]
        assert len(changed) == 1, (before, self.proxy.forwarded)
        return answer, changed[0]


@pytest.mark.slow
@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_replicas_behind_a_balancer_see_each_others_feedback_within_the_state_ttl(
    tiny_personalized_dir: Path, tmp_path: Path, db_url: str
) -> None:
    """Two ``serve`` processes on one PostgreSQL schema of their own behind a round-robin proxy, with
    STATE_TTL_SECONDS=1: ratings stored through one replica personalise its own next answer at once and the other's
    within STATE_TTL_SECONDS (+ a margin for the poll's own time), while background traffic through the proxy
    (anonymous and personalised requests) never sees a failed request."""
    env = {
        "MODEL_PATH": str(tiny_personalized_dir),
        "DATABASE_URL": db_url,
        "STATE_TTL_SECONDS": str(STATE_TTL_SECONDS),
    }
    servers = [start(tmp_path, "a", **env), start(tmp_path, "b", **env)]
    try:
        with RoundRobinProxy([s.port for s in servers]) as proxy:
            balanced = Balanced(proxy)
            fan = {**EXAMPLE, "user_id": "fan", "movie_id": 3}
            # Both replicas answer the user first from the six-feature model (and remember they know nothing of them).
            assert {balanced.call("POST", "/predict", fan)[1] for _ in range(2)} == {0, 1}

            failures: list[object] = []
            done = threading.Event()

            def background() -> None:
                bodies = [EXAMPLE, {**EXAMPLE, "user_id": "other", "movie_id": 1}]
                while not done.is_set():
                    for body in bodies:
                        answer, _ = balanced.call("POST", "/predict", body)
                        if answer.status != 200:
                            failures.append(answer)

            traffic = threading.Thread(target=background)
            traffic.start()
            try:
                ratings = [{"user_id": "fan", "movie_id": m, "rating": 10} for m in range(10)]
                stored, writer = balanced.call("POST", "/feedback", {"ratings": ratings})
                assert (stored.status, stored.body["accepted"]) == (201, 10)
                written = time.monotonic()
                seen: dict[int, float] = {}  # replica -> seconds until it answered the fan personally
                deadline = written + STATE_TTL_SECONDS + 3.0
                while len(seen) < 2 and time.monotonic() < deadline:
                    answer, replica = balanced.call("POST", "/predict", fan)
                    assert answer.status == 200, answer
                    if answer.body["source"] == "personalized":
                        seen.setdefault(replica, time.monotonic() - written)
                    else:
                        assert replica != writer, "the replica that stored the ratings answered without them"
            finally:
                done.set()
                traffic.join(30)
            assert set(seen) == {0, 1}, f"personalised answers within {STATE_TTL_SECONDS} s (+3 s) from {seen}"
            assert seen[1 - writer] <= STATE_TTL_SECONDS + 1.5, seen
            assert failures == []
            assert min(proxy.forwarded) > 5  # the traffic went to both replicas
    finally:
        for server in servers:
            stop(server)
