"""The A/B report: each variant measured on the ratings that followed its predictions, each challenger against the
champion, a verdict (``moviematch-ml ab-report``; the method is in docs/ab.md).

Per variant: users, ratings, RMSE and MAE of the joined predictions (0-10 scale), NDCG@10 of what was ranked (per
user with at least NDCG_MIN_RATINGS joined ratings, their rated movies ordered by prediction against their ratings,
then the mean over users), each with a 95% interval from a user-level bootstrap (users resampled with replacement,
``bootstrap`` times, seeded). A challenger against the champion: the difference (challenger - champion) with the
2.5-97.5 percentiles of the two groups' bootstrap differences, and a two-sided p-value from a permutation test on
users (the two groups are different users: their labels are shuffled, keeping the group sizes).

The verdict, on RMSE: a significant difference is one whose interval excludes 0 **and** whose p-value is below
0.05; the lower RMSE is better. Otherwise "no significant difference yet", with about how many more ratings would
make the observed difference significant: the ratings now times ``((z_0.975 + z_0.8) * se / |d|)^2`` less the
ratings now (80% power, ``se`` the bootstrap standard error of the difference, which shrinks as one over the square
root of the ratings when new ones come in the same proportions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from moviematch_ml.errors import ReportError
from moviematch_ml.offline.joins import Joined
from moviematch_ml.offline.metrics import NDCG_K, NDCG_MIN_RATINGS, ndcg_at_k
from moviematch_ml.runtime.registry import CHAMPION

FloatArray = npt.NDArray[np.float64]

METRICS: Final[tuple[str, ...]] = ("rmse", "mae", "ndcg@10")
LOWER_IS_BETTER: Final[dict[str, bool]] = {"rmse": True, "mae": True, "ndcg@10": False}
ALPHA: Final[float] = 0.05
Z_975: Final[float] = 1.959964  # two-sided 95%
Z_80: Final[float] = 0.841621  # 80% power
CHUNK: Final[int] = 100  # resamples computed at once (a CHUNK x users matrix)
MINUS: Final[str] = "\u2212"


@dataclass(frozen=True)
class UserTotals:
    """One variant's joined ratings summed per user: what every statistic (and its resamples) is computed from."""

    n: FloatArray  # ratings
    sse: FloatArray  # sum of squared errors
    sae: FloatArray  # sum of absolute errors
    ndcg: FloatArray  # the user's NDCG@10, 0 where the user has fewer than NDCG_MIN_RATINGS ratings
    ranked: FloatArray  # 1 where the user's NDCG counts, else 0

    @classmethod
    def of(cls, frame: pd.DataFrame) -> UserTotals:
        n, sse, sae, nd, ranked = [], [], [], [], []
        for _, rows in frame.groupby("user_id", sort=True):
            truth = rows["rating"].to_numpy(dtype=np.float64)
            pred = rows["prediction"].to_numpy(dtype=np.float64)
            err = pred - truth
            n.append(float(len(rows)))
            sse.append(float(np.sum(err * err)))
            sae.append(float(np.sum(np.abs(err))))
            # The user's NDCG: ndcg_at_k of one user's rows (NaN below its minimum, or when every rating is 0).
            value = ndcg_at_k(np.zeros(len(rows)), truth, pred, NDCG_K, NDCG_MIN_RATINGS)
            nd.append(0.0 if math.isnan(value) else value)
            ranked.append(0.0 if math.isnan(value) else 1.0)
        return cls(*(np.asarray(a, dtype=np.float64) for a in (n, sse, sae, nd, ranked)))

    @property
    def users(self) -> int:
        return int(self.n.size)

    def stats(self, w: FloatArray) -> dict[str, FloatArray]:
        """Every metric for each row of weights ``w`` (resamples x users: how many times each user counts)."""
        n = w @ self.n
        ranked = w @ self.ranked
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "rmse": np.sqrt((w @ self.sse) / n),
                "mae": (w @ self.sae) / n,
                "ndcg@10": np.where(ranked > 0, (w @ self.ndcg) / ranked, np.nan),
            }

    def point(self) -> dict[str, float]:
        return {k: float(v[0]) for k, v in self.stats(np.ones((1, self.users))).items()}

    def bootstrap(self, rng: np.random.Generator, b: int) -> dict[str, FloatArray]:
        """Every metric on ``b`` resamples of the users (with replacement)."""
        out: dict[str, list[FloatArray]] = {k: [] for k in METRICS}
        u = self.users
        for start in range(0, b, CHUNK):
            m = min(CHUNK, b - start)
            w = rng.multinomial(u, np.full(u, 1.0 / u), size=m).astype(np.float64)
            for k, v in self.stats(w).items():
                out[k].append(v)
        return {k: np.concatenate(v) for k, v in out.items()}


def _interval(values: FloatArray) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else x


def permutation_p(
    a: UserTotals, b: UserTotals, observed: dict[str, float], rng: np.random.Generator, permutations: int
) -> dict[str, float | None]:
    """Two-sided p-values of the differences (b - a) of every metric: users' group labels shuffled ``permutations``
    times (sizes kept); p = (1 + #|permuted| >= |observed|) / (1 + permutations)."""
    pooled = UserTotals(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in UserTotals.__dataclass_fields__))
    total, nb = pooled.users, b.users
    extreme = dict.fromkeys(METRICS, 0)
    counted = dict.fromkeys(METRICS, 0)
    for start in range(0, permutations, CHUNK):
        m = min(CHUNK, permutations - start)
        in_b = (np.argsort(rng.random((m, total)), axis=1) < nb).astype(np.float64)
        sb, sa = pooled.stats(in_b), pooled.stats(1.0 - in_b)
        for k in METRICS:
            d = sb[k] - sa[k]
            ok = np.isfinite(d)
            counted[k] += int(ok.sum())
            # The tolerance keeps a permutation equal to the observed split from missing by a rounding error.
            extreme[k] += int(np.sum(np.abs(d[ok]) >= abs(observed[k]) - 1e-12))
    return {
        k: (None if not math.isfinite(observed[k]) or counted[k] == 0 else (1 + extreme[k]) / (1 + counted[k]))
        for k in METRICS
    }


def signed(x: float) -> str:
    """A difference as the report writes it: its sign always shown, a true minus sign."""
    return f"{x:+.3f}".replace("-", MINUS)


def verdict(
    d: float, lo: float | None, hi: float | None, p: float | None, n_now: int, se: float
) -> tuple[str, str | None, int | None]:
    """(text, which is better: "challenger" / "champion" / None, more ratings needed) of an RMSE difference ``d``
    (challenger - champion) with its interval and p-value, ``n_now`` ratings in both groups and ``se`` the
    difference's standard error (see the module)."""
    if lo is not None and hi is not None and p is not None and (lo > 0 or hi < 0) and p < ALPHA:
        better = "challenger" if d < 0 else "champion"
        return f"{better} better: RMSE {signed(d)} [{signed(lo)}, {signed(hi)}] (p = {p:.2g})", better, None
    if d == 0 or not math.isfinite(d) or se <= 0 or not math.isfinite(se):
        return "no significant difference yet: the two RMSEs are equal", None, None
    needed = n_now * ((Z_975 + Z_80) * se / abs(d)) ** 2
    more = max(1, math.ceil(needed - n_now))
    return f"no significant difference yet: about {more:,} more ratings needed", None, more


def report(
    joined: Joined,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    min_ratings: int = 100,
    window: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints); ReportError when there is nothing to compare."""
    if joined.log_predictions == 0:
        raise ReportError("the prediction log is empty: is PREDICTION_LOG on, and is this the service's database?")
    if joined.frame.empty:
        raise ReportError(
            f"no rating joined a logged prediction ({joined.ratings:,} ratings read, {joined.log_predictions:,} "
            "predictions logged): ratings must follow a prediction of the same movie for the same user, or quote "
            "its prediction_id"
        )
    frame = joined.frame
    names = sorted(frame["variant"].unique(), key=lambda v: (v != CHAMPION, v))
    if len(names) < 2:
        raise ReportError(f"one variant only ({names[0]}): nothing to compare; serve a challenger first")
    if CHAMPION not in names:
        raise ReportError(f"no joined rating of the {CHAMPION} variant: nothing to compare the challengers with")
    rng = np.random.default_rng(seed)
    totals: dict[str, UserTotals] = {}
    resampled: dict[str, dict[str, FloatArray]] = {}
    variants = []
    for name in names:
        rows = frame[frame["variant"] == name]
        t = totals[name] = UserTotals.of(rows)
        resampled[name] = t.bootstrap(rng, bootstrap)
        point = t.point()
        versions = rows["model_version"].value_counts()
        variants.append(
            {
                "name": name,
                "model_versions": {str(v): int(c) for v, c in sorted(versions.items())},
                "users": t.users,
                "ratings": len(rows),
                "ranked_users": int(t.ranked.sum()),
                **{
                    k: dict(
                        zip(("value", "low", "high"), (_num(point[k]), *_interval(resampled[name][k])), strict=True)
                    )
                    for k in METRICS
                },
            }
        )
    comparisons = []
    champion = totals[CHAMPION]
    for name in names[1:]:
        challenger = totals[name]
        observed = {k: challenger.point()[k] - champion.point()[k] for k in METRICS}
        p = permutation_p(champion, challenger, observed, rng, bootstrap)
        diffs = {k: resampled[name][k] - resampled[CHAMPION][k] for k in METRICS}
        metrics = {}
        for k in METRICS:
            lo, hi = _interval(diffs[k])
            metrics[k] = {"difference": _num(observed[k]), "low": lo, "high": hi, "p_value": p[k]}
        n_chal, n_champ = int(challenger.n.sum()), int(champion.n.sum())
        enough = min(n_chal, n_champ) >= min_ratings
        finite = diffs["rmse"][np.isfinite(diffs["rmse"])]
        se = float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan")
        r = metrics["rmse"]
        text, better, more = verdict(observed["rmse"], r["low"], r["high"], r["p_value"], n_chal + n_champ, se)
        if not enough:
            better, more = None, None
            text = (
                f"too few ratings yet: {name} has {n_chal:,} joined ratings and the {CHAMPION} {n_champ:,}; "
                f"a verdict needs {min_ratings:,} each (--min-ratings)"
            )
        comparisons.append(
            {
                "challenger": name,
                "champion": CHAMPION,
                **metrics,
                "better": better,
                "significant": better is not None,
                "more_ratings_needed": more,
                "verdict": text,
            }
        )
    return {
        "format_version": 1,
        "scale": "0-10",
        "window": window or {"since": None, "until": None},
        "method": {
            "bootstrap": bootstrap,
            "permutations": bootstrap,
            "seed": seed,
            "interval": "95% user-level bootstrap (percentiles 2.5-97.5)",
            "p_value": "two-sided permutation test on users",
            "alpha": ALPHA,
            "min_ratings": min_ratings,
            "ndcg_min_ratings": NDCG_MIN_RATINGS,
        },
        "ratings": {
            "read": joined.ratings,
            "joined": joined.by_id + joined.by_time,
            "joined_by_id": joined.by_id,
            "joined_by_time": joined.by_time,
            "not_joined": joined.unjoined,
            "log_predictions": joined.log_predictions,
        },
        "variants": variants,
        "comparisons": comparisons,
    }


def _fmt(x: float | None, signed_: bool = False) -> str:
    if x is None:
        return "n/a"
    return signed(x) if signed_ else f"{x:.3f}"


def _cell(m: dict[str, float | None], fmt: Callable[[float | None], str] = _fmt) -> str:
    return f"{fmt(m['value'])} [{fmt(m['low'])}, {fmt(m['high'])}]"


def markdown(data: dict[str, Any]) -> str:
    """The report as Markdown (ab_report.md)."""
    r = data["ratings"]
    w = data["window"]
    lines = [
        "# A/B report",
        "",
        f"Ratings rated {w['since'] or 'from the start'} to {w['until'] or 'now'}: {r['read']:,} read, "
        f"{r['joined']:,} joined to the prediction before them ({r['joined_by_id']:,} by prediction id, "
        f"{r['joined_by_time']:,} by user, movie and time), {r['not_joined']:,} not joined. Errors on the 0-10 "
        f"scale; 95% intervals from {data['method']['bootstrap']:,} user-level bootstrap resamples.",
        "",
        "| variant | model versions | users | ratings | RMSE | MAE | NDCG@10 (users) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in data["variants"]:
        versions = ", ".join(f"`{k}` ({n:,})" for k, n in v["model_versions"].items())
        lines.append(
            f"| {v['name']} | {versions} | {v['users']:,} | {v['ratings']:,} | {_cell(v['rmse'])} | "
            f"{_cell(v['mae'])} | {_cell(v['ndcg@10'])} ({v['ranked_users']:,}) |"
        )
    lines += [
        "",
        "## Challengers against the champion",
        "",
        "| challenger | RMSE difference | p | MAE difference | p | NDCG@10 difference | p | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in data["comparisons"]:
        cells = []
        for k in METRICS:
            m = c[k]
            cells.append(f"{_fmt(m['difference'], True)} [{_fmt(m['low'], True)}, {_fmt(m['high'], True)}]")
            cells.append("n/a" if m["p_value"] is None else f"{m['p_value']:.2g}")
        lines.append(f"| {c['challenger']} | {' | '.join(cells)} | {c['verdict']} |")
    lines += [
        "",
        "Differences are challenger minus champion (negative RMSE and MAE, positive NDCG: the challenger is better). "
        "p: two-sided permutation test on users. The verdict is on RMSE: significant when the interval excludes 0 "
        f"and p < {data['method']['alpha']}; the method is described in docs/ab.md.",
        "",
        "![the variants' RMSE, MAE and NDCG@10 with their 95% intervals](ab_report.png)",
        "",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """The variants' metrics with their intervals, one panel per metric (ab_report.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["name"] for v in data["variants"]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.5))
    for ax, k in zip(axes, METRICS, strict=True):
        values = [v[k]["value"] if v[k]["value"] is not None else np.nan for v in data["variants"]]
        lows = [v[k]["low"] if v[k]["low"] is not None else np.nan for v in data["variants"]]
        highs = [v[k]["high"] if v[k]["high"] is not None else np.nan for v in data["variants"]]
        err = np.array([np.subtract(values, lows), np.subtract(highs, values)])
        ax.bar(names, values, yerr=err, capsize=6, color=["#4c72b0", *["#dd8452"] * (len(names) - 1)])
        ax.set_title(
            f"{k.upper() if k != 'ndcg@10' else 'NDCG@10'} ({'lower' if LOWER_IS_BETTER[k] else 'higher'} is better)"
        )
        finite = [x for x in (*lows, *highs, *values) if math.isfinite(x)]
        if finite and k == "ndcg@10":
            ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.02))
    fig.suptitle("A/B report: each variant on the ratings that followed its predictions (95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(data: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """ab_report.md and ab_report.png into ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "ab_report.md", out / "ab_report.png"
    md.write_text(markdown(data), encoding="utf-8")
    plot(data, png)
    return md, png
