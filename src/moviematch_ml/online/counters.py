"""Metric values in flat float64 slots: lock-free updates in each worker, summed over every worker at scrape time.

A metric child (one combination of label values) owns consecutive slots of its process's array: a counter or a
gauge one, a histogram one per bucket (not cumulative) and one for the sum. An update is one increment of a
memoryview item: a fraction of what prometheus_client's own Counter.inc and Histogram.observe cost (a lock and
Python-level bookkeeping each; docs/operations.md has the measurements), which matters because a /predict answer
costs tens of microseconds in all and updates several metrics.

Updates take no lock. Under CPython's global interpreter lock ``values[i] += x`` on a memoryview is one
uninterruptible step: no thread switch can fall between its read and its write (no eval-breaker check between
those bytecodes; tests/online/test_counters.py hammers one slot from threads). Creating a child does take a lock.

Several worker processes (``METRICS_DIR``): each process's array is a memory-mapped file ``<pid>-<n>.slots`` of
that directory, beside ``<pid>-<n>.slots.jsonl``, its layout (a line appended per new series). The worker that
answers a scrape reads every process's files: counters and histograms are summed over all of them, those of
workers that stopped included (so a counter never goes down when a worker is replaced); gauges are taken from the
live workers only (their maximum, or their sum). The directory is emptied when the server starts
(``clear_directory``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from prometheus_client.metrics_core import Metric

    FloatArray = npt.NDArray[np.float64]

log = logging.getLogger(__name__)


def _numpy() -> Any:
    """numpy, imported on first use: the server's supervisor imports this module only to empty the directory, and
    stays without numpy (a tenth of a second and megabytes it would hold for nothing)."""
    import numpy

    return numpy


Kind = Literal["counter", "gauge", "histogram"]

# 64 Ki slots, 512 KiB per process (a sparse file: only the pages written take memory). The service uses a few
# hundred; each model version loaded adds about a hundred.
CAPACITY: Final[int] = 1 << 16
SLOTS_SUFFIX: Final[str] = ".slots"
LAYOUT_SUFFIX: Final[str] = ".slots.jsonl"
_instances = itertools.count()


class FloatSlots(Protocol):
    """A memoryview of float64 items (typeshed types memoryview items as int)."""

    def __getitem__(self, index: int, /) -> float: ...

    def __setitem__(self, index: int, value: float, /) -> None: ...


@dataclass(frozen=True, slots=True)
class Family:
    """One metric as Prometheus shows it: name, help text, label names; buckets for a histogram.

    ``aggregate`` says how a gauge of several workers becomes one value (the live workers' maximum or sum);
    ``only_set`` drops the children whose value is 0 (an info metric's old versions).
    """

    name: str
    help: str
    kind: Kind
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    aggregate: Literal["max", "sum"] = "max"
    only_set: bool = False

    @property
    def width(self) -> int:
        """Slots per child: the buckets, +Inf and the sum for a histogram; one otherwise."""
        return len(self.buckets) + 2 if self.kind == "histogram" else 1


class CounterChild:
    """One counter series."""

    __slots__ = ("_i", "_values")

    def __init__(self, values: FloatSlots, index: int) -> None:
        self._values = values
        self._i = index

    def inc(self, amount: float = 1.0) -> None:
        self._values[self._i] += amount


class GaugeChild:
    """One gauge series."""

    __slots__ = ("_i", "_values")

    def __init__(self, values: FloatSlots, index: int) -> None:
        self._values = values
        self._i = index

    def set(self, value: float) -> None:
        self._values[self._i] = value


class HistogramChild:
    """One histogram series: a count per bucket (``le``: value <= bound) and the sum."""

    __slots__ = ("_base", "_bounds", "_sum", "_values")

    def __init__(self, values: FloatSlots, base: int, bounds: tuple[float, ...]) -> None:
        self._values = values
        self._base = base
        self._bounds = bounds
        self._sum = base + len(bounds) + 1

    def observe(self, value: float) -> None:
        values = self._values
        values[self._base + bisect.bisect_left(self._bounds, value)] += 1.0
        values[self._sum] += value


class Registry:
    """A process's metric families and their values; children are made on first use and kept.

    In memory, or (``directory``) in a memory-mapped file other workers read (see the module docstring).
    """

    def __init__(self, families: Iterable[Family], directory: Path | None = None, capacity: int = CAPACITY) -> None:
        self.families = {f.name: f for f in families}
        self.directory = directory
        self.capacity = capacity
        self._lock = threading.Lock()
        self._layout: list[tuple[str, tuple[str, ...], int]] = []
        self._children: dict[tuple[str, tuple[str, ...]], int] = {}
        self._used = 0
        self._full_logged = False
        if directory is None:
            self._buffer: bytearray | mmap.mmap = bytearray(capacity * 8)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self._stem = directory / f"{os.getpid()}-{next(_instances)}"
            with open(self._stem.with_suffix(SLOTS_SUFFIX), "w+b") as file:
                file.truncate(capacity * 8)
                self._buffer = mmap.mmap(file.fileno(), capacity * 8)  # the map keeps the file open
            self._append_layout({"pid": os.getpid()})
        self.values = cast(FloatSlots, memoryview(self._buffer).cast("d"))
        # The same memory as a numpy array, for updates of many slots at once.
        self.array: FloatArray = _numpy().frombuffer(self._buffer, dtype="float64")
        # Children past the capacity count here, unexported (a warning is logged once).
        self._spill = cast(FloatSlots, memoryview(bytearray(8 * 64)).cast("d"))

    # --- children ---------------------------------------------------------------------------------------------------

    def block(self, family: Family, label_sets: Sequence[tuple[str, ...]]) -> int | None:
        """The first slot of consecutive children of ``family``, one per label set (made if new, in one piece: a
        caller may then update them by offset); None past the capacity."""
        keys = [(family.name, tuple(labels)) for labels in label_sets]
        for labels in label_sets:
            if len(labels) != len(family.labels):
                raise ValueError(f"{family.name} takes labels {family.labels}, got {labels}")
        width = family.width
        with self._lock:
            found = [self._children.get(k) for k in keys]
            if found[0] is not None and found == [found[0] + i * width for i in range(len(keys))]:
                return found[0]
            if any(f is not None for f in found):
                raise ValueError(f"{family.name}: some of these children exist already, not as one block")
            base = self._used
            if base + width * len(keys) > self.capacity:
                if not self._full_logged:
                    log.warning("metrics capacity reached: new series are not exported", extra={"metric": family.name})
                    self._full_logged = True
                return None
            new = [(name, labels, base + i * width) for i, (name, labels) in enumerate(keys)]
            self._children.update((key, index) for key, (_, _, index) in zip(keys, new, strict=True))
            self._layout += new
            self._used = base + width * len(keys)
            if self.directory is not None:
                self._append_layout(*({"slot": [*entry, width]} for entry in new))
            return base

    def _slot(self, family: Family, labels: tuple[str, ...]) -> tuple[FloatSlots, int]:
        index = self._children.get((family.name, labels))
        if index is None:
            index = self.block(family, [labels])
        if index is None:
            return self._spill, 0
        return self.values, index

    def counter(self, family: Family, *labels: str) -> CounterChild:
        """The counter child of these label values."""
        assert family.kind == "counter", family.name
        return CounterChild(*self._slot(family, labels))

    def gauge(self, family: Family, *labels: str) -> GaugeChild:
        """The gauge child of these label values."""
        assert family.kind == "gauge", family.name
        return GaugeChild(*self._slot(family, labels))

    def histogram(self, family: Family, *labels: str) -> HistogramChild:
        """The histogram child of these label values."""
        assert family.kind == "histogram", family.name
        values, index = self._slot(family, labels)
        if values is self._spill:
            return HistogramChild(self._spill, 0, ())
        return HistogramChild(values, index, family.buckets)

    # --- the shared directory ---------------------------------------------------------------------------------------

    def _append_layout(self, *entries: Mapping[str, object]) -> None:
        """Add lines to this process's layout: appended in one write, so a reader sees each line whole or not at
        all (a last line still being written is skipped), and a new series costs one short write, not a rewrite."""
        text = "".join(json.dumps(e) + "\n" for e in entries)
        with open(self._stem.with_suffix(LAYOUT_SUFFIX), "a", encoding="utf-8") as f:
            f.write(text)

    def close(self) -> None:
        """Mark this process's file as stopped: its gauges leave the scrape, its counters stay (see the module)."""
        if self.directory is not None:
            with self._lock:
                self._append_layout({"closed": True})

    # --- reading ----------------------------------------------------------------------------------------------------

    def processes(self) -> list[ProcessValues]:
        """Every process's values: this one's alone in memory, else every file of the directory."""
        if self.directory is None:
            with self._lock:
                layout = list(self._layout)
                used = self._used
            return [ProcessValues(os.getpid(), True, layout, self.array[:used].copy())]
        return read_directory(self.directory)

    def totals(self, processes: Sequence[ProcessValues] | None = None) -> Totals:
        """Every child's values over the processes (``processes()`` unless given): see ``aggregate``."""
        return aggregate(self.families.values(), self.processes() if processes is None else processes)


@dataclass(frozen=True, slots=True)
class ProcessValues:
    """One process's slots as read at a scrape."""

    pid: int
    live: bool
    layout: list[tuple[str, tuple[str, ...], int]]
    values: FloatArray


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's: not ours, but not gone either
        return True
    return True


def read_directory(directory: Path) -> list[ProcessValues]:
    """The values of every process that wrote slots into ``directory``."""
    out = []
    for layout_file in sorted(directory.glob("*" + LAYOUT_SUFFIX)):
        pid, closed, used = None, False, 0
        layout: list[tuple[str, tuple[str, ...], int]] = []
        try:
            lines = layout_file.read_text(encoding="utf-8").splitlines()
        except OSError:  # removed meanwhile
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # the last line, still being written
                continue
            if not isinstance(entry, dict):
                continue
            if "slot" in entry:
                name, labels, index, width = entry["slot"]
                layout.append((str(name), tuple(labels), int(index)))
                used = max(used, int(index) + int(width))
            if "pid" in entry:
                pid = int(entry["pid"])
            closed = closed or bool(entry.get("closed"))
        if pid is None:
            continue
        slots_file = layout_file.with_name(layout_file.name.removesuffix(LAYOUT_SUFFIX) + SLOTS_SUFFIX)
        try:
            values = _numpy().fromfile(slots_file, dtype="float64", count=used)
        except (OSError, ValueError):
            continue
        if len(values) < used:
            continue
        out.append(ProcessValues(pid, not closed and _alive(pid), layout, values))
    return out


def clear_directory(directory: Path) -> None:
    """Remove the slot files a previous run left in ``directory`` (and nothing else), creating it if needed."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        if path.name.endswith((SLOTS_SUFFIX, LAYOUT_SUFFIX)):
            path.unlink(missing_ok=True)


Totals = dict[tuple[str, tuple[str, ...]], "FloatArray"]


def aggregate(families: Iterable[Family], processes: Sequence[ProcessValues]) -> Totals:
    """Each child's values: counters and histograms summed over every process, gauges over the live ones (their
    maximum or sum)."""
    totals: Totals = {}
    by_name = {f.name: f for f in families}
    for process in processes:
        for name, labels, index in process.layout:
            family = by_name.get(name)
            if family is None or (family.kind == "gauge" and not process.live):
                continue
            chunk = process.values[index : index + family.width]
            key = (name, labels)
            held = totals.get(key)
            if held is None:
                totals[key] = chunk.copy()
            elif family.kind == "gauge" and family.aggregate == "max":
                _numpy().maximum(held, chunk, out=held)
            else:
                held += chunk
    return totals


def to_metrics(families: Iterable[Family], totals: Totals) -> Iterator[Metric]:
    """The families as prometheus_client metrics, their children sorted by label values."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    children: dict[str, list[tuple[tuple[str, ...], FloatArray]]] = {}
    for (name, labels), values in sorted(totals.items()):
        children.setdefault(name, []).append((labels, values))
    for family in families:
        labelnames = list(family.labels)
        metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
        if family.kind == "counter":
            metric = CounterMetricFamily(family.name.removesuffix("_total"), family.help, labels=labelnames)
            for labels, values in children.get(family.name, []):
                metric.add_metric(list(labels), float(values[0]))
        elif family.kind == "gauge":
            metric = GaugeMetricFamily(family.name, family.help, labels=labelnames)
            for labels, values in children.get(family.name, []):
                if not (family.only_set and values[0] == 0):
                    metric.add_metric(list(labels), float(values[0]))
        else:
            metric = HistogramMetricFamily(family.name, family.help, labels=labelnames)
            for labels, values in children.get(family.name, []):
                metric.add_metric(list(labels), histogram_buckets(family.buckets, values), float(values[-1]))
        yield metric


def histogram_buckets(bounds: Sequence[float], values: FloatArray) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, from one child's per-bucket slots."""
    counts = _numpy().cumsum(values[: len(bounds) + 1]).tolist()
    return [(repr(float(b)), c) for b, c in zip(bounds, counts, strict=False)] + [("+Inf", counts[-1])]


class CallTimer(Protocol):
    """Times a dependency's calls: ``with calls.time(operation): ...``."""

    def time(self, operation: str) -> AbstractContextManager[None]: ...


class Calls:
    """The latency and failures of one dependency's calls (the store, Redis), by operation.

    ``with calls.time("add"): ...`` observes the call's seconds, and counts a failure when it raises.
    """

    def __init__(self, registry: Registry, seconds: Family, failures: Family, operations: Iterable[str]) -> None:
        # Every operation's series exist from the start, at 0: rate() of failures needs a series to start from.
        self._children = {op: (registry.histogram(seconds, op), registry.counter(failures, op)) for op in operations}

    def time(self, operation: str) -> AbstractContextManager[None]:
        return _Timing(*self._children[operation])


class _Timing:
    """One call: its seconds and, when it raised, a failure."""

    __slots__ = ("_failures", "_seconds", "_start")

    def __init__(self, seconds: HistogramChild, failures: CounterChild) -> None:
        self._seconds = seconds
        self._failures = failures
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._seconds.observe(time.perf_counter() - self._start)
        if kind is not None:
            self._failures.inc()


class _NoCalls:
    """Calls that measure nothing (metrics off)."""

    def time(self, operation: str) -> AbstractContextManager[None]:
        return nullcontext()


NO_CALLS: Final[_NoCalls] = _NoCalls()
