"""The ``moviematch-ml`` command: a thin shell over the library (serve, train, evaluate).

Exit codes: 0 success, 1 a known error (bad data, bad model, bad settings), 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moviematch_ml.errors import MovieMatchError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moviematch-ml", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # --- serve (owned by the API work) ---------------------------------------------------------------------
    serve = sub.add_parser("serve", help="run the prediction service")
    serve.set_defaults(func=_serve)

    # --- train / evaluate (owned by the training work) -----------------------------------------------------
    train = sub.add_parser("train", help="train a model and write its model card and report")
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("evaluate", help="evaluate every model and baseline on a protocol")
    evaluate.set_defaults(func=_evaluate)
    return parser


def _serve(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _train(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _evaluate(args: argparse.Namespace) -> int:
    raise NotImplementedError


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except MovieMatchError as exc:
        print(f"moviematch-ml {args.command}: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
