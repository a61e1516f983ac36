"""The options every broker command takes (see docs/cli.md, "Which broker")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        "-u",
        envvar="MSGBROKER_URL",
        help="Broker URL: redis://, nats://, amqp://, kafka://host:port, sqlite:///PATH, "
        "memory://NAME (this process only).",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="MSGBROKER_CONFIG",
        help="Settings file (JSON, TOML, YAML, or the seed's appsettings.json).",
    ),
]
PartitionsOption = Annotated[
    int | None,
    typer.Option("--partition-count", "-p", min=1, help="Partitions per topic (must match the producers')."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
GroupOption = Annotated[str, typer.Option("--group", "-g", help="Consumer group.")]
