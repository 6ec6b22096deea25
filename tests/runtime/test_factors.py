"""A factorisation at serving time: id lookups, scores, the fold-in of a user (ridge shrinkage, by hand), and safe
persistence. (Fitting it: tests/offline/test_als.py.)"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moviematch_ml.errors import ModelChecksumError, ModelFormatError, ModelNotFoundError
from moviematch_ml.runtime import native
from moviematch_ml.runtime.factors import JSON_NAME, NPZ_NAME, Id, MFConfig, MFModel, fold_in, lookup


def _model(config: MFConfig, mu: float, user_bias: list[float], item_bias: list[float], k: int = 0) -> MFModel:
    """A factorisation written by hand: users 10, 20, 30 and movies "x", "y", "z" (zero factors unless k > 0)."""
    users: list[Id] = [10, 20, 30]
    items: list[Id] = ["x", "y", "z"]
    rng = np.random.default_rng(k)
    return MFModel(
        config,
        mu,
        np.array(user_bias),
        np.array(item_bias),
        rng.normal(size=(3, k)),
        rng.normal(size=(3, k)),
        users,
        items,
        {u: n for n, u in enumerate(users)},
        {i: n for n, i in enumerate(items)},
    )


def _additive(config: MFConfig) -> MFModel:
    """r(u, i) = 3 + a_u + c_i with a = (-1, 0, 1), c = (-0.5, 0, 0.5): what ALS learns of a full additive matrix
    (tests/offline/test_als.py)."""
    return _model(config, 3.0, [-1.0, 0.0, 1.0], [-0.5, 0.0, 0.5])


def _random(seed: int = 0, n_users: int = 40, n_items: int = 30, k: int = 3) -> MFModel:
    """A factorisation of random arrays, with int user ids and int movie ids."""
    rng = np.random.default_rng(seed)
    users: list[Id] = list(range(n_users))
    items: list[Id] = list(range(100, 100 + n_items))
    return MFModel(
        MFConfig(factors=k),
        3.5,
        rng.normal(size=n_users),
        rng.normal(size=n_items),
        rng.normal(size=(n_users, k)),
        rng.normal(size=(n_items, k)),
        users,
        items,
        {u: n for n, u in enumerate(users)},
        {i: n for n, i in enumerate(items)},
    )


def test_scores_by_hand() -> None:
    m = _additive(MFConfig(factors=0))
    pred, known = m.score([30, 10], ["z", "x"])
    np.testing.assert_allclose(pred, [3.0 + 1.0 + 0.5, 3.0 - 1.0 - 0.5], atol=1e-12)
    assert known.tolist() == [True, True]
    with_factors = _model(MFConfig(factors=2), 3.0, [-1.0, 0.0, 1.0], [-0.5, 0.0, 0.5], k=2)
    pu, qi = with_factors.user_factors[2], with_factors.item_factors[0]
    assert with_factors.score([30], ["x"])[0][0] == pytest.approx(3.0 + 1.0 - 0.5 + pu[0] * qi[0] + pu[1] * qi[1])


def test_bias_damping_shrinks_like_a_ridge() -> None:
    # A new user rates x 5 and z 4: residuals 5 - 3 + 0.5 = 2.5 and 4 - 3 - 0.5 = 0.5, sum 3, over n + damping.
    bias, vec = fold_in(_additive(MFConfig(factors=0, reg_bias=0.0, bias_damping=3.0)), ["x", "z"], [5.0, 4.0])
    assert bias == pytest.approx(3.0 / (2 + 3.0))
    assert vec.shape == (0,)
    # reg_bias scales with the count: (n * reg_bias + damping) = 2 * 0.5 + 3 = 4.
    m4 = _additive(MFConfig(factors=0, reg_bias=0.5, bias_damping=3.0))
    assert fold_in(m4, ["x", "z"], [5.0, 4.0])[0] == pytest.approx(3.0 / (2 + 4.0))


def test_fold_in_ignores_unknown_items_and_handles_none() -> None:
    m = _additive(MFConfig(factors=0, reg_bias=0.0, bias_damping=1.0))
    # Only x counts: residual 5 - 3 - (-0.5) = 2.5 over 1 rating + damping 1.
    assert fold_in(m, ["x", "nope"], [5.0, 1.0])[0] == fold_in(m, ["x"], [5.0])[0] == pytest.approx(2.5 / 2)
    bias, vec = fold_in(m, ["nope"], [5.0])
    assert bias == 0.0
    assert vec.shape == (0,)
    bias, vec = fold_in(_random(k=3), [], [])
    assert bias == 0.0
    assert vec.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("compiled", [True, False], ids=["C-cholesky", "numpy-solve"])
def test_fold_in_is_the_ridge_solve(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # (sum x x^T + diag(reg_bias * m + damping, reg_factors * m, ...)) w = sum x (r - mu - b_i), x = [1, q_i].
    if not compiled:
        monkeypatch.setattr(native, "codec", None)
    elif native.codec is None:
        pytest.skip("the _codec extension is not built")
    m = replace(_random(seed=2, k=4), config=MFConfig(factors=4, reg_factors=0.3, reg_bias=0.1, bias_damping=2.0))
    movies = [100, 103, 107, 999, 115]  # 999: unknown, ignored
    ratings = [4.0, 2.5, 5.0, 1.0, 3.5]
    rows = [m.item_index[i] for i in movies if i in m.item_index]
    known_ratings = np.array([r for i, r in zip(movies, ratings, strict=True) if i in m.item_index])
    x = np.hstack([np.ones((len(rows), 1)), m.item_factors[rows]])
    n = len(rows)
    a = x.T @ x + np.diag([0.1 * n + 2.0] + [0.3 * n] * 4)
    want = np.linalg.solve(a, x.T @ (known_ratings - m.global_mean - m.item_bias[rows]))
    bias, vec = fold_in(m, movies, ratings)
    np.testing.assert_allclose([bias, *vec], want, rtol=1e-10, atol=1e-12)


def test_unknown_users_and_items_score_nan() -> None:
    m = _random()
    pred, known = m.score([0, 999, 0], [100, 100, 999])
    assert known.tolist() == [True, False, False]
    assert np.isfinite(pred[0])
    assert np.isnan(pred[1:]).all()
    index_pred, index_known = m.score_index(np.array([0, -1, 0]), np.array([0, 0, -1]))
    assert index_known.tolist() == known.tolist()
    np.testing.assert_array_equal(index_pred, pred)


def test_save_load_round_trip(tmp_path: Path) -> None:
    m = _random()
    sums = m.save(tmp_path)
    assert set(sums) == {NPZ_NAME, JSON_NAME}
    assert sums[NPZ_NAME] == hashlib.sha256((tmp_path / NPZ_NAME).read_bytes()).hexdigest()
    assert sums[JSON_NAME] == hashlib.sha256((tmp_path / JSON_NAME).read_bytes()).hexdigest()
    assert m.save(tmp_path / "again") == sums  # the same model, the same bytes
    back = MFModel.load(tmp_path, sums)
    assert back.config == m.config
    assert back.user_ids == m.user_ids
    assert back.item_index == m.item_index
    u = np.repeat(np.arange(40), 30)
    i = np.tile(np.arange(100, 130), 40)
    np.testing.assert_array_equal(back.score(u, i)[0], m.score(u, i)[0])


def test_load_refuses_a_tampered_or_unlisted_file(tmp_path: Path) -> None:
    sums = _random(k=2).save(tmp_path)
    meta = json.loads((tmp_path / JSON_NAME).read_text())
    meta["user_ids"][0] = 12345
    (tmp_path / JSON_NAME).write_text(json.dumps(meta))
    with pytest.raises(ModelChecksumError):
        MFModel.load(tmp_path, sums)
    with pytest.raises(ModelFormatError):  # no checksum for cf.json: refused rather than read unchecked
        MFModel.load(tmp_path, {NPZ_NAME: sums[NPZ_NAME]})
    (tmp_path / NPZ_NAME).unlink()
    with pytest.raises(ModelNotFoundError):
        MFModel.load(tmp_path, sums)


def test_load_refuses_arrays_that_do_not_fit_the_ids(tmp_path: Path) -> None:
    m = _random(k=2)
    sums = m.save(tmp_path)
    meta = json.loads((tmp_path / JSON_NAME).read_text())
    meta["user_ids"] = meta["user_ids"][:-1]  # one user fewer than the arrays hold
    js = json.dumps(meta).encode()
    (tmp_path / JSON_NAME).write_bytes(js)
    with pytest.raises(ModelFormatError, match="shapes"):
        MFModel.load(tmp_path, {**sums, JSON_NAME: hashlib.sha256(js).hexdigest()})


@pytest.mark.parametrize("compiled", [True, False], ids=["C", "map"])
def test_lookup_finds_positions_with_or_without_the_extension(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(native, "codec", None)
    elif native.codec is None:
        pytest.skip("the _codec extension is not built")
    index: dict[Id, int] = {10: 0, 20: 1, "x": 2}
    assert lookup(index, [20, 10, 30, "x", "10"]).tolist() == [1, 0, -1, 2, -1]
    assert lookup(index, np.array([20, 99])).tolist() == [1, -1]  # numpy ids: as Python ints
    assert lookup(index, (10, 20), default=7).tolist() == [0, 1]
    assert lookup(index, [5], default=7).tolist() == [7]
    assert lookup(index, []).tolist() == []
