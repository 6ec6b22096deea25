"""Inference runtimes side by side on one LightGBM model: LightGBM itself, ONNX Runtime, our TreeEnsemble (compiled
and numpy).

    python bench/runtimes.py [--model DIR]      # needs onnxmltools + onnxruntime for the ONNX column
    python bench/runtimes.py --personalized     # the bundled personalised model (150 trees, 20 inputs)

One thread each; prints microseconds per call for 1-row and 1000-row calls and the largest difference from
LightGBM. Without --model it uses the stand-in model of bench/make_model.py. The personalised rows hold one
user's values in the user's 8 columns, as a batch of /predict-batch does (the compiled evaluator folds them).
Rounds alternate between the runtimes and the best of them is kept: the figures are robust to a noisy machine.
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

from moviematch_ml.runtime.cards import BUNDLED_MODEL_DIR, read_card
from moviematch_ml.runtime.inputs import MODEL_FEATURES, RECENT_FEATURES
from moviematch_ml.runtime.personalized import MODEL_FILE
from moviematch_ml.runtime.trees import TreeEnsemble

Fn = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]


def per_call(fn: Fn, x: npt.NDArray[np.float64]) -> float:
    number = 2000 if len(x) == 1 else 20
    return min(timeit.repeat(lambda: fn(x), number=number, repeat=3)) / number


def personalised_rows(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    """Rows shaped like the personalised model's input for one user and n movies."""
    x = np.column_stack([synthetic_rows(rng, n), rng.uniform(0.5, 5.0, (n, len(MODEL_FEATURES) - 6))])
    user = [MODEL_FEATURES.index(c) for c in ("user_count", "user_mean", "user_std", "user_bias", *RECENT_FEATURES)]
    x[:, user] = x[0, user]  # one user: the same value in every row
    x[:, MODEL_FEATURES.index("movie_count")] = rng.integers(0, 300, n)
    x[::7, MODEL_FEATURES.index("movie_bias") :] = np.nan  # some movies the model does not know
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--personalized", action="store_true", help="the bundled personalised model instead")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = 1000
    if args.personalized:
        text = (BUNDLED_MODEL_DIR / "personalized" / MODEL_FILE).read_text(encoding="utf-8")
        n_features, name = len(MODEL_FEATURES), "bundled personalised"
        x = personalised_rows(rng, n)
    else:
        model_dir = args.model or make(Path(tempfile.mkdtemp(prefix="mmmodel-")))
        card = read_card(model_dir)
        text = (model_dir / card.model_file).read_text(encoding="utf-8")
        n_features, name = 6, card.version
        x = synthetic_rows(rng, n)

    import lightgbm as lgb

    booster = lgb.Booster(model_str=text)
    runtimes: dict[str, Fn] = {"lightgbm": lambda x: np.asarray(booster.predict(x, num_threads=1))}
    native = TreeEnsemble.from_lightgbm_text(text, n_features)
    numpy_only = TreeEnsemble.from_lightgbm_text(text, n_features, native=False)
    if native.runtime == "native":
        runtimes["TreeEnsemble, C"] = native.predict_raw
    else:
        print("the C extension is not built: only the numpy evaluator is timed")
    runtimes["TreeEnsemble, numpy"] = numpy_only.predict_raw
    if not args.personalized:
        try:
            import onnxmltools  # type: ignore[import-untyped]
            import onnxruntime as ort
            from onnxmltools.convert.common.data_types import DoubleTensorType  # type: ignore[import-untyped]

            onx = onnxmltools.convert_lightgbm(
                booster, initial_types=[("x", DoubleTensorType([None, 6]))], target_opset=15
            )
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(onx.SerializeToString(), options, providers=["CPUExecutionProvider"])
            runtimes["onnxruntime"] = lambda x: session.run(None, {"x": x})[0].ravel()
        except Exception as exc:  # the ONNX column is optional: say why it is missing
            print(f"onnxruntime skipped: {type(exc).__name__}: {exc}")

    reference = runtimes["lightgbm"](x)
    one = dict.fromkeys(runtimes, float("inf"))
    many = dict.fromkeys(runtimes, float("inf"))
    for _ in range(args.rounds):
        for key, fn in runtimes.items():
            one[key] = min(one[key], per_call(fn, x[:1]))
            many[key] = min(many[key], per_call(fn, x))
    print(f"model {name}: {native.n_trees} trees, up to {native.width} leaves, {n_features} inputs")
    print(f"{'runtime':<20} {'1 row us':>9} {'1000 rows us':>13} {'rows/s @1000':>13} {'max |diff|':>11}")
    for key, fn in runtimes.items():
        diff = float(np.abs(fn(x) - reference).max())
        print(f"{key:<20} {one[key] * 1e6:>9.1f} {many[key] * 1e6:>13.1f} {n / many[key]:>13,.0f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
