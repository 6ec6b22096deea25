"""Types of the C extension built from _codec.c (see serving.py)."""

from typing import Any

def rows(
    ids: list[Any],
    ratings: list[float],
    order: list[int] | None,
    source: bytes,
    sources: list[bytes] | None,
    prefix: bytes,
) -> bytes | None: ...
def matrix(movies: list[Any], names: tuple[str, ...], out: Any) -> bool: ...
def positions(
    keys: list[Any], index: dict[Any, int], default: int, out: Any, dense: Any = None, complete: bool = False
) -> int: ...
def user_rows(
    rows: Any,
    x6: Any,
    table: Any,
    factors: Any,
    user_factors: Any,
    template: Any,
    out: Any,
    n_known: int,
    movie_col: int,
    score_col: int,
    dot_col: int,
    base: float,
) -> None: ...
def view_data(
    factors: Any,
    k: int,
    item_bias: Any,
    mu: float,
    cols: list[int],
    ratings: list[float],
    times: list[float],
    reg_factors: float,
    reg_bias: float,
    damping: float,
    recent: int,
) -> tuple[bytes, int] | None: ...
