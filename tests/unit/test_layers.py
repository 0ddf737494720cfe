"""The house's layers, checked on the import graph read from the source (``ast``; nothing is imported).

Bottom to top: ``protos`` → ``kvscale`` (core) → ``simulator`` → ``predictor`` → ``scaler``, ``router`` → ``harness``
(real parts for tests, benchmarks and the demo) → ``bench``, ``demo``; ``deploy`` checks the manifests against the
CLIs. A package may import only the packages :data:`ALLOWED` lists for it; every import counts, also one inside a
function or under ``TYPE_CHECKING`` (an upward import is a design fault wherever it hides). The serving parts of
``scaler`` and ``router`` must not import ``simulator``: only their evaluation and benchmark modules may
(:data:`SIMULATOR_OK`); the scaling evaluation and the predictor's simulated capacity may use the router's
virtual-clock dispatcher (:data:`SIDEWAYS_OK`: the simulator has no dispatcher of its own, so whatever runs the
virtual cluster routes with the router's policies). No import circle between any two files. ``kvscale/cli.py``
loads each part's CLI by name (``importlib``), so the core's entry point is the one place that reaches up, on
purpose, without an import.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protos", "kvscale", "simulator", "predictor", "scaler", "router", "harness", "bench", "demo", "deploy")

ALLOWED: dict[str, set[str]] = {
    "protos": set(),
    "kvscale": set(),
    "simulator": {"kvscale"},
    "predictor": {"kvscale", "simulator"},
    "scaler": {"protos", "kvscale", "predictor", "simulator"},
    "router": {"kvscale", "simulator"},
    "harness": {"kvscale", "simulator"},
    "bench": {"kvscale", "simulator", "router", "harness"},
    "demo": {"protos", "kvscale", "simulator", "scaler", "router", "harness"},
    "deploy": {"kvscale", "scaler", "router"},
}
# Within scaler/ and router/, the files that may import the simulator (evaluation on the virtual clock).
SIMULATOR_OK = ("scaler/evaluate/", "router/evaluate/")
# The imports across: the virtual cluster has no dispatcher of its own, so the scaling evaluation (``eval scaling
# --router-policy``) and the predictor's capacity probes (``predictor/capacity_sim.py``: the router's default
# least-request feeds the probe's pool) route with the router's policies, through the router's own virtual-clock
# adapter and nothing else of it.
SIDEWAYS_OK = {"scaler/evaluate/": "router.evaluate.dispatch", "predictor/capacity_sim.py": "router.evaluate.dispatch"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Every module of the house by dotted name (generated gRPC stubs excluded)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "_pb2" not in path.name:
                out[_module_name(path)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The house's modules that ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        for t in targets:
            while t and t not in modules:  # a name inside a module: the module itself
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    modules = source_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_graph_reads_imports() -> None:
    g = graph()
    assert "kvscale.latency" in g["simulator.engine"]  # from kvscale.latency import LatencyModel
    assert len(g) > 80


def test_no_upward_import() -> None:
    bad = []
    for src, targets in graph().items():
        top = src.split(".")[0]
        path = str(source_files()[src].relative_to(ROOT))
        for t in sorted(targets):
            dst = t.split(".")[0]
            if dst == top:
                continue
            if any(path.startswith(where) and t == mod for where, mod in SIDEWAYS_OK.items()):
                continue
            if dst not in ALLOWED[top]:
                bad.append(f"{path}: imports {t} ({top} may import {sorted(ALLOWED[top]) or 'nothing'})")
            elif dst == "simulator" and top in ("scaler", "router") and not path.startswith(SIMULATOR_OK):
                bad.append(f"{path}: imports {t} (only {', '.join(SIMULATOR_OK)} may, not the serving code)")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    g = graph()
    # a package's __init__ re-exporting its modules is not a circle with them
    for name in list(g):
        g[name] = {t for t in g[name] if not name.startswith(t + ".")}
    circles = _cycles(g)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_packages_by_import_count() -> None:
    """Every top-level package exists (a typo in PACKAGES would make the checks above vacuous)."""
    counts: dict[str, int] = defaultdict(int)
    for name in source_files():
        counts[name.split(".")[0]] += 1
    assert set(counts) == set(PACKAGES) - {p for p in PACKAGES if not (ROOT / p).is_dir()}
    assert {"kvscale", "simulator", "scaler", "router"} <= set(counts)
