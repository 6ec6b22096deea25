"""Progress of train and evaluate: every stage on stderr with its time, only on a terminal, never on stdout."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

from moviematch_ml import cli
from moviematch_ml.offline.candidates import CANDIDATES
from moviematch_ml.offline.progress import Progress
from reference import synthetic_dataset, write_csvs


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, and keeps what was written to it."""

    def isatty(self) -> bool:
        return True


def _stages(text: str) -> list[str]:
    """The finished stages written above the bar, in order: ``name: 1.2 s`` lines (the bar's redraws dropped)."""
    lines = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text))
    return [m.group(1) for line in lines if (m := re.fullmatch(r"(.+): [0-9]+\.[0-9] s", line.strip()))]


def test_each_stage_is_written_with_its_time() -> None:
    out = Terminal()
    progress = Progress(enabled=True, file=out)
    progress.expect(2)
    with progress.step("features"):
        pass
    with progress.step("model") as note:
        note("tree 3/10")
    with progress.step("report"):  # not announced: counted all the same
        pass
    progress.close("run")
    text = out.getvalue()
    assert _stages(text) == ["features", "model", "report"]
    assert "stage 0/2" in text  # the bar counts the stages announced
    assert "stage 2/3" in text
    assert re.search(r"run: done in [0-9]+\.[0-9] s", text)


def test_disabled_it_writes_nothing() -> None:
    out = Terminal()
    progress = Progress(enabled=False, file=out)
    progress.expect(1)
    with progress.step("features") as note:
        note("anything")
    progress.close("run")
    assert out.getvalue() == ""


@pytest.fixture
def csvs(tmp_path: Path) -> tuple[str, str]:
    r, m = write_csvs(tmp_path, synthetic_dataset(1500))
    return str(r), str(m)


def _evaluate(csvs: tuple[str, str], *extra: str) -> list[str]:
    r, m = csvs
    return ["evaluate", "--ratings", r, "--movies", m, "--protocol", "kfold", "--folds", "2", "--json", *extra]


def test_evaluate_shows_every_stage_on_a_terminal_and_its_json_stays_alone_on_stdout(
    csvs: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(_evaluate(csvs)) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1
    assert json.loads(stdout)["protocol"] == "kfold"  # exactly one JSON object: progress never goes there
    folds = [f"fold {i}/2: {name}" for i in (1, 2) for name in CANDIDATES]
    assert _stages(terminal.getvalue()) == ["loading data", "features", *folds]
    assert re.search(r"evaluate: done in [0-9]+\.[0-9] s", terminal.getvalue())


@pytest.mark.parametrize("terminal", [True, False], ids=["quiet", "not-a-terminal"])
def test_evaluate_is_quiet_with_quiet_or_off_a_terminal(
    csvs: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], terminal: bool
) -> None:
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert cli.main(_evaluate(csvs, *(["--quiet"] if terminal else []))) == 0
    assert json.loads(capsys.readouterr().out)["protocol"] == "kfold"
    assert err.getvalue() == ""


def test_train_shows_every_stage(
    csvs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    r, m = csvs
    assert cli.main(["train", "--ratings", r, "--movies", m, "--out", str(tmp_path / "model")]) == 0
    holdout = [f"hold-out: {name}" for name in CANDIDATES]
    assert _stages(terminal.getvalue()) == [
        "loading data",
        "features",
        *holdout,
        "final six-feature model",
        "final personalised model",
        "writing the models",
        "report and plots",
    ]
    assert "trained in " in capsys.readouterr().out  # the summary stays on stdout, as before
