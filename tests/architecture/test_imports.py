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
