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
