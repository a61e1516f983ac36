"""The layering every distribution keeps: outside core, nothing imports ``msgbroker._*`` (the
provider interface is ``msgbroker.spi``, the user API is ``msgbroker``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_CORE = ["plugins", "conformance", "examples", "bench", "tests"]


def _python_files() -> list[Path]:
    files: list[Path] = []
    for top in OUTSIDE_CORE:
        files += [p for p in (ROOT / top).rglob("*.py") if not {".venv", "build"} & set(p.parts)]
    return sorted(files)


def private_core_imports(source: str, label: str) -> list[str]:
    """``label:line: module`` for every import of a private core module in ``source``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=label)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "msgbroker" and len(parts) > 1 and parts[1].startswith("_"):
                found.append(f"{label}:{node.lineno}: {name}")
                break
    return found


def test_the_checker_finds_each_form_of_a_private_import() -> None:
    source = (
        "from msgbroker._engine import x\n"
        "import msgbroker._memory\n"
        "from msgbroker import _codec\n"
        "from msgbroker import spi, Message\n"
        "from msgbroker.spi import Transport\n"
        "from . import _local\n"
    )
    assert [hit.split(": ")[1] for hit in private_core_imports(source, "m.py")] == [
        "msgbroker._engine", "msgbroker._memory", "msgbroker._codec"]


def test_no_distribution_outside_core_imports_a_private_core_module() -> None:
    files = _python_files()
    assert len(files) > 50, "the walk found too few files to mean anything"
    offending = [hit for path in files
                 for hit in private_core_imports(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not offending, "private core imports outside core (use msgbroker.spi):\n" + "\n".join(offending)


PACKAGES = {
    "core": ROOT / "core/src/msgbroker",
    "conformance": ROOT / "conformance/src/msgbroker_conformance",
    "bench": ROOT / "bench/src/msgbroker_bench",
    "sqlite": ROOT / "examples/sqlite-provider/src/msgbroker_sqlite",
    "servers": ROOT / "scripts/msgbroker_servers",
    **{p.name: next((p / "src").glob("msgbroker_*[!o]")) for p in sorted((ROOT / "plugins").iterdir())},
}


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (at the top, under TYPE_CHECKING
    or inside a function: any of them closes a circle for a reader)."""
    name = package.name
    modules = {
        ".".join((name, *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    stem = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    stem = node.module or ""
                # `from pkg import sub` imports the module pkg.sub; `from mod import name`, mod
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            edges |= {t for t in targets if t in modules and t != module}
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_distribution_has_an_import_circle() -> None:
    assert len(PACKAGES) >= 9
    found = {dist: circles for dist, package in PACKAGES.items() if (circles := cycles(import_graph(package)))}
    assert not found, f"import circles inside a distribution: {found}"


def test_the_graph_sees_relative_type_checking_and_local_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from ._a import A\n")
    (package / "_a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._b import B\nA = 1\n")
    (package / "_b.py").write_text("def f():\n    from pkg import _a\nB = 2\n")
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg._a"}, "pkg._a": {"pkg._b"}, "pkg._b": {"pkg._a"}}
    assert cycles(graph) == [["pkg._a", "pkg._b"]]
