"""The ``moviematch-ml`` command: a thin shell over the library (serve, train, evaluate, models, prune-log,
ab-report).

Exit codes: 0 success, 1 a known error (bad data, bad model, bad settings), 2 bad command-line usage, or nothing
for ab-report to compare (no prediction log, no rating joined to it, one variant only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moviematch_ml import __version__
from moviematch_ml.errors import MovieMatchError

if TYPE_CHECKING:
    from moviematch_ml.offline.data import Dataset
    from moviematch_ml.offline.progress import Progress


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moviematch-ml", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moviematch-ml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the prediction service", description="Run the prediction service (settings: environment)."
    )
    serve.add_argument("--host", help="interface to bind (default: HOST, else 0.0.0.0)")
    serve.add_argument("--port", type=int, help="TCP port (default: PORT, else 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default: WORKERS, else 1)")
    serve.set_defaults(func=_serve)

    train = sub.add_parser("train", help="train a model and write its model card and report")
    _add_data_options(train)
    train.add_argument("--out", type=Path, default=Path("model"), help="directory for model.txt and model_card.json")
    train.add_argument("--report-dir", type=Path, help="directory for report.md and the plots (default: --out)")
    train.add_argument(
        "--no-personalized",
        action="store_true",
        help="train only the six-feature model (default: also the personalised model, into OUT/personalized/)",
    )
    _add_quiet(train)
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("evaluate", help="evaluate every model and baseline on a protocol")
    _add_data_options(evaluate)
    evaluate.add_argument("--protocol", choices=("temporal", "kfold", "replay"), default="temporal")
    evaluate.add_argument("--folds", type=int, default=5, help="folds of the kfold protocol (default 5)")
    evaluate.add_argument(
        "--features",
        choices=("online", "frozen"),
        default="online",
        help="online: from all earlier ratings (default); frozen: only training ratings reach any feature",
    )
    evaluate.add_argument(
        "--refit-days",
        type=float,
        default=None,
        help="replay: refit the service's models every N days on all earlier ratings (default: fitted once)",
    )
    evaluate.add_argument(
        "--validation",
        action="store_true",
        help="replay: replay the last 20%% of the history instead of what follows it (that part is never read): "
        "for choosing settings",
    )
    evaluate.add_argument("--report", type=Path, help="replay: write the table and learning-curve plot into DIR")
    evaluate.add_argument("--json", action="store_true", help="print exactly one JSON object")
    _add_quiet(evaluate)
    evaluate.set_defaults(func=_evaluate)
    _add_models(sub)
    prune = sub.add_parser(
        "prune-log",
        help="delete old rows of the prediction log",
        description="Delete prediction-log rows older than the retention (DATABASE_URL's store).",
    )
    prune.add_argument(
        "--older-than-days", type=float, help="default: PREDICTION_LOG_RETENTION_DAYS (90); 0 deletes every row"
    )
    prune.set_defaults(func=_prune_log)
    _add_ab_report(sub)
    return parser


def _add_ab_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ab = sub.add_parser(
        "ab-report",
        help="compare the variants on the ratings that followed their predictions",
        description="Join each stored rating to the prediction served before it and compare every challenger with "
        "the champion: RMSE, MAE, NDCG@10 with 95%% intervals, p-values and a verdict (docs/ab.md).",
    )
    ab.add_argument(
        "--database-url", help="the service's feedback store (default: DATABASE_URL, else the service default)"
    )
    ab.add_argument("--out", type=Path, default=Path("ab"), help="directory for ab_report.md and ab_report.png")
    ab.add_argument("--json", action="store_true", help="print exactly one JSON object (the report's data)")
    ab.add_argument("--since", help="only ratings rated at or after this ISO time (UTC unless it says otherwise)")
    ab.add_argument("--until", help="only ratings rated at or before this ISO time")
    ab.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples and permutations (default 1000)")
    ab.add_argument("--seed", type=int, default=0, help="seed of the resamples (default 0)")
    ab.add_argument(
        "--min-ratings",
        type=int,
        default=100,
        help="joined ratings each side needs before a verdict (default 100)",
    )
    ab.set_defaults(func=_ab_report)


def _iso_time(text: str | None, flag: str) -> float | None:
    from datetime import UTC, datetime

    from moviematch_ml.errors import DataError

    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise DataError(flag, f"must be an ISO-8601 time such as 2026-12-01T00:00:00Z (got {text!r})") from None
    return (parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)).timestamp()


def _database_url(args: argparse.Namespace) -> str:
    """--database-url, else DATABASE_URL, else the service default; a SQLite file that does not exist is refused
    (connecting would create an empty database and hide a wrong path behind "0 ratings")."""
    import os

    from sqlalchemy.engine import make_url

    from moviematch_ml.errors import DataError
    from moviematch_ml.online.store import engine_url
    from moviematch_ml.settings import Settings

    # The one place the CLI reads DATABASE_URL; the library is handed the URL.
    url = args.database_url or os.environ.get("DATABASE_URL") or str(Settings.model_fields["database_url"].default)
    real = make_url(engine_url(url))
    file = real.database if real.get_backend_name() == "sqlite" and real.database not in ("", ":memory:") else None
    if file is not None and not Path(file).is_file():
        raise DataError("--database-url", f"no SQLite database at {file}")
    return url


def _ab_report(args: argparse.Namespace) -> int:
    import json

    from moviematch_ml.errors import DataError, ReportError
    from moviematch_ml.offline import ab
    from moviematch_ml.offline.joins import join_ratings
    from moviematch_ml.online import journal
    from moviematch_ml.online.store import FeedbackStore

    if args.bootstrap < 1 or args.min_ratings < 0:
        flag = "--bootstrap must be >= 1" if args.bootstrap < 1 else "--min-ratings must be >= 0"
        print(f"moviematch-ml ab-report: {flag}", file=sys.stderr)
        return 2
    since, until = _iso_time(args.since, "--since"), _iso_time(args.until, "--until")
    try:
        url = _database_url(args)
    except DataError as exc:  # no database at all: no log either
        print(f"moviematch-ml ab-report: {exc}", file=sys.stderr)
        return 2
    store = FeedbackStore.from_url(url, migrate=False)
    try:
        joined = join_ratings(store.iter_feedback(since=since, until=until), journal.read(store, until=until))
    finally:
        store.close()
    try:
        data = ab.report(
            joined,
            bootstrap=args.bootstrap,
            seed=args.seed,
            min_ratings=args.min_ratings,
            window={"since": args.since, "until": args.until},
        )
    except ReportError as exc:
        print(f"moviematch-ml ab-report: {exc}", file=sys.stderr)
        return 2
    md, png = ab.write(data, args.out)
    if args.json:
        print(json.dumps(data))
        return 0
    for c in data["comparisons"]:
        print(f"{c['challenger']} vs {c['champion']}: {c['verdict']}")
    print(f"wrote {md} and {png}")
    return 0


def _add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser(
        "models",
        help="the model registry: list, register, promote, rollback, challenge, end",
        description="The model registry (MODEL_REGISTRY, or --registry). The service picks every change up by itself "
        "within REGISTRY_POLL_SECONDS, or at once on POST /admin/reload.",
    )
    models.add_argument("--registry", type=Path, help="the registry directory (default: MODEL_REGISTRY)")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every registered model, the champion and the challengers")
    listing.add_argument("--json", action="store_true", help="print exactly one JSON object")
    register = actions.add_parser("register", help="copy a trained model directory into the registry")
    register.add_argument("model_dir", type=Path, help="a directory written by `moviematch-ml train`")
    register.add_argument("--challenger", metavar="NAME", help="also serve it as challenger NAME")
    register.add_argument("--weight", type=float, default=0.1, help="the challenger's share of users (default 0.1)")
    promote = actions.add_parser("promote", help="make a model (a version, its prefix, or a variant) the champion")
    promote.add_argument("model", help="a version (or a unique prefix of it), or a challenger's name")
    actions.add_parser("rollback", help="make the previous champion the champion again")
    challenge = actions.add_parser("challenge", help="serve a model to a share of the users as a named variant")
    challenge.add_argument("name", help="the variant's name (letters, digits, - and _)")
    challenge.add_argument("model", help="a version (or a unique prefix of it)")
    challenge.add_argument("--weight", type=float, required=True, help="its share of the users, between 0 and 1")
    end = actions.add_parser("end", help="stop serving a challenger (its users go back to the champion)")
    end.add_argument("name")
    models.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> int:
    import json

    from moviematch_ml.runtime.registry import Registry
    from moviematch_ml.settings import load_settings

    root = args.registry or load_settings().model_registry
    if root is None:
        print("moviematch-ml models: no registry: set MODEL_REGISTRY or pass --registry DIR", file=sys.stderr)
        return 2
    registry = Registry(root)
    if args.action == "register":
        version, new = registry.register(args.model_dir)
        print(f"{'registered' if new else 'already registered'}: {version}")
        if args.challenger:
            registry.challenge(args.challenger, version, args.weight)
            print(f"serving it as challenger {args.challenger} to {args.weight:.0%} of the users")
    elif args.action == "promote":
        assignment = registry.promote(args.model)
        print(f"champion: {assignment.champion} (registry revision {assignment.revision})")
    elif args.action == "rollback":
        assignment = registry.rollback()
        print(f"champion: {assignment.champion} (registry revision {assignment.revision})")
    elif args.action == "challenge":
        assignment = registry.challenge(args.name, args.model, args.weight)
        print(f"challenger {args.name}: {assignment.challengers[args.name].version} to {args.weight:.0%} of the users")
    elif args.action == "end":
        registry.end(args.name)
        print(f"challenger {args.name} ended: its users go back to the champion")
    assignment = registry.read()
    roles = {version: name for name, version, _ in assignment.variants()}
    if args.action == "list" and getattr(args, "json", False):
        out = {
            "revision": assignment.revision,
            "variants": [{"name": n, "model_version": v, "weight": round(w, 6)} for n, v, w in assignment.variants()],
            "models": [
                {
                    "version": m.version,
                    "role": roles.get(m.version),
                    "six_features": m.six.version,
                    "personalized": None if m.personalized is None else m.personalized.version,
                    "created_at": m.six.created_at,
                    "data": m.six.data.get("dataset"),
                }
                for m in registry.models()
            ],
        }
        print(json.dumps(out))
    elif args.action == "list":
        print(f"registry revision {assignment.revision}")
        for m in registry.models():
            role = roles.get(m.version, "")
            weight = next((f" {w:.0%}" for n, v, w in assignment.variants() if v == m.version), "")
            print(f"{m.version}  {role}{weight}  trained {m.six.created_at} on {m.six.data.get('dataset', '?')}")
    return 0


def _prune_log(args: argparse.Namespace) -> int:
    import time

    from moviematch_ml.online.journal import prune
    from moviematch_ml.online.store import FeedbackStore
    from moviematch_ml.settings import load_settings

    settings = load_settings()
    if args.older_than_days is None and settings.prediction_log_retention_days == 0:
        print("PREDICTION_LOG_RETENTION_DAYS is 0: the log is kept; nothing deleted")
        return 0
    days = settings.prediction_log_retention_days if args.older_than_days is None else args.older_than_days
    if days < 0:
        print("moviematch-ml prune-log: --older-than-days must be >= 0", file=sys.stderr)
        return 2
    store = FeedbackStore.from_url(settings.database_url)
    try:
        deleted = prune(store, time.time() - days * 86400.0)
    finally:
        store.close()
    print(f"deleted {deleted} prediction-log rows older than {days:g} days")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Run uvicorn on the app factory; each worker reads the settings from the environment once."""
    import math
    import os
    import shutil
    import signal
    import tempfile
    import types

    from moviematch_ml.errors import ConfigError
    from moviematch_ml.logs import log_config
    from moviematch_ml.online import counters, supervisor
    from moviematch_ml.settings import load_settings, require_drivers

    settings = load_settings()
    require_drivers(settings)  # here, once, rather than in every worker as it starts
    workers = args.workers if args.workers is not None else settings.workers
    if workers < 1:
        raise ConfigError("--workers must be at least 1")

    def _graceful_exit(sig: int, frame: types.FrameType | None) -> None:
        """Once uvicorn has drained the requests it re-raises SIGTERM; a graceful stop is a success (exit 0)."""

    # uvicorn installs its own handler while serving and restores this one afterwards.
    signal.signal(signal.SIGTERM, _graceful_exit)
    # Several workers keep their metrics in files of one directory, so that a scrape of any worker shows all of
    # them (online/counters.py): emptied here, before any worker starts; a temporary one unless METRICS_DIR names it.
    metrics_dir = settings.metrics_dir
    temporary = None
    if settings.metrics_enabled and (metrics_dir is not None or workers > 1):
        if metrics_dir is None:
            metrics_dir = temporary = Path(tempfile.mkdtemp(prefix="moviematch-metrics-"))
            os.environ["METRICS_DIR"] = str(metrics_dir)  # the workers read their settings from the environment
        counters.clear_directory(metrics_dir)
    try:
        supervisor.run(
            app="moviematch_ml.api.app:app_from_env",
            host=args.host if args.host is not None else settings.host,
            port=args.port if args.port is not None else settings.port,
            workers=workers,
            log_config=log_config(settings.log_level),
            log_level=settings.log_level,
            access_log=False,  # the request middleware writes one JSON line per request instead
            timeout_graceful_shutdown=math.ceil(settings.graceful_timeout),
            proxy_headers=True,
            server_header=False,  # no "server: uvicorn": the answers need not name the software behind them
            loop="auto",  # uvloop when installed, else asyncio
            http="auto",  # httptools with request deadlines (supervisor.DeadlineProtocol)
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            drain_seconds=settings.drain_seconds,
            max_concurrency=settings.max_concurrency,
        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (there is none anyway when stderr is not a terminal)",
    )


def _progress(args: argparse.Namespace) -> Progress:
    """The run's progress on stderr, when stderr is a terminal and --quiet was not given; needs the train extra."""
    from moviematch_ml.errors import ConfigError

    try:
        from moviematch_ml.offline.progress import Progress
    except ImportError as exc:
        # The service install leaves out the training extras; say how to get them instead of a traceback.
        raise ConfigError(
            f"training needs the 'train' extra ({exc.name} is missing): pip install 'moviematch-ml[train]'"
        ) from None
    return Progress(enabled=not args.quiet and sys.stderr.isatty())


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=("movielens-small",), help="built-in data set (default if no --ratings)")
    p.add_argument("--ratings", type=Path, help="ratings.csv in the MovieLens ml-latest layout")
    p.add_argument("--movies", type=Path, help="movies.csv in the MovieLens ml-latest layout")
    p.add_argument("--movie-metadata", type=Path, help="per-movie vote_average,vote_count,popularity,release_year")
    p.add_argument("--rating-scale", choices=("1-5", "0.5-5", "1-10"), help="rating scale (default: detected)")
    p.add_argument("--seed", type=int, default=42, help="random seed (folds, LightGBM)")
    p.add_argument(
        "--from-feedback",
        action="store_true",
        help="use every rating stored by the service (0-10 scale); needs --movies with the app's movie ids",
    )
    p.add_argument(
        "--database-url",
        help="the service's feedback store for --from-feedback (default: DATABASE_URL, else the service default)",
    )


def _load_dataset(args: argparse.Namespace, progress: Progress) -> Dataset:
    with progress.step("loading data"):
        return _read_dataset(args)


def _read_dataset(args: argparse.Namespace) -> Dataset:
    from moviematch_ml.errors import DataError
    from moviematch_ml.offline import data

    if args.from_feedback:
        return _load_feedback(args)
    if args.database_url is not None:
        raise DataError("--database-url", "only applies to --from-feedback")
    if args.ratings is None and args.movies is None:
        if args.movie_metadata is not None:
            raise DataError("--movie-metadata", "only applies to --ratings/--movies files")
        if args.rating_scale is not None:
            raise DataError("--rating-scale", "the built-in data set is on the 0.5-5 scale; give --ratings instead")
        return data.load_movielens_small()
    if args.dataset is not None:
        raise DataError("--dataset", "give either --dataset or --ratings/--movies, not both")
    if args.ratings is None or args.movies is None:
        raise DataError("--ratings" if args.ratings is None else "--movies", "--ratings and --movies go together")
    scale = data.parse_scale(args.rating_scale) if args.rating_scale else None
    return data.load_csv(args.ratings, args.movies, args.movie_metadata, scale)


def _load_feedback(args: argparse.Namespace) -> Dataset:
    """--from-feedback: the service's stored ratings joined with --movies (and --movie-metadata), with the features
    the backend sent for every rating the prediction log joins."""
    from moviematch_ml.errors import DataError
    from moviematch_ml.offline.boosting import TrainConfig
    from moviematch_ml.offline.data import load_feedback
    from moviematch_ml.offline.training import min_training_ratings
    from moviematch_ml.online import journal
    from moviematch_ml.online.store import FeedbackStore

    for flag, value in (
        ("--ratings", args.ratings),
        ("--dataset", args.dataset),
        ("--rating-scale", args.rating_scale),
    ):
        if value is not None:
            raise DataError(flag, "does not go with --from-feedback (the ratings are the store's, on the 0-10 scale)")
    if args.movies is None:
        raise DataError("--movies", "--from-feedback needs --movies: the app's movies (movieId,title,genres)")
    store = FeedbackStore.from_url(_database_url(args), migrate=False)
    try:
        dataset = load_feedback(
            store,
            args.movies,
            args.movie_metadata,
            min_ratings=min_training_ratings(TrainConfig(seed=args.seed)),
            logged=journal.read(store),
        )
    finally:
        store.close()
    src = dataset.source
    print(
        f"read {src['feedback_rows']:,} feedback ratings (up to row {src['last_feedback_row_id']}); training on "
        f"{len(dataset.ratings):,} ({src['unmatched_ratings']:,} of movies not in {args.movies} left out, "
        f"{src['superseded_ratings']:,} replaced by a later rating of the same movie); "
        f"{src['logged_feature_ratings']:,} of them with the features the backend sent (from the prediction log), "
        "the others with features computed from the movie files",
        file=sys.stderr,
    )
    return dataset


def _train(args: argparse.Namespace) -> int:
    import time
    from datetime import UTC, datetime

    from moviematch_ml.offline.boosting import TrainConfig
    from moviematch_ml.offline.report import write_report
    from moviematch_ml.offline.training import (
        personalized_config,
        remove_personalized,
        train_models,
        write_model,
    )
    from moviematch_ml.runtime.cards import PERSONALIZED_DIR, model_version

    progress = _progress(args)
    progress.expect(3)  # loading data, writing the models, the report; training announces its own stages
    started = time.perf_counter()
    dataset = _load_dataset(args, progress)
    loaded = time.perf_counter() - started
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pconfig = None if args.no_personalized else personalized_config(args.seed)
    result = train_models(dataset, TrainConfig(seed=args.seed), pconfig, created_at=now, progress=progress)
    trained = time.perf_counter()
    with progress.step("writing the models"):
        card_file = write_model(args.out, result)
        removed = pconfig is None and remove_personalized(args.out)
    with progress.step("report and plots"):
        report = write_report(args.report_dir or args.out, result)
    progress.close("train")
    if removed:
        print(f"removed the earlier personalised model from {args.out / PERSONALIZED_DIR}", file=sys.stderr)
    t = result.card.training
    six = result.card.metrics["models"]["six_features"]
    print(
        f"wrote {card_file.parent / result.card.model_file} ({t['num_trees']} trees, {t['num_leaves_total']} leaves), "
        f"{card_file} and {report}\nversion {result.card.version}; temporal hold-out RMSE {six['rmse']}, "
        f"NDCG@10 {six['ndcg@10']}"
    )
    p = result.personalized
    if p is not None:
        folder = args.out / PERSONALIZED_DIR
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        own = p.metrics["models"]["personalized"]
        print(
            f"wrote the personalised model into {folder} ({size / 1e6:.1f} MB)\nversion {p.model.version}; temporal "
            f"hold-out RMSE {own['rmse']} (six_features {six['rmse']}), NDCG@10 {own['ndcg@10']}"
        )
    served = model_version(result.card.version, None if p is None else p.model.version)
    print(f"model version {served} (what answers, the registry and ab-report name this model by)")
    done = time.perf_counter()
    stages = {"loading data": loaded, **result.seconds, "writing files and report": done - trained}
    total = done - started
    stages_text = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
    print(f"trained in {total:.1f} s ({stages_text})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json
    import math

    from moviematch_ml.offline.evaluation import evaluate

    if args.protocol != "replay" and (args.refit_days is not None or args.report is not None or args.validation):
        print(
            "moviematch-ml evaluate: --refit-days, --validation and --report belong to --protocol replay",
            file=sys.stderr,
        )
        return 2
    progress = _progress(args)
    progress.expect(1)  # loading data; evaluate announces the features and every fold's models
    dataset = _load_dataset(args, progress)
    if args.protocol == "replay":
        from moviematch_ml.offline.replay import replay
        from moviematch_ml.online.harness import ServiceHarness

        summary = replay(
            dataset, refit_days=args.refit_days, service=ServiceHarness, validation=args.validation, progress=progress
        )
    else:
        summary = evaluate(
            dataset, args.protocol, folds=args.folds, seed=args.seed, features=args.features, progress=progress
        )
    progress.close("evaluate")  # before the answer, which goes to stdout
    if args.report is not None and args.protocol == "replay":
        from moviematch_ml.offline.report import write_replay_report

        print(f"replay report: {write_replay_report(args.report, summary)}", file=sys.stderr)

    def clean(x: object) -> object:
        # JSON has no NaN: a metric that cannot be computed (e.g. no cold users in k-fold) is null.
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    if args.json:
        print(json.dumps(clean(summary), sort_keys=False))
        return 0
    if args.protocol == "replay":
        from moviematch_ml.offline.report import replay_text

        print(replay_text(summary))
        return 0
    print(f"{summary['protocol']}: train {summary['n_train']:,} ratings, test {summary['n_test']:,}")
    print(f"{'model':<14}{'RMSE':>8}{'MAE':>8}{'NDCG@10':>9}{'RMSE cold':>11}")
    for name, m in summary["models"].items():
        print(f"{name:<14}{m['rmse']:>8.4f}{m['mae']:>8.4f}{m['ndcg@10']:>9.4f}{m['rmse_cold_users']:>11.4f}")
    return 0


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
