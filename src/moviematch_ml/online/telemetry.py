"""The service's metrics, declared in one place, and what records them: requests, predictions, models, drift, calls.

Every metric is a ``Family`` below: its name, what it means, its labels (bounded: routes, methods, status
classes, endpoints, sources, model versions, features and bins; never a user or a movie id). ``Telemetry`` holds
one process's values (``online/counters.py``) and the objects the service updates them through, bound once so that
the hot path does no label look-up it can avoid. ``GET /metrics`` shows them in Prometheus's text format
(docs/operations.md lists them with the queries that read them).
"""

from __future__ import annotations

import bisect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from moviematch_ml.errors import InputError, StoreError
from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.online.counters import (
    Calls,
    CounterChild,
    Family,
    GaugeChild,
    HistogramChild,
    Registry,
    to_metrics,
)
from moviematch_ml.online.models import ModelReport, Models, ReloadOutcome
from moviematch_ml.runtime.drift import DriftBins, feature_bins
from moviematch_ml.runtime.registry import CHAMPION

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

FloatArray = npt.NDArray[np.float64]

# No experiment runs yet: every prediction is of the one variant (A/B variants will name theirs here).
OTHER: Final[str] = "other"
METHODS: Final[frozenset[str]] = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SOURCES: Final[tuple[str, ...]] = ("model", "fallback", "personalized")
ENDPOINTS: Final[tuple[str, ...]] = ("predict", "predict_batch")  # the endpoint label of prediction metrics
STORE_OPERATIONS: Final[tuple[str, ...]] = (
    "add",
    "user_ratings",
    "changed_rows",
    "last_row_id",
    "movie_counts",
    "migrate",
    "ping",
    "log_predictions",
    "prune_predictions",
)
REDIS_OPERATIONS: Final[tuple[str, ...]] = ("get", "put")
# Series made at start-up, at 0, rather than at their first event: rate() and increase() take a series' first
# sample as their starting point, so the events of a series that appears with them would not be counted. These are
# the ones alerts and dashboards compute rates of; any other appears with its first event.
WATCHED_ROUTES: Final[tuple[str, ...]] = ("/predict", "/predict-batch", "/feedback")
WATCHED_STATUSES: Final[tuple[int, ...]] = (200, 400, 500)
ERROR_REASONS: Final[tuple[str, ...]] = ("invalid_json", "validation_error", "internal_error")
REJECTED_REASONS: Final[tuple[str, ...]] = ("invalid_json", "validation_error", "store_unavailable")
# A batch with more rows than this is binned by numpy, whose calls cost more than a few rows binned one by one.
DRIFT_NUMPY_ROWS: Final[int] = 12
PROCESS_SAMPLE_SECONDS: Final[float] = 1.0
# What ``Telemetry.render`` writes: the classic text format (every name here is a legacy one), which every
# Prometheus reads; prometheus_client's newest default Content-Type names version 1.0.0 instead.
CONTENT_TYPE: Final[str] = "text/plain; version=0.0.4; charset=utf-8"

# --- the metrics ------------------------------------------------------------------------------------------------------

HTTP_SECONDS = Family(
    "moviematch_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route (its path, or 'other' for paths the service "
    "does not serve), method and status class (2xx, 4xx, ...).",
    "histogram",
    ("route", "method", "status"),
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
)
# Not stored: the count of HTTP_SECONDS, shown under the name dashboards expect (``collect``).
HTTP_REQUESTS = Family(
    "moviematch_http_requests_total",
    "Requests answered, by route, method and status class (the count of moviematch_http_request_duration_seconds).",
    "counter",
    ("route", "method", "status"),
)
PREDICTIONS = Family(
    "moviematch_predictions_total",
    "Ratings predicted (one per movie of a batch, cached answers included), by endpoint (predict, predict_batch), "
    "variant, the version of the model that answered, and source (model, fallback, personalized).",
    "counter",
    ("endpoint", "variant", "version", "source"),
)
PREDICTION_ERRORS = Family(
    "moviematch_prediction_errors_total",
    "Prediction requests answered with an error by the prediction itself, by endpoint and reason (the error code: "
    "invalid_json, validation_error, internal_error...).",
    "counter",
    ("endpoint", "reason"),
)
BATCH_SIZE = Family(
    "moviematch_batch_size",
    "Movies per /predict-batch request.",
    "histogram",
    (),
    (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
INFERENCE_SECONDS = Family(
    "moviematch_inference_seconds",
    "Time in the model of a prediction request, apart from HTTP and validation, by source (model, fallback, "
    "personalized: the user's view included, read from the store when it is not cached).",
    "histogram",
    ("source",),
    (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
MODEL_INFO = Family(
    "moviematch_model_info",
    "1 for each model role (six_features, personalized) with the version and status it is loaded with (ok, "
    "fallback, absent, refused, starting: as /health says).",
    "gauge",
    ("model", "version", "status"),
    only_set=True,
)
MODEL_READY = Family(
    "moviematch_model_ready",
    "1 when the model loaded, passed its canned prediction and answers (status ok), else 0.",
    "gauge",
    ("model",),
)
CACHE_LOOKUPS = Family(
    "moviematch_answer_cache_lookups_total",
    "Answer-cache look-ups of prediction requests, by backend (memory, redis) and result (hit, miss).",
    "counter",
    ("backend", "result"),
)
_CALL_BUCKETS: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
STORE_SECONDS = Family(
    "moviematch_store_call_duration_seconds",
    "Feedback-store calls (SQLite or PostgreSQL), by operation, failed ones included.",
    "histogram",
    ("operation",),
    _CALL_BUCKETS,
)
STORE_FAILURES = Family(
    "moviematch_store_failures_total",
    "Feedback-store calls that failed (the database unreachable, a statement refused), by operation.",
    "counter",
    ("operation",),
)
REDIS_SECONDS = Family(
    "moviematch_redis_call_duration_seconds",
    "Redis answer-cache calls, by operation (get, put), failed ones included.",
    "histogram",
    ("operation",),
    _CALL_BUCKETS,
)
REDIS_FAILURES = Family(
    "moviematch_redis_failures_total",
    "Redis answer-cache calls that failed (answered as a miss), by operation.",
    "counter",
    ("operation",),
)
FEEDBACK_RATINGS = Family(
    "moviematch_feedback_ratings_total",
    "Ratings of /feedback requests the service took, by outcome: accepted (newly stored) or duplicate (their key "
    "was already stored).",
    "counter",
    ("outcome",),
)
FEEDBACK_REJECTED = Family(
    "moviematch_feedback_rejected_total",
    "/feedback requests refused or not stored (nothing of them was), by reason (invalid_json, validation_error, "
    "store_unavailable).",
    "counter",
    ("reason",),
)
PREDICTION_LOG = Family(
    "moviematch_prediction_log_total",
    "Predictions of the prediction log, by outcome: written to the store, or dropped (the queue was full, the "
    "worker had spent its share of time on the log, or the store could not write them).",
    "counter",
    ("outcome",),
)
PREDICTION_LOG_QUEUED = Family(
    "moviematch_prediction_log_queued",
    "Predictions waiting in the workers' queues to be written to the prediction log (at each worker's last write).",
    "gauge",
    aggregate="sum",
)
RELOADS = Family(
    "moviematch_model_reloads_total",
    "Model reloads (POST /admin/reload, SIGHUP, a change of the registry), by outcome: reloaded or refused (the "
    "models in service kept).",
    "counter",
    ("outcome",),
)
DRIFT_INPUTS = Family(
    "moviematch_drift_inputs_total",
    "Input values the models evaluated (not those answered from the cache), by the six-feature model version whose "
    "card defines the bins, feature and bin: its training-quantile intervals, 'below' and 'above' its training "
    "range (runtime/drift.py).",
    "counter",
    ("version", "feature", "bin"),
)
DRIFT_TRAINING_SHARE = Family(
    "moviematch_drift_training_share",
    "The share of the model's training inputs in each bin (from its card): what PSI compares live inputs against.",
    "gauge",
    ("version", "feature", "bin"),
)
PROCESS_CPU = Family(
    "process_cpu_seconds_total",
    "CPU time (user and system) of the service's worker processes, summed; stopped workers' included.",
    "counter",
)
PROCESS_MEMORY = Family(
    "process_resident_memory_bytes",
    "Resident memory of the service's live worker processes, summed.",
    "gauge",
    aggregate="sum",
)
# Not stored: the number of live worker processes at the scrape (``collect``).
WORKERS = Family("moviematch_workers", "Live worker processes of the service.", "gauge")

FAMILIES: Final[tuple[Family, ...]] = (
    HTTP_SECONDS,
    PREDICTIONS,
    PREDICTION_ERRORS,
    BATCH_SIZE,
    INFERENCE_SECONDS,
    MODEL_INFO,
    MODEL_READY,
    CACHE_LOOKUPS,
    STORE_SECONDS,
    STORE_FAILURES,
    REDIS_SECONDS,
    REDIS_FAILURES,
    FEEDBACK_RATINGS,
    FEEDBACK_REJECTED,
    PREDICTION_LOG,
    PREDICTION_LOG_QUEUED,
    RELOADS,
    DRIFT_INPUTS,
    DRIFT_TRAINING_SHARE,
    PROCESS_CPU,
    PROCESS_MEMORY,
)
# Every metric /metrics shows, derived ones included (tests and the dashboard check against this).
EXPORTED: Final[tuple[Family, ...]] = (*FAMILIES, HTTP_REQUESTS, WORKERS)


def error_reason(exc: BaseException) -> str:
    """The error code an exception is answered with (the ``error`` of its JSON body), as a metric's reason."""
    if isinstance(exc, InputError):
        return exc.error_code
    if isinstance(exc, StoreError):
        return "store_unavailable"
    return "internal_error"


class HttpMetrics:
    """Requests by route, method and status class, with their durations (``RequestContextMiddleware`` calls
    ``observe`` once per request)."""

    def __init__(self, registry: Registry, routes: Iterable[str]) -> None:
        self._registry = registry
        self.routes = frozenset(routes)
        # Only known (route, method, status) keys are kept: a scan of random paths must not grow this.
        self._children: dict[tuple[str, str, int], HistogramChild] = {}
        for path in WATCHED_ROUTES:
            if path in self.routes:
                for status in WATCHED_STATUSES:
                    self._child(path, "POST", status)

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        child = self._children.get((path, method, status))
        if child is None:
            child = self._child(path, method, status)
        child.observe(seconds)

    def _child(self, path: str, method: str, status: int) -> HistogramChild:
        known = path in self.routes and method in METHODS
        status_class = f"{status // 100}xx" if 100 <= status < 600 else OTHER
        route, method_label = (path, method) if known else (OTHER, OTHER)
        child = self._registry.histogram(HTTP_SECONDS, route, method_label, status_class)
        if known:
            self._children[(path, method, status)] = child
        return child


class DriftCounter:
    """Counts the inputs of one six-feature model version in its card's bins, feature by feature.

    Within a time budget: after counting a request's inputs it skips requests for as long as that took, times
    (1 - share) / share, so that drift takes at most ``share`` of a busy worker's time (binning a big batch costs a
    noticeable part of predicting it: docs/operations.md). A quiet service has every input counted; a busy one a
    sample of whole requests, taken by time and not by content, so the shares per bin (what PSI compares) stay
    unbiased. ``share=1`` counts every input.
    """

    def __init__(
        self,
        registry: Registry,
        version: str,
        bins: tuple[DriftBins, ...],
        *,
        share: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        bins = tuple(b for b in bins if b.feature in FEATURE_NAMES)
        labels = [(version, b.feature, label) for b in bins for label in b.labels]
        base = registry.block(DRIFT_INPUTS, labels) if labels else None
        self.active = base is not None
        self._values = registry.values
        self._array = registry.array
        self._base = base or 0
        self._size = len(labels)
        self._pause = (1.0 - share) / share
        self._clock = clock
        self._resume = -math.inf
        starts: list[int] = np.cumsum([0, *(len(b.labels) for b in bins)])[:-1].tolist()
        self._columns = [FEATURE_NAMES.index(b.feature) for b in bins]
        self._edges = [b.search_edges for b in bins]
        self._plan = list(zip(self._edges, self._columns, starts, strict=True))
        edge_lists = [e.tolist() for e in self._edges]
        self._row_plan = list(zip([self._base + s for s in starts], edge_lists, self._columns, strict=True))
        for b in bins:
            for label, share_ in zip(b.labels, b.shares, strict=True):
                registry.gauge(DRIFT_TRAINING_SHARE, version, b.feature, label).set(share_)

    def add(self, x: FloatArray) -> None:
        """Count every row of ``x`` (n, 6), each feature's value in its bin; or none, within the pause."""
        if not self.active:
            return
        clock = self._clock
        start = clock()
        if start < self._resume:
            return
        if len(x) <= DRIFT_NUMPY_ROWS:
            values = self._values
            for row in x.tolist():
                for first, edges, column in self._row_plan:
                    values[first + bisect.bisect_right(edges, row[column])] += 1.0
        else:
            index = np.empty((len(self._columns), len(x)), dtype=np.intp)
            for j, (edges, column, offset) in enumerate(self._plan):
                index[j] = np.searchsorted(edges, x[:, column], side="right")
                index[j] += offset
            # One update of the whole block (a few dozen slots: numpy keeps the GIL for it, so no thread interleaves).
            self._array[self._base : self._base + self._size] += np.bincount(index.ravel(), minlength=self._size)
        if self._pause:
            done = clock()
            self._resume = done + (done - start) * self._pause


def _rss_bytes() -> float | None:
    """This process's resident memory, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") * 1.0
    except (OSError, ValueError, IndexError):
        return None


class Telemetry:
    """One process's metrics: the registry, and what the service records them through."""

    def __init__(self, directory: Path | None = None, *, drift_share: float = 1.0) -> None:
        self.registry = registry = Registry(FAMILIES, directory)
        self.drift_share = drift_share
        self.http: HttpMetrics | None = None
        self.store_calls = Calls(registry, STORE_SECONDS, STORE_FAILURES, STORE_OPERATIONS)
        self.redis_calls = Calls(registry, REDIS_SECONDS, REDIS_FAILURES, REDIS_OPERATIONS)
        self.batch_size = registry.histogram(BATCH_SIZE)
        self.inference = {source: registry.histogram(INFERENCE_SECONDS, source) for source in SOURCES}
        self.feedback_accepted = registry.counter(FEEDBACK_RATINGS, "accepted")
        self.feedback_duplicate = registry.counter(FEEDBACK_RATINGS, "duplicate")
        self.log_written = registry.counter(PREDICTION_LOG, "written")
        self.log_dropped = registry.counter(PREDICTION_LOG, "dropped")
        self.log_queued = registry.gauge(PREDICTION_LOG_QUEUED)
        self.reloaded = registry.counter(RELOADS, "reloaded")
        self.reload_refused = registry.counter(RELOADS, "refused")
        for reason in REJECTED_REASONS:
            registry.counter(FEEDBACK_REJECTED, reason)
        for endpoint in ENDPOINTS:
            for reason in ERROR_REASONS:
                registry.counter(PREDICTION_ERRORS, endpoint, reason)
        self._predictions: dict[tuple[str, str, str, str], CounterChild] = {}
        self._drift: dict[str, DriftCounter] = {}
        self._drift_of: tuple[object, DriftCounter | None] = (None, None)
        self._info: dict[str, GaugeChild] = {}
        self._cpu = registry.counter(PROCESS_CPU)
        self._cpu_seen = 0.0
        self._memory = registry.gauge(PROCESS_MEMORY)

    def serve_routes(self, routes: Iterable[str]) -> HttpMetrics:
        """The HTTP metrics of an app serving these paths (any other path is the route 'other')."""
        self.http = HttpMetrics(self.registry, routes)
        return self.http

    # --- predictions --------------------------------------------------------------------------------------------

    def predicted(self, endpoint: str, variant: str, source: str, version: str, n: int) -> None:
        """``n`` ratings answered by variant ``variant``, the model ``version`` (a model directory's), ``source``."""
        key = (endpoint, variant, source, version)
        child = self._predictions.get(key)
        if child is None:
            child = self._predictions[key] = self.registry.counter(PREDICTIONS, endpoint, variant, version, source)
        child.inc(n)

    def prediction_failed(self, endpoint: str, exc: BaseException) -> None:
        self.registry.counter(PREDICTION_ERRORS, endpoint, error_reason(exc)).inc()

    def cache_lookups(self, backend: str) -> tuple[CounterChild, CounterChild]:
        """The (hit, miss) counters of an answer cache."""
        hit, miss = (self.registry.counter(CACHE_LOOKUPS, backend, result) for result in ("hit", "miss"))
        return hit, miss

    def drift(self, models: Models) -> DriftCounter | None:
        """The drift counter of the six-feature model of ``models`` (None when its card has no statistics: the
        fallback rule, a card without them)."""
        seen, counter = self._drift_of
        if seen is models.six:
            return counter
        card = models.six_report.card
        if card is None or not card.feature_stats or models.six.source != "model":
            counter = None
        else:
            counter = self._drift.get(card.version)
            if counter is None:
                counter = self._drift[card.version] = DriftCounter(
                    self.registry, card.version, feature_bins(card.feature_stats), share=self.drift_share
                )
        self._drift_of = (models.six, counter)
        return counter

    # --- models ---------------------------------------------------------------------------------------------------

    def models_changed(self, models: Models) -> None:
        """A new model set answers: its info and readiness, and its drift bins (``ModelSet`` calls this)."""
        for role, report in (("six_features", models.six_report), ("personalized", models.personalized_report)):
            self._set_info(role, report)
            self.registry.gauge(MODEL_READY, role).set(1.0 if report.status == "ok" else 0.0)
        self.drift(models)
        sources = [models.six.source, *(["personalized"] if models.personalized is not None else [])]
        for endpoint in ENDPOINTS:
            for source in sources:
                self.predicted(endpoint, CHAMPION, source, models.version, 0)

    def _set_info(self, role: str, report: ModelReport) -> None:
        child = self.registry.gauge(MODEL_INFO, role, report.version or "", report.status)
        old = self._info.get(role)
        if old is not None:
            old.set(0.0)
        child.set(1.0)
        self._info[role] = child

    # --- feedback -------------------------------------------------------------------------------------------------

    def reload_done(self, outcome: ReloadOutcome) -> None:
        (self.reloaded if outcome.reloaded else self.reload_refused).inc()

    def feedback_stored(self, accepted: int, duplicates: int) -> None:
        self.feedback_accepted.inc(accepted)
        self.feedback_duplicate.inc(duplicates)

    def feedback_rejected(self, exc: BaseException) -> None:
        self.registry.counter(FEEDBACK_REJECTED, error_reason(exc)).inc()

    # --- the process ----------------------------------------------------------------------------------------------

    def sample_process(self) -> None:
        """Record this process's CPU time and memory (a worker does every PROCESS_SAMPLE_SECONDS, and before it
        answers a scrape)."""
        cpu = time.process_time()
        self._cpu.inc(cpu - self._cpu_seen)
        self._cpu_seen = cpu
        rss = _rss_bytes()
        if rss is not None:
            self._memory.set(rss)

    def close(self) -> None:
        self.registry.close()

    # --- the scrape -----------------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Every metric, over every worker process (``online/counters.py``), derived ones included."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.sample_process()
        processes = self.registry.processes()
        totals = self.registry.totals(processes)
        yield from to_metrics(FAMILIES, totals)
        requests = CounterMetricFamily(
            HTTP_REQUESTS.name.removesuffix("_total"), HTTP_REQUESTS.help, labels=list(HTTP_REQUESTS.labels)
        )
        for (name, labels), values in sorted(totals.items()):
            if name == HTTP_SECONDS.name:
                requests.add_metric(list(labels), float(values[:-1].sum()))
        yield requests
        yield GaugeMetricFamily(WORKERS.name, WORKERS.help, value=sum(p.live for p in processes))

    def render(self) -> bytes:
        """The Prometheus text format of ``collect``."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry)


class _Collector:
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        return self._telemetry.collect()
