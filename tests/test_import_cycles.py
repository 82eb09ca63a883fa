"""Imports run one way: no cycle among the package's modules, counting imports inside functions (and
under TYPE_CHECKING) too, and the top of the graph in DESIGN.md's order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vicuna_exp"


def module_files(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file. `from a import b` counts as an
    import of `a.b` when that is a module; a package's own `__init__` is not implied."""
    files = module_files(package)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t not in (name, package.name)}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The modules tied together by cycles: strongly connected components of more than one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One shortest path start -> ... -> start inside a component, to name in a failure."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def describe(graph: dict[str, set[str]], component: set[str]) -> str:
    cycle = a_cycle(graph, component)
    more = f" (cycles tie together {', '.join(sorted(component))})" if len(component) > len(cycle) - 1 else ""
    return " -> ".join(cycle) + more


def test_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    found = import_cycles(graph)
    assert not found, "import cycles: " + "; ".join(describe(graph, c) for c in found)


# DESIGN.md: ... -> checkpoint, export, rundir -> recipe (train) -> launch -> job -> cli, where A -> B
# means B imports A. The worker imports the recipe; nothing imports the worker.
TOP = ["vicuna_exp.train", "vicuna_exp.launch", "vicuna_exp.job"]
ENTRY_POINTS = {"vicuna_exp.worker", "vicuna_exp.sweep"}  # what torchrun and `vicuna-exp sweep` run


def test_the_top_of_the_graph_runs_one_way() -> None:
    wrong = []
    for module, imported in import_graph(PACKAGE).items():
        for target in sorted(imported & set(TOP)):
            if module not in ENTRY_POINTS and not (module in TOP and TOP.index(module) > TOP.index(target)):
                wrong.append(f"{module} imports {target}")
        if "vicuna_exp.worker" in imported:
            wrong.append(f"{module} imports the worker")
    assert not wrong, wrong


@pytest.mark.parametrize("source,expected", [
    ("from vicuna_exp import b\n", {"vicuna_exp.b"}),
    ("def f():\n    from vicuna_exp.b import thing\n", {"vicuna_exp.b"}),
    ("from . import b\n", {"vicuna_exp.b"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vicuna_exp.b\n", {"vicuna_exp.b"}),
])
def test_every_kind_of_import_is_an_edge(tmp_path: Path, source: str, expected: set[str]) -> None:
    package = tmp_path / "vicuna_exp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(source)
    (package / "b.py").write_text("thing = 1\n")
    assert import_graph(package)["vicuna_exp.a"] == expected


def test_a_cycle_through_a_function_level_import_is_named(tmp_path: Path) -> None:
    package = tmp_path / "vicuna_exp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from vicuna_exp import b\n")
    (package / "b.py").write_text("def f():\n    from vicuna_exp.c import g\n")
    (package / "c.py").write_text("import vicuna_exp.a\n")
    graph = import_graph(package)
    assert [describe(graph, c) for c in import_cycles(graph)] == ["vicuna_exp.a -> vicuna_exp.b -> vicuna_exp.c -> vicuna_exp.a"]
