"""A biased matrix factorisation's learned state: its arrays, the fold-in of a user, and safe persistence.

    r(u, i) ~ global_mean + user_bias[u] + item_bias[i] + user_factors[u] . item_factors[i]

Fitted by alternating least squares (``offline/als.py``); the service folds its own users in against the fixed
movie side (``fold_in``), with the same ridge solve as the ALS user step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moviematch_ml.errors import ModelFormatError
from moviematch_ml.runtime import native
from moviematch_ml.runtime.cards import CARD_NAME, read_npz, verified_bytes, write_npz

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Id = int | str

NPZ_NAME: Final[str] = "cf.npz"
JSON_NAME: Final[str] = "cf.json"
_ARRAYS: Final[tuple[str, ...]] = ("global_mean", "user_bias", "item_bias", "user_factors", "item_factors")


class MFConfig(BaseModel):
    """Hyper-parameters of the factorisation (chosen on a validation split of the training data, see the docs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    factors: int = Field(default=16, ge=0, le=512, description="Latent dimensions; 0 gives the plain bias model.")
    iterations: int = Field(default=15, ge=1, le=200, description="ALS sweeps (each solves users, then items).")
    reg_factors: float = Field(
        default=0.2, ge=0, description="Ridge penalty on factors, multiplied by the rating count."
    )
    reg_bias: float = Field(default=0.0, ge=0, description="Ridge penalty on biases, multiplied by the rating count.")
    bias_damping: float = Field(
        default=5.0, ge=0, description="Extra constant penalty on biases (shrinks sparse ones)."
    )
    init_scale: float = Field(default=0.1, gt=0, description="Standard deviation of the initial random factors.")
    seed: int = Field(default=42, ge=0)


def lookup(index: dict[Id, int], ids: Sequence[Id] | npt.NDArray[np.generic], default: int = -1) -> IntArray:
    """Positions of ``ids`` in ``index``, ``default`` (-1) for unknown ones. A sequence is taken as it is (numpy
    ids as Python values): ``np.asarray`` of a mix of ints and strings would turn every id into a string."""
    values = ids.tolist() if isinstance(ids, np.ndarray) else ids if isinstance(ids, list) else list(ids)
    out: IntArray = np.empty(len(values), dtype=np.int64)
    native.positions(values, index, default, out)
    return out


@dataclass(frozen=True, slots=True)
class MFModel:
    """Learned state: the global mean, each user's and movie's bias and factors, and the ids they belong to."""

    config: MFConfig
    global_mean: float
    user_bias: FloatArray
    item_bias: FloatArray
    user_factors: FloatArray
    item_factors: FloatArray
    user_ids: list[Id]
    item_ids: list[Id]
    user_index: dict[Id, int]
    item_index: dict[Id, int]

    def score(
        self, user_ids: Sequence[Id] | npt.NDArray[np.generic], item_ids: Sequence[Id] | npt.NDArray[np.generic]
    ) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """Predictions for (user, item) pairs and the mask of pairs where both are known (others are NaN)."""
        u = lookup(self.user_index, user_ids)
        i = lookup(self.item_index, item_ids)
        return self.score_index(u, i)

    def score_index(self, u: IntArray, i: IntArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """As ``score`` for indices (-1 = unknown)."""
        known = (u >= 0) & (i >= 0)
        uu, ii = np.where(known, u, 0), np.where(known, i, 0)
        s = (
            self.global_mean
            + self.user_bias[uu]
            + self.item_bias[ii]
            + np.einsum("nk,nk->n", self.user_factors[uu], self.item_factors[ii])
        )
        return np.where(known, s, np.nan), known

    # --- persistence -------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> dict[str, str]:
        """Write ``cf.npz`` (arrays, no pickle) and ``cf.json`` (config, ids); returns {file name: sha256}."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "global_mean": np.array([self.global_mean]),
            "user_bias": self.user_bias,
            "item_bias": self.item_bias,
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
        }
        npz = write_npz(arrays)
        meta = {"config": self.config.model_dump(mode="json"), "user_ids": self.user_ids, "item_ids": self.item_ids}
        js = (json.dumps(meta, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
        (directory / NPZ_NAME).write_bytes(npz)
        (directory / JSON_NAME).write_bytes(js)
        return {NPZ_NAME: hashlib.sha256(npz).hexdigest(), JSON_NAME: hashlib.sha256(js).hexdigest()}

    @classmethod
    def load(cls, directory: Path, checksums: dict[str, str]) -> MFModel:
        """Read what ``save`` wrote, refusing any file whose sha256 differs from ``checksums``."""
        card = directory / CARD_NAME
        arrays = read_npz(verified_bytes(card, NPZ_NAME, checksums.get(NPZ_NAME)))
        try:
            meta = json.loads(verified_bytes(card, JSON_NAME, checksums.get(JSON_NAME)))
            config = MFConfig.model_validate(meta["config"])
            uids: list[Id] = list(meta["user_ids"])
            iids: list[Id] = list(meta["item_ids"])
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise ModelFormatError(f"{directory / JSON_NAME}: not a valid factorisation description: {exc}") from exc
        if set(arrays) != set(_ARRAYS):
            raise ModelFormatError(f"{directory / NPZ_NAME}: expected arrays {sorted(_ARRAYS)}, got {sorted(arrays)}")
        shapes_ok = (
            arrays["global_mean"].shape == (1,)
            and arrays["user_bias"].shape == (len(uids),)
            and arrays["item_bias"].shape == (len(iids),)
            and arrays["user_factors"].shape == (len(uids), config.factors)
            and arrays["item_factors"].shape == (len(iids), config.factors)
        )
        if not shapes_ok:
            raise ModelFormatError(f"{directory / NPZ_NAME}: array shapes do not match the ids and config")
        return cls(
            config,
            float(arrays["global_mean"][0]),
            arrays["user_bias"],
            arrays["item_bias"],
            arrays["user_factors"],
            arrays["item_factors"],
            uids,
            iids,
            {v: n for n, v in enumerate(uids)},
            {v: n for n, v in enumerate(iids)},
        )


def fold_in(mf: MFModel, item_ids: Sequence[Id], ratings: Sequence[float]) -> tuple[float, FloatArray]:
    """A user's (bias, factors) from their ratings against the fixed movie side: the ALS user step for one user
    (``native.view_data``'s w). Ratings of unknown movies are ignored; with none left, (0, zeros)."""
    if not len(ratings):
        return 0.0, np.zeros(mf.config.factors)
    cols = lookup(mf.item_index, list(item_ids)).tolist()
    c = mf.config
    raw, _ = native.view_data(
        np.ascontiguousarray(mf.item_factors, dtype=np.float64),
        c.factors,
        np.ascontiguousarray(mf.item_bias, dtype=np.float64),
        mf.global_mean,
        cols,
        [float(r) for r in ratings],
        [0.0] * len(cols),
        c.reg_factors,
        c.reg_bias,
        c.bias_damping,
        1,
    )
    w = np.frombuffer(raw, dtype=np.float64)[3 : 4 + c.factors]
    return float(w[0]), w[1:].copy()
