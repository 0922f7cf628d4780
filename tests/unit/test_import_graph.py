"""Layers point down: no import cycles in ted_fl (imports inside functions count), every module sits in a
declared layer, and no module imports one of a higher layer (docs/architecture.md draws them)."""

from __future__ import annotations

import ast
from pathlib import Path

import ted_fl

PACKAGE = Path(ted_fl.__file__).parent
# The documented `python -m ted_fl.X` names: each a shim that hands over to ted_fl.commands.X.
SHIMS = ("simulate", "centralized", "sites", "generalize", "study", "sweep", "diagnose", "networks", "report",
         "results_doc", "gkd_report")
# Bottom to top: a module may import its own layer and the ones below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("ted_fl", "ted_fl.errors", "ted_fl.files", "ted_fl.config"),  # the schema, errors, atomic writes
    ("ted_fl.data",),  # site sets and their loaders
    ("ted_fl.continual", "ted_fl.privacy"),  # plain PyTorch: the learning core and its privacy mechanisms
    ("ted_fl.run",),  # a run's files and processes: run directory, pages, diagnostics
    ("ted_fl.schedule",),  # the arrival schedule, the site worker, the in-process executor, cells
    ("ted_fl.federated",),  # the Flower layer
    ("ted_fl.studies",),  # many runs: sweeps, the privacy study
    ("ted_fl.commands", "ted_fl.bench"),  # the command lines
    tuple(f"ted_fl.{s}" for s in SHIMS),  # their documented names
]
# Arrows that run up a layer on purpose, each with its reason (keep this list short).
UPWARD_ALLOWED = {
    ("ted_fl.schedule.in_process", "ted_fl.federated.dp"):
        "client-level DP in-process applies Flower's own DP strategy objects (StageDP) to weight dicts",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ted_fl modules it imports anywhere in its file (top level or inside functions)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return []

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return []


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def layer_of(module: str) -> int | None:
    """The layer of a module: that of the longest declared name it is or sits under."""
    best: tuple[int, int] | None = None
    for i, names in enumerate(LAYERS):
        for n in names:
            under = module == n or (module.startswith(n + ".") and n != "ted_fl")
            if under and (best is None or len(n) > best[1]):
                best = (i, len(n))
    return None if best is None else best[0]


def test_every_module_has_a_layer() -> None:
    loose = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not loose, f"modules in no layer (add them to LAYERS or move them into a layer's package): {loose}"


def test_no_arrow_runs_up_a_layer() -> None:
    graph = import_graph()
    up = sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})" for m, ts in graph.items()
                for t in ts if (layer_of(t) or 0) > (layer_of(m) or 0) and (m, t) not in UPWARD_ALLOWED)
    assert not up, "; ".join(up)
    stale = [k for k in UPWARD_ALLOWED if k[1] not in graph.get(k[0], set())]
    assert not stale, f"allowed upward arrows that no longer exist (remove them): {stale}"


def test_shims_only_hand_over() -> None:
    """`ted_fl/X.py` of a documented command is a docstring, one import of its command's main and the guard."""
    for name in SHIMS:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert [(i.module, [a.name for a in i.names]) for i in imports] == [(f"ted_fl.commands.{name}", ["main"])], name
        assert len(tree.body) == 3, name  # docstring, import, __main__ guard


def test_the_checker_sees_a_cycle_hidden_in_a_function() -> None:
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert "ted_fl.config" in import_graph()["ted_fl.continual.approaches"]
    assert layer_of("ted_fl.errors") == 0 and layer_of("ted_fl.simulate") == len(LAYERS) - 1
    assert layer_of("ted_fl.schedule.engine") > layer_of("ted_fl.run.directory") > layer_of("ted_fl.continual.step")  # type: ignore[operator]
    assert layer_of("ted_fl.simulator") is None  # a new top-level module must be placed


# ---- Figures for docs/architecture.md: `python -m tests.unit.test_import_graph` (radon for the function sizes) ----

def unit_of(module: str) -> str:
    """A module's unit: its sub-package (ted_fl.continual), or itself when it sits at the top level."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else module


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for m, ts in graph.items():
        units.setdefault(unit_of(m), set()).update(unit_of(t) for t in ts)
    return {u: ts - {u} for u, ts in units.items()}


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each node's floor: 1 + the highest floor it imports (1 = imports nothing); nodes of a cycle share one."""
    comp = {n: n for n in graph}
    for n in graph:  # fold mutual reachability into one representative (small graphs: quadratic is fine)
        reach = _reach(graph, n)
        for m in reach:
            if n in _reach(graph, m):
                comp[m] = min(comp[m], n)
    memo: dict[str, int] = {}

    def floor(n: str, seen: frozenset[str] = frozenset()) -> int:
        c = comp[n]
        if c not in memo:
            members = [m for m in graph if comp[m] == c]
            below = {t for m in members for t in graph[m] if comp[t] != c}
            memo[c] = 1 + max((floor(t) for t in below), default=0)
        return memo[c]

    return {n: floor(n) for n in graph}


def _reach(graph: dict[str, set[str]], n: str) -> set[str]:
    seen, todo = set(), [n]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def imports_inside_functions() -> int:
    """Import statements inside a function (each counted once, however deeply nested)."""
    def count(node: ast.AST, inside: bool) -> int:
        here = inside or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        own = int(inside and isinstance(node, ast.Import | ast.ImportFrom))
        return own + sum(count(c, here) for c in ast.iter_child_nodes(node))

    return sum(count(ast.parse(p.read_text(), str(p)), False) for p in PACKAGE.rglob("*.py"))


def figures() -> list[str]:
    import json
    import subprocess
    import sys

    graph = import_graph()
    units = unit_graph(graph)
    unit_floor = floors(units)
    mutual = sorted({tuple(sorted((u, t))) for u, ts in units.items() for t in ts if u in units.get(t, set())})
    top = sorted(m for m in graph if m.count(".") == 1 and not (PACKAGE / m.split(".")[1]).is_dir())
    lines = [f"modules: {len(graph)}; top-level modules: {len(top)}; sub-packages: "
             f"{sum(1 for u in units if (PACKAGE / u.split('.')[-1]).is_dir() and u != 'ted_fl')}",
             f"module import arrows: {sum(len(t) for t in graph.values())}; imports inside functions: "
             f"{imports_inside_functions()}",
             f"unit floors (sub-package or top-level module): {max(unit_floor.values())}; "
             f"pairs of units importing each other: {len(mutual)} {mutual}"]
    layered = [m for m in graph if layer_of(m) is not None]
    if layered:
        up = sorted(f"{m} -> {t}" for m in layered for t in graph[m] if (layer_of(t) or 0) > (layer_of(m) or 0))
        lines.append(f"declared layers: {len(LAYERS)}; arrows that run up a layer: {len(up)} {up}")
    try:
        out = subprocess.run([sys.executable, "-m", "radon", "cc", "-j", str(PACKAGE)], capture_output=True,
                             text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return [*lines, "radon is not installed: pip install radon"]
    blocks = [{**b, "name": f"{Path(f).relative_to(PACKAGE.parent)}:{b.get('classname', '') and b['classname'] + '.'}"
               f"{b['name']}"} for f, bs in json.loads(out).items() for b in bs if b.get("type") in ("function", "method")]
    complex_ = sorted((b["complexity"], b["name"]) for b in blocks if b["complexity"] > 15)
    long_ = sorted((b["endline"] - b["lineno"] + 1, b["name"]) for b in blocks if b["endline"] - b["lineno"] + 1 > 60)
    lines += [f"functions: {len(blocks)}; cyclomatic complexity > 15: {len(complex_)}; over 60 lines: {len(long_)}",
              f"  complexity > 15: {complex_[::-1]}", f"  over 60 lines: {long_[::-1]}"]
    return lines


if __name__ == "__main__":
    print("\n".join(figures()))
