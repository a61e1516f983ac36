"""The runnable examples of docs/resilience.md (the seed's two usage examples) work."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


@pytest.fixture
def load_example() -> Iterator[Callable[[str], ModuleType]]:
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        path = EXAMPLES / f"{name}.py"
        assert path.is_file(), f"missing example {path}"
        module_name = f"_docs_example_{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # pydantic resolves the message's annotations through it
        loaded.append(module_name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


async def test_resilient_message_handler_example_locks_every_seat(
    load_example: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("resilience_worker")
    locked = await example.main("memory://", 5)
    assert sorted(locked) == [f"A{n}" for n in range(5)]
    assert "locked ['A0', 'A1', 'A2', 'A3', 'A4']" in capsys.readouterr().out


async def test_resilience_service_example_gets_through_two_dropped_connections(
    load_example: Callable[[str], ModuleType],
) -> None:
    example = load_example("resilience_service")
    assert await example.main() == "reserved"


def test_the_docs_page_shows_both_examples() -> None:
    page = (EXAMPLES.parent / "resilience.md").read_text(encoding="utf-8")
    for name in ("resilience_worker.py", "resilience_service.py"):
        assert f"examples/{name}" in page
