"""``msgbroker tail``: join a group as one more member and print (and settle) what it gets, or
peek at what the group has not settled (``--no-ack``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.text import Text

from .._broker import Broker, Subscription
from .._errors import CapabilityNotSupported
from .._message import Message, MessageContext
from .._provider import Delivery
from .._registry import registry
from ._errors import CliError, require_prometheus
from ._options import ConfigOption, GroupOption, JsonOption, PartitionsOption, UrlOption
from ._render import emit_json, err, out, payload
from ._target import Target, run_with_broker


class Settle(StrEnum):
    """How ``tail`` settles what it handled."""

    ACK = "ack"
    NAK = "nak"
    REJECT = "reject"


def _delivery_line(topic: str, partition: int, message_id: str, attempt: int, fields: Any, outcome: str) -> Text:
    text = Text()
    text.append(f"{topic}[{partition}] ", style="cyan")
    text.append(message_id, style="bold")
    text.append(f" attempt {attempt} {outcome} ", style="dim")
    text.append(json.dumps(fields, default=str, ensure_ascii=False))
    return text


def _peek(target: Target, topic: str, group: str, limit: int, json_output: bool) -> int:
    async def work(broker: Broker) -> list[Delivery]:
        await broker.pending_count(topic, group)  # validates the names
        try:
            return await broker.transport.peek(topic, group, limit)
        except CapabilityNotSupported:
            raise CliError(
                f"the {broker.provider} provider cannot read messages without settling them; run tail without --no-ack"
            ) from None

    deliveries = run_with_broker(target, work)
    console = out()
    for d in deliveries:
        if json_output:
            emit_json(
                {
                    "topic": topic,
                    "group": group,
                    "partition": d.partition,
                    "message_id": d.message_id,
                    "delivery_attempt": d.attempt,
                    "headers": dict(d.headers),
                    "message": payload(d.body),
                    "outcome": "unsettled",
                }
            )
        else:
            console.print(_delivery_line(topic, d.partition, d.message_id, d.attempt, payload(d.body), "unsettled"))
    if not json_output:
        err().print(
            f"peeked at {len(deliveries)} unsettled message(s) of {topic!r} for {group!r}; nothing settled",
            markup=False,
        )
    return 0


def tail(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    group: GroupOption,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Stop after this many messages.")] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", "-t", min=0, help="Stop after this many seconds.")
    ] = None,
    idle: Annotated[
        float | None, typer.Option("--idle", min=0, help="Stop after this many seconds without a message.")
    ] = None,
    settle: Annotated[
        Settle,
        typer.Option(
            "--settle", case_sensitive=False, help="ack; nak (retry later); reject (straight to the dead letters)."
        ),
    ] = Settle.ACK,
    no_ack: Annotated[bool, typer.Option("--no-ack", help="Peek: show unsettled messages, settle nothing.")] = False,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="Print this run's metrics (Prometheus text) at the end.")
    ] = False,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Join GROUP on TOPIC, print each message and settle it (ack by default)."""
    target = Target(url, config, partition_count)
    if no_ack:
        return _peek(target, topic, group, count or 20, json_output)
    plugin, plugin_name = None, f"msgbroker.cli.metrics.{os.getpid()}.{time.monotonic_ns()}"
    if metrics:
        require_prometheus()
        from prometheus_client import CollectorRegistry

        from ..metrics import MessagingMetrics

        plugin = MessagingMetrics(registry=CollectorRegistry(), prometheus=True, otel=False)
        registry.register(plugin, name=plugin_name)
    console = out()
    handled = 0

    async def work(broker: Broker) -> int:
        nonlocal handled
        enough = asyncio.Event()
        parked: set[asyncio.Task[Any]] = set()
        last = time.monotonic()

        async def handle(ctx: MessageContext[Message]) -> None:
            nonlocal handled, last
            if enough.is_set():
                # Past --count (should not happen, see below): hold the message unsettled until
                # the subscription stops, so that it stays for the group.
                task = asyncio.current_task()
                if task is not None:
                    parked.add(task)
                await asyncio.Event().wait()
            handled += 1
            last = time.monotonic()
            fields = ctx.message.model_dump(mode="json")
            if json_output:
                emit_json(
                    {
                        "topic": ctx.topic,
                        "group": ctx.group,
                        "partition": ctx.partition,
                        "message_id": ctx.message_id,
                        "delivery_attempt": ctx.delivery_attempt,
                        "headers": dict(ctx.headers),
                        "message": fields,
                        "outcome": settle.value,
                    }
                )
            else:
                console.print(
                    _delivery_line(ctx.topic, ctx.partition, ctx.message_id, ctx.delivery_attempt, fields, settle.value)
                )
            if settle is Settle.NAK:
                await ctx.nak(requeue=True, error="nak by msgbroker tail")
            elif settle is Settle.REJECT:
                await ctx.nak(requeue=False, error="rejected by msgbroker tail")
            else:
                await ctx.ack()
            if count is not None and handled >= count:
                enough.set()
                # Keep the one handler slot until every lane is stopping, so that no lane starts
                # a handler past --count; what the lanes read ahead goes back unread.
                deadline = time.monotonic() + 30
                while (not subscriptions or subscriptions[0].partitions) and time.monotonic() < deadline:  # noqa: ASYNC110 - the engine offers no event for it
                    await asyncio.sleep(0.005)

        subscriptions: list[Subscription] = []
        subscription = await broker.subscribe(topic, group, handle, message_type=Message, max_concurrency=1)
        subscriptions.append(subscription)
        started = time.monotonic()
        try:
            while not enough.is_set():
                now = time.monotonic()
                waits = []
                if timeout is not None:
                    waits.append(started + timeout - now)
                if idle is not None:
                    waits.append(last + idle - now)
                wait = min(waits) if waits else None
                if wait is not None and wait <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(enough.wait(), wait)
        finally:
            for task in parked:
                task.cancel()
            # bounded like the broker's close; what it does not settle comes back to the group
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(subscription.close(), broker.settings.shutdown_timeout.total_seconds() + 10)
        return handled

    try:
        run_with_broker(target, work)
    finally:
        if plugin is not None:
            registry.plugins.unregister(name=plugin_name)
    if metrics and plugin is not None:
        from ..metrics import exposition

        sys.stderr.write(exposition(plugin.registry))
    if not json_output:
        err().print(f"handled {handled} message(s) of {topic!r} for {group!r} ({settle.value})", markup=False)
    if count is not None and handled < count:
        raise CliError(f"stopped after {handled} of {count} message(s)")
    return 0


def register(app: typer.Typer) -> None:
    """Add ``tail`` to ``app``."""
    app.command()(tail)
