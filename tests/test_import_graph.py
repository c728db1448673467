"""The import graph of stackcomp: no circles, and no import from a lower layer to a higher one.

Every module under ``stackcomp/`` is parsed with ``ast``; every import counts, those inside
functions too (a lazy import is still a dependency: it only moves the failure to run time).
Circles are checked among module-level imports, the ones that run when a module is imported.
The layering contract is data (``CONTRACTS``): a module matching a pattern never imports a
module matching one of its forbidden patterns, at any level.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "stackcomp"

#: the run-engine modules: what plans and runs stages
ENGINE = ["stackcomp.engine", "stackcomp.plan", "stackcomp.scheduler", "stackcomp.executor", "stackcomp.view"]

#: (who, never imports, why): a pattern names a module and its submodules with ``.*``
CONTRACTS: list[tuple[list[str], list[str], str]] = [
    (["stackcomp.report", "stackcomp.render", "stackcomp.plots", "stackcomp.rundir", "stackcomp.lock"], ENGINE,
     "report/compare/diff read run directories; they never plan or run"),
    (["stackcomp.factorize", "stackcomp.factorize.*"],
     ["stackcomp.nn", "stackcomp.nn.*", "stackcomp.passes", "stackcomp.passes.*", "stackcomp.engine", "transformers",
      "transformers.*"],
     "factorizers are plain tensor maths"),
    (["stackcomp.rundir", "stackcomp.errors"], ["stackcomp", "stackcomp.*", "!stackcomp.errors"],
     "the lowest layer: importable by every module"),
    (["stackcomp.nn", "stackcomp.nn.*"],
     ["stackcomp.passes", "stackcomp.passes.*", "stackcomp.engine", "stackcomp.plan"],
     "layers know nothing of passes or plans"),
    (["stackcomp.tasks", "stackcomp.tasks.*", "stackcomp.data", "stackcomp.data.*"],
     ["stackcomp.passes", "stackcomp.passes.*", *ENGINE, "stackcomp.report", "stackcomp.search", "stackcomp.search.*"],
     "a task kind serves data, heads and metrics to any pass; it never knows which pass or engine asks"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import of the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = set()
    for node in tree.body:  # module level: the body, and if/try blocks in it (not functions or classes)
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            top_level.add(id(n))
            stack.extend(ast.iter_child_nodes(n))
    out = []
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            out.extend((a.name, at_top, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            for a in node.names:  # ``from stackcomp import plots`` imports the module stackcomp.plots
                out.append((f"{mod}.{a.name}", at_top, node.lineno))
    return out


def _graph() -> tuple[nx.DiGraph, dict[str, list[tuple[str, bool, int]]]]:
    files = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    all_imports = {}
    for name, path in files.items():
        edges = []
        for target, at_top, line in _imports(path):
            if target.split(".")[0] != "stackcomp":
                edges.append((target, at_top, line))  # third-party: kept for the contracts
                continue
            while target not in files and "." in target:  # ``from stackcomp.x import name``: the module x
                target = target.rpartition(".")[0]
            if target in files and target != name:
                edges.append((target, at_top, line))
                if at_top:
                    graph.add_edge(name, target)
        all_imports[name] = edges
    return graph, all_imports


def _matches(module: str, patterns: list[str]) -> bool:
    allowed = [p[1:] for p in patterns if p.startswith("!")]
    return (any(fnmatchcase(module, p) for p in patterns if not p.startswith("!"))
            and not any(fnmatchcase(module, p) for p in allowed))


def test_the_graph_sees_the_package():
    graph, imports = _graph()
    assert {"stackcomp.cli", "stackcomp.engine", "stackcomp.report", "stackcomp.rundir"} <= set(graph)
    assert any(t == "stackcomp.engine" for t, _, _ in imports["stackcomp.cli"])  # lazy imports are seen


def test_no_import_cycles_at_module_level():
    graph, _ = _graph()
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "module-level import cycles:\n" + "\n".join(
        "  " + " -> ".join([*c, c[0]]) for c in cycles[:10])


def test_no_import_cycles_even_through_lazy_imports():
    """A lazy import only hides a circle until run time. A module's lazy import of its own
    package (``stackcomp.nn.base`` filling the layer registry from ``stackcomp.nn``) is not one."""
    _, imports = _graph()
    graph = nx.DiGraph()
    for module, edges in imports.items():
        for target, at_top, _ in edges:
            own_package = module.startswith(target + ".")
            if target.startswith("stackcomp") and not (own_package and not at_top):
                graph.add_edge(module, target)
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(
        "  " + " -> ".join([*c, c[0]]) for c in cycles[:10])


@pytest.mark.parametrize("who,forbidden,why", CONTRACTS, ids=[c[2] for c in CONTRACTS])
def test_layering_contract(who, forbidden, why):
    _, imports = _graph()
    bad = []
    for module, edges in sorted(imports.items()):
        if not _matches(module, who):
            continue
        for target, at_top, line in edges:
            if _matches(target, forbidden):
                where = "module level" if at_top else "inside a function"
                bad.append(f"  {module} -> {target}  (line {line}, {where})")
    assert not bad, f"{why}; forbidden imports:\n" + "\n".join(sorted(set(bad)))
