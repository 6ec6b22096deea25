"""The common way, for comparison: FastAPI + pydantic + scikit-learn GBR + a pandas DataFrame per request.

This is what a hand-written service typically looks like; the benchmark runs it next to ours in the same run.
Its model is trained at start-up on synthetic data shaped like ours (the reference needs a model of similar
size, not our accuracy), so no model file is loaded at all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from fastapi import FastAPI
from pydantic import BaseModel
from sklearn.ensemble import GradientBoostingRegressor

COLUMNS = ["n_shared_genres", "vote_average", "vote_count", "is_favorite_genre", "years_since_release", "popularity"]


def _train() -> GradientBoostingRegressor:
    rng = np.random.default_rng(0)
    n = 5000
    x = np.column_stack(
        [
            rng.integers(0, 4, n),
            rng.uniform(1, 10, n),
            rng.integers(0, 20000, n),
            rng.integers(0, 2, n),
            rng.integers(0, 60, n),
            rng.uniform(0, 300, n),
        ]
    ).astype(float)
    y = 0.8 * x[:, 1] + 0.3 * x[:, 3] + 0.1 * x[:, 0] + rng.normal(0, 0.5, n)
    return GradientBoostingRegressor(n_estimators=100, max_depth=3, random_state=0).fit(
        pd.DataFrame(x, columns=COLUMNS), y
    )


model = _train()
app = FastAPI()


class Features(BaseModel):
    n_shared_genres: int
    vote_average: float
    vote_count: int
    is_favorite_genre: int
    years_since_release: float
    popularity: float


class Movie(Features):
    movie_id: int


class Batch(BaseModel):
    movies: list[Movie]


@app.post("/predict")
def predict(features: Features) -> dict[str, object]:
    df = pd.DataFrame([features.model_dump()])[COLUMNS]
    return {"predicted_rating": float(model.predict(df)[0]), "model_version": "reference", "source": "model"}


@app.post("/predict-batch")
def predict_batch(batch: Batch) -> dict[str, object]:
    df = pd.DataFrame([m.model_dump() for m in batch.movies])
    preds = model.predict(df[COLUMNS])
    return {
        "predictions": [
            {"movie_id": int(mid), "predicted_rating": float(p)} for mid, p in zip(df["movie_id"], preds, strict=True)
        ]
    }
