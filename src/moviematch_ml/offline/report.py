"""The training report: a Markdown summary and PNG plots of a trained model's held-out behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moviematch_ml.offline.training import TrainResult

FloatArray = npt.NDArray[np.float64]

PLOTS = {
    "feature_importance": "feature_importance.png",
    "predicted_vs_actual": "predicted_vs_actual.png",
    "error_by_decile": "error_by_decile.png",
    "rmse_cold_warm": "rmse_cold_warm.png",
}


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
    ax.set_xlabel("actual rating")
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
    ax.set_xlabel("decile of prediction (mean prediction)")
    ax.set_ylabel("RMSE")
    ax.set_title("Error by decile of prediction (temporal hold-out)")
    fig.tight_layout()
    fig.savefig(paths["error_by_decile"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    models = list(result.holdout.predictions)
    width = 0.38
    xs = np.arange(len(models))
    for offset, mask, label in ((-width / 2, cold, "cold users"), (width / 2, ~cold, "warm users")):
        vals = [
            float(np.sqrt(np.mean((result.holdout.predictions[m][mask] - truth[mask]) ** 2))) if mask.any() else 0.0
            for m in models
        ]
        ax.bar(xs + offset, vals, width, label=label)
    ax.set_xticks(xs, models)
    ax.set_ylabel("RMSE")
    ax.set_title("RMSE for cold vs warm users (temporal hold-out)")
    ax.legend()
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
        f"## Personalised model: {p.version}",
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
        + (f" (step {card.rating_scale.step:g})" if card.rating_scale.step else ""),
    ]
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
