"""ab-report: per-variant errors with user-level bootstrap intervals, a permutation p-value, the verdict, the files
and the JSON it writes, and the errors when there is nothing to compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml import cli
from moviematch_ml.errors import ReportError
from moviematch_ml.features import example_matrix
from moviematch_ml.offline.ab import Z_80, Z_975, UserTotals, report, verdict
from moviematch_ml.offline.joins import Joined, join_ratings
from moviematch_ml.online.feedback import Feedback
from moviematch_ml.online.journal import Entry, PredictionLog, read
from moviematch_ml.online.store import FeedbackStore


def join_store(store: FeedbackStore) -> Joined:
    return join_ratings(store.iter_feedback(), read(store))


def _fill(store: FeedbackStore, rows: list[tuple[str, str, str, float, float]]) -> None:
    """One /predict per (variant, user, movie, prediction, rating), each followed by a rating quoting its id."""
    entries, ratings = [], []
    for i, (variant, user, movie, prediction, rating) in enumerate(rows):
        pid = f"{i:032x}"
        entries.append(
            Entry(
                pid,
                100.0 + i,
                "predict",
                variant,
                f"v-{variant}",
                user,
                [movie],
                example_matrix(),
                [prediction],
                "model",
                None,
            )
        )
        ratings.append(Feedback(f"f{i}", user, movie, rating, 1000.0 + i, pid))
    store.log_predictions(PredictionLog(max_rows=len(rows)).rows(entries))
    store.add(ratings)


# Champion: c1 errs by -1 and 0, c2 by +2; challenger b: h1 by +-0.5.
SMALL = [
    ("champion", "c1", "1", 7.0, 8.0),
    ("champion", "c1", "2", 5.0, 5.0),
    ("champion", "c2", "1", 6.0, 4.0),
    ("b", "h1", "1", 7.0, 7.5),
    ("b", "h1", "2", 7.0, 6.5),
]


def test_errors_intervals_and_p_value_by_hand(store: FeedbackStore) -> None:
    _fill(store, SMALL)
    data = report(join_store(store), bootstrap=4000, seed=1, min_ratings=1)
    champion, b = data["variants"]
    assert (champion["name"], champion["users"], champion["ratings"]) == ("champion", 2, 3)
    assert champion["model_versions"] == {"v-champion": 3}
    assert champion["rmse"]["value"] == pytest.approx(math.sqrt(5 / 3))  # (1 + 0 + 4) / 3
    assert champion["mae"]["value"] == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    assert (b["rmse"]["value"], b["mae"]["value"]) == (pytest.approx(0.5), pytest.approx(0.5))
    # Resampling two users: {c1, c1} (RMSE sqrt(1/2)) and {c2, c2} (2) each come a quarter of the time, so the
    # 2.5th and 97.5th percentiles are those two values exactly; one user only: no spread at all.
    assert (champion["rmse"]["low"], champion["rmse"]["high"]) == (pytest.approx(math.sqrt(0.5)), pytest.approx(2.0))
    assert (b["rmse"]["low"], b["rmse"]["high"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert champion["ndcg@10"] == {"value": None, "low": None, "high": None}  # nobody rated 5 movies
    (c,) = data["comparisons"]
    assert c["rmse"]["difference"] == pytest.approx(0.5 - math.sqrt(5 / 3))
    assert (c["rmse"]["low"], c["rmse"]["high"]) == (pytest.approx(0.5 - 2.0), pytest.approx(0.5 - math.sqrt(0.5)))
    # Permutations put one of the three users in b's place: h1 (the observed split) or c2 (RMSE 2 against
    # sqrt(1.5/4): a larger difference) are as extreme, c1 is not (sqrt(0.5) against sqrt(4.5/3)): p = 2/3.
    assert c["rmse"]["p_value"] == pytest.approx(2 / 3, abs=0.03)
    assert (c["better"], c["significant"]) == (None, False)
    assert c["verdict"].startswith("no significant difference yet: about ")
    assert data["ratings"] == {
        "read": 5,
        "joined": 5,
        "joined_by_id": 5,
        "joined_by_time": 0,
        "not_joined": 0,
        "log_predictions": 5,
    }


def test_ndcg_of_a_user_is_ranked_by_prediction_against_the_ratings() -> None:
    import pandas as pd

    rows = pd.DataFrame(
        {"user_id": ["u"] * 5, "rating": [1.0, 2.0, 3.0, 4.0, 5.0], "prediction": [5.0, 4.0, 3.0, 2.0, 1.0]}
    )
    t = UserTotals.of(rows)
    log2 = np.log2(np.arange(2, 7))
    dcg = np.sum(np.array([1, 2, 3, 4, 5]) / log2)  # worst order: the lowest rating ranked first
    idcg = np.sum(np.array([5, 4, 3, 2, 1]) / log2)
    assert (t.ranked.tolist(), t.n.tolist(), t.sse.tolist()) == ([1.0], [5.0], [16 + 4 + 0 + 4 + 16.0])
    assert t.point()["ndcg@10"] == pytest.approx(dcg / idcg)


def test_the_verdict_text() -> None:
    assert verdict(-0.031, -0.045, -0.017, 0.001, 1000, 0.007) == (
        "challenger better: RMSE \u22120.031 [\u22120.045, \u22120.017] (p = 0.001)",
        "challenger",
        None,
    )
    assert verdict(0.05, 0.02, 0.08, 0.004, 1000, 0.015)[:2] == (
        "champion better: RMSE +0.050 [+0.020, +0.080] (p = 0.004)",
        "champion",
    )
    # Not significant: 1,000 ratings now; (2.8016 * 0.015 / 0.02)^2 = 4.415 times as many would do: 3,415 more.
    assert round(Z_975 + Z_80, 6) == 2.801585
    assert verdict(-0.02, -0.05, 0.01, 0.2, 1000, 0.015) == (
        "no significant difference yet: about 3,415 more ratings needed",
        None,
        3415,
    )
    # An interval that excludes 0 with a p-value above 0.05 (or the reverse) is not enough.
    assert verdict(-0.02, -0.04, -0.001, 0.06, 1000, 0.01)[1] is None


def test_a_clearly_better_challenger_is_named(store: FeedbackStore) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for variant, spread in (("champion", 2.0), ("b", 1.0)):
        for u in range(40):
            for m in range(6):
                rows.append((variant, f"{variant}{u}", str(m), 5.0, float(np.clip(5.0 + rng.normal(0, spread), 0, 10))))
    _fill(store, rows)
    data = report(join_store(store), bootstrap=500, seed=0, min_ratings=100)
    (c,) = data["comparisons"]
    assert (c["better"], c["significant"], c["more_ratings_needed"]) == ("challenger", True, None)
    assert c["rmse"]["high"] < 0
    assert c["rmse"]["p_value"] < 0.05
    assert c["verdict"].startswith("challenger better: RMSE \u2212")
    # Below --min-ratings there is no verdict, whatever the difference.
    few = report(join_store(store), bootstrap=100, seed=0, min_ratings=241)["comparisons"][0]
    assert (few["better"], few["verdict"]) == (
        None,
        "too few ratings yet: b has 240 joined ratings and the champion 240; a verdict needs 241 each (--min-ratings)",
    )


def test_nothing_to_compare_is_an_error(store: FeedbackStore) -> None:
    with pytest.raises(ReportError, match="the prediction log is empty"):
        report(join_store(store))
    _fill(store, SMALL[:3])
    with pytest.raises(ReportError, match=r"one variant only \(champion\)"):
        report(join_store(store))
    store.add([Feedback("late", "zz", "1", 5.0, 2000.0, None)])
    with store.engine.begin() as conn:  # only the unjoinable rating is left
        conn.exec_driver_sql("DELETE FROM feedback WHERE user_id != 'zz'")
    with pytest.raises(ReportError, match="no rating joined a logged prediction"):
        report(join_store(store))


def test_the_command_writes_markdown_png_and_json(
    store: FeedbackStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(store, SMALL)
    url = str(store.engine.url)
    out = tmp_path / "report"
    code = cli.main(["ab-report", "--database-url", url, "--out", str(out), "--json", "--bootstrap", "200"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"format_version", "scale", "window", "method", "ratings", "variants", "comparisons"}
    assert [v["name"] for v in data["variants"]] == ["champion", "b"]
    for v in data["variants"]:
        assert set(v) == {"name", "model_versions", "users", "ratings", "ranked_users", "rmse", "mae", "ndcg@10"}
        assert set(v["rmse"]) == {"value", "low", "high"}
    (c,) = data["comparisons"]
    assert set(c) == {"challenger", "champion", "rmse", "mae", "ndcg@10", "better", "significant",
                      "more_ratings_needed", "verdict"}  # fmt: skip
    assert set(c["rmse"]) == {"difference", "low", "high", "p_value"}
    assert (c["challenger"], c["champion"]) == ("b", "champion")
    assert data["method"]["min_ratings"] == 100
    assert c["verdict"].startswith("too few ratings yet")
    md = (out / "ab_report.md").read_text()
    assert "| b | `v-b` (2) | 1 | 2 | 0.500 [0.500, 0.500] | 0.500 [0.500, 0.500] | n/a [n/a, n/a] (0) |" in md
    assert (out / "ab_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_exits_2_naming_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"sqlite:///{tmp_path / 'nothing.sqlite3'}"
    assert cli.main(["ab-report", "--database-url", missing, "--out", str(tmp_path / "r")]) == 2
    assert "no SQLite database at" in capsys.readouterr().err
    empty = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    FeedbackStore.from_url(empty).close()
    assert cli.main(["ab-report", "--database-url", empty, "--out", str(tmp_path / "r")]) == 2
    assert "moviematch-ml ab-report: the prediction log is empty" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert cli.main(["ab-report", "--database-url", empty, "--since", "yesterday"]) == 1
    assert "--since" in capsys.readouterr().err


def test_the_window_selects_ratings_by_their_time(
    store: FeedbackStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fill(store, SMALL)  # rated at 1000-1004 (unix seconds, 1970-01-01T00:16:40Z to 00:16:44Z)
    url = str(store.engine.url)
    args = ["ab-report", "--database-url", url, "--out", str(tmp_path / "r"), "--json", "--bootstrap", "50"]
    assert cli.main([*args, "--since", "1970-01-01T00:16:42Z"]) == 0
    data = json.loads(capsys.readouterr().out)
    # c2's rating (1002) and h1's two (1003, 1004): the champion's c1 falls out.
    assert (data["ratings"]["read"], [v["users"] for v in data["variants"]]) == (3, [1, 1])
    assert data["window"] == {"since": "1970-01-01T00:16:42Z", "until": None}
    assert cli.main([*args, "--until", "1970-01-01T00:16:41"]) == 2  # no zone: UTC; c1's two ratings, one variant
    assert "one variant only (champion)" in capsys.readouterr().err
