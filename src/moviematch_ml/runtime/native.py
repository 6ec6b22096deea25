"""The one boundary to the C extensions: each compiled kernel, and the Python twin that does its work without it.

Both extensions are optional (setup.py): without a C compiler the package installs, and every kernel below is
its Python twin instead, slower and with the same results. Tests run each kernel against its twin.

=========================  ======================================  =========================================
kernel                     what it does                            Python twin
=========================  ======================================  =========================================
``Forest``                 evaluates a tree ensemble               ``trees.TreeEnsemble`` with ``native=False``
``rows``                   the JSON of a batch answer's rows        ``rows_py``
``matrix``                 decoded movies -> feature matrix        ``matrix_py``
``positions``              ids -> positions in an id index         ``positions_py``
``user_rows``              one user's personalised input rows      ``inputs.model_inputs`` (and, for a single
                                                                   prediction, ``inputs.model_input_row``)
``view_data``              a user's view from their ratings:       ``view_data_py``
                           the fold-in, mean, spread, recency
=========================  ======================================  =========================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, Final, ParamSpec, TypeVar, cast

import numpy as np
import numpy.typing as npt
import orjson

codec: Any
Forest: Any
try:
    from moviematch_ml.runtime import _codec as codec
except ImportError:  # pragma: no cover - depends on how the package was built
    codec = None
try:
    from moviematch_ml.runtime._trees import Forest
except ImportError:  # pragma: no cover - depends on how the package was built
    Forest = None

BUILT: Final[dict[str, bool]] = {"_codec": codec is not None, "_trees": Forest is not None}

FloatArray = npt.NDArray[np.float64]
P = ParamSpec("P")
R = TypeVar("R")


def _kernel_first(name: str, twin: Callable[P, R], accepts: Callable[P, bool] | None = None) -> Callable[P, R]:
    """``twin``, done by the C kernel of the same arguments when the extension is built and ``accepts`` them (the
    argument types the kernel parses); a kernel that declines (returns None or False: an input it does not cover)
    leaves the work to the twin. ``codec`` is read at every call, so a test can set it to None to run the twins."""

    def dispatch(*args: P.args, **kwargs: P.kwargs) -> R:
        if codec is not None and (accepts is None or accepts(*args, **kwargs)):
            out = getattr(codec, name)(*args, **kwargs)
            if out is not None and out is not False:
                return cast(R, out)
        return twin(*args, **kwargs)

    dispatch.__name__ = name
    dispatch.__doc__ = f"``{twin.__name__}``, in C when the extension is built."
    return dispatch


# --- rows: the JSON of a batch answer's rows ------------------------------------------------------------------------


def rows_py(
    ids: list[Any],
    ratings: list[float],
    order: list[int] | None,
    source: bytes,
    sources: list[bytes] | None,
    prefix: bytes,
) -> bytes:
    """``rows``: the rows ``{"movie_id","predicted_rating","source","prediction_id": "<prefix>-<i>"}`` in ``order``
    (None: request order), comma-separated; ``source``/``sources`` are JSON texts."""
    pre = prefix.decode("ascii")
    picked = range(len(ids)) if order is None else order
    return b",".join(
        orjson.dumps(
            {
                "movie_id": ids[i],
                "predicted_rating": ratings[i],
                "source": orjson.loads(source if sources is None else sources[i]),
                "prediction_id": f"{pre}-{i}",
            }
        )
        for i in picked
    )


# --- matrix: decoded movies -> feature matrix -----------------------------------------------------------------------


def matrix_py(movies: list[Any], names: tuple[str, ...], out: FloatArray) -> bool:
    """``matrix``: ``getattr(movie, name)`` of every movie and name, row by row, into ``out`` ((n, len(names)))."""
    n = len(movies)
    flat = (getattr(movie, name) for movie in movies for name in names)
    out[:] = np.fromiter(flat, dtype=np.float64, count=n * len(names)).reshape(n, len(names))
    return True


# --- positions: ids -> positions in an id index ---------------------------------------------------------------------


def positions_py(
    keys: Sequence[Any],
    index: dict[Any, int],
    default: int,
    out: npt.NDArray[np.int64],
    dense: npt.NDArray[np.int32] | None = None,
    complete: bool = False,
) -> int:
    """``positions``: ``out[k] = index.get(keys[k], default)``, except for a non-negative int key within ``dense``,
    whose row is ``dense[key]`` (-1: none), and, with ``complete``, one past its end (none); returns how many keys
    are not ints. (``dense`` usually holds what ``index`` holds, to be faster; a table keyed by text gives it the
    rows of the keys that are an int's text, ``personalized._dense_text_rows``.)"""
    n = len(keys)
    if dense is None:
        out[:] = np.fromiter(map(index.get, keys, repeat(default, n)), dtype=np.int64, count=n)
    else:
        size = len(dense)

        def one(key: Any) -> int:
            if type(key) is int and key >= 0:
                if key < size:
                    row = int(dense[key])
                    return row if row >= 0 else default
                if complete:
                    return default
            return index.get(key, default)

        out[:] = np.fromiter(map(one, keys), dtype=np.int64, count=n)
    return sum(type(k) is not int for k in keys)


# --- view_data: a user's view from their ratings ----------------------------------------------------------------------


def view_data_py(
    factors: FloatArray,
    k: int,
    item_bias: FloatArray,
    mu: float,
    cols: list[int],
    ratings: list[float],
    times: list[float],
    reg_factors: float,
    reg_bias: float,
    damping: float,
    recent: int,
) -> tuple[bytes, int]:
    """``view_data``: from a user's ratings (one per movie, arrival order; ``cols`` each movie's row of ``factors``,
    -1 for a movie the model does not know), the array of a ``UserView`` and how many recent ratings it holds:

        count, mean, spread, w = [bias, p_1..p_k], NaN, NaN, the recent times, their residuals

    w is the fold-in: the ridge solution of (sum_i x_i x_i^T + D) w = sum_i x_i e_i over the m known movies,
    x_i = [1, q_i], e_i = r_i - mu - b_i, D = diag(reg_bias * m + damping, reg_factors * m, ...): the ALS user step
    against the fixed movie side (zeros when no movie is known). The recent ratings are the ``recent`` latest by
    time, ascending, arrival order among equal times; residual r - mu - b (r - mu for an unknown movie). The two
    NaN are the places of the recent residuals' means, which ``UserView`` fills.
    """
    n = len(ratings)
    resid = [v - mu - float(item_bias[c]) if c >= 0 else v - mu for v, c in zip(ratings, cols, strict=True)]
    known = [j for j, c in enumerate(cols) if c >= 0]
    m = len(known)
    d = k + 1
    w: FloatArray
    if m:
        x = np.empty((m, d + 1))
        x[:, 0] = 1.0
        x[:, 1:d] = factors.take([cols[j] for j in known], 0)
        x[:, d] = [resid[j] for j in known]
        g = x.T @ x  # [[gram, rhs], [rhs^T, .]]: both sums of the system in one product
        g.ravel()[: d * (d + 2) : d + 2] += reg_factors * m  # the diagonal of the gram part (g is C-ordered)
        g[0, 0] = m + (reg_bias * m + damping)
        w = np.asarray(np.linalg.solve(g[:d, :d], g[:d, d]), dtype=np.float64)
    else:
        w = np.zeros(d)
    mean = sum(ratings) / n
    spread = math.sqrt(max(sum(v * v for v in ratings) / n - mean * mean, 0.0))
    # sorted() is stable: among equal timestamps the later arrival is the later one.
    latest = sorted(range(n), key=times.__getitem__)[-recent:]
    data = np.array(
        [
            float(n),
            mean,
            spread,
            *w.tolist(),
            math.nan,
            math.nan,
            *(times[j] for j in latest),
            *(resid[j] for j in latest),
        ]
    )
    return data.tobytes(), len(latest)


rows = _kernel_first("rows", rows_py)
matrix = _kernel_first("matrix", matrix_py)
view_data = _kernel_first("view_data", view_data_py)
positions = _kernel_first(
    "positions", positions_py, lambda keys, index, *_, **__: type(keys) is list and type(index) is dict
)
