"""The feedback store failing under a running service: hung, slow, dead, full, read-only, or never opened.

Each fault is reproduced against the real server (``moviematch-ml serve``) or the app in-process, and each test
says what the client gets, how long it waits, that the service recovers without a restart, and that no rating it
acknowledged is lost (the ledger of tests/probes.py retries the refused ones with their keys and counts the rows).
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from faults import PostgresServer, SmallDisk, TcpProxy, sqlite_read_only_url, with_port
from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.settings import Settings
from probes import Answer, LiveProbe, Ratings, call, wait_until
from realserver import Server, start, stop

READ_TIMEOUT = 0.5  # STORE_READ_TIMEOUT of the servers here (the default)
WRITE_TIMEOUT = 1.0  # STORE_WRITE_TIMEOUT of the servers here (10 s by default: shortened for the tests)
MARGIN = 0.5  # seconds on top of a timeout that a request may take on a busy machine
RECOVERY = 15.0  # seconds a recovered store gets before the service must use it again
POSTGRES_ONLY = pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


def _serve(tmp_path: Path, model_dir: Path, database_url: str, **env: str) -> Server:
    # As deployed, except: a worker keeps at most STATE_CACHE_USERS=20 users, so that at its start it builds ahead
    # only those of the latest 20 ratings, and the other users of _prestore_fans are read from the store when first
    # asked for (the requests these tests need: they must read the store while it fails).
    return start(
        tmp_path,
        MODEL_PATH=str(model_dir),
        DATABASE_URL=database_url,
        STATE_CACHE_USERS="20",
        STORE_READ_TIMEOUT=str(READ_TIMEOUT),
        STORE_WRITE_TIMEOUT=str(WRITE_TIMEOUT),
        **env,
    )


def _prestore_fans(database_url: str, users: range) -> None:
    """Migrate the store and give each user ``fan-<n>`` of ``users`` three ratings of 10, as a previous run of the
    service would have: users the store knows and a new worker has not read."""
    store = FeedbackStore.from_url(database_url)
    try:
        store.add(
            [Feedback(f"fan-{n}-{m}", f"fan-{n}", str(m), 10.0, 1_700_000_000.0, None) for n in users for m in range(3)]
        )
    finally:
        store.close()


def _predict(port: int, user: str) -> Answer:
    return call(port, "POST", "/predict", {**EXAMPLE, "user_id": user, "movie_id": 3})


def _predict_batch(port: int, user: str) -> Answer:
    movies = [{"movie_id": m, **EXAMPLE} for m in range(5)]
    return call(port, "POST", "/predict-batch", {"user_id": user, "movies": movies})


def _check_six_feature_answers(port: int, users: list[str]) -> None:
    """/predict and /predict-batch for each user (the store knows them, this worker has not read them yet): 200
    from the six-feature model, within the store-read timeout."""
    for user in users:
        one = _predict(port, user)
        assert (one.status, one.body["source"]) == (200, "model"), one
        assert one.seconds < READ_TIMEOUT + MARGIN, one
        batch = _predict_batch(port, user)
        assert batch.status == 200, batch
        assert {p["source"] for p in batch.body["predictions"]} == {"model"}, batch
        assert batch.seconds < READ_TIMEOUT + MARGIN, batch


def _refused_in_time(answers: list[Answer], timeout: float) -> None:
    """Every answer is the store's 503, within ``timeout`` (+ MARGIN)."""
    assert [a.status for a in answers] == [503] * len(answers), answers
    assert max(a.seconds for a in answers) < timeout + MARGIN, [a.seconds for a in answers]


def _personalised_again(port: int, users: itertools.count[int]) -> float:
    """Seconds until a user the worker has not read yet is answered by the personalised model again."""
    return wait_until(
        lambda: _predict(port, f"fan-{next(users)}").body["source"] == "personalized",
        RECOVERY,
        "personalised answers after the store came back",
        every=0.2,
    )


# --- defect 1: a hung database froze a worker -------------------------------------------------------------------------


@pytest.mark.slow
@POSTGRES_ONLY
def test_a_hung_database_costs_feedback_only_and_recovers(
    tiny_personalized_dir: Path, tmp_path: Path, db_url: str, postgres_proxy: TcpProxy
) -> None:
    """Defect 1 (a hung database froze the worker: /health/live timed out 15 times of 15 with no traffic at all) and
    the fault "database paused": PostgreSQL behind a paused proxy. The worker's event loop never waits for it:
    /health/live answers in under 50 ms, idle and under personalised traffic; /predict and /predict-batch for users
    it must read answer 200 from the six-feature model within STORE_READ_TIMEOUT; /feedback answers 503 with
    Retry-After after STORE_WRITE_TIMEOUT. Resumed, it personalises again without a restart, and every rating it
    acknowledged, and every refused one sent again with its key, is in the store once."""
    _prestore_fans(db_url, range(100))
    server = _serve(tmp_path, tiny_personalized_dir, with_port(db_url, postgres_proxy.port))
    try:
        port = server.port
        ledger = Ratings(port)
        assert [a.status for a in ledger.send(3)] == [201] * 3
        assert _predict(port, "fan-0").body["source"] == "personalized"

        postgres_proxy.pause()
        with LiveProbe(port) as idle:  # no other traffic: the worker's background tasks meet the hung database
            idle.wait_for(20)
        idle.check(20)
        # Its change-feed poll did hit the hung database meanwhile (and gave up after its timeout).
        server.wait_for_log("user states not kept up to date")

        with LiveProbe(port) as busy:
            _check_six_feature_answers(port, [f"fan-{n}" for n in range(1, 11)])
            _refused_in_time(ledger.send(2), WRITE_TIMEOUT)
            busy.wait_for(10)
        busy.check(10)

        postgres_proxy.resume()
        _personalised_again(port, itertools.count(11))
        ledger.retry()
        assert [a.status for a in ledger.send(2)] == [201] * 2
        ledger.check_stored(db_url)
    finally:
        stop(server)


@pytest.mark.slow
@POSTGRES_ONLY
def test_a_slow_database_slows_only_the_reads_it_serves(
    tiny_personalized_dir: Path, tmp_path: Path, db_url: str, postgres_proxy: TcpProxy
) -> None:
    """Defect 1, its other half: with 10 ms added to every packet to and from PostgreSQL, /predict for users not yet
    read fell to 21 req/s and /health/live to 879 ms at the median (the reads ran on the event loop). Now the reads
    run beside the loop: 8 clients asking for 8 new users at a time keep well above that (a generous floor, not a
    benchmark), every answer is a 200, and /health/live stays under 50 ms."""
    _prestore_fans(db_url, range(2000))
    server = _serve(tmp_path, tiny_personalized_dir, with_port(db_url, postgres_proxy.port))
    try:
        port = server.port
        postgres_proxy.delay(0.01)
        users = itertools.count()
        statuses: list[int] = []
        sources: list[str] = []
        lock = threading.Lock()
        seconds = 3.0
        until = time.monotonic() + seconds

        def client() -> None:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                while time.monotonic() < until:
                    body = orjson.dumps({**EXAMPLE, "user_id": f"fan-{next(users)}", "movie_id": 3})
                    conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    answer = orjson.loads(response.read())
                    with lock:
                        statuses.append(response.status)
                        sources.append(answer["source"])
            finally:
                conn.close()

        with LiveProbe(port) as probe:
            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert set(statuses) == {200}
        rate = len(statuses) / seconds
        assert rate > 40, (
            f"{rate:.0f} req/s for users read from a database 10 ms away ({sources.count('personalized')} personalised)"
        )
        assert "personalized" in sources  # the reads did go to the database and come back
        probe.check(10)
    finally:
        stop(server)


# --- defect 2: a store that cannot be opened gave 500 -----------------------------------------------------------------


def _check_store_cannot_be_opened(model_dir: Path, database_url: str, known_source: str) -> None:
    """In-process: /predict and /predict-batch for a user the store does not know and for ``fan-0``, whom it knows
    (answered by ``known_source``), are 200; /feedback is 503 with Retry-After."""
    settings = Settings(model_path=model_dir, database_url=database_url)
    with TestClient(create_app(settings)) as client:
        for user, source in (("stranger", "model"), ("fan-0", known_source)):
            one = client.post("/predict", json={**EXAMPLE, "user_id": user, "movie_id": 1})
            assert (one.status_code, one.json()["source"]) == (200, source), one.text
            movies = [{"movie_id": m, **EXAMPLE} for m in range(3)]
            batch = client.post("/predict-batch", json={"user_id": user, "movies": movies})
            assert batch.status_code == 200, batch.text
            assert {p["source"] for p in batch.json()["predictions"]} == {source}
        refused = client.post("/feedback", json={"user_id": "u", "movie_id": 1, "rating": 5})
        assert (refused.status_code, refused.json()["error"]) == (503, "store_unavailable")
        assert refused.headers["retry-after"] == "1"


def test_a_sqlite_file_in_a_missing_directory_costs_feedback_only(tiny_personalized_dir: Path, tmp_path: Path) -> None:
    """Defect 2: DATABASE_URL=sqlite:////nonexistent-dir/x.sqlite3 made /predict and /predict-batch with a user_id
    answer 500 (the driver's OperationalError escaped ``except SQLAlchemyError``). The six-feature model answers
    them; only /feedback is refused (503)."""
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.sqlite3'}"
    _check_store_cannot_be_opened(tiny_personalized_dir, url, known_source="model")


@POSTGRES_ONLY
def test_a_postgres_that_is_down_costs_feedback_only(
    tiny_personalized_dir: Path, db_url: str, postgres_proxy: TcpProxy
) -> None:
    """Defect 2 with PostgreSQL down (19 requests of 19 answered 500): the proxy in front of it killed, so every
    connection is refused, from the start of the service on."""
    _prestore_fans(db_url, range(1))
    postgres_proxy.kill()
    _check_store_cannot_be_opened(tiny_personalized_dir, with_port(db_url, postgres_proxy.port), known_source="model")


def test_a_read_only_mount_costs_feedback_only(tiny_personalized_dir: Path, small_disk: SmallDisk) -> None:
    """Defect 2 with a read-only SQLite store (500 before): its file system mounted read-only, where a WAL database
    cannot even be read (no -shm file can be made). The six-feature model answers every prediction."""
    url = f"sqlite:///{small_disk.path / 'feedback.sqlite3'}"
    _prestore_fans(url, range(1))
    small_disk.read_only()
    _check_store_cannot_be_opened(tiny_personalized_dir, url, known_source="model")


def test_a_read_only_sqlite_url_still_personalises(tiny_personalized_dir: Path, tmp_path: Path) -> None:
    """A store opened read-only by its URL (SQLite's mode=ro): every write fails, so /feedback is refused (503 with
    Retry-After), while reads still work: a user the store knows gets personalised answers, others the six-feature
    model's."""
    path = tmp_path / "ro.sqlite3"
    _prestore_fans(f"sqlite:///{path}", range(1))
    _check_store_cannot_be_opened(tiny_personalized_dir, sqlite_read_only_url(path), known_source="personalized")


# --- the other faults of the store: killed, full disk, read-only disk -------------------------------------------------


@pytest.mark.slow
def test_a_killed_database_is_refused_at_once_and_nothing_acknowledged_is_lost(
    tiny_personalized_dir: Path, tmp_path: Path, dedicated_postgres: PostgresServer
) -> None:
    """The fault "database killed": a PostgreSQL of the test's own SIGKILLed (the postmaster and its backends at
    once) under a running service. Connections are refused, so /feedback answers 503 at once (well before
    STORE_WRITE_TIMEOUT) and predictions for users to read come from the six-feature model; restarted on the same
    data, the service writes and personalises again without a restart of its own, and loses no rating."""
    url = dedicated_postgres.url
    _prestore_fans(url, range(100))
    server = _serve(tmp_path, tiny_personalized_dir, url)
    try:
        port = server.port
        ledger = Ratings(port)
        assert [a.status for a in ledger.send(3)] == [201] * 3

        dedicated_postgres.kill()
        _refused_in_time(ledger.send(3), 0.0)  # refused, not waited for
        _check_six_feature_answers(port, [f"fan-{n}" for n in range(5)])

        dedicated_postgres.start()
        wait_until(lambda: ledger.send(1)[0].status == 201, RECOVERY, "feedback stored after the restart", every=0.2)
        _personalised_again(port, itertools.count(5))
        ledger.retry()
        ledger.check_stored(url)
    finally:
        stop(server)


@pytest.mark.slow
def test_a_full_disk_refuses_feedback_until_space_is_freed(
    tiny_personalized_dir: Path, tmp_path: Path, small_disk: SmallDisk
) -> None:
    """The fault "disk full": the SQLite store on a 1 MiB file system that fills up. Writes fail with SQLITE_FULL:
    /feedback answers 503 at once, and every prediction still 200 (reads need no space, so a user the worker has not
    read yet is personalised). Space freed, feedback is stored again without a restart, and nothing acknowledged is
    lost."""
    url = f"sqlite:///{small_disk.path / 'feedback.sqlite3'}"
    _prestore_fans(url, range(10))
    server = _serve(tmp_path, tiny_personalized_dir, url)
    try:
        port = server.port
        ledger = Ratings(port)
        assert [a.status for a in ledger.send(3)] == [201] * 3

        assert small_disk.fill() > 0
        _refused_in_time(ledger.send(3), 0.0)
        for user in ("fan-0", "fan-1"):
            assert _predict(port, user).body["source"] == "personalized"
            assert _predict(port, "stranger").body["source"] == "model"

        small_disk.free()
        wait_until(lambda: ledger.send(1)[0].status == 201, RECOVERY, "feedback stored after space was freed")
        ledger.retry()
        ledger.check_stored(url)
    finally:
        stop(server)


@pytest.mark.slow
def test_a_read_only_disk_refuses_feedback_until_writable(
    tiny_personalized_dir: Path, tmp_path: Path, small_disk: SmallDisk
) -> None:
    """The fault "read-only store": the SQLite store's file system mounted read-only before the service starts (a
    WAL database cannot even be read there: no -shm file can be made). The service starts anyway, answers every
    prediction from the six-feature model and refuses /feedback (503) at once; remounted writable, it writes and
    personalises without a restart, and nothing acknowledged is lost."""
    url = f"sqlite:///{small_disk.path / 'feedback.sqlite3'}"
    _prestore_fans(url, range(20))
    small_disk.read_only()
    server = _serve(tmp_path, tiny_personalized_dir, url)
    try:
        port = server.port
        _check_six_feature_answers(port, [f"fan-{n}" for n in range(3)])
        ledger = Ratings(port)
        _refused_in_time(ledger.send(3), 0.0)

        small_disk.writable()
        wait_until(lambda: ledger.send(1)[0].status == 201, RECOVERY, "feedback stored once writable")
        _personalised_again(port, itertools.count(3))
        ledger.retry()
        ledger.check_stored(url)
    finally:
        stop(server)
