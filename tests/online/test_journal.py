"""The prediction log: queued on the request path, written in bulk by a background task, bounded, pruned."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator, Sequence

import numpy as np
import orjson
import pytest
from sqlalchemy import select

from moviematch_ml.features import EXAMPLE, FEATURE_NAMES, example_matrix
from moviematch_ml.online.journal import Entry, PredictionLog, prune
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.online.tables import prediction_log_table

X2 = np.array([[1.0, 7.5, 100.0, 0.0, 3.0, 9.5], [2.0, 6.0, 50.0, 1.0, 10.0, 1.25]])


@pytest.fixture
def store(db_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore.from_url(db_url)
    yield s
    s.close()


def _batch(request_id: str = "a" * 32, *, at: float = 1000.0, user: str | int | None = "u1") -> Entry:
    return Entry(request_id, at, "predict_batch", "b", "model-x", user, [10, "m2"], X2, [6.5, 8.25], "mixed",
                 ["personalized", "model"], True, 1)  # fmt: skip


def _rows(store: FeedbackStore) -> list[dict[str, object]]:
    with store.engine.connect() as conn:
        return [
            dict(r._mapping) for r in conn.execute(select(prediction_log_table).order_by(prediction_log_table.c.id))
        ]


def test_entries_are_written_as_one_row_per_request(store: FeedbackStore) -> None:
    log = PredictionLog(max_rows=100)
    log.add(_batch())
    log.add(Entry("c" * 32, 1001.0, "predict", "champion", "model-y", None, [None], example_matrix(), [7.909],
                  "fallback", None))  # fmt: skip
    assert log.queued == 3
    log.write(store, log.take())
    assert (log.queued, log.written, log.dropped) == (0, 3, 0)
    batch, one = _rows(store)
    assert {k: batch[k] for k in ("request_id", "endpoint", "variant", "model_version", "user_id", "n")} == {
        "request_id": "a" * 32,
        "endpoint": "predict_batch",
        "variant": "b",
        "model_version": "model-x",
        "user_id": "u1",
        "n": 2,
    }
    assert (batch["logged_at"], batch["ranked"], batch["top_k"], batch["source"]) == (1000.0, True, 1, "mixed")
    assert orjson.loads(str(batch["movie_ids"])) == [10, "m2"]  # the ids as sent, with their JSON types
    assert orjson.loads(str(batch["row_sources"])) == ["personalized", "model"]
    features = np.frombuffer(bytes(batch["features"]), dtype="<f8").reshape(-1, len(FEATURE_NAMES))  # type: ignore[call-overload]
    np.testing.assert_array_equal(features, X2)
    np.testing.assert_array_equal(np.frombuffer(bytes(batch["predictions"]), dtype="<f8"), [6.5, 8.25])  # type: ignore[call-overload]
    assert (one["user_id"], one["row_sources"], one["ranked"], one["top_k"]) == (None, None, False, None)
    assert orjson.loads(str(one["movie_ids"])) == [None]
    assert list(np.frombuffer(bytes(one["features"]), dtype="<f8")) == [EXAMPLE[n] for n in FEATURE_NAMES]  # type: ignore[call-overload]


def test_a_queued_predict_entry_is_out_of_the_garbage_collectors_sight() -> None:
    # Under load thousands wait in the queue for up to a second: as objects, every collection of the collector's
    # older generations walked them (docs/operations.md, Overload). A /predict's is a tuple of atomic values.
    log = PredictionLog(max_rows=10)
    log.add(Entry("f" * 32, 1.0, "predict", "champion", "v", 7, (42,), example_matrix(), (7.5,), "model", None))
    gc.collect()
    (queued,) = log.take()
    assert not gc.is_tracked(queued)
    assert Entry(*queued).movie_ids == (42,)


def test_a_full_queue_drops_and_counts_never_blocks() -> None:
    dropped: list[int] = []
    log = PredictionLog(max_rows=3)
    log.on_dropped = dropped.append
    log.add(_batch("1" * 32))  # 2 rows
    log.add(_batch("2" * 32))  # 2 more would make 4 > 3: dropped whole
    log.add(Entry("3" * 32, 1.0, "predict", "champion", "v", None, [None], example_matrix(), [1.0], "model", None))
    assert (log.queued, log.dropped, dropped) == (3, 2, [2])
    assert [Entry(*e).request_id for e in log.take()] == ["1" * 32, "3" * 32]
    assert log.queued == 0


def test_a_cached_answer_is_decoded_when_written(store: FeedbackStore) -> None:
    def decode(body: bytes) -> tuple[np.ndarray, Sequence[str | int | None]]:
        obj = orjson.loads(body)
        return np.array([[float(obj[n]) for n in FEATURE_NAMES]]), [obj.get("movie_id")]

    log = PredictionLog(max_rows=10, decode=decode)
    body = orjson.dumps({**EXAMPLE, "movie_id": 5})
    log.add(Entry("d" * 32, 5.0, "predict", "champion", "v", None, None, None, [7.9], "model", None, body=body))
    # A body that no longer decodes (it was answered from the cache, so it once did): NaN features, not a lost row.
    log.add(Entry("e" * 32, 6.0, "predict", "champion", "v", None, None, None, [7.9], "model", None, body=b"{"))
    log.write(store, log.take())
    first, second = _rows(store)
    assert list(np.frombuffer(bytes(first["features"]), dtype="<f8")) == [EXAMPLE[n] for n in FEATURE_NAMES]  # type: ignore[call-overload]
    assert orjson.loads(str(first["movie_ids"])) == [5]
    assert np.isnan(np.frombuffer(bytes(second["features"]), dtype="<f8")).all()  # type: ignore[call-overload]


def test_the_background_task_writes_what_is_queued_and_flush_writes_the_rest(store: FeedbackStore) -> None:
    async def scenario() -> int:
        log = PredictionLog(max_rows=1000, share=1.0)
        task = asyncio.create_task(log.run(store, interval=0.01))
        log.add(_batch("1" * 32))
        deadline = time.monotonic() + 10
        while log.written < 2:
            assert time.monotonic() < deadline, "not written in time"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log.add(_batch("2" * 32))  # after the task stopped: what a clean shutdown writes
        await log.flush(store)
        return log.written

    assert asyncio.run(scenario()) == 4
    assert [r["request_id"] for r in _rows(store)] == ["1" * 32, "2" * 32]


def test_a_worker_out_of_its_share_of_time_drops_instead_of_queueing(store: FeedbackStore) -> None:
    now = [0.0]

    class SlowStore:
        """A store whose every write takes a second of the (fake) clock."""

        def log_predictions(self, rows: Sequence[object]) -> None:
            now[0] += 1.0

    log = PredictionLog(max_rows=1000, share=0.1, clock=lambda: now[0])

    async def one_period() -> None:
        task = asyncio.create_task(log.run(SlowStore(), interval=0.0))  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while log.paused_until == 0.0:  # the write is done and its cost accounted for
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    log.add(_batch())
    asyncio.run(one_period())
    assert log.written == 2
    # The write took 1 s at a 10% share: for 9 s more nothing is queued (counted as dropped), then again.
    log.add(_batch())
    assert (log.queued, log.dropped) == (0, 2)
    now[0] += 9.0
    log.add(_batch())
    assert log.queued == 2


def test_a_store_that_cannot_write_counts_the_rows_dropped(tmp_path: object) -> None:
    broken = FeedbackStore.from_url("sqlite:///" + str(tmp_path) + "/missing/x.sqlite3", migrate=False)
    log = PredictionLog(max_rows=10)
    log.add(_batch())

    async def scenario() -> None:
        task = asyncio.create_task(log.run(broken, interval=0.0))
        deadline = time.monotonic() + 10
        while log.dropped < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert (log.written, log.dropped) == (0, 2)


def test_prune_deletes_old_rows_in_chunks(store: FeedbackStore) -> None:
    log = PredictionLog(max_rows=100)
    for k in range(25):
        log.add(_batch(f"{k:032d}", at=float(k)))
    log.write(store, log.take())
    assert prune(store, 20.0, chunk=7) == 20  # rows 0..19, in chunks of 7, 7, 6
    assert [r["logged_at"] for r in _rows(store)] == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert prune(store, 20.0) == 0
