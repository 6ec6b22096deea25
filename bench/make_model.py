"""A stand-in model of the bundled model's size (200 trees, 31 leaves) for benchmarks run before one is trained.

    python bench/make_model.py OUT_DIR [--trees 200] [--leaves 31]

Writes OUT_DIR/model.txt and OUT_DIR/model_card.json (with the right sha256); point MODEL_PATH at OUT_DIR.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from moviematch_ml.features import FEATURE_NAMES
from moviematch_ml.runtime.cards import ModelCard, RatingScale, write_card


def synthetic_rows(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    """n rows of the six features, shaped like the real ones (FEATURE_NAMES order)."""
    return np.column_stack(
        [
            rng.integers(0, 5, n),
            np.round(rng.uniform(1, 10, n), 1),
            (rng.pareto(1.2, n) * 50).astype(int),
            rng.integers(0, 2, n),
            rng.integers(0, 60, n),
            np.round(rng.exponential(40.0, n), 3),
        ]
    ).astype(np.float64)


def make(out: Path, trees: int = 200, leaves: int = 31, n: int = 20_000) -> Path:
    """Train on synthetic rows shaped like the real features; returns the model directory."""
    rng = np.random.default_rng(0)
    x = synthetic_rows(rng, n)
    y = np.clip(
        0.35 * x[:, 1]
        + 0.2 * x[:, 0]
        + 0.3 * x[:, 3]
        + 0.1 * np.log1p(x[:, 2])
        - 0.005 * x[:, 4]
        + rng.normal(0, 0.6, n),
        0.5,
        5.0,
    )
    params = {"objective": "regression", "num_leaves": leaves, "learning_rate": 0.05, "seed": 0, "verbose": -1}
    booster = lgb.train(params, lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES)), num_boost_round=trees)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.txt").write_text(booster.model_to_string(), encoding="utf-8")
    card = ModelCard(
        name="bench-stand-in",
        version=f"bench-{trees}x{leaves}",
        created_at="2026-01-01T00:00:00+00:00",
        model_file="model.txt",
        model_format="lightgbm-text",
        sha256=hashlib.sha256((out / "model.txt").read_bytes()).hexdigest(),
        features=list(FEATURE_NAMES),
        rating_scale=RatingScale(min=0.5, max=5.0, step=0.5),
        metrics={"note": "synthetic benchmark stand-in"},
    )
    write_card(out, card)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--trees", type=int, default=200)
    ap.add_argument("--leaves", type=int, default=31)
    args = ap.parse_args()
    print(make(args.out, args.trees, args.leaves))


if __name__ == "__main__":
    main()
