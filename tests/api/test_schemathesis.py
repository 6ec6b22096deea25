"""The service against its own /openapi.json (Schemathesis): requests generated from the schema, valid and invalid,
with access keys off and on; zero 5xx, every answer as the schema describes it, and the schema's rules as the
service's (what the schema allows is accepted, what it forbids is refused)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from moviematch_ml.api.app import create_app
from moviematch_ml.settings import Settings

SECRET: Final[str] = "s3cr3t-schemathesis-0001"
EXAMPLES: Final[int] = 30  # per operation and generation mode: 9 operations x 2 modes, a few seconds in all
# What every answer is held to (schemathesis.checks): no 5xx; status, content type and body as the schema declares
# them; a request the schema forbids is refused (4xx); one it allows is accepted (see _json_schema_can_say).
CHECKS: Final[tuple[str, ...]] = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
# Fields whose rule JSON Schema cannot state whole: ids and keys are strings of printable characters (Python's
# str.isprintable: no JSON Schema pattern says it); ids and top_k are JSON integers, while JSON Schema's "integer"
# admits 1.0, which the service refuses there. The descriptions in the schema state the rules.
_PRINTABLE: Final[frozenset[str]] = frozenset({"user_id", "movie_id", "feedback_id", "prediction_id"})
_INTEGER: Final[frozenset[str]] = frozenset({"user_id", "movie_id", "top_k"})


def _json_schema_can_say(value: Any) -> bool:
    """Whether a generated body holds no value that only the rule's words (not its JSON Schema) refuse."""
    if isinstance(value, list):
        return all(_json_schema_can_say(v) for v in value)
    if not isinstance(value, dict):
        return True
    for key, v in value.items():
        if key in _INTEGER and type(v) is float:
            return False
        if key in _PRINTABLE and isinstance(v, str) and not v.isprintable():
            return False
        if not _json_schema_can_say(v):
            return False
    return True


_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _httpx(request: dict[str, Any]) -> dict[str, Any]:
    """Schemathesis's arguments for ``requests`` as the test client's (httpx) arguments."""
    assert not request.pop("cookies", None)  # the schema has none (and httpx deprecates per-request cookies)
    if isinstance(request.get("data"), bytes | str):  # a raw body (an invalid one, say): httpx calls it content
        request["content"] = request.pop("data")
    return request


def _checker(client: TestClient, strategy: Any, positive: bool, statuses: dict[int, int]) -> Callable[[], None]:
    """A Hypothesis test that sends each generated request to the app and holds the answer to CHECKS."""
    checks = [getattr(schemathesis.checks, name) for name in CHECKS]
    accepts = schemathesis.checks.positive_data_acceptance

    @_SETTINGS
    @given(case=strategy)
    def check(case: Any) -> None:
        response = client.request(**_httpx(case.as_transport_kwargs(base_url="http://testserver")))
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        extra = [accepts] if positive and _json_schema_can_say(case.body) else []
        case.validate_response(response, checks=[*checks, *extra])

    return check


def _run(client: TestClient, headers: dict[str, str]) -> dict[tuple[str, str], dict[int, int]]:
    """Every operation of the app's own schema, in both generation modes; the status codes seen, by operation."""
    spec = client.get("/openapi.json", headers=headers).json()
    seen: dict[tuple[str, str], dict[int, int]] = {}
    schema = schemathesis.openapi.from_dict(spec)
    operations = [schema[path][method] for path in schema for method in schema[path]]
    assert len(operations) == len([m for ops in spec["paths"].values() for m in ops])
    for operation in operations:
        for mode in GenerationMode:
            statuses = seen.setdefault((operation.label, mode.value), {})
            strategy = operation.as_strategy(generation_mode=mode, headers=headers or None)
            try:
                _checker(client, strategy, mode is GenerationMode.POSITIVE, statuses)()
            except Unsatisfiable:
                # No request of this operation breaks its schema (a GET without parameters): nothing to send.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return seen


def _client(tmp_path: Path, model_path: Path, **settings: Any) -> TestClient:
    db = f"sqlite:///{tmp_path / 'schemathesis.sqlite3'}"
    return TestClient(create_app(Settings(model_path=model_path, database_url=db, **settings)))


@pytest.mark.slow  # about 4-5 s each on a quiet machine
@pytest.mark.parametrize(
    "keys",
    [
        pytest.param(False, id="keys-off-model"),
        pytest.param(True, id="keys-on-fallback"),
    ],
)
def test_the_service_keeps_its_own_schema(tmp_path: Path, tiny_model_dir: Path, keys: bool) -> None:
    """Keys off, with a model (GET /models shows its card); keys on (every request with a key of every scope),
    with the fallback rule. Defect 9 (3 failures before): the schema allowed null for user_id, movie_id and
    feedback_id, which the service refuses."""
    if keys:
        client = _client(tmp_path, tmp_path / "no-model", api_keys=f"{SECRET}:admin")
        headers = {"Authorization": f"Bearer {SECRET}"}
    else:
        client, headers = _client(tmp_path, tiny_model_dir), {}
    with client:
        seen = _run(client, headers)
    # The run reached the service: valid requests answered, invalid ones refused, on every route with a body.
    for route in ("POST /predict", "POST /predict-batch", "POST /feedback"):
        assert set(seen[(route, "positive")]) & {200, 201}, seen[(route, "positive")]
        assert set(seen[(route, "negative")]) <= {400, 422}, seen[(route, "negative")]
    assert seen[("GET /health/ready", "positive")] == {200: 1}
    assert all(status < 500 for statuses in seen.values() for status in statuses)
