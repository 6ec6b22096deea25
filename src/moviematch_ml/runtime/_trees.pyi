"""Types of the C extension built from _trees.c (see trees.TreeEnsemble; imported by native.py only)."""

from typing import Any

class Forest:
    def __init__(
        self, thresholds: Any, thr_starts: Any, tables: Any, table_starts: Any, leaf_values: Any, n_trees: int
    ) -> None: ...
    def predict(self, x: Any, out: Any, columns: Any = None, values: Any = None) -> None: ...
    def predict_row(self, values: list[float]) -> float: ...
