"""In-process timing of PredictionService (no HTTP): /predict and /predict-batch bodies, bytes in, bytes out.

    python bench/inprocess.py [--model DIR] [--seconds 2]
    python -m pyinstrument -r text bench/inprocess.py --only batch1000     # where the time goes

Without --model it uses the stand-in model of bench/make_model.py (written to a temporary directory).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_model import make
from run import batch_body, features

from moviematch_ml.online.models import ModelSet
from moviematch_ml.online.service import PredictionService


def timed(fn: Callable[[bytes], bytes], bodies: list[bytes], seconds: float) -> tuple[float, int]:
    """Median seconds per call over repeated passes through ``bodies`` for about ``seconds``."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        fn(body)
        times.append(time.perf_counter() - t0)
        i += 1
    times.sort()
    return times[len(times) // 2], len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--only", choices=("predict", "batch1000", "batch10000"))
    args = ap.parse_args()
    model_dir = args.model or make(Path(tempfile.mkdtemp(prefix="mmmodel-")))
    models = ModelSet(model_dir)
    six = models.load().six
    service = PredictionService(models, max_batch_size=10_000)
    print(f"model {six.version} ({type(six).__name__})")
    rng = random.Random(7)
    cases = {
        "predict": (service.predict_one, [orjson.dumps(features(rng)) for _ in range(2000)], 1),
        "batch1000": (service.predict_batch, [orjson.dumps(batch_body(rng, 1000)) for _ in range(20)], 1000),
        "batch10000": (service.predict_batch, [orjson.dumps(batch_body(rng, 10_000)) for _ in range(4)], 10_000),
    }
    for name, (fn, bodies, rows) in cases.items():
        if args.only and name != args.only:
            continue
        med, n = timed(fn, bodies, args.seconds)
        print(f"{name:<11} median {med * 1e6:9.1f} us/call  {rows / med:12,.0f} rows/s  ({n} calls)")


if __name__ == "__main__":
    main()
