"""The service's metrics as the prediction and feedback services record them: counts and labels by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from moviematch_ml.errors import FieldError, InvalidJSONError, StoreError
from moviematch_ml.features import EXAMPLE, FEATURE_NAMES
from moviematch_ml.online.counters import Registry
from moviematch_ml.online.feedback import FeedbackService
from moviematch_ml.online.models import ModelReport, Models, ModelSet
from moviematch_ml.online.store import FeedbackStore
from moviematch_ml.online.telemetry import DRIFT_INPUTS, EXPORTED, DriftCounter, Telemetry
from moviematch_ml.runtime.cards import FeatureStats, ModelCard, RatingScale, model_version
from moviematch_ml.runtime.drift import DriftBins, feature_bins
from moviematch_ml.runtime.fallback import FallbackPredictor
from moviematch_ml.runtime.personalized import PersonalizedModel
from reference import Knows, Service

FloatArray = npt.NDArray[np.float64]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Every feature gets the same statistics: edges 0, 1, 2, 5, 8, 9, 10 (see tests/runtime/test_drift.py).
STATS = FeatureStats(
    min=0.0,
    max=10.0,
    mean=4.0,
    quantiles={"p01": 1.0, "p05": 1.0, "p25": 2.0, "p50": 5.0, "p75": 5.0, "p95": 8.0, "p99": 9.0},
)
CARD = ModelCard(
    name="stats",
    version="v1",
    created_at="2026-01-01T00:00:00Z",
    model_file="model.txt",
    model_format="lightgbm-text",
    sha256="0" * 64,
    features=list(FEATURE_NAMES),
    rating_scale=RatingScale(min=0.5, max=5.0),
    feature_stats={name: STATS for name in FEATURE_NAMES},
)


def scrape(telemetry: Telemetry) -> Samples:
    """Every sample of ``GET /metrics``'s text, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(telemetry.render().decode())
        for s in family.samples
    }


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


class Fixed:
    """A six-feature predictor answering 6.0 for every row; raises for a vote_average of 9.9 (a broken model)."""

    source = "model"

    def __init__(self, version: str = "v1") -> None:
        self.version = version

    def predict(self, x: FloatArray) -> FloatArray:
        if (x[:, 1] == 9.9).any():
            raise RuntimeError("the model broke")
        return np.full(x.shape[0], 6.0)


def model_set(six: Fixed | FallbackPredictor, personal: PersonalizedModel | None = None) -> ModelSet:
    card = CARD if isinstance(six, Fixed) else None
    report = ModelReport("ok" if card else "fallback", six.version, None, card)
    personal_report = ModelReport("absent", None) if personal is None else ModelReport("ok", personal.version)
    models = ModelSet(Path("missing"))
    models.swap(Models(six, personal, report, personal_report))
    return models


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry()


def _body(**changes: float) -> bytes:
    return orjson.dumps({**EXAMPLE, **changes})


def test_predictions_cache_and_batch_sizes(telemetry: Telemetry) -> None:
    service = Service(model_set(Fixed()), max_batch_size=10, cache_size=10, telemetry=telemetry)
    service.predict_one(_body(popularity=1.0))
    service.predict_one(_body(popularity=2.0))
    service.predict_one(_body(popularity=1.0))  # answered from the cache: a prediction all the same
    movies = [{"movie_id": m, **EXAMPLE} for m in range(3)]
    service.predict_batch(orjson.dumps({"movies": movies, "top_k": 1}))  # 3 movies predicted, 1 returned
    got = scrape(telemetry)
    v1 = service.models.current.version  # the model set's: a hash of its six-feature model's version, "v1"
    one = labels(endpoint="predict", variant="champion", version=v1, source="model")
    batch = labels(endpoint="predict_batch", variant="champion", version=v1, source="model")
    assert (got[("moviematch_predictions_total", one)], got[("moviematch_predictions_total", batch)]) == (3, 3)
    assert got[("moviematch_answer_cache_lookups_total", labels(backend="memory", result="hit"))] == 1
    assert got[("moviematch_answer_cache_lookups_total", labels(backend="memory", result="miss"))] == 3
    assert (got[("moviematch_batch_size_count", ())], got[("moviematch_batch_size_sum", ())]) == (1, 3)
    assert got[("moviematch_batch_size_bucket", labels(le="1.0"))] == 0
    assert got[("moviematch_batch_size_bucket", labels(le="10.0"))] == 1
    # The model ran three times (the cached answer did not run it).
    assert got[("moviematch_inference_seconds_count", labels(source="model"))] == 3
    assert got[("moviematch_inference_seconds_count", labels(source="personalized"))] == 0


def test_prediction_errors_by_reason(telemetry: Telemetry) -> None:
    service = Service(model_set(Fixed()), max_batch_size=2, telemetry=telemetry)
    with pytest.raises(InvalidJSONError):
        service.predict_one(b'{"vote_average": ')
    with pytest.raises(FieldError):
        service.predict_one(_body(vote_average=11))
    with pytest.raises(FieldError):
        service.predict_batch(orjson.dumps({"movies": []}))
    with pytest.raises(RuntimeError):
        service.predict_one(_body(vote_average=9.9))
    got = scrape(telemetry)
    errors = "moviematch_prediction_errors_total"
    assert got[(errors, labels(endpoint="predict", reason="invalid_json"))] == 1
    assert got[(errors, labels(endpoint="predict", reason="validation_error"))] == 1
    assert got[(errors, labels(endpoint="predict_batch", reason="validation_error"))] == 1
    assert got[(errors, labels(endpoint="predict", reason="internal_error"))] == 1
    assert (
        "moviematch_predictions_total",
        labels(endpoint="predict", variant="champion", version=service.models.current.version, source="model"),
    ) not in got


def test_personalised_rows_are_counted_with_the_personalised_version(
    telemetry: Telemetry, store: FeedbackStore, tiny_personalized_dir: Path
) -> None:
    personal = PersonalizedModel.load(tiny_personalized_dir / "personalized")
    service = Service(
        model_set(Fixed(), personal), max_batch_size=10, user_views=Knows(store, known={1, 3}), telemetry=telemetry
    )
    service.predict_one(orjson.dumps({**EXAMPLE, "user_id": "u", "movie_id": 1}))
    movies = [{"movie_id": m, **EXAMPLE} for m in (1, 2, 3, 4)]
    service.predict_batch(orjson.dumps({"movies": movies, "user_id": "u"}))  # two rows each
    got = scrape(telemetry)
    p = "moviematch_predictions_total"
    v = service.models.current.version  # one version for the model set, whichever of its parts answered
    assert v == model_version("v1", personal.version)
    assert got[(p, labels(endpoint="predict", variant="champion", version=v, source="personalized"))] == 1
    assert got[(p, labels(endpoint="predict_batch", variant="champion", version=v, source="personalized"))] == 2
    assert got[(p, labels(endpoint="predict_batch", variant="champion", version=v, source="model"))] == 2
    assert got[("moviematch_inference_seconds_count", labels(source="personalized"))] == 2
    assert got[("moviematch_inference_seconds_count", labels(source="model"))] == 1  # the batch's other rows


def drift_counts(got: Samples, feature: str) -> list[float]:
    bins = DriftBins.of(feature, STATS)
    return [got[("moviematch_drift_inputs_total", labels(version="v1", feature=feature, bin=b))] for b in bins.labels]


@pytest.mark.parametrize("n", [3, 40], ids=["row by row", "numpy"])
def test_drift_counts_every_input_in_its_bin(telemetry: Telemetry, n: int) -> None:
    service = Service(model_set(Fixed()), max_batch_size=100, telemetry=telemetry)
    rng = np.random.default_rng(n)
    vote_average = np.round(rng.uniform(0, 10, n), 1)
    vote_average[:2] = [10.0, 0.0]  # the training maximum and minimum themselves
    movies = [{**EXAMPLE, "movie_id": i, "vote_average": float(v)} for i, v in enumerate(vote_average)]
    service.predict_batch(orjson.dumps({"movies": movies}))
    service.predict_one(_body(vote_average=9.5, popularity=50.0))
    got = scrape(telemetry)
    expected = DriftBins.of("vote_average", STATS).counts(np.append(vote_average, 9.5))
    assert drift_counts(got, "vote_average") == expected.tolist()
    # popularity is 50.0 in every request: above the training maximum of 10.
    assert drift_counts(got, "popularity") == [0, 0, 0, 0, 0, 0, 0, 0, n + 1]
    # The training shares beside them (what PSI compares with): the quantile levels, as the card has no counts.
    share = got[("moviematch_drift_training_share", labels(version="v1", feature="vote_average", bin="[5,8)"))]
    assert share == pytest.approx(0.45)


def test_no_drift_without_feature_statistics(telemetry: Telemetry) -> None:
    service = Service(model_set(FallbackPredictor()), max_batch_size=10, telemetry=telemetry)
    service.predict_one(_body())
    assert not any(name == "moviematch_drift_inputs_total" for name, _ in scrape(telemetry))


def test_drift_keeps_to_its_share_of_the_time() -> None:
    registry = Registry([DRIFT_INPUTS])
    now = [0.0]

    def clock() -> float:  # each reading takes a second: counting a request (two readings) takes one
        t = now[0]
        now[0] += 1.0
        return t

    drift = DriftCounter(registry, "v1", feature_bins(CARD.feature_stats), share=0.25, clock=clock)
    row = np.array([[2.0, 6.0, 3.0, 1.0, 4.0, 9.0]])
    counted = []
    for t in (0.0, 2.0, 3.9, 4.0, 4.5):
        now[0] = t
        before = registry.array.sum()
        drift.add(row)
        counted.append(int((registry.array.sum() - before) / len(FEATURE_NAMES)))
    # Counting at 0 ends at 1 and took 1 s; with a share of 1/4 the pause is 3 s: until 4. So 2.0 and 3.9 are
    # skipped, 4.0 is counted (ending at 5: a pause until 8), 4.5 is skipped.
    assert counted == [1, 0, 0, 1, 0]


def test_model_info_and_readiness_follow_the_swaps(telemetry: Telemetry) -> None:
    models = model_set(FallbackPredictor())
    telemetry.models_changed(models.current)
    models.listeners.append(telemetry.models_changed)
    got = scrape(telemetry)
    info = "moviematch_model_info"
    assert got[(info, labels(model="six_features", version="fallback-1", status="fallback"))] == 1
    assert got[(info, labels(model="personalized", version="", status="absent"))] == 1
    assert got[("moviematch_model_ready", labels(model="six_features"))] == 0
    models.swap(model_set(Fixed("v2")).current)
    got = scrape(telemetry)
    assert got[(info, labels(model="six_features", version="v2", status="ok"))] == 1
    assert (info, labels(model="six_features", version="fallback-1", status="fallback")) not in got
    assert got[("moviematch_model_ready", labels(model="six_features"))] == 1
    # The new model's drift bins exist from the swap on, at 0.
    assert drift_counts(got, "vote_average") == [0] * 9


def test_feedback_outcomes(telemetry: Telemetry, store: FeedbackStore) -> None:
    store.calls = telemetry.store_calls
    feedback = FeedbackService(store, telemetry=telemetry)
    one = {"user_id": 1, "movie_id": 1, "rating": 8}
    feedback.record_now(orjson.dumps(one), "k1")
    feedback.record_now(orjson.dumps(one), "k1")  # a retry: a duplicate
    feedback.record_now(orjson.dumps({"ratings": [one, {**one, "movie_id": 2}]}), None)  # both new (content keys)
    with pytest.raises(InvalidJSONError):
        feedback.record_now(b"{", None)
    with pytest.raises(FieldError):
        feedback.record_now(orjson.dumps({**one, "rating": 11}), None)
    got = scrape(telemetry)
    assert got[("moviematch_feedback_ratings_total", labels(outcome="accepted"))] == 3
    assert got[("moviematch_feedback_ratings_total", labels(outcome="duplicate"))] == 1
    assert got[("moviematch_feedback_rejected_total", labels(reason="invalid_json"))] == 1
    assert got[("moviematch_feedback_rejected_total", labels(reason="validation_error"))] == 1
    assert got[("moviematch_store_call_duration_seconds_count", labels(operation="add"))] == 3
    assert got[("moviematch_store_failures_total", labels(operation="add"))] == 0


def test_a_store_that_cannot_write_is_a_rejection_and_a_failure(telemetry: Telemetry, tmp_path: Path) -> None:
    broken = FeedbackStore(create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'f.sqlite3'}"))
    broken.calls = telemetry.store_calls
    with pytest.raises(StoreError):
        FeedbackService(broken, telemetry=telemetry).record_now(
            orjson.dumps({"user_id": 1, "movie_id": 1, "rating": 8}), None
        )
    got = scrape(telemetry)
    assert got[("moviematch_feedback_rejected_total", labels(reason="store_unavailable"))] == 1
    assert got[("moviematch_store_failures_total", labels(operation="add"))] == 1


def test_requests_by_route_method_and_status_class(telemetry: Telemetry) -> None:
    http = telemetry.serve_routes(["/predict", "/health"])
    http.observe("/predict", "POST", 200, 0.0007)
    http.observe("/predict", "POST", 201, 0.003)
    http.observe("/predict", "POST", 422, 0.0004)
    for k in range(50):  # a scan of paths the service does not serve: one series
        http.observe(f"/wp-admin/{k}", "GET", 404, 0.0001)
    http.observe("/health", "BREW", 405, 0.0001)
    got = scrape(telemetry)
    ok = labels(route="/predict", method="POST", status="2xx")
    assert got[("moviematch_http_requests_total", ok)] == 2
    bucket = labels(route="/predict", method="POST", status="2xx", le="0.001")
    assert got[("moviematch_http_request_duration_seconds_bucket", bucket)] == 1
    assert got[("moviematch_http_requests_total", labels(route="/predict", method="POST", status="4xx"))] == 1
    assert got[("moviematch_http_requests_total", labels(route="other", method="other", status="4xx"))] == 51
    routes = {dict(k)["route"] for name, k in got if name == "moviematch_http_requests_total"}
    assert routes == {"/predict", "other"}


def test_every_exported_metric_is_declared_and_described(telemetry: Telemetry) -> None:
    families = {f.name: f.documentation for f in text_string_to_metric_families(telemetry.render().decode())}
    declared = {f.name.removesuffix("_total"): f.help for f in EXPORTED}
    assert families == declared
    assert all(len(help_text) > 20 for help_text in declared.values())
    # No label could take a user's or a movie's id.
    assert not any(label.endswith("_id") or label in ("user", "movie") for f in EXPORTED for label in f.labels)
