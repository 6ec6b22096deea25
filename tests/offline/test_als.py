"""Fitting the factorisation by ALS: hand-computed biases, what factors capture, the last user step, determinism.
(The fitted model at serving time: tests/runtime/test_factors.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from moviematch_ml.offline.als import fit_mf, index_ids
from moviematch_ml.runtime.factors import Id, MFConfig, fold_in


def _additive() -> tuple[list[Id], list[Id], list[float]]:
    """A full 3x3 matrix r(u, i) = 3 + a_u + c_i with a = (-1, 0, 1), c = (-0.5, 0, 0.5); items are strings."""
    a = {10: -1.0, 20: 0.0, 30: 1.0}
    c = {"x": -0.5, "y": 0.0, "z": 0.5}
    users: list[Id] = []
    items: list[Id] = []
    ratings: list[float] = []
    for u, au in a.items():
        for i, ci in c.items():
            users.append(u)
            items.append(i)
            ratings.append(3.0 + au + ci)
    return users, items, ratings


def test_biases_of_an_additive_matrix_with_zero_factors_are_exact() -> None:
    users, items, ratings = _additive()
    # No penalty: the first user step gives a_u + mean(c) = a_u, the item step c_i, the last user step a_u again.
    m = fit_mf(users, items, ratings, MFConfig(factors=0, iterations=1, reg_bias=0.0, bias_damping=0.0))
    assert m.global_mean == pytest.approx(3.0)
    assert m.user_ids == [10, 20, 30]
    assert m.item_ids == ["x", "y", "z"]
    np.testing.assert_allclose(m.user_bias, [-1.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(m.item_bias, [-0.5, 0.0, 0.5], atol=1e-12)
    assert m.user_factors.shape == (3, 0)
    pred, known = m.score([30, 10], ["z", "x"])
    np.testing.assert_allclose(pred, [4.5, 1.5], atol=1e-12)
    assert known.tolist() == [True, True]


def test_index_ids_sorts_and_indexes() -> None:
    values, index, inverse = index_ids([30, 10, 30, 20])
    assert values == [10, 20, 30]
    assert all(type(v) is int for v in values)  # plain ints, as JSON and the service spell them
    assert index == {10: 0, 20: 1, 30: 2}
    assert inverse.tolist() == [2, 0, 2, 1]


def _low_rank(
    seed: int = 0, n_users: int = 40, n_items: int = 30, density: float = 0.6
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    p = rng.normal(0, 1, (n_users, 2))
    q = rng.normal(0, 1, (n_items, 2))
    full = 3.0 + (p @ q.T)
    mask = rng.random((n_users, n_items)) < density
    u, i = np.nonzero(mask)
    return u.astype(np.int64), i.astype(np.int64), full[u, i]


def test_factors_capture_a_low_rank_matrix_that_biases_cannot() -> None:
    u, i, r = _low_rank()
    bias_only = fit_mf(u, i, r, MFConfig(factors=0, iterations=10, reg_factors=0.01, bias_damping=0.1))
    rank2 = fit_mf(u, i, r, MFConfig(factors=2, iterations=30, reg_factors=0.001, bias_damping=0.1))
    err0 = np.sqrt(np.mean((bias_only.score(u, i)[0] - r) ** 2))
    err2 = np.sqrt(np.mean((rank2.score(u, i)[0] - r) ** 2))
    assert err0 > 0.8
    assert err2 < 0.1


def test_fold_in_of_a_training_user_equals_their_als_user_step() -> None:
    u, i, r = _low_rank(seed=1)
    m = fit_mf(u, i, r, MFConfig(factors=3, iterations=5))
    for user in (0, 7, 39):
        rows = u == user
        bias, vec = fold_in(m, i[rows].tolist(), r[rows].tolist())
        k = m.user_index[user]
        assert bias == pytest.approx(m.user_bias[k], abs=1e-10)
        np.testing.assert_allclose(vec, m.user_factors[k], atol=1e-10)


def test_fit_is_deterministic_byte_for_byte(tmp_path: Path) -> None:
    u, i, r = _low_rank()
    cfg = MFConfig(factors=4, iterations=4, seed=7)
    a, b = fit_mf(u, i, r, cfg), fit_mf(u, i, r, cfg)
    for name in ("user_bias", "item_bias", "user_factors", "item_factors"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.save(tmp_path / "a") == b.save(tmp_path / "b")
    other = fit_mf(u, i, r, cfg.model_copy(update={"seed": 8}))
    assert other.user_factors.tobytes() != a.user_factors.tobytes()


def test_fit_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        fit_mf([1, 2], [1], [3.0, 4.0], MFConfig())
    with pytest.raises(ValueError, match="non-empty"):
        fit_mf([], [], [], MFConfig())
