"""LightGBM's tree models evaluated without LightGBM: the QuickScorer tables, in C or in numpy."""

from __future__ import annotations

import bisect
import threading
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from moviematch_ml.errors import ModelFormatError
from moviematch_ml.runtime.native import Forest

# LightGBM treats |x| <= kZeroThreshold as exactly zero when it reads a dense row (it stores only non-zeros). Its
# constant is the float 1e-35f widened to a double, 1.0000000180025095e-35, and trained models do split there.
_ZERO_THRESHOLD: Final[float] = float(np.float32(1e-35))
# Largest total size of the per-feature mask tables of TreeEnsemble; bigger models are left to LightGBM itself.
MAX_TABLE_BYTES: Final[int] = 64 * 1024 * 1024
# Rows evaluated together: big enough to amortise numpy's per-call cost, small enough for the work buffers
# (rows x trees x 8 bytes) to stay in the CPU cache.
_CHUNK_ROWS: Final[int] = 256
# Objectives whose raw score is the prediction (no link function to apply).
_IDENTITY_OBJECTIVES: Final[frozenset[str]] = frozenset(
    {"regression", "regression_l2", "regression_l1", "huber", "fair", "quantile", "mape"}
)


class UnsupportedModelError(Exception):
    """A valid LightGBM model that TreeEnsemble does not evaluate (categorical, linear trees, link functions...)."""


def _fields(block: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _in_order(left: list[int], right: list[int], n_leaf: int) -> tuple[list[int], dict[int, list[int]]]:
    """Leaves in left-to-right order, and for each split node the positions of the leaves of its left subtree."""
    order: list[int] = []
    left_leaves: dict[int, list[int]] = {}
    seen: set[int] = set()

    def walk(node: int) -> list[int]:
        if node in seen:
            raise UnsupportedModelError("malformed tree: a node is reached twice")
        seen.add(node)
        if node < 0:
            order.append(~node)
            return [len(order) - 1]
        below_left = walk(left[node])
        left_leaves[node] = below_left
        return below_left + walk(right[node])

    walk(0)
    if sorted(order) != list(range(n_leaf)) or len(left_leaves) != n_leaf - 1:
        raise UnsupportedModelError("malformed tree: not every leaf and node is reached once")
    return order, left_leaves


def full_rows(
    x: npt.NDArray[np.float64], columns: npt.NDArray[np.int64], values: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The (n, len(values)) matrix of ``predict_raw_columns``'s arguments: ``values`` in every row, ``x``'s columns
    at ``columns``."""
    full = np.empty((x.shape[0], len(values)))
    full[:] = values
    full[:, columns] = x
    return full


class TreeEnsemble:
    """LightGBM regression trees evaluated with numpy, all trees at once (QuickScorer's bit-vector algorithm).

    Each leaf of a tree is one bit, leaves numbered left to right. A split whose test ``x <= threshold`` is false
    rules out every leaf of its left subtree, so its "false mask" clears those bits; the leaf a row reaches is the
    lowest bit still set once every false split's mask is applied. For each feature the splits are sorted by
    threshold, so the false ones for a value x are a prefix (those with threshold < x): their combined mask per
    tree is precomputed for every prefix. A batch then costs one ``searchsorted`` and one table gather per
    feature, an AND per feature, a lowest-set-bit and one leaf-value gather, whatever the depth of the trees.
    NaN is not on the threshold line: LightGBM sends it to each split's learnt default side (NaN-as-missing
    splits) or reads it as 0 (splits without missing values), so each feature's table has one more row, after
    the prefixes, with the masks of the splits a NaN makes false.
    Built from the LightGBM text at load time; results equal LightGBM's to float rounding of the sum (tested).

    When the package was built with its C extension (``runtime/_trees.c``, through ``native.Forest``), the same
    tables are walked row by row in C instead (``runtime == "native"``): no numpy call per step, so one row and a
    batch both cost a fraction of numpy's. ``native=False`` keeps numpy (tests compare both).
    """

    def __init__(
        self,
        thresholds: list[npt.NDArray[np.float64]],
        tables: list[npt.NDArray[np.unsignedinteger[Any]]],
        leaf_values: npt.NDArray[np.float64],
        n_trees: int,
        *,
        native: bool = True,
    ) -> None:
        self.thresholds = thresholds
        # All features' tables one under the other (the one-row path gathers from it in one call); each feature's
        # table is a view into it, so the masks are held once, not twice.
        self._stacked = np.concatenate(tables, axis=0)
        self._table_starts = np.cumsum([0] + [len(t) for t in tables[:-1]]).tolist()
        self.tables = [self._stacked[s : s + len(t)] for s, t in zip(self._table_starts, tables, strict=True)]
        self.leaf_values = leaf_values  # (n_trees * width,): tree t's leaves, left to right, at t * width
        self.n_trees = n_trees
        self.width = leaf_values.shape[0] // max(n_trees, 1)
        offsets = np.arange(n_trees, dtype=np.int64) * self.width
        self._offsets_32 = (offsets - 127).astype(np.int32)  # minus the float32 exponent bias
        self._offsets_64 = offsets - 1023  # minus the float64 exponent bias
        self._threshold_lists = [t.tolist() for t in thresholds]
        self._nan_rows = [len(t) + 1 for t in thresholds]  # the row after the K + 1 prefixes: NaN's masks
        self._local = threading.local()
        self._native: Any = None
        self._native_tables: npt.NDArray[np.unsignedinteger[Any]] = self._stacked
        if native and Forest is not None:
            # Trees of up to 16 leaves (the six-feature model's 15) get 16-bit masks in C: half the table to
            # read and twice the masks per vector instruction. numpy keeps its own 32-bit tables, which its
            # lowest-set-bit trick needs.
            self._native_tables = self._stacked.astype(np.uint16) if self.width <= 16 else self._stacked
            self._native = Forest(
                np.concatenate([*thresholds, np.empty(0)]).astype(np.float64),
                np.cumsum([0] + [len(t) for t in thresholds], dtype=np.int64),
                self._native_tables,
                np.asarray(self._table_starts, dtype=np.int64),
                np.ascontiguousarray(leaf_values, dtype=np.float64),
                n_trees,
            )
        self.runtime = "native" if self._native is not None else "numpy"

    @property
    def forest(self) -> Any:
        """The compiled evaluator (``native.Forest``) that runs these tables, or None when numpy does."""
        return self._native

    @property
    def forest_tables(self) -> npt.NDArray[np.unsignedinteger[Any]]:
        """Every feature's mask table, one under the other, as the compiled evaluator reads them (16-bit masks
        for trees of up to 16 leaves, else the numpy tables); a read-only view."""
        view = self._native_tables.view()
        view.flags.writeable = False
        return view

    @classmethod
    def from_lightgbm_text(cls, text: str, n_features: int, *, native: bool = True) -> TreeEnsemble:
        """Parse LightGBM's text format; raises UnsupportedModelError for what this evaluator does not cover."""
        head, sep, rest = text.partition("\nTree=")
        if not head.startswith("tree") or not sep:
            raise UnsupportedModelError("no trees in the text")
        header = _fields(head)
        if header.get("num_class", "1") != "1" or header.get("num_tree_per_iteration", "1") != "1":
            raise UnsupportedModelError("not a single-output model")
        if header.get("objective", "").split(" ")[0] not in _IDENTITY_OBJECTIVES or "sqrt" in header["objective"]:
            raise UnsupportedModelError(f"objective {header.get('objective')!r} has a link function")
        if "average_output" in head.splitlines():
            raise UnsupportedModelError("random-forest averaging")
        if int(header.get("max_feature_idx", "-1")) != n_features - 1:
            raise UnsupportedModelError("wrong number of features")
        body = rest.split("\nend of trees", 1)[0]
        trees = [_fields(block) for block in ("Tree=" + body).split("\nTree=")]
        n_leaves = [int(t["num_leaves"]) for t in trees]
        width = max(n_leaves)
        if width > 64:
            raise UnsupportedModelError("more than 64 leaves per tree")
        dtype: type[np.unsignedinteger[Any]] = np.uint32 if width <= 32 else np.uint64
        n_bits = 32 if width <= 32 else 64
        all_ones = (1 << n_bits) - 1
        leaf_values = np.zeros(len(trees) * width, dtype=np.float64)
        # (threshold, tree, mask, whether a NaN value makes the split false), per feature
        splits: list[list[tuple[float, int, int, bool]]] = [[] for _ in range(n_features)]
        for t, (tree, n_leaf) in enumerate(zip(trees, n_leaves, strict=True)):
            if tree.get("num_cat", "0") != "0" or tree.get("is_linear", "0") != "0":
                raise UnsupportedModelError("categorical splits or linear trees")
            values = [float(v) for v in tree["leaf_value"].split()]
            if len(values) != n_leaf:
                raise UnsupportedModelError("leaf count mismatch")
            if n_leaf == 1:
                leaf_values[t * width] = values[0]
                continue
            feature = [int(v) for v in tree["split_feature"].split()]
            threshold = [float(v) for v in tree["threshold"].split()]
            decision = [int(v) for v in tree["decision_type"].split()]
            left = [int(v) for v in tree["left_child"].split()]
            right = [int(v) for v in tree["right_child"].split()]
            if not all(len(a) == n_leaf - 1 for a in (feature, threshold, decision, left, right)):
                raise UnsupportedModelError("node count mismatch")
            # decision_type bit 0: categorical; bit 1: default left; bits 2-3: missing type. Zero-as-missing (1)
            # sends values near 0 to the default side, which breaks the prefix rule; NaN-as-missing (2) sends NaN
            # there (the NaN row); with none (0) LightGBM reads NaN as 0.
            if any(d & 1 or (d >> 2) & 3 not in (0, 2) for d in decision) or any(
                not 0 <= f < n_features for f in feature
            ):
                raise UnsupportedModelError("categorical or zero-as-missing splits")
            order, left_leaves = _in_order(left, right, n_leaf)
            for position, leaf in enumerate(order):
                leaf_values[t * width + position] = values[leaf]
            for node, positions in left_leaves.items():
                mask = all_ones
                for p in positions:
                    mask &= ~(1 << p)
                d = decision[node]
                nan_false = not d & 2 if (d >> 2) & 3 == 2 else threshold[node] < 0.0
                splits[feature[node]].append((threshold[node], t, mask, nan_false))
        n_trees = len(trees)
        table_bytes = sum((len(s) + 2) * n_trees for s in splits) * np.dtype(dtype).itemsize
        if table_bytes > MAX_TABLE_BYTES:
            raise UnsupportedModelError(f"mask tables would take {table_bytes} bytes")
        thresholds: list[npt.NDArray[np.float64]] = []
        tables: list[npt.NDArray[np.unsignedinteger[Any]]] = []
        for feature_splits in splits:
            feature_splits.sort(key=lambda s: s[0])
            table = np.full((len(feature_splits) + 2, n_trees), all_ones, dtype=dtype)
            nan_row = len(feature_splits) + 1
            for k, (_, t, mask, nan_false) in enumerate(feature_splits):
                # Row k+1 = the first k+1 splits false: row k's masks, and this split's mask on its own tree.
                table[k + 1] = table[k]
                table[k + 1, t] &= mask
                if nan_false:
                    table[nan_row, t] &= mask
            thresholds.append(np.array([s[0] for s in feature_splits], dtype=np.float64))
            tables.append(table)
        return cls(thresholds, tables, leaf_values, n_trees, native=native)

    def predict_raw_columns(
        self, x: npt.NDArray[np.float64], columns: npt.NDArray[np.int64], values: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """``predict_raw`` of rows that share most of their inputs: ``x`` (n, k) holds the features ``columns``
        (k distinct feature indices), and every other feature j is ``values[j]`` (n_features) in every row. The
        compiled evaluator reads them as they are (a personalised batch then writes 12 columns per movie, not 20);
        numpy gets the full matrix."""
        if self._native is not None:
            out = np.empty(x.shape[0], dtype=np.float64)
            self._native.predict(x, out, columns, values)
            return out
        return self.predict_raw(full_rows(x, columns, values))

    def predict_raw(
        self, x: npt.NDArray[np.float64], out: npt.NDArray[np.float64] | None = None
    ) -> npt.NDArray[np.float64]:
        """Sum of the trees' leaf values for each row of ``x`` (n, n_features), into ``out`` ((n,) float64) if
        given."""
        n = x.shape[0]
        if self._native is not None:
            if out is None:
                out = np.empty(n, dtype=np.float64)
            self._native.predict(np.ascontiguousarray(x, dtype=np.float64), out)
            return out
        if out is not None:
            out[:] = self.predict_raw(x)
            return out
        if n == 1:
            return self._predict_one(x[0])
        nan = np.isnan(x)
        x = np.where(np.abs(x) > _ZERO_THRESHOLD, x, 0.0)  # NaN compares False: 0 here, its own row below
        # side="left": the number of thresholds < x, i.e. the splits whose test x <= threshold is false.
        index = [np.searchsorted(thr, x[:, j], side="left") for j, thr in enumerate(self.thresholds)]
        if nan.any():
            for j in np.flatnonzero(nan.any(axis=0)).tolist():
                index[j][nan[:, j]] = self._nan_rows[j]
        out = np.empty(n, dtype=np.float64)
        scratch = self._scratch()
        for lo in range(0, n, _CHUNK_ROWS):
            hi = min(lo + _CHUNK_ROWS, n)
            self._chunk([k[lo:hi] for k in index], out[lo:hi], *(b[: hi - lo] for b in scratch))
        return out

    def _scratch(self) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.float64]]:
        # Work buffers reused across calls (one set per thread: big batches run in the thread pool). Fresh
        # megabyte-sized arrays per call cost more in page faults than the arithmetic done in them.
        buffers: tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.float64]] | None = getattr(
            self._local, "buffers", None
        )
        if buffers is None:
            shape = (_CHUNK_ROWS, self.n_trees)
            dtype = self.tables[0].dtype
            buffers = (np.empty(shape, dtype), np.empty(shape, dtype), np.empty(shape, np.float64))
            self._local.buffers = buffers
        return buffers

    def _chunk(
        self,
        index: list[npt.NDArray[np.intp]],
        out: npt.NDArray[np.float64],
        masks: npt.NDArray[Any],
        tmp: npt.NDArray[Any],
        values: npt.NDArray[np.float64],
    ) -> None:
        # mode="clip": with out=, the default mode="raise" copies through a buffer (slow); the indices are in range
        # by construction (searchsorted over K thresholds gives 0..K, and a table has K + 1 rows).
        np.take(self.tables[0], index[0], axis=0, out=masks, mode="clip")
        for table, k in zip(self.tables[1:], index[1:], strict=True):
            np.take(table, k, axis=0, out=tmp, mode="clip")
            np.bitwise_and(masks, tmp, out=masks)
        # m & -m isolates the lowest set bit: the exit leaf (unsigned negation wraps, as ~m + 1).
        np.negative(masks, out=tmp)
        np.bitwise_and(masks, tmp, out=masks)
        # A power of two converts to a float exactly, and the float's exponent field is the bit's index (20x
        # faster than log2); the exponent bias is folded into the per-tree offsets.
        if masks.dtype == np.uint32:
            bits = tmp.view(np.int32)
            np.copyto(tmp.view(np.float32), masks, casting="unsafe")
            np.right_shift(bits, 23, out=bits)
            np.add(bits, self._offsets_32, out=bits)
        else:
            bits = tmp.view(np.int64)
            np.copyto(tmp.view(np.float64), masks, casting="unsafe")
            np.right_shift(bits, 52, out=bits)
            np.add(bits, self._offsets_64, out=bits)
        np.take(self.leaf_values, bits, out=values, mode="clip")
        values.sum(axis=1, out=out)

    def _predict_one(self, row: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return self.predict_list(row.tolist())

    def predict_value(self, values: list[float]) -> float:
        """The sum of leaf values for one row given as a list of floats."""
        if self._native is not None:
            value: float = self._native.predict_row(values)
            return value
        return float(self.predict_list(values)[0])

    def predict_list(self, values: list[float]) -> npt.NDArray[np.float64]:
        """The sum of leaf values for one row given as a list of floats: a (1,) array, computed with numpy.

        One row: bisect on Python lists beats numpy's per-call overhead, and one gather from the stacked tables
        plus one AND-reduce replace a gather and an AND per feature.
        """
        rows = [
            start + (bisect.bisect_left(thr, v if abs(v) > _ZERO_THRESHOLD else 0.0) if v == v else nan_row)
            for v, thr, start, nan_row in zip(
                values, self._threshold_lists, self._table_starts, self._nan_rows, strict=True
            )
        ]
        masks = np.bitwise_and.reduce(self._stacked.take(rows, axis=0), axis=0)
        # The batch path's lowest-set-bit and leaf gather, on one row and in place: these few numpy calls are most
        # of a one-row prediction, and fresh temporaries for each step would cost nearly as much again.
        np.bitwise_and(masks, np.negative(masks), out=masks)  # m & -m: the exit leaf's bit
        if masks.dtype == np.uint32:
            position = masks.astype(np.float32).view(np.int32)
            position >>= 23
            position += self._offsets_32
        else:
            position = masks.astype(np.float64).view(np.int64)
            position >>= 52
            position += self._offsets_64
        return np.array([self.leaf_values.take(position).sum()])


class EnsembleBooster:
    """A ``TreeEnsemble`` behind the ``lightgbm.Booster`` methods the serving and saving code call.

    For other LightGBM text models: ``fast_booster(text, n)`` is a drop-in for ``lightgbm.Booster(model_str=text)``
    at prediction time, several times faster and without importing LightGBM (the personalised model uses it).
    """

    def __init__(self, ensemble: TreeEnsemble, n_features: int, text: str) -> None:
        self.ensemble = ensemble
        self._n_features = n_features
        self._text = text

    def predict(self, x: npt.NDArray[np.float64], num_threads: int = 1) -> npt.NDArray[np.float64]:
        return self.ensemble.predict_raw(np.asarray(x, dtype=np.float64))

    def num_feature(self) -> int:
        return self._n_features

    def model_to_string(self, num_iteration: int | None = None) -> str:
        """The LightGBM text it was built from (a loaded model can be saved again, byte for byte)."""
        return self._text


def fast_booster(model_text: str, n_features: int) -> Any:
    """An ``EnsembleBooster`` when the evaluator covers the model, else LightGBM's own ``Booster``.

    Raises ModelFormatError when LightGBM does not read the text as a model of ``n_features`` inputs.
    """
    try:
        return EnsembleBooster(TreeEnsemble.from_lightgbm_text(model_text, n_features), n_features, model_text)
    except (UnsupportedModelError, ValueError, KeyError, IndexError, RecursionError):
        return lightgbm_booster(model_text, n_features)


def lightgbm_booster(model_text: str, n_features: int) -> Any:
    import lightgbm as lgb  # only for models TreeEnsemble does not cover: importing it costs seconds and memory

    try:
        booster = lgb.Booster(model_str=model_text)
    except lgb.basic.LightGBMError as exc:
        raise ModelFormatError(f"not a LightGBM model: {exc}") from exc
    if booster.num_feature() != n_features:
        raise ModelFormatError(f"model has {booster.num_feature()} inputs, expected {n_features}")
    return booster
