"""The harness's modules import one way: no circle, counting every import (top level, under
TYPE_CHECKING and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "msgbroker_bench"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _module_of(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, wherever the import statement is."""
    package = PACKAGE  # the package is flat: every module's parent is the package itself
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}" if base else package
            found.add(base)
            # ``from . import _x`` / ``from msgbroker_bench import _x`` name modules too
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def import_graph(source: Path = SOURCE) -> dict[str, set[str]]:
    paths = sorted(source.glob("*.py"))
    modules = {_module_of(p) for p in paths}
    return {_module_of(p): _imports(p, modules) - {_module_of(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as the path that closes it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert f"{PACKAGE}._run" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_walk_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
