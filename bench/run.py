"""Benchmark: start the service and the common-way reference app, drive both with wrk over loopback, print a table.

    python bench/run.py [--duration 10] [--workers 2] [--skip-reference] [--json results.json]
                        [--as-deployed] [--model DIR] [--only SCENARIO ...] [--set KEY=VALUE ...] [--settle 8]

Also drives the HTTP stack's ceiling (``bench/ceiling_app.py``, a raw ASGI app answering a fixed JSON) on
/predict. Needs wrk (Debian: ``apt-get install wrk``) and scikit-learn for the reference app
(``pip install -e '.[bench]'``).
Traffic goes to 127.0.0.1 only; every run is bounded by --duration per scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

LUA = """
local bodies = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = math.random(#bodies)
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[i])
end
"""

# sitecustomize for --as-deployed: packages of the bench/train extras, not in requirements.txt, that LightGBM
# imports at start-up when they are installed (they double a worker's memory and add a second of start-up).
HIDE_PACKAGES = """
import sys

HIDDEN = {"sklearn", "pandas", "pyarrow", "dask", "datatable", "matplotlib", "graphviz"}


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ImportError(f"{name} hidden by the benchmark (not installed in the image)")
        return None


sys.meta_path.insert(0, _Hide())
"""


def features(rng: random.Random) -> dict[str, float | int]:
    """Realistic, varied inputs: TMDB-like vote counts are heavy-tailed, most films are a few years old."""
    return {
        "n_shared_genres": rng.randint(0, 4),
        "vote_average": round(rng.uniform(2.0, 9.5), 1),
        "vote_count": int(rng.paretovariate(1.2) * 50),
        "is_favorite_genre": rng.randint(0, 1),
        "years_since_release": rng.randint(0, 60),
        "popularity": round(rng.expovariate(1 / 40.0), 3),
    }


def batch_body(rng: random.Random, n: int, user: int | None = None) -> dict[str, object]:
    body: dict[str, object] = {"movies": [{"movie_id": rng.randint(1, 200_000), **features(rng)} for _ in range(n)]}
    if user is not None:
        body["user_id"] = user
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def wait_log(path: Path, marker: str, count: int, timeout: float) -> float:
    """Seconds until ``marker`` appears ``count`` times in the log file at ``path``."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if path.read_text(errors="replace").count(marker) >= count:
            return time.perf_counter() - start
        time.sleep(0.02)
    raise RuntimeError(f"{marker} not seen {count} times in {path} after {timeout} s")


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """(largest single process, whole tree) resident memory in MB, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    todo, rss = [pid], []
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return (max(rss, default=0.0), sum(rss))


@dataclass
class Result:
    app: str
    scenario: str
    connections: int
    rows_per_request: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    rows_per_s: float
    errors: int


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        print(f"  cannot read the latency {text!r} from wrk's output", file=sys.stderr)
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return {"us": value / 1000, "ms": value, "s": value * 1000, "m": value * 60_000}[unit]


def run_wrk(url: str, bodies: Path, connections: int, duration: int, lua: Path) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url, "--", str(bodies)],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    if p99 != p99:  # NaN: keep wrk's whole report for a look
        print(out, file=sys.stderr)
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return rps, p50, p99, errors


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def prestore(database_url: str, users: list[int], rng: random.Random) -> None:
    """Three ratings for each of ``users``, written to the service's database before it starts (as a previous run
    of the service would have stored them)."""
    from moviematch_ml.online.feedback import Feedback
    from moviematch_ml.online.store import FeedbackStore

    store = FeedbackStore.from_url(database_url)
    ratings = [
        Feedback(f"pre-{u}-{k}", str(u), str(rng.randint(1, 2000)), float(rng.randint(2, 10)), time.time(), None)
        for u in users
        for k in range(3)
    ]
    for at in range(0, len(ratings), 5000):
        store.add(ratings[at : at + 5000])
    store.close()


def write_bodies(directory: Path, name: str, items: list[object]) -> Path:
    """``items`` as JSON lines in ``directory/name.jsonl``: the bodies the wrk script cycles through."""
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(b, separators=(",", ":")) + "\n" for b in items))
    return path


def hide_packages(env: dict[str, str], directory: Path) -> None:
    """--as-deployed: put a sitecustomize that hides HIDE_PACKAGES (written in ``directory``) on env's PYTHONPATH."""
    site = directory / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_PACKAGES)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)


def post_json(url: str, body: object) -> object:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per scenario (default 10)")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    ap.add_argument("--skip-reference", action="store_true", help="do not run the common-way reference app")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--model", type=Path, help="MODEL_PATH for the service (default: the bundled model)")
    ap.add_argument(
        "--only", action="append", help="run only this scenario of our service (repeatable), e.g. 'batch 1000'"
    )
    ap.add_argument(
        "--as-deployed",
        action="store_true",
        help="hide from the service the optional packages LightGBM imports when present but the image does not "
        "install (scikit-learn, pandas, ...): memory and cold start as in the Docker image",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the service")
    ap.add_argument(
        "--settle",
        type=float,
        default=8.0,
        help="seconds to wait after seeding the feedback, before the first scenario (default 8)",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    rng = random.Random(7)
    tmp = Path(tempfile.mkdtemp(prefix="mmbench-"))
    lua = tmp / "bodies.lua"
    lua.write_text(LUA)

    def bodies(name: str, items: list[object]) -> Path:
        return write_bodies(tmp, name, items)

    single = bodies("single", [features(rng) for _ in range(5000)])
    batches = {
        n: bodies(f"batch{n}", [batch_body(rng, n) for _ in range(k)]) for n, k in ((100, 200), (1000, 40), (10_000, 6))
    }
    known_users = list(range(1, 201))
    personal_single = bodies(
        "psingle",
        [{**features(rng), "user_id": rng.choice(known_users), "movie_id": rng.randint(1, 2000)} for _ in range(5000)],
    )
    # No body repeats within a run (a 10 s run at 10k req/s sends 100k): the worst case for an answer cache.
    unique_single = bodies("unique", [features(rng) for _ in range(200_000)])
    personal_batch = bodies("pbatch1000", [batch_body(rng, 1000, rng.choice(known_users)) for _ in range(40)])
    # Many users, each seen a few times per run. Their ratings arrive (through /feedback) while the service runs, so
    # the change feed names them and each worker builds their state before they ask (STATE_WARM_SHARE).
    many_users = list(range(10_001, 10_001 + 20_000))
    personal_many = bodies(
        "pmany",
        [{**features(rng), "user_id": rng.choice(many_users), "movie_id": rng.randint(1, 2000)} for _ in range(50_000)],
    )
    # As many others whose ratings were stored before the service started (a restart, a deploy): the feed does not
    # name them (a worker builds at start those of the latest rows, but the 20,200 above push them out of the
    # 20,000-view cache), so each worker's first request for each of them reads their ratings and folds them in.
    cold_users = list(range(40_001, 40_001 + 20_000))
    personal_cold = bodies(
        "pcold",
        [{**features(rng), "user_id": rng.choice(cold_users), "movie_id": rng.randint(1, 2000)} for _ in range(50_000)],
    )

    results: list[Result] = []
    extra: dict[str, float] = {}
    py = sys.executable

    # --- start everything first -----------------------------------------------------------------------------
    # Our service, the common-way reference app and the ceiling app all run for the whole benchmark (idle when
    # not driven), so that each comparison is measured back to back: on a shared machine whose speed drifts by
    # minutes, scenarios a few minutes apart would compare two different machines.
    port = free_port()
    env = {**os.environ, "LOG_LEVEL": "info", "DATABASE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}"}
    if args.model is not None:
        env["MODEL_PATH"] = str(args.model.resolve())
    env.update(kv.split("=", 1) for kv in args.set)
    if args.as_deployed:
        hide_packages(env, tmp)
    if args.only is None or "personalised, 20k cold" in args.only:
        prestore(env["DATABASE_URL"], cold_users, rng)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc = start(
            [
                py,
                "-m",
                "moviematch_ml.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],
            env,
            tmp / "service.log",
        )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        # Cold start: from spawning the process to the ready probe answering 200 (nothing else starts meanwhile).
        extra["first_worker_ready_s"] = wait_ready(base + "/health/ready", 60)
        # wrk opens its keep-alive connections once and keeps them: a worker still loading when it starts would
        # get none of them, and the run would measure one worker. So wait until every worker logged its start.
        extra["cold_start_s"] = extra["first_worker_ready_s"] + wait_log(
            tmp / "service.log", '"message":"service started"', args.workers, 60
        )
        others: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        if not args.skip_reference:
            # The reference app is run the common way (uvicorn --workers); the ceiling app as our service is.
            commands = {
                "reference": [
                    py,
                    "-m",
                    "uvicorn",
                    "reference_app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "{port}",
                    "--workers",
                    str(args.workers),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                    "--app-dir",
                    str(HERE),
                ],
                "ceiling": [py, str(HERE / "ceiling_app.py"), "{port}", str(args.workers)],
            }
            for app, probe in (("reference", "/openapi.json"), ("ceiling", "/")):
                other_port = free_port()
                other_env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, (str(HERE), os.environ.get("PYTHONPATH")))),
                }
                other = start(
                    [part.replace("{port}", str(other_port)) for part in commands[app]], other_env, tmp / f"{app}.log"
                )
                procs.append(other)
                other_base = f"http://127.0.0.1:{other_port}"
                wait_ready(other_base + probe, 120)
                others[app] = (other, other_base)
        # Seed feedback so the personalised scenarios hit known users (skipped if the endpoint is absent).
        try:
            for u in known_users:
                ratings = [
                    {"user_id": u, "movie_id": rng.randint(1, 2000), "rating": rng.randint(2, 10)} for _ in range(5)
                ]
                post_json(base + "/feedback", {"ratings": ratings})
            # The many users: 3 ratings each, 1,000 ratings per request.
            ratings = [
                {"user_id": u, "movie_id": rng.randint(1, 2000), "rating": rng.randint(2, 10)}
                for u in many_users
                for _ in range(3)
            ]
            for start_at in range(0, len(ratings), 1000):
                post_json(base + "/feedback", {"ratings": ratings[start_at : start_at + 1000]})
            have_feedback = True
            # Each worker builds the state of these 20,200 users in the background, with at most a tenth of its time
            # (about 4 s here): that burst, which the seeding alone causes, must not land in the first scenarios.
            time.sleep(args.settle)
        except OSError:
            have_feedback = False
        # (app, scenario, path, bodies, connections, rows per request), in the order run: each comparison the
        # table or the ratios make is between neighbours.
        scenarios: list[tuple[str, str, str, Path, int, int]] = [
            ("moviematch", "predict", "/predict", single, 64, 1),
            ("ceiling", "predict", "/predict", single, 64, 1),
            ("reference", "predict", "/predict", single, 64, 1),
            ("moviematch", "predict, unique bodies", "/predict", unique_single, 64, 1),
        ]
        if have_feedback:
            scenarios += [
                ("moviematch", "personalised predict", "/predict", personal_single, 64, 1),
                ("moviematch", "personalised, 20k users", "/predict", personal_many, 64, 1),
                ("moviematch", "personalised, 20k cold", "/predict", personal_cold, 64, 1),
            ]
        # Our two batches next to each other, the reference's after them: until 2026-11-28 the reference's run sat
        # between them, putting 10 s and another app's load between the two sides of the tighter comparison (the
        # personalised cost ratio, against 13x and more for the reference).
        scenarios.append(("moviematch", "batch 1000", "/predict-batch", batches[1000], 8, 1000))
        if have_feedback:
            scenarios.append(("moviematch", "personalised batch 1000", "/predict-batch", personal_batch, 8, 1000))
        scenarios += [
            ("reference", "batch 1000", "/predict-batch", batches[1000], 8, 1000),
            ("moviematch", "batch 100", "/predict-batch", batches[100], 8, 100),
            ("moviematch", "batch 10000", "/predict-batch", batches[10_000], 4, 10_000),
        ]
        if args.only:
            scenarios = [sc for sc in scenarios if sc[0] != "moviematch" or sc[1] in args.only]
        for app, name, path, body_file, conns, rows in scenarios:
            if app != "moviematch" and app not in others:
                continue
            url = (base if app == "moviematch" else others[app][1]) + path
            rps, p50, p99, errors = run_wrk(url, body_file, conns, args.duration, lua)
            results.append(Result(app, name, conns, rows, rps, p50, p99, rps * rows, errors))
            print(f"  measured {app} {name}: {rps:,.0f} req/s", file=sys.stderr)
        extra["worker_rss_mb"], extra["total_rss_mb"] = tree_rss_mb(proc.pid)
        if "reference" in others:
            extra["reference_worker_rss_mb"], _ = tree_rss_mb(others["reference"][0].pid)
    finally:
        for running in procs:
            stop(running)

    ref = {r.scenario: r for r in results if r.app == "reference"}
    print(
        f"\n{'app':<11} {'scenario':<24} {'conns':>5} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'rows/s':>11} {'errors':>6} {'vs ref':>7}"
    )
    for r in results:
        ratio = ""
        if r.app == "moviematch" and r.scenario in ref:
            ratio = f"{r.rows_per_s / ref[r.scenario].rows_per_s:.1f}x"
        print(
            f"{r.app:<11} {r.scenario:<24} {r.connections:>5} {r.requests_per_s:>9,.0f} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.rows_per_s:>11,.0f} {r.errors:>6} {ratio:>7}"
        )
    base_row = {r.scenario: r for r in results if r.app == "moviematch"}
    # Cost of a personalised prediction against a six-feature one, both computed: personalised answers are never
    # taken from the answer cache, so they are set against the scenario where the cache cannot help either (every
    # body unique), and 1,000-movie batches (too big for the cache) against each other. Against the cached
    # /predict scenario as well, for completeness.
    for key, six, personal in (
        ("personalised_predict_cost_ratio", "predict, unique bodies", "personalised predict"),
        ("personalised_batch_cost_ratio", "batch 1000", "personalised batch 1000"),
        ("personalised_predict_vs_cached_predict", "predict", "personalised predict"),
        ("personalised_20k_users_cost_ratio", "predict, unique bodies", "personalised, 20k users"),
        ("personalised_20k_cold_users_cost_ratio", "predict, unique bodies", "personalised, 20k cold"),
    ):
        if six in base_row and personal in base_row:
            extra[key] = base_row[six].requests_per_s / base_row[personal].requests_per_s
    ceiling = [r for r in results if r.app == "ceiling"]
    if ceiling and "predict" in base_row:
        extra["predict_share_of_ceiling"] = base_row["predict"].requests_per_s / ceiling[0].requests_per_s
        if "predict, unique bodies" in base_row:
            extra["unique_predict_share_of_ceiling"] = (
                base_row["predict, unique bodies"].requests_per_s / ceiling[0].requests_per_s
            )
    for k, v in extra.items():
        print(f"{k}: {v:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], **extra}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
