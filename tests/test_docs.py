"""The docs run: every shell and curl example of README.md and docs/api.md against a real ``moviematch-ml serve``.

Each ```` ```bash ```` block is one test. Its commands run in a shell, with ``localhost:8000`` pointed at a server
this module starts (docs/api.md: with ``MODEL_PATH=/nonexistent``, as that page says its examples were run; the
README: the bundled models). An answer the docs show (a ```` ```json ```` block right after the example, or a
``# {...}`` comment after a command) must be what the server answers, field for field, except the fields that are
new on every request (prediction ids, uptime). Every other answer must be a 2xx with a JSON body. ``serve``
commands are started and must become ready; ``train`` and ``evaluate`` run on small files made here. A block that
cannot run here says so in the Markdown, right before it: ``<!-- docs-test: skip: <why> -->``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moviematch_ml.settings import Settings
from realserver import Server, free_port, request, start, stop

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"README.md": "bundled", "docs/api.md": "fallback"}
SKIP = re.compile(r"<!-- docs-test: skip: (.+?) -->")
VOLATILE = {"prediction_id", "uptime_seconds"}  # new on every request
BIN = str(Path(sys.executable).parent)


@dataclass
class Command:
    text: str
    expected: Any = None  # the answer the docs show, when they show one


@dataclass
class Example:
    path: str
    line: int
    skip: str | None
    commands: list[Command] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def _split_comment(line: str) -> tuple[str, str | None]:
    """A shell line's code and its ``# comment`` (a ``#`` outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), None


def _json_prefix(text: str) -> Any:
    """The JSON value a comment starts with (``{"status":"alive"}: the process answers``), else None."""
    try:
        return json.JSONDecoder().raw_decode(text)[0] if text.startswith(("{", "[")) else None
    except json.JSONDecodeError:
        return None


def _commands(lines: list[str]) -> list[Command]:
    out: list[Command] = []
    pending = ""
    for raw in lines:
        code, comment = _split_comment(raw) if not pending else (raw.rstrip(), None)
        if not pending and not code:
            if comment is not None and out and (value := _json_prefix(comment)) is not None:
                out[-1].expected = value  # "# {...}" after a command: its answer
            continue
        pending = f"{pending}\n{code}" if pending else code
        if pending.endswith("\\") or pending.count("'") % 2:
            continue  # continued on the next line (a trailing \, or a quoted body over several lines)
        out.append(Command(pending, _json_prefix(comment) if comment else None))
        pending = ""
    assert not pending, f"unfinished command: {pending!r}"
    return out


def examples(path: str) -> list[Example]:
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = m.group(1) if (m := SKIP.fullmatch(before.strip())) else None
        end = lines.index("```", i + 1)
        example = Example(path, i + 1, skip, _commands(lines[i + 1 : end]))
        after = end + 1
        while after < len(lines) and not lines[after].strip():
            after += 1
        if after < len(lines) and lines[after].strip() == "```json":
            answer = "\n".join(lines[after + 1 : lines.index("```", after + 1)])
            example.commands[-1].expected = json.loads(answer)
        found.append(example)
        i = end + 1
    return found


ALL = [e for path in DOCS for e in examples(path)]
SLOW = ("moviematch-ml train", "moviematch-ml evaluate")


def _params() -> Iterator[Any]:
    for e in ALL:
        marks = [pytest.mark.slow] if any(s in c.text for c in e.commands for s in SLOW) else []
        yield pytest.param(e, id=e.id, marks=marks)


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<new each time>" if k in VOLATILE else _normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """The two servers the docs describe: with the bundled models, and with a MODEL_PATH that does not exist."""
    tmp = tmp_path_factory.mktemp("docs")
    bundled = start(tmp, "bundled", DATABASE_URL=f"sqlite:///{tmp / 'bundled.sqlite3'}")
    try:
        fallback = start(tmp, "fallback", DATABASE_URL=f"sqlite:///{tmp / 'f.sqlite3'}", MODEL_PATH="/nonexistent")
    except BaseException:
        stop(bundled)
        raise
    try:
        yield {"bundled": bundled, "fallback": fallback}
    finally:
        stop(bundled)
        stop(fallback)


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in {n.upper() for n in Settings.model_fields}}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PORT": str(port), "HOST": "127.0.0.1"}


def _curl(command: Command, port: int, tmp_path: Path) -> None:
    text = command.text.replace("localhost:8000", f"127.0.0.1:{port}")
    out = subprocess.run(
        ["bash", "-c", text + " -w '\\n%{http_code}'"],
        cwd=tmp_path,
        env=_env(tmp_path, port),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"{command.text}\n{out.stderr}"
    body, _, status = out.stdout.rpartition("\n")
    assert status.startswith("2"), f"{command.text}: HTTP {status} {body}"
    answer = json.loads(body)
    if command.expected is not None:
        assert _normalised(answer) == _normalised(command.expected), command.text


def _serve(command: Command, tmp_path: Path) -> None:
    """A command that ends in ``moviematch-ml serve``: it must come up (on a free port) and answer ready."""
    port = free_port()
    text = re.sub(r"--port \d+", f"--port {port}", command.text)
    env = {**_env(tmp_path, port), "DATABASE_URL": f"sqlite:///{tmp_path / 'moviematch.sqlite3'}"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", text], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300  # a command may train first (train ... && serve)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{command.text} exited:\n{(tmp_path / 'serve.log').read_text()}"
            try:
                if request(port, "GET", "/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{command.text} not ready within 300 s:\n{(tmp_path / 'serve.log').read_text()}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def _training_files(tmp_path: Path) -> None:
    """What the training examples read: ratings.csv, movies.csv and tmdb.csv, and the service's own store with
    enough ratings for --from-feedback (the README's examples name these files)."""
    from moviematch_ml.online.feedback import Feedback
    from moviematch_ml.online.store import FeedbackStore
    from reference import synthetic_dataset, write_csvs

    ds = synthetic_dataset(1200)
    write_csvs(tmp_path, ds)
    movies = ds.movies
    columns = ["vote_average", "vote_count", "popularity", "year"]
    meta = ["movieId,vote_average,vote_count,popularity,release_year"]
    for _, row in movies.iterrows():
        cells = ["" if row[c] != row[c] else f"{row[c]:g}" for c in columns]  # NaN (unknown): an empty cell
        meta.append(",".join([str(row["movie_id"]), *cells]))
    (tmp_path / "tmdb.csv").write_text("\n".join(meta) + "\n", encoding="utf-8")
    store = FeedbackStore.from_url(f"sqlite:///{tmp_path / 'moviematch.sqlite3'}")
    r = ds.ratings
    store.add(
        [
            Feedback(f"d{i}", str(u), str(m), 2.0 * v, float(t), None)
            for i, (u, m, v, t) in enumerate(zip(r["user_id"], r["movie_id"], r["rating"], r["timestamp"], strict=True))
        ]
    )
    store.close()


def _run(command: Command, tmp_path: Path) -> None:
    env = {**_env(tmp_path, free_port()), "DATABASE_URL": f"sqlite:///{tmp_path / 'moviematch.sqlite3'}"}
    out = subprocess.run(
        ["bash", "-c", command.text], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, f"{command.text} ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    if "--json" in command.text:
        assert isinstance(json.loads(out.stdout), dict)  # exactly one JSON object on stdout


@pytest.mark.parametrize("example", list(_params()))
def test_the_example_runs_as_documented(example: Example, servers: dict[str, Server], tmp_path: Path) -> None:
    if example.skip is not None:
        pytest.skip(example.skip)
    assert example.commands, f"{example.id}: an empty example"
    server = servers[DOCS[example.path]]
    if any(s in c.text for c in example.commands for s in SLOW):
        _training_files(tmp_path)
    for command in example.commands:
        if command.text.startswith("curl") and "localhost:8000" in command.text:
            _curl(command, server.port, tmp_path)
        elif "moviematch-ml serve" in command.text:
            _serve(command, tmp_path)
        elif command.text.startswith("moviematch-ml "):
            _run(command, tmp_path)
        else:
            raise AssertionError(f"{example.id}: no way to run {command.text!r}: mark the block as skipped, with why")


RUN_BY = re.compile(r"run by (tests/[\w/]+\.py)")


def test_every_example_is_run_or_says_why_not() -> None:
    assert len(ALL) >= 10
    # Only what cannot run here: installing packages, Railway's commands, and workflows that need a state the docs'
    # servers do not have (an admin key, a registry with traffic), which a named test runs instead, command by command.
    for e in ALL:
        if not e.skip:
            continue
        if (m := RUN_BY.search(e.skip)) is not None:
            test = (ROOT / m.group(1)).read_text(encoding="utf-8")
            for c in e.commands:
                words = c.text.split()
                # Each command's subcommand ("models promote", "ab-report") or route ("/admin/reload") is in that test.
                if words[0] == "moviematch-ml":
                    keys = [words[1]] if words[1] != "models" else [f'"{words[2]}"']
                elif words[0] == "curl":
                    keys = [w.split("8000", 1)[1] for w in words if "localhost:8000/" in w]
                else:
                    keys = []  # export, cd...: set-up, not a command of the service
                for key in keys:
                    assert key in test, f"{e.id}: {m.group(1)} does not run {c.text!r} ({key!r})"
            continue
        assert "pip install" in e.skip or "railway" in e.skip, (e.id, e.skip)
        assert any(w in c.text for c in e.commands for w in ("pip install", "railway")), e.id


def test_ci_runs_the_readme_s_test_command() -> None:
    readme = [e for e in ALL if e.path == "README.md" and any("scripts/check" in c.text for c in e.commands)]
    [command] = readme[0].commands
    assert command.text in (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.text == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install --require-hashes -r requirements-test.txt "
        "&& pip install --no-deps -e . && scripts/check"
    )


def test_the_configuration_tables_list_every_setting() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    for path in DOCS:
        rows = re.findall(r"^\| `([A-Z_]+)` \|", (ROOT / path).read_text(encoding="utf-8"), re.MULTILINE)
        assert set(rows) == settings, f"{path}: missing {settings - set(rows)}, unknown {set(rows) - settings}"
