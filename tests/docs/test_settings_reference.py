"""docs/settings-reference.md is what scripts/settings_reference.py writes from the settings models."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from msgbroker import BrokerSettings, MemorySettings, registry
from msgbroker.resilience import ResilienceSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "settings_reference.py"


def load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> types.ModuleType:
    return load(SCRIPT, "settings_reference")


def test_the_page_is_up_to_date(generator: types.ModuleType) -> None:
    page = (ROOT / "docs" / "settings-reference.md").read_text(encoding="utf-8")
    assert page == generator.render(), (
        "docs/settings-reference.md is out of date: run .venv/bin/python scripts/settings_reference.py"
    )


def test_every_field_of_every_model_is_on_the_page(generator: types.ModuleType) -> None:
    page = generator.render()
    models = {"": BrokerSettings, "MEMORY__": MemorySettings, "RESILIENCE__": ResilienceSettings}
    for name in ("redis", "nats", "rabbitmq", "kafka", "sqlite"):
        models[f"{name.upper()}__"] = registry.by_name(name).SETTINGS
    for prefix, model in models.items():
        for field in model.model_fields:
            if field == "memory":
                continue  # BrokerSettings' section: its own table
            row = next((line for line in page.splitlines() if f"`MSGBROKER_{prefix}{field.upper()}`" in line), None)
            assert row is not None, f"{model.__name__}.{field} is missing"
            assert row.startswith(f"| `{field}` |")


def test_the_rows_say_type_default_bounds_and_the_fields_docstring(generator: types.ModuleType) -> None:
    rows = {line.split(" | ")[0]: line for line in generator.render().splitlines() if line.startswith("| `")}
    partitions = rows["| `partition_count`"]
    assert "int (≥ 1, ≤ 4096) | `64` | `MSGBROKER_PARTITION_COUNT`<br>`MessageBroker:PartitionCount`" in partitions
    assert "every producer and worker of a topic must use the same count" in partitions
    assert "| `poll_timeout` | duration | 5 s |" in rows["| `poll_timeout`"]
    assert "`MessageBroker:Redis:KeyPrefix`" in rows["| `key_prefix`"]


def test_a_field_without_a_docstring_stops_the_generator(generator: types.ModuleType, tmp_path: Path) -> None:
    source = tmp_path / "undocumented_settings.py"
    source.write_text(
        "from msgbroker import ProviderSettings\n\n"
        "class UndocumentedSettings(ProviderSettings):\n"
        "    depth: int = 1\n"
        '    """How deep."""\n'
        "    colour: str = 'red'\n"
    )
    module = load(source, "undocumented_settings")
    with pytest.raises(SystemExit, match=r"UndocumentedSettings\.colour has no docstring"):
        generator.table(module.UndocumentedSettings, "MSGBROKER_X__", "MessageBroker:X:")
