"""Write docs/settings-reference.md from the settings models: every field of BrokerSettings, of each
provider's section (``Transport.SETTINGS``) and of ResilienceSettings, with its type, default,
bounds, environment variable, settings-file key and the field's own docstring.

    .venv/bin/python scripts/settings_reference.py            # rewrite the page
    .venv/bin/python scripts/settings_reference.py --check    # exit 1 when the page is out of date

Every provider must be installed (scripts/bootstrap installs them all); tests/docs checks the page
is up to date.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
import types
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any

import annotated_types
from msgbroker import BrokerSettings, MemorySettings, registry
from msgbroker.resilience import ResilienceSettings
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "settings-reference.md"
PROVIDERS = {  # section name -> (title, distribution, extra, provider page)
    "redis": ("Redis Streams", "msgbroker-redis", "redis", "providers/redis.md"),
    "nats": ("NATS JetStream", "msgbroker-nats", "nats", "providers/nats.md"),
    "rabbitmq": ("RabbitMQ", "msgbroker-rabbitmq", "rabbitmq", "providers/rabbitmq.md"),
    "kafka": ("Apache Kafka", "msgbroker-kafka", "kafka", "providers/kafka.md"),
    "sqlite": ("one SQLite file, shared by the processes of one machine", "msgbroker-sqlite", "sqlite",
               "providers/memory.md#several-processes-on-one-machine-sqlitepath"),
}
FILE_NAMES = {"rabbitmq": "RabbitMQ"}  # the file keys are case-insensitive; this is how they read best

HEADER = """\
# Settings reference

<!-- Generated from the settings models by scripts/settings_reference.py: do not edit by hand. -->

Every setting of `msgbroker.connect()`, the `msgbroker` command and `msgbroker.resilience`, from
the models themselves. Sources, highest first: arguments (`connect(url, partition_count=16,
redis={"key_prefix": "x"})`), the environment (`MSGBROKER_*`, `__` between a section and its
key), a settings file (JSON, TOML or YAML: the `MessageBroker` section, keys in PascalCase or
snake_case, the seed's `appsettings.json` unchanged; `BrokerSettings.from_file()`, the command's
`--config`). A URL given to `connect()` or `--url` sets `provider` and its section's address.

Durations take seconds (`5`, `0.5`), suffixed strings (`"500ms"`, `"5s"`, `"2m"`, `"1h"`,
`"7d"`), .NET TimeSpans (`"00:00:05"`, `"7.00:00:00"`) or ISO 8601 (`"PT5S"`). A bad value is a
`ConfigurationError` naming the key and the value; an unknown key is refused. A settings file
that has provider sections must name its `Provider` (docs/providers/memory.md).
"""


def attribute_docs(model: type[BaseModel]) -> dict[str, str]:
    """The docstring under each field of ``model`` and its bases (the nearest wins)."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls.__module__.startswith("pydantic"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, [*body[1:], None], strict=True):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def one_line(text: str) -> str:
    """Markdown for a table cell: one line, ``literal`` as `literal`, no bare pipes."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or none"
    if annotation is timedelta:
        return "duration"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}" if unit != "days" else f"{count} day{'s' if count > 1 else ''}"
    return f"{int(seconds * 1000)} ms" if seconds < 1 else f"{seconds:g} s"


def default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, timedelta):
        return duration(value)
    if isinstance(value, BaseModel):
        return "—"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value}`"


def bounds(field: FieldInfo) -> str:
    low = high = ""
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"≥ {item.ge}"
        elif isinstance(item, annotated_types.Gt):
            low = f"> {item.gt}"
        elif isinstance(item, annotated_types.Le):
            high = f"≤ {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f"< {item.lt}"
    return ", ".join(b for b in (low, high) if b)


def pascal(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def table(model: type[BaseModel], env_prefix: str, file_prefix: str) -> list[str]:
    docs = attribute_docs(model)
    rows = ["| setting | type | default | environment / file key | what it does |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue  # a section: its own table below
        kind = type_name(field.annotation)
        limit = bounds(field)
        if limit:
            kind = f"{kind} ({limit})"
        where = f"`{env_prefix}{name.upper()}`<br>`{file_prefix}{pascal(name)}`"
        doc = docs.get(name)
        if not doc:
            raise SystemExit(f"{model.__module__}.{model.__qualname__}.{name} has no docstring: write one "
                             f"under the field (the reference takes it from there)")
        rows.append(f"| `{name}` | {kind} | {default(field)} | {where} | {one_line(doc)} |")
    return rows


def render() -> str:
    """The page, from the installed models."""
    missing = [name for name in PROVIDERS if name not in registry.names()]
    if missing:
        raise SystemExit(f"providers not installed: {', '.join(missing)} (run scripts/bootstrap)")
    out = [HEADER]
    out += ["## Broker (`BrokerSettings`)", "",
            "The settings every provider shares: `msgbroker.BrokerSettings`, the top of the `MessageBroker` "
            "section.", ""]
    out += table(BrokerSettings, "MSGBROKER_", "MessageBroker:")
    out += ["", "## `memory` — the in-memory provider (built in)", "",
            "`msgbroker.MemorySettings`; `memory://NAME` sets `name`. One process only: see "
            "[providers/memory.md](providers/memory.md).", ""]
    out += table(MemorySettings, "MSGBROKER_MEMORY__", "MessageBroker:Memory:")
    for name, (title, dist, extra, page) in PROVIDERS.items():
        model = registry.by_name(name).SETTINGS
        assert model is not None, f"the {name} provider declares no SETTINGS"
        file_name = FILE_NAMES.get(name, pascal(name))
        out += ["", f"## `{name}` — {title}", "",
                f"`{model.__module__.split('.')[0]}.{model.__qualname__}`, from `{dist}` (the `[{extra}]` extra); "
                f"details in [{page.split('#')[0]}]({page}).", ""]
        out += table(model, f"MSGBROKER_{name.upper()}__", f"MessageBroker:{file_name}:")
    out += ["", "## Resilience (`msgbroker.resilience.ResilienceSettings`)", "",
            "The retry, circuit-breaker and timeout policy of `ResilienceService`: the file's own `Resilience` "
            "section (next to `MessageBroker`), `ResilienceSettings.from_file()`; see "
            "[resilience.md](resilience.md).", ""]
    out += table(ResilienceSettings, "MSGBROKER_RESILIENCE__", "Resilience:")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run .venv/bin/python scripts/settings_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
