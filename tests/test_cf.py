"""Biased matrix factorisation: hand-computed biases, ridge shrinkage, fold-in, determinism and safe persistence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moviematch_ml import cf
from moviematch_ml.cf import JSON_NAME, NPZ_NAME, MFConfig, MFModel, read_npz, write_npz
from moviematch_ml.errors import ModelChecksumError, ModelFormatError, ModelNotFoundError


def _additive() -> tuple[list[int], list[str], list[float]]:
    """A full 3x3 matrix r(u, i) = 3 + a_u + c_i with a = (-1, 0, 1), c = (-0.5, 0, 0.5); items are strings."""
    a = {10: -1.0, 20: 0.0, 30: 1.0}
    c = {"x": -0.5, "y": 0.0, "z": 0.5}
    users, items, ratings = [], [], []
    for u, au in a.items():
        for i, ci in c.items():
            users.append(u)
            items.append(i)
            ratings.append(3.0 + au + ci)
    return users, items, ratings


def test_biases_of_an_additive_matrix_with_zero_factors_are_exact() -> None:
    users, items, ratings = _additive()
    # No penalty: the first user step gives a_u + mean(c) = a_u, the item step c_i, the last user step a_u again.
    m = MFModel.fit(users, items, ratings, MFConfig(factors=0, iterations=1, reg_bias=0.0, bias_damping=0.0))
    assert m.global_mean == pytest.approx(3.0)
    assert m.user_ids == [10, 20, 30]
    assert m.item_ids == ["x", "y", "z"]
    np.testing.assert_allclose(m.user_bias, [-1.0, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(m.item_bias, [-0.5, 0.0, 0.5], atol=1e-12)
    pred, known = m.score([30, 10], ["z", "x"])
    np.testing.assert_allclose(pred, [4.5, 1.5], atol=1e-12)
    assert known.tolist() == [True, True]


def test_bias_damping_shrinks_like_a_ridge() -> None:
    users, items, ratings = _additive()
    m = MFModel.fit(users, items, ratings, MFConfig(factors=0, iterations=1, reg_bias=0.0, bias_damping=0.0))
    # A new user rates x 5 and z 4: residuals 5 - 3 + 0.5 = 2.5 and 4 - 3 - 0.5 = 0.5, sum 3, over n + damping.
    m3 = MFModel(MFConfig(factors=0, reg_bias=0.0, bias_damping=3.0), *_state(m))
    bias, vec = m3.fold_in(["x", "z"], [5.0, 4.0])
    assert bias == pytest.approx(3.0 / (2 + 3.0))
    assert vec.shape == (0,)
    # reg_bias scales with the count: (n * reg_bias + damping) = 2 * 0.5 + 3 = 4.
    m4 = MFModel(MFConfig(factors=0, reg_bias=0.5, bias_damping=3.0), *_state(m))
    assert m4.fold_in(["x", "z"], [5.0, 4.0])[0] == pytest.approx(3.0 / (2 + 4.0))


def _state(m: MFModel) -> tuple[Any, ...]:
    return (
        m.global_mean,
        m.user_bias,
        m.item_bias,
        m.user_factors,
        m.item_factors,
        m.user_ids,
        m.item_ids,
        m.user_index,
        m.item_index,
    )


def test_fold_in_ignores_unknown_items_and_handles_none() -> None:
    users, items, ratings = _additive()
    exact = MFModel.fit(users, items, ratings, MFConfig(factors=0, iterations=1, reg_bias=0.0, bias_damping=0.0))
    m = MFModel(MFConfig(factors=0, reg_bias=0.0, bias_damping=1.0), *_state(exact))
    # Only x counts: residual 5 - 3 - (-0.5) = 2.5 over 1 rating + damping 1.
    assert m.fold_in(["x", "nope"], [5.0, 1.0])[0] == m.fold_in(["x"], [5.0])[0] == pytest.approx(2.5 / 2)
    bias, vec = m.fold_in(["nope"], [5.0])
    assert bias == 0.0
    assert vec.shape == (0,)


def _low_rank(
    seed: int = 0, n_users: int = 40, n_items: int = 30, density: float = 0.6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.normal(0, 1, (n_users, 2))
    q = rng.normal(0, 1, (n_items, 2))
    full = 3.0 + (p @ q.T)
    mask = rng.random((n_users, n_items)) < density
    u, i = np.nonzero(mask)
    return u.astype(np.int64), i.astype(np.int64), full[u, i]


def test_factors_capture_a_low_rank_matrix_that_biases_cannot() -> None:
    u, i, r = _low_rank()
    bias_only = MFModel.fit(u, i, r, MFConfig(factors=0, iterations=10, reg_factors=0.01, bias_damping=0.1))
    rank2 = MFModel.fit(u, i, r, MFConfig(factors=2, iterations=30, reg_factors=0.001, bias_damping=0.1))
    err0 = np.sqrt(np.mean((bias_only.score(u, i)[0] - r) ** 2))
    err2 = np.sqrt(np.mean((rank2.score(u, i)[0] - r) ** 2))
    assert err0 > 0.8
    assert err2 < 0.1


def test_fold_in_of_a_training_user_equals_their_als_user_step() -> None:
    u, i, r = _low_rank(seed=1)
    m = MFModel.fit(u, i, r, MFConfig(factors=3, iterations=5))
    for user in (0, 7, 39):
        rows = u == user
        bias, vec = m.fold_in(i[rows], r[rows])
        k = m.user_index[user]
        assert bias == pytest.approx(m.user_bias[k], abs=1e-10)
        np.testing.assert_allclose(vec, m.user_factors[k], atol=1e-10)


def test_unknown_users_and_items_score_nan() -> None:
    u, i, r = _low_rank()
    m = MFModel.fit(u, i, r, MFConfig(factors=2, iterations=2))
    pred, known = m.score([0, 999, 0], [0, 0, 999])
    assert known.tolist() == [True, False, False]
    assert np.isfinite(pred[0])
    assert np.isnan(pred[1:]).all()


def test_fit_is_deterministic_byte_for_byte(tmp_path: Path) -> None:
    u, i, r = _low_rank()
    cfg = MFConfig(factors=4, iterations=4, seed=7)
    a, b = MFModel.fit(u, i, r, cfg), MFModel.fit(u, i, r, cfg)
    for name in ("user_bias", "item_bias", "user_factors", "item_factors"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.save(tmp_path / "a") == b.save(tmp_path / "b")
    other = MFModel.fit(u, i, r, cfg.model_copy(update={"seed": 8}))
    assert other.user_factors.tobytes() != a.user_factors.tobytes()


def test_save_load_round_trip(tmp_path: Path) -> None:
    u, i, r = _low_rank()
    m = MFModel.fit(u, i, r, MFConfig(factors=3, iterations=3))
    sums = m.save(tmp_path)
    assert set(sums) == {NPZ_NAME, JSON_NAME}
    assert sums[NPZ_NAME] == hashlib.sha256((tmp_path / NPZ_NAME).read_bytes()).hexdigest()
    back = MFModel.load(tmp_path, sums)
    assert back.config == m.config
    assert back.user_ids == m.user_ids
    assert back.item_index == m.item_index
    np.testing.assert_array_equal(back.score(u, i)[0], m.score(u, i)[0])


def test_load_refuses_a_tampered_or_unlisted_file(tmp_path: Path) -> None:
    u, i, r = _low_rank()
    sums = MFModel.fit(u, i, r, MFConfig(factors=2, iterations=2)).save(tmp_path)
    meta = json.loads((tmp_path / JSON_NAME).read_text())
    meta["user_ids"][0] = 12345
    (tmp_path / JSON_NAME).write_text(json.dumps(meta))
    with pytest.raises(ModelChecksumError):
        MFModel.load(tmp_path, sums)
    with pytest.raises(ModelFormatError):
        MFModel.load(tmp_path, {NPZ_NAME: sums[NPZ_NAME]})
    (tmp_path / NPZ_NAME).unlink()
    with pytest.raises(ModelNotFoundError):
        MFModel.load(tmp_path, sums)


def test_npz_is_stable_and_refuses_object_arrays() -> None:
    arrays = {"b": np.arange(3.0), "a": np.ones((2, 2))}
    data = write_npz(arrays)
    assert data == write_npz(dict(reversed(arrays.items())))
    back = read_npz(data)
    np.testing.assert_array_equal(back["a"], arrays["a"])
    import io

    buf = io.BytesIO()
    np.savez(buf, bad=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ModelFormatError):
        read_npz(buf.getvalue())


def test_fit_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        MFModel.fit([1, 2], [1], [3.0, 4.0], MFConfig())


@pytest.mark.parametrize("compiled", [True, False], ids=["C", "map"])
def test_lookup_finds_positions_with_or_without_the_extension(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(cf, "_codec", None)
    index: dict[int | str, int] = {10: 0, 20: 1, "x": 2}
    assert cf.lookup(index, [20, 10, 30, "x", "10"]).tolist() == [1, 0, -1, 2, -1]
    assert cf.lookup(index, np.array([20, 99])).tolist() == [1, -1]  # numpy ids: as Python ints
    assert cf.lookup(index, (10, 20), default=7).tolist() == [0, 1]
    assert cf.lookup(index, [5], default=7).tolist() == [7]
    assert cf.lookup(index, []).tolist() == []
