"""Fitting a biased matrix factorisation by alternating least squares (ALS), deterministically."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from moviematch_ml.runtime.factors import FloatArray, Id, IntArray, MFConfig, MFModel


def index_ids(ids: Sequence[Id] | npt.NDArray[np.generic]) -> tuple[list[Id], dict[Id, int], IntArray]:
    """Sorted distinct ids, their id -> index map and the index of every input element."""
    arr = np.asarray(ids)
    uniq, inverse = np.unique(arr, return_inverse=True)
    # .tolist() turns numpy scalars into plain int/str, the types JSON and the service use.
    values: list[Id] = uniq.tolist()
    return values, {v: i for i, v in enumerate(values)}, inverse.astype(np.int64).reshape(-1)


def _gram(own: IntArray, x: FloatArray, target: FloatArray, n_own: int) -> tuple[FloatArray, FloatArray]:
    """Per owner, sum of x_r x_r^T and of x_r * target_r over their ratings r (``own`` sorted ascending).

    Owners are grouped by rating count into power-of-two buckets; within a bucket their rating rows are padded to
    the same length (zeros) so one batched matmul computes all their Gram matrices. Padding wastes at most half
    the work, and no (ratings, d, d) temporary is ever built.
    """
    d = x.shape[1]
    a = np.zeros((n_own, d, d))
    b = np.zeros((n_own, d))
    counts = np.bincount(own, minlength=n_own)
    starts = np.zeros(n_own, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    pos = np.arange(len(own)) - starts[own]
    # Pad with a zero row appended at index len(own).
    xz = np.vstack([x, np.zeros((1, d))])
    tz = np.append(target, 0.0)
    length = np.ones(n_own, dtype=np.int64)
    nz = counts > 0
    length[nz] = 1 << np.ceil(np.log2(counts[nz])).astype(np.int64)
    for width in np.unique(length[nz]):
        owners = np.flatnonzero(nz & (length == width))
        slot = np.full(n_own, -1, dtype=np.int64)
        slot[owners] = np.arange(len(owners))
        rows = np.flatnonzero(slot[own] >= 0)
        pad = np.full((len(owners), int(width)), len(own), dtype=np.int64)
        pad[slot[own[rows]], pos[rows]] = rows
        xb = xz[pad]
        a[owners] = np.matmul(xb.transpose(0, 2, 1), xb)
        b[owners] = np.einsum("nld,nl->nd", xb, tz[pad])
    return a, b


def _ridge_step(
    own: IntArray,
    other: IntArray,
    target: FloatArray,
    other_factors: FloatArray,
    counts: FloatArray,
    config: MFConfig,
) -> tuple[FloatArray, FloatArray]:
    """Solve every owner's ridge problem for (bias, factors) against the other side's fixed factors.

    ``own`` must be sorted ascending; ``target`` is the rating minus the global mean and the other side's bias.
    """
    n_own = len(counts)
    x = np.hstack([np.ones((len(other), 1)), other_factors[other]])
    a, b = _gram(own, x, target, n_own)
    diag = np.empty((n_own, x.shape[1]))
    diag[:, 0] = config.reg_bias * counts + config.bias_damping
    diag[:, 1:] = (config.reg_factors * counts)[:, None]
    # Owners without ratings get the identity so that the stacked solve stays non-singular (their answer is 0).
    diag[counts == 0] = 1.0
    idx = np.arange(x.shape[1])
    a[:, idx, idx] += diag
    w = np.asarray(np.linalg.solve(a, b[:, :, None])[:, :, 0], dtype=np.float64)
    return w[:, 0].copy(), w[:, 1:].copy()


def fit_mf(
    user_ids: Sequence[Id] | npt.NDArray[np.generic],
    item_ids: Sequence[Id] | npt.NDArray[np.generic],
    ratings: Sequence[float] | FloatArray,
    config: MFConfig,
    *,
    start: MFModel | None = None,
) -> MFModel:
    """Fit by ALS; deterministic for a given config (seeded initialisation, no randomness afterwards).

    ``start``: a model fitted earlier (on fewer ratings) whose movie factors the sweeps start from instead of random
    ones, for the movies it knows: a refit on a few more ratings then needs a sweep or two, not ``iterations``.
    """
    r = np.asarray(ratings, dtype=np.float64)
    if r.ndim != 1 or len(r) == 0 or len(user_ids) != len(r) or len(item_ids) != len(r):
        raise ValueError("user_ids, item_ids and ratings must be non-empty 1-d sequences of the same length")
    uids, uindex, u = index_ids(user_ids)
    iids, iindex, i = index_ids(item_ids)
    n_u, n_i, k = len(uids), len(iids), config.factors
    mu = float(r.mean())
    rng = np.random.default_rng(config.seed)
    p = rng.normal(0.0, config.init_scale, (n_u, k))
    q = rng.normal(0.0, config.init_scale, (n_i, k))
    bi = np.zeros(n_i)
    if start is not None and start.config.factors == k:
        # Only the movie side matters: the first sweep solves every user against it.
        old = np.array([start.item_index.get(v, -1) for v in iids], dtype=np.int64)
        known = old >= 0
        q[known] = start.item_factors[old[known]]
        bi[known] = start.item_bias[old[known]]
    bu = np.zeros(n_u)
    cu = np.bincount(u, minlength=n_u).astype(np.float64)
    ci = np.bincount(i, minlength=n_i).astype(np.float64)
    # Sort once per side: the Gram accumulation needs each owner's ratings contiguous.
    ou = np.argsort(u, kind="stable")
    oi = np.argsort(i, kind="stable")
    u_u, i_u, r_u = u[ou], i[ou], r[ou]
    u_i, i_i, r_i = u[oi], i[oi], r[oi]
    for _ in range(config.iterations):
        bu, p = _ridge_step(u_u, i_u, r_u - mu - bi[i_u], q, cu, config)
        bi, q = _ridge_step(i_i, u_i, r_i - mu - bu[u_i], p, ci, config)
    # A last user step against the final item state makes every stored user exactly what ``fold_in`` would
    # compute from their ratings, so a user learnt in training and one folded in online are treated alike.
    bu, p = _ridge_step(u_u, i_u, r_u - mu - bi[i_u], q, cu, config)
    return MFModel(config, mu, bu, bi, p, q, uids, iids, uindex, iindex)
