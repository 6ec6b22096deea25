"""Inference runtimes side by side on one LightGBM model: LightGBM itself, ONNX Runtime, our numpy TreeEnsemble.

    python bench/runtimes.py [--model DIR]      # needs onnxmltools + onnxruntime for the ONNX column

One thread each; prints microseconds per call for 1-row and 1000-row calls and the largest difference from
LightGBM. Without --model it uses the stand-in model of bench/make_model.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_model import make, synthetic_rows

from moviematch_ml.model import TreeEnsemble, read_card

Fn = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]


def per_call(fn: Fn, x: npt.NDArray[np.float64]) -> float:
    number = 2000 if len(x) == 1 else 20
    return min(timeit.repeat(lambda: fn(x), number=number, repeat=5)) / number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    model_dir = args.model or make(Path(tempfile.mkdtemp(prefix="mmmodel-")))
    card = read_card(model_dir)
    text = (model_dir / card.model_file).read_text(encoding="utf-8")

    import lightgbm as lgb

    booster = lgb.Booster(model_str=text)
    runtimes: dict[str, Fn] = {"lightgbm": lambda x: np.asarray(booster.predict(x, num_threads=1))}
    ensemble = TreeEnsemble.from_lightgbm_text(text, 6)
    runtimes["numpy TreeEnsemble"] = ensemble.predict_raw
    try:
        import onnxmltools  # type: ignore[import-untyped]
        import onnxruntime as ort
        from onnxmltools.convert.common.data_types import DoubleTensorType  # type: ignore[import-untyped]

        onx = onnxmltools.convert_lightgbm(booster, initial_types=[("x", DoubleTensorType([None, 6]))], target_opset=15)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(onx.SerializeToString(), options, providers=["CPUExecutionProvider"])
        runtimes["onnxruntime"] = lambda x: session.run(None, {"x": x})[0].ravel()
    except Exception as exc:  # the ONNX column is optional: say why it is missing
        print(f"onnxruntime skipped: {type(exc).__name__}: {exc}")

    n = 1000
    x = synthetic_rows(np.random.default_rng(0), n)
    reference = runtimes["lightgbm"](x)
    print(f"model {card.version}: {ensemble.n_trees} trees, up to {ensemble.width} leaves")
    print(f"{'runtime':<20} {'1 row us':>9} {'1000 rows us':>13} {'rows/s @1000':>13} {'max |diff|':>11}")
    for name, fn in runtimes.items():
        diff = float(np.abs(fn(x) - reference).max())
        one, many = per_call(fn, x[:1]), per_call(fn, x)
        print(f"{name:<20} {one * 1e6:>9.1f} {many * 1e6:>13.1f} {n / many:>13,.0f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
