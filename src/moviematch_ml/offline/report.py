"""The training report: a Markdown summary and PNG plots of a trained model's held-out behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moviematch_ml.offline.training import TrainResult
from moviematch_ml.runtime.cards import API_SCALE_MAX, RatingScale

FloatArray = npt.NDArray[np.float64]

PLOTS = {
    "feature_importance": "feature_importance.png",
    "predicted_vs_actual": "predicted_vs_actual.png",
    "error_by_decile": "error_by_decile.png",
    "rmse_cold_warm": "rmse_cold_warm.png",
}


def scale_label(scale: RatingScale) -> str:
    """Which scale the report's ratings, predictions and errors are on, next to the API's 0-10."""
    if scale.min == 0.0 and scale.max == API_SCALE_MAX:
        return "0–10, the API's scale"
    return f"{scale.min:g}–{scale.max:g}, the training data's scale; the API answers ×{scale.to_api:g} on 0–10"


def _fmt(x: Any) -> str:
    return "–" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def decile_rmse(pred: FloatArray, truth: FloatArray) -> list[tuple[float, float, int]]:
    """RMSE within each decile of the prediction: (mean prediction, RMSE, rows) per decile, lowest first."""
    order = np.argsort(pred, kind="stable")
    out = []
    for part in np.array_split(order, 10):
        if part.size:
            err = pred[part] - truth[part]
            out.append((float(pred[part].mean()), float(np.sqrt(np.mean(err**2))), int(part.size)))
    return out


def cold_warm_rmse(
    predictions: dict[str, FloatArray], truth: FloatArray, cold: npt.NDArray[np.bool_]
) -> dict[str, list[float] | None]:
    """Each model's RMSE on the cold users' and on the warm users' test ratings, model by model: None for a group
    with no test rating (the plot then leaves it out and says so, instead of drawing bars of height 0)."""
    out: dict[str, list[float] | None] = {}
    for label, mask in (("cold users", cold), ("warm users", ~cold)):
        out[label] = (
            [float(np.sqrt(np.mean((pred[mask] - truth[mask]) ** 2))) for pred in predictions.values()]
            if mask.any()
            else None
        )
    return out


def write_plots(directory: Path, result: TrainResult) -> dict[str, Path]:
    """Draw the four PNGs (matplotlib, Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    test = result.holdout.test
    truth = test["rating"].to_numpy(dtype=np.float64)
    pred = result.holdout.predictions["six_features"]
    cold = result.holdout.cold
    paths = {k: directory / v for k, v in PLOTS.items()}
    scale = scale_label(result.card.rating_scale)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(result.importance)
    ax.barh(names, [result.importance[n] for n in names], color="#4c72b0")
    ax.set_xlabel("total gain")
    ax.set_title("Feature importance (gain), final model")
    fig.tight_layout()
    fig.savefig(paths["feature_importance"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    levels = np.unique(truth)
    ax.boxplot([pred[truth == lv] for lv in levels], positions=list(levels), widths=0.3, showfliers=False)
    ax.plot([levels.min(), levels.max()], [levels.min(), levels.max()], "--", color="grey", label="perfect")
    ax.set_xlabel(f"actual rating\n({scale})", fontsize=9)
    ax.set_ylabel("predicted rating")
    ax.set_title("Predicted vs actual (temporal hold-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["predicted_vs_actual"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    dec = decile_rmse(pred, truth)
    ax.bar(range(1, len(dec) + 1), [d[1] for d in dec], color="#dd8452")
    ax.set_xticks(range(1, len(dec) + 1), [f"{d[0]:.2f}" for d in dec], rotation=45)
    ax.set_xlabel(f"decile of prediction (mean prediction; {scale})", fontsize=9)
    ax.set_ylabel("RMSE")
    ax.set_title("Error by decile of prediction (temporal hold-out)")
    fig.tight_layout()
    fig.savefig(paths["error_by_decile"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    models = list(result.holdout.predictions)
    width = 0.38
    xs = np.arange(len(models))
    series = cold_warm_rmse(result.holdout.predictions, truth, cold)
    counts = {"cold users": int(cold.sum()), "warm users": int((~cold).sum())}
    for offset, label, color in ((-width / 2, "cold users", "#4c72b0"), (width / 2, "warm users", "#dd8452")):
        vals = series[label]
        if vals is None:  # no bars of height 0: say there were none
            ax.text(0.5, 0.5, f"no {label} in the test part", transform=ax.transAxes, ha="center", color="grey")
            continue
        ax.bar(xs + offset, vals, width, label=f"{label} ({counts[label]:,} test ratings)", color=color)
    ax.set_xticks(xs, models, fontsize=9)
    ax.set_ylabel(f"RMSE ({scale.split(',')[0]})")
    ax.set_title("RMSE for cold vs warm users (temporal hold-out)", pad=24)
    # Above the axes, so it never hides the last bars.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False, fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["rmse_cold_warm"], dpi=100)
    plt.close(fig)
    return paths


def _personalized_section(result: TrainResult) -> list[str]:
    """The personalised model: what it is and its hold-out figures against the six-feature and bias models."""
    p = result.personalized
    if p is None:
        return []
    cfg = p.model.config
    m = p.metrics
    lines = [
        "",
        f"## Personalised model: {p.model.version}",
        "",
        f"- Model: LightGBM, {cfg.n_estimators} trees of up to {cfg.num_leaves} leaves over the six features plus "
        f"user and movie state and the collaborative-filtering score ({cfg.mf.factors} factors, "
        f"{cfg.mf.iterations} ALS sweeps); state features of training rows computed out of fold "
        f"({cfg.inner_folds} inner folds); the method is in docs/personalized.md",
        f"- State: {len(p.model.mf.user_ids):,} users, {len(p.model.mf.item_ids):,} movies; it answers users with "
        f"at least {cfg.min_user_ratings} rating(s), the six-feature model everyone else",
        "",
        f"Hold-out ({m['protocol']}, same split as above): it answered {m['personalized_test_ratings']:,} of the "
        f"{m['n_test']:,} test ratings (users with ratings in the training part); the six-feature model answered "
        "the rest, as in the service.",
        "",
        "| model | RMSE | MAE | NDCG@10 | RMSE cold users | RMSE warm users | RMSE on the rows it answered |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in m["models"].items():
        own = m["personalized_rows"].get(name, {})
        lines.append(
            f"| {name} | {_fmt(row['rmse'])} | {_fmt(row['mae'])} | {_fmt(row['ndcg@10'])} | "
            f"{_fmt(row['rmse_cold_users'])} | {_fmt(row['rmse_warm_users'])} | {_fmt(own.get('rmse'))} |"
        )
    return lines


def render_markdown(result: TrainResult) -> str:
    """The report's Markdown: data, model size, held-out metrics of every model, feature ranges, plots."""
    card = result.card
    t = card.training
    d = card.data
    m = card.metrics
    lines = [
        f"# Model report: {card.name} {card.version}",
        "",
        f"- Data: `{d['dataset']}`, {d['n_ratings']:,} ratings, {d['n_users']:,} users, {d['n_movies']:,} movies; "
        f"fingerprint `{d['fingerprint_sha256'][:16]}…`",
        f"- Rating scale: {card.rating_scale.min:g}–{card.rating_scale.max:g}"
        + (f" (step {card.rating_scale.step:g})" if card.rating_scale.step else "")
        + f"; every rating, prediction and error below and in the plots is on it ({scale_label(card.rating_scale)})",
    ]
    for source in card.data_terms:
        use = {False: "no commercial use without permission", None: "commercial use: not stated"}.get(
            source.commercial_use, "commercial use allowed"
        )
        lines.append(f"- Source: {source.name}; {source.publisher} ({use}: the card's `data_terms`)")
    join = d.get("metadata_join") or {}
    if join:
        cov = f"{join.get('joined', 0):,}/{join.get('movies', 0):,} movies ({100 * join.get('coverage', 0):.1f}%)"
        if "coverage_up_to_last_year" in join:
            cov += (
                f"; {100 * join['coverage_up_to_last_year']:.1f}% of the {join['movies_up_to_last_year']:,} "
                f"released up to {join['metadata_last_year']}"
            )
        lines.append(f"- Metadata join ({join.get('source')}): {cov}")
    lines += [
        f"- Model: LightGBM {t['lightgbm_version']}, {t['num_trees']} trees, {t['num_leaves_total']} leaves in "
        f"total (early stopping chose {t['best_iteration']} rounds; validation RMSE "
        f"{t['early_stopping_valid_rmse']} on the latest {t['n_early_stopping']:,} training ratings)",
        f"- Model file sha256: `{card.sha256}`",
        "",
        f"## Held-out metrics ({m['protocol']}: train {m['n_train']:,} ratings, test {m['n_test']:,}, "
        f"of which {m['cold_user_test_ratings']:,} by cold users)",
        "",
        "| model | RMSE | MAE | NDCG@10 | RMSE cold users | RMSE warm users |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in m["models"].items():
        lines.append(
            f"| {name} | {_fmt(row['rmse'])} | {_fmt(row['mae'])} | {_fmt(row['ndcg@10'])} | "
            f"{_fmt(row['rmse_cold_users'])} | {_fmt(row['rmse_warm_users'])} |"
        )
    lines += [
        "",
        "## Feature ranges in training (drift reference)",
        "",
        "| feature | min | p05 | p50 | p95 | max | mean | importance (gain) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, st in card.feature_stats.items():
        q = st.quantiles
        lines.append(
            f"| {name} | {st.min:g} | {q['p05']:g} | {q['p50']:g} | {q['p95']:g} | {st.max:g} | {st.mean:.3f} | "
            f"{result.importance.get(name, 0.0):,.0f} |"
        )
    lines += _personalized_section(result)
    lines += ["", "## Plots", ""]
    for key, file in PLOTS.items():
        lines.append(f"![{key.replace('_', ' ')}]({file})")
    lines.append("")
    return "\n".join(lines)


def write_report(directory: Path, result: TrainResult) -> Path:
    """Write report.md and the PNGs into ``directory``; returns the Markdown file's path."""
    write_plots(directory, result)
    path = directory / "report.md"
    path.write_text(render_markdown(result), encoding="utf-8")
    return path


# --- the replay protocol -----------------------------------------------------------------------------------------

REPLAY_REPORT = "replay.md"
LEARNING_CURVE_PLOT = "learning_curve.png"


def replay_table(summary: dict[str, Any]) -> list[str]:
    """The replay's metrics as Markdown tables: one row per model, then the learning curve (RMSE by the number
    of the user's earlier ratings)."""
    models: dict[str, dict[str, Any]] = summary["models"]
    lines = [
        "| model | RMSE | MAE | NDCG@10 | RMSE cold users | RMSE warm users |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        cells = [m["rmse"], m["mae"], m["ndcg@10"], m["rmse_cold_users"], m["rmse_warm_users"]]
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    buckets: dict[str, int] = summary["bucket_test_ratings"]
    lines += [
        "",
        "| earlier ratings of the user | " + " | ".join(buckets) + " |",
        "|---|" + "---|" * len(buckets),
        "| test ratings | " + " | ".join(f"{n:,}" for n in buckets.values()) + " |",
    ]
    for name, m in models.items():
        curve = m["learning_curve_rmse"]
        lines.append(f"| {name} | " + " | ".join(_fmt(curve[b]) for b in buckets) + " |")
    gaps: dict[str, dict[str, Any] | None] | None = summary.get("personalized_vs_best_online")
    if gaps:
        lines += [
            "",
            "| earlier ratings | best online baseline | personalized minus it | 95 % interval (users resampled) |",
            "|---|---|---|---|",
        ]
        for label, gap in gaps.items():
            if gap is not None:
                low, high = gap["ci95"]
                lines.append(f"| {label} | {gap['best_peer']} | {gap['difference']:+.4f} | [{low:+.4f}, {high:+.4f}] |")
    return lines


def replay_text(summary: dict[str, Any]) -> str:
    """What ``evaluate --protocol replay`` prints without ``--json``."""
    head = (
        f"replay{' (validation: within the history)' if summary.get('validation') else ''}: "
        f"history {summary['n_history']:,} ratings, then {summary['n_test']:,} predicted one timestamp at a "
        f"time ({summary['cold_user_test_ratings']:,} by cold users); {summary['seconds']['total']:.1f} s"
    )
    costs = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in cost.items()) for name, cost in summary["per_rating"].items()
    )
    return "\n".join([head, *replay_table(summary), f"per rating (ms): {costs}"])


def write_replay_report(directory: Path, summary: dict[str, Any]) -> Path:
    """Write the replay's Markdown table and its learning-curve plot into ``directory``; returns the Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    buckets = list(summary["bucket_test_ratings"])
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(buckets))
    for name, m in summary["models"].items():
        curve = m["learning_curve_rmse"]
        ys = [np.nan if curve[b] is None else curve[b] for b in buckets]
        ax.plot(xs, ys, marker="o", label=name, linewidth=2.5 if name == "personalized" else 1.2)
    ax.set_xticks(xs, buckets)
    ax.set_xlabel("ratings the user had made before")
    ax.set_ylabel(f"RMSE ({scale_label(RatingScale(**summary['rating_scale'])).split(',')[0]})")
    ax.set_title("Replay: RMSE by the user's number of earlier ratings")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / LEARNING_CURVE_PLOT, dpi=100)
    plt.close(fig)
    text = [
        f"# Replay of {summary['dataset']}",
        "",
        replay_text(summary).split("\n")[0],
        "",
        *replay_table(summary),
        "",
        f"![learning curve]({LEARNING_CURVE_PLOT})",
        "",
    ]
    path = directory / REPLAY_REPORT
    path.write_text("\n".join(text), encoding="utf-8")
    return path
