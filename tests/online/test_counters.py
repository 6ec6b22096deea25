"""Metric slots: counters, gauges and histograms in one process, summed over processes through a directory, and
updates from many threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from moviematch_ml.online.counters import (
    Calls,
    Family,
    Registry,
    clear_directory,
    read_directory,
    to_metrics,
)

COUNTER = Family("t_requests_total", "Requests.", "counter", ("route",))
GAUGE = Family("t_ready", "Ready.", "gauge", ("model",))
MEMORY = Family("t_memory_bytes", "Memory.", "gauge", aggregate="sum")
INFO = Family("t_info", "Info.", "gauge", ("version",), only_set=True)
HISTOGRAM = Family("t_seconds", "Seconds.", "histogram", ("op",), (0.1, 1.0))
CALL_SECONDS = Family("t_call_seconds", "Calls.", "histogram", ("operation",), (0.5,))
CALL_FAILURES = Family("t_call_failures_total", "Failures.", "counter", ("operation",))
FAMILIES = (COUNTER, GAUGE, MEMORY, INFO, HISTOGRAM, CALL_SECONDS, CALL_FAILURES)


def scrape(registry: Registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What Prometheus would read: every sample of the text format, by name and labels."""

    class Collector:
        def collect(self) -> Iterator[object]:
            return to_metrics(FAMILIES, registry.totals())

    prom = CollectorRegistry(auto_describe=False)
    prom.register(Collector())  # type: ignore[arg-type]
    from prometheus_client import generate_latest

    text = generate_latest(prom).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counter_gauge_and_histogram_in_one_process() -> None:
    registry = Registry(FAMILIES)
    registry.counter(COUNTER, "/a").inc()
    registry.counter(COUNTER, "/a").inc(2)  # the same child
    registry.gauge(GAUGE, "six").set(1)
    seconds = registry.histogram(HISTOGRAM, "get")
    for value in (0.05, 0.1, 0.5, 3.0):  # le is "less than or equal": 0.1 counts in the 0.1 bucket
        seconds.observe(value)
    got = scrape(registry)
    assert got[("t_requests_total", (("route", "/a"),))] == 3
    assert got[("t_ready", (("model", "six"),))] == 1
    assert got[("t_seconds_bucket", (("le", "0.1"), ("op", "get")))] == 2
    assert got[("t_seconds_bucket", (("le", "1.0"), ("op", "get")))] == 3
    assert got[("t_seconds_bucket", (("le", "+Inf"), ("op", "get")))] == 4
    assert got[("t_seconds_count", (("op", "get"),))] == 4
    assert got[("t_seconds_sum", (("op", "get"),))] == pytest.approx(3.65)


def test_only_set_gauges_leave_out_their_zero_children() -> None:
    registry = Registry(FAMILIES)
    registry.gauge(INFO, "v1").set(1)
    registry.gauge(INFO, "v1").set(0)  # replaced
    registry.gauge(INFO, "v2").set(1)
    got = scrape(registry)
    assert ("t_info", (("version", "v2"),)) in got
    assert ("t_info", (("version", "v1"),)) not in got


def test_a_block_is_consecutive_and_refuses_to_overlap() -> None:
    registry = Registry(FAMILIES)
    base = registry.block(COUNTER, [("/a",), ("/b",), ("/c",)])
    assert base is not None
    assert registry.block(COUNTER, [("/a",), ("/b",), ("/c",)]) == base  # the same block again
    registry.values[base + 1] += 4  # by offset: /b
    assert scrape(registry)[("t_requests_total", (("route", "/b"),))] == 4
    with pytest.raises(ValueError, match="not as one block"):
        registry.block(COUNTER, [("/b",), ("/d",)])
    with pytest.raises(ValueError, match="takes labels"):
        registry.counter(COUNTER)


def test_past_the_capacity_updates_go_nowhere_and_nothing_breaks() -> None:
    registry = Registry(FAMILIES, capacity=4)
    registry.histogram(HISTOGRAM, "a")  # 4 slots: both buckets, +Inf and the sum
    registry.counter(COUNTER, "/x").inc()  # no room: counted nowhere
    registry.histogram(HISTOGRAM, "b").observe(1.0)
    got = scrape(registry)
    assert ("t_requests_total", (("route", "/x"),)) not in got
    assert ("t_seconds_count", (("op", "b"),)) not in got
    assert got[("t_seconds_count", (("op", "a"),))] == 0


def test_calls_time_each_call_and_count_failures() -> None:
    registry = Registry(FAMILIES)
    calls = Calls(registry, CALL_SECONDS, CALL_FAILURES, ["read", "write"])
    with calls.time("read"):
        pass
    with pytest.raises(RuntimeError), calls.time("write"):
        raise RuntimeError("down")
    got = scrape(registry)
    assert got[("t_call_seconds_count", (("operation", "read"),))] == 1
    assert got[("t_call_seconds_count", (("operation", "write"),))] == 1
    assert got[("t_call_failures_total", (("operation", "read"),))] == 0  # there from the start, at 0
    assert got[("t_call_failures_total", (("operation", "write"),))] == 1


def test_increments_from_many_threads_are_not_lost() -> None:
    # The module relies on one memoryview increment being atomic under the GIL: switch threads as often as
    # CPython allows and count.
    registry = Registry(FAMILIES)
    child = registry.counter(COUNTER, "/busy")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:

        def work() -> None:
            for _ in range(50_000):
                child.inc()

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert scrape(registry)[("t_requests_total", (("route", "/busy"),))] == 400_000


# --- several processes: one directory ----------------------------------------------------------------------------

OTHER_PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from online.test_counters import COUNTER, FAMILIES, GAUGE, HISTOGRAM, MEMORY
    from moviematch_ml.online.counters import Registry

    registry = Registry(FAMILIES, Path({directory!r}))
    registry.counter(COUNTER, "/a").inc(5)
    registry.counter(COUNTER, "/other").inc(1)
    registry.gauge(GAUGE, "six").set(3)
    registry.gauge(MEMORY).set(100)
    registry.histogram(HISTOGRAM, "get").observe(0.5)
    print("ready", flush=True)
    sys.stdin.readline()  # stays alive until told
    """
)


def other_process(directory: Path) -> subprocess.Popen[str]:
    code = OTHER_PROCESS.format(tests=str(Path(__file__).parents[1]), directory=str(directory))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_directory_sums_counters_and_takes_gauges_from_live_processes(tmp_path: Path) -> None:
    here = Registry(FAMILIES, tmp_path)
    here.counter(COUNTER, "/a").inc(2)
    here.gauge(GAUGE, "six").set(1)
    here.gauge(MEMORY).set(50)
    here.histogram(HISTOGRAM, "get").observe(0.05)
    proc = other_process(tmp_path)
    try:
        live = scrape(here)
        assert live[("t_requests_total", (("route", "/a"),))] == 2 + 5
        assert live[("t_requests_total", (("route", "/other"),))] == 1
        assert live[("t_ready", (("model", "six"),))] == 3  # the maximum of 1 and 3
        assert live[("t_memory_bytes", ())] == 150  # the sum of 50 and 100
        assert live[("t_seconds_bucket", (("le", "0.1"), ("op", "get")))] == 1
        assert live[("t_seconds_count", (("op", "get"),))] == 2
        assert len(read_directory(tmp_path)) == 2
    finally:
        proc.communicate("\n", timeout=30)  # it stops, and its pipes are closed
    # The other process is gone: its counts stay (a counter never goes down), its gauges leave.
    gone = scrape(here)
    assert gone[("t_requests_total", (("route", "/a"),))] == 7
    assert gone[("t_seconds_count", (("op", "get"),))] == 2
    assert gone[("t_ready", (("model", "six"),))] == 1
    assert gone[("t_memory_bytes", ())] == 50
    assert sorted(p.live for p in read_directory(tmp_path)) == [False, True]


def test_a_closed_registry_keeps_its_counts_and_drops_its_gauges(tmp_path: Path) -> None:
    reader = Registry(FAMILIES, tmp_path)
    closing = Registry(FAMILIES, tmp_path)
    closing.counter(COUNTER, "/a").inc(4)
    closing.gauge(GAUGE, "six").set(1)
    closing.close()
    got = scrape(reader)
    assert got[("t_requests_total", (("route", "/a"),))] == 4
    assert ("t_ready", (("model", "six"),)) not in got


def test_clearing_the_directory_removes_only_slot_files(tmp_path: Path) -> None:
    Registry(FAMILIES, tmp_path).counter(COUNTER, "/a").inc()
    (tmp_path / "notes.txt").write_text("keep me")
    assert len(read_directory(tmp_path)) == 1
    clear_directory(tmp_path)
    assert read_directory(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    clear_directory(tmp_path / "new")  # made when missing
    assert (tmp_path / "new").is_dir()
