"""What a public URL shows (defect 9) and how a client that leaves is logged (defect 6), on a real ``moviematch-ml
serve``: no server banner, security headers, /docs from the service's own files, no file path in any answer, no
null for the ids in the OpenAPI schema; a client gone mid-body is a 499 at info level, not an error."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
from fastapi.testclient import TestClient
from swagger_ui_bundle import swagger_ui_path

from moviematch_ml.api.app import create_app
from moviematch_ml.features import EXAMPLE
from moviematch_ml.runtime.cards import PERSONALIZED_DIR
from moviematch_ml.settings import Settings
from realserver import Server, start, stop

SECURITY_HEADERS: Final[dict[str, str]] = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
# An absolute path anywhere in a text (not a URL's slashes, nor a relative path's).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s/:'\",;()<>]+/[^\s'\",;()<>]+")
Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exposure")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    """A real server whose MODEL_PATH is missing: degraded, answering with the fallback rule."""
    s = start(home, MODEL_PATH=str(home / "missing-model"), DATABASE_URL=f"sqlite:///{home / 'feedback.sqlite3'}")
    try:
        yield s
    finally:
        stop(s)


def fetch(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Answer:
    """(status, headers with lower-case names, body bytes), the headers exactly as the server sent them."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        names = [name.lower() for name, _ in response.getheaders()]
        assert len(names) == len(set(names)), names  # no header twice
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def answers(port: int) -> dict[str, Answer]:
    json = {"Content-Type": "application/json"}
    return {
        "health": fetch(port, "GET", "/health"),
        "root": fetch(port, "GET", "/"),
        "live": fetch(port, "GET", "/health/live"),
        "predict": fetch(port, "POST", "/predict", orjson.dumps(EXAMPLE), json),
        "batch": fetch(port, "POST", "/predict-batch", orjson.dumps({"movies": [{"movie_id": 1, **EXAMPLE}]}), json),
        "invalid": fetch(port, "POST", "/predict", b'{"vote_average": 11}', json),
        "not json": fetch(port, "POST", "/predict", b"{", json),
        "not found": fetch(port, "GET", "/nope"),
        "wrong method": fetch(port, "GET", "/predict"),
        "too large": fetch(port, "POST", "/feedback", b" " * (9 * 1024 * 1024), json),
        "docs": fetch(port, "GET", "/docs"),
        "asset": fetch(port, "GET", "/docs/assets/swagger-ui.css"),
        "openapi": fetch(port, "GET", "/openapi.json"),
        "metrics": fetch(port, "GET", "/metrics"),
    }


def test_no_server_banner_and_the_security_headers_on_every_answer(server: Server) -> None:
    """Defect 9: ``server: uvicorn`` named the software; no X-Content-Type-Options or other security headers."""
    seen = answers(server.port)
    assert {name: a[0] for name, a in seen.items()} == {
        "health": 200,
        "root": 200,
        "live": 200,
        "predict": 200,
        "batch": 200,
        "invalid": 422,
        "not json": 400,
        "not found": 404,
        "wrong method": 405,
        "too large": 413,
        "docs": 200,
        "asset": 200,
        "openapi": 200,
        "metrics": 200,
    }
    for name, (_, headers, _) in seen.items():
        assert "server" not in headers, name
        assert "x-powered-by" not in headers, name
        assert {k: headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, name


def test_docs_load_nothing_from_another_host(server: Server) -> None:
    """Defect 9: /docs loaded Swagger UI's scripts and styles from a public CDN. Now every file the page names is
    the service's own (the package's bytes), the page's policy keeps it to its origin, and Swagger UI's badge from a
    public validator (which would send it the schema's URL) is off."""
    status, headers, page = fetch(server.port, "GET", "/docs")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    html = page.decode()
    assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+", html), "the page names another host"
    assert headers["content-security-policy"].startswith("default-src 'self';")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert '"validatorUrl": null' in html
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(urls) == [
        "/docs/assets/favicon-32x32.png",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
    ]
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in urls:
        status, headers, body = fetch(server.port, "GET", url)
        assert status == 200, url
        assert headers["content-type"].startswith(types[Path(url).suffix])
        assert body == (Path(swagger_ui_path) / Path(url).name).read_bytes()


@pytest.mark.parametrize(
    "name", ["index.html", "oauth2-redirect.html", "swagger-initializer.js", "swagger-ui-bundle.js.map", "..%2fdocs.py"]
)
def test_only_the_files_the_page_needs_are_served(server: Server, name: str) -> None:
    # The package's directory also holds Swagger UI's demo page, which loads a specification from a public host.
    status, _, body = fetch(server.port, "GET", f"/docs/assets/{name}")
    assert (status, orjson.loads(body)["error"]) == (404, "not_found")


def test_degraded_health_and_root_show_no_path(server: Server, home: Path) -> None:
    """Defect 9: degraded /health and GET / showed the model's absolute path."""
    for path in ("/health", "/"):
        status, _, body = fetch(server.port, "GET", path)
        text = body.decode()
        assert status == 200
        assert str(home) not in text
        assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text)
        assert "no model card at MODEL_PATH" in text
    log = server.log_path.read_text()
    assert f"no model card at {home / 'missing-model'}" in log  # the log keeps the path, for the operator


def test_openapi_ids_are_not_nullable(server: Server) -> None:
    """Defect 9: the schema allowed null for user_id, movie_id and feedback_id, which the service refuses (422)."""
    schemas = orjson.loads(fetch(server.port, "GET", "/openapi.json")[2])["components"]["schemas"]
    fields = {
        "PredictRequest": ("user_id", "movie_id"),
        "BatchRequest": ("user_id",),
        "BatchMovie": ("movie_id",),
        "FeedbackRating": ("user_id", "movie_id", "feedback_id"),
    }
    for model, names in fields.items():
        for name in names:
            prop = schemas[model]["properties"][name]
            assert "null" not in orjson.dumps(prop).decode(), (model, name, prop)
    # What the schema says is what the service does: null is refused.
    json = {"Content-Type": "application/json"}
    for path, body in [
        ("/predict", {**EXAMPLE, "user_id": None}),
        ("/predict", {**EXAMPLE, "movie_id": None}),
        ("/predict-batch", {"user_id": None, "movies": [{"movie_id": 1, **EXAMPLE}]}),
        ("/feedback", {"user_id": 1, "movie_id": 2, "rating": 5, "feedback_id": None}),
    ]:
        assert fetch(server.port, "POST", path, orjson.dumps(body), json)[0] == 422, (path, body)


# --- defect 6: a client that leaves mid-body --------------------------------------------------------------------------


def _leave_mid_body(port: int, path: str, request_id: str) -> None:
    """Send headers promising 1,000 bytes of body, 10 of them, and close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: {request_id}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"user_id"'
        )


def _lines_of(server: Server, request_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The log lines of one request, once its access line is written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [e for e in server.log_entries() if e.get("request_id") == request_id]
        if any(e["message"] == "request" for e in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id} within {timeout} s:\n{server.log_path.read_text()[-3000:]}")


# What the server logs above info at start-up when MODEL_PATH is missing and API_KEYS unset, and nothing else.
START_UP_WARNINGS: Final[frozenset[str]] = frozenset(
    {"model load failed", "no API_KEYS: every endpoint but /admin is open to anyone who can reach the service"}
)


@pytest.mark.parametrize("path", ["/feedback", "/predict", "/predict-batch"])
def test_a_client_that_leaves_mid_body_is_a_499_at_info_level(server: Server, path: str) -> None:
    """Defect 6: a client gone mid-body on /feedback was logged at error level ("unhandled error", a traceback) with
    a 500 in the access log. Now: one info line with status 499, nothing at warning or above, no traceback; and the
    server goes on answering."""
    request_id = f"leaves-{path.strip('/')}-{time.monotonic_ns()}"
    _leave_mid_body(server.port, path, request_id)
    [access] = _lines_of(server, request_id)
    assert (access["level"], access["method"], access["path"], access["status"]) == ("info", "POST", path, 499)
    assert fetch(server.port, "GET", "/health/live")[0] == 200
    entries = server.log_entries()
    assert {e["message"] for e in entries if e["level"] not in ("debug", "info")} <= START_UP_WARNINGS
    assert "Traceback" not in server.log_path.read_text()


# --- no path in any answer, whatever MODEL_PATH names -----------------------------------------------------------------


def _reasons(settings: Settings) -> str:
    with TestClient(create_app(settings)) as c:
        return c.get("/health").text + c.get("/").text + c.get("/models").text


@pytest.fixture
def broken_personalised(tiny_personalized_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny models whose personalised state no longer has its card's checksum."""
    model = Path(shutil.copytree(tiny_personalized_dir, tmp_path / "model"))
    with (model / PERSONALIZED_DIR / "state.npz").open("ab") as f:
        f.write(b"\0")
    return model


def test_a_model_card_s_path_as_model_path_shows_no_path(broken_personalised: Path, tmp_path: Path) -> None:
    """MODEL_PATH may name the card file: the personalised model's reason named its directory's full path."""
    text = _reasons(Settings(model_path=broken_personalised / "model_card.json"))
    assert str(tmp_path) not in text
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text)
    assert "ModelChecksumError: MODEL_PATH/../personalized/state.npz: sha256 " in text


def test_a_relative_model_path_is_named_like_an_absolute_one(broken_personalised: Path, tmp_path: Path) -> None:
    """A relative MODEL_PATH ("model") was replaced wherever its text appeared, words of the message included:
    "MODEL_PATH card MODEL_PATH/MODEL_PATH_card.json names MODEL_PATH.txt". Now only where it stands as a path."""
    (tmp_path / "model" / "model.txt").unlink()  # the tests run in tmp_path: "model" is the copy
    text = _reasons(Settings(model_path=Path("model")))
    assert "ModelNotFoundError: model card MODEL_PATH/model_card.json names model.txt, which does not exist" in text
    assert "ModelChecksumError: MODEL_PATH/personalized/state.npz: sha256 " in text
    assert str(tmp_path) not in text
