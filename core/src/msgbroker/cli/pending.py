"""``msgbroker pending``: what a group still owes on a topic, in total and per partition."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .._broker import Broker
from .._errors import CapabilityNotSupported
from ._options import ConfigOption, GroupOption, JsonOption, PartitionsOption, UrlOption
from ._render import emit_json, out
from ._target import Target, run_with_broker


def pending(
    topic: Annotated[str, typer.Argument(help="Topic.")],
    group: GroupOption,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """How many messages of TOPIC the GROUP has not settled, in total and per partition."""

    async def work(broker: Broker) -> tuple[str, int, dict[int, int] | None]:
        total = await broker.pending_count(topic, group)
        try:
            per = dict(await broker.transport.pending_by_partition(topic, group))
        except CapabilityNotSupported:
            per = None
        return broker.provider, total, per

    provider, total, per = run_with_broker(Target(url, config, partition_count), work)
    if json_output:
        emit_json(
            {
                "topic": topic,
                "group": group,
                "pending": total,
                "partitions": None if per is None else {str(p): n for p, n in sorted(per.items()) if n},
            }
        )
        return 0
    console = out()
    if per is None:
        console.print(
            f"{total} pending in {topic!r} for {group!r} (the {provider} provider does not count per partition)",
            markup=False,
        )
        return 0
    table = Table(title=f"pending: {topic} / {group}")
    table.add_column("partition", justify="right")
    table.add_column("pending", justify="right")
    for partition, n in sorted(per.items()):
        if n:
            table.add_row(str(partition), str(n))
    table.add_section()
    table.add_row("total", str(total), style="bold")
    console.print(table)
    return 0


def register(app: typer.Typer) -> None:
    """Add ``pending`` to ``app``."""
    app.command()(pending)
