"""The ``msgbroker`` command: publish, tail, pending counts, health, dead letters, metrics, demo
and benchmark — for an operator at 3 a.m. and for scripts (``--json``, exit codes).

Every command takes the broker from ``--url`` (or ``MSGBROKER_URL``), ``--config FILE`` (or
``MSGBROKER_CONFIG``; JSON, TOML, YAML or the seed's appsettings.json) and the ``MSGBROKER_*``
environment of :class:`msgbroker.BrokerSettings`. Errors are one line on stderr and a non-zero
exit code, never a traceback. See docs/cli.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from pydantic import ConfigDict, PrivateAttr, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ._broker import Broker, Subscription, connect
from ._errors import CapabilityNotSupported, MsgBrokerError
from ._message import DeadLetter, Message, MessageContext
from ._partitioner import partition_for
from ._provider import Delivery
from ._registry import registry
from ._settings import BrokerSettings

__all__ = ["CliError", "JsonMessage", "app", "main"]

T = TypeVar("T")

PUBLISH_CHUNK = 500
"""Messages per ``publish_batch`` round trip when publishing many."""
REPLAY_CHUNK = 100
"""Dead letters per replay round trip (the progress bar moves per chunk)."""


class CliError(Exception):
    """A failure to report as one line on stderr, with an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class JsonMessage(Message):
    """A message of arbitrary JSON fields (what the CLI publishes); ``--key`` sets its partition key."""

    model_config = ConfigDict(extra="allow")
    _key: str | None = PrivateAttr(default=None)

    @property
    def partition_key(self) -> str:
        return self._key if self._key is not None else str(self.message_id)


app = typer.Typer(
    name="msgbroker",
    help="Operate msgbroker: publish, tail, pending counts, health, dead letters, metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="List, show, replay and purge dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

# -- the options every broker command takes ------------------------------------------------

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        "-u",
        envvar="MSGBROKER_URL",
        help="Broker URL: memory://NAME, redis://, nats://, amqp://, kafka://host:port.",
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


@dataclass(frozen=True)
class Target:
    """Where to connect: the command's ``--url``, ``--config`` and ``--partition-count``."""

    url: str | None = None
    config: Path | None = None
    partition_count: int | None = None

    def broker(self) -> Broker:
        """An unopened broker for these options (URL over environment over file)."""
        overrides: dict[str, Any] = {}
        if self.partition_count is not None:
            overrides["partition_count"] = self.partition_count
        if self.config is not None:
            settings = BrokerSettings.from_file(self.config)
            if self.url is None:
                return connect(settings, **overrides)
            scheme = urlsplit(self.url).scheme if "://" in self.url else ""
            if not scheme:
                raise CliError(f"connection URL {self.url!r} has no scheme (like redis:// or memory://)")
            transport = registry.by_scheme(scheme)
            from_url = {"provider": transport.NAME, **transport.settings_from_url(self.url)}
            return connect(BrokerSettings(**_merge(_merge(settings.model_dump(), from_url), overrides)))
        if self.url is not None:
            return connect(self.url, **overrides)
        if "MSGBROKER_PROVIDER" in os.environ:
            return connect(None, **overrides)
        raise CliError(
            "no broker given: pass --url (or set MSGBROKER_URL), --config FILE, or MSGBROKER_PROVIDER "
            "with its MSGBROKER_<PROVIDER>__* settings"
        )


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        current = out.get(key)
        out[key] = _merge(current, value) if isinstance(value, Mapping) and isinstance(current, Mapping) else value
    return out


def describe(broker: Broker) -> str:
    """Where ``broker`` points, without credentials."""
    settings = broker.settings
    name = broker.provider
    if name == "memory":
        return f"memory://{settings.memory.name}"
    if name == "kafka":
        return f"kafka://{settings.kafka.bootstrap_servers}"
    section = getattr(settings, name, None)
    url = getattr(section, "url", None)
    if not isinstance(url, str):
        return name
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _connect_timeout() -> float:
    raw = os.environ.get("MSGBROKER_CONNECT_TIMEOUT", "10")
    try:
        return float(raw)
    except ValueError:
        raise CliError(f"MSGBROKER_CONNECT_TIMEOUT={raw!r} is not a number of seconds") from None


async def open_broker(target: Target) -> Broker:
    """Connect, bounded by ``MSGBROKER_CONNECT_TIMEOUT`` seconds (10)."""
    broker = target.broker()
    timeout = _connect_timeout()
    try:
        await asyncio.wait_for(broker.open(), timeout)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await broker.abort()
        raise CliError(f"cannot reach the {broker.provider} broker at {describe(broker)} within {timeout:g}s") from None
    except MsgBrokerError as exc:
        raise CliError(str(exc)) from exc  # the providers' messages name the server
    except OSError as exc:
        raise CliError(f"cannot connect to the {broker.provider} broker at {describe(broker)}: {exc}") from exc
    return broker


async def close_bounded(broker: Broker) -> None:
    """Close gracefully, but give up (and drop the connection) when a sick server makes it hang."""
    grace = broker.settings.shutdown_timeout.total_seconds() + 10
    try:
        await asyncio.wait_for(broker.close(), grace)
    except TimeoutError:
        _err().print(f"closing the {broker.provider} connection took over {grace:g}s; dropped it", markup=False)
        with contextlib.suppress(Exception):
            await broker.abort()


def run_with_broker(target: Target, work: Callable[[Broker], Awaitable[T]]) -> T:
    """Open the broker, run ``work`` on one event loop, close the broker."""

    async def session() -> T:
        broker = await open_broker(target)
        try:
            return await work(broker)
        finally:
            await close_bounded(broker)

    return asyncio.run(session())


# -- output ----------------------------------------------------------------------------------


def _out() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # piped into grep or a file: no wrapping at 80 columns
    return console


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(value: Any) -> None:
    """One JSON document on one line of stdout."""
    sys.stdout.write(json.dumps(value, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _progress(enabled: bool) -> Progress:
    console = _err()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )


def _payload(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id,
        "topic": letter.topic,
        "group": letter.group,
        "partition": letter.partition,
        "partition_key": letter.partition_key,
        "attempts": letter.attempts,
        "error": letter.error,
        "dead_lettered_at": letter.dead_lettered_at.isoformat(),
        "headers": dict(letter.headers),
        "payload": _payload(letter.payload),
    }


def _short(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


# -- publish ---------------------------------------------------------------------------------


def _parse_documents(text: str, source: str) -> list[Any]:
    """A JSON array, one JSON value, or JSON lines."""
    stripped = text.strip()
    if not stripped:
        raise CliError(f"{source} holds no message")
    try:
        value = json.loads(stripped)
    except ValueError:
        pass
    else:
        return value if isinstance(value, list) else [value]
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            documents.append(json.loads(line))
        except ValueError as exc:
            raise CliError(f"line {number} of {source} is not valid JSON: {exc}") from None
    return documents


def _read_messages(payload: str | None, file: Path | None) -> tuple[list[Any], str]:
    if payload is not None and file is not None:
        raise CliError("give the message as an argument or with --file, not both", exit_code=2)
    if payload is not None:
        return _parse_documents(payload, "the argument"), "the argument"
    if file is not None and str(file) != "-":
        try:
            text = file.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise CliError(f"cannot read {str(file)!r}: {exc.strerror or exc}") from None
        return _parse_documents(text, repr(str(file))), repr(str(file))
    if file is None and sys.stdin.isatty():
        raise CliError("give the message as a JSON argument, with --file, or as JSON lines on stdin", exit_code=2)
    return _parse_documents(sys.stdin.read(), "stdin"), "stdin"


def _build_messages(documents: Sequence[Any], source: str, key: str | None, key_field: str | None) -> list[JsonMessage]:
    messages = []
    for number, document in enumerate(documents, 1):
        where = source if len(documents) == 1 else f"message {number} of {source}"
        if not isinstance(document, dict):
            raise CliError(f"{where} is not a JSON object (got {type(document).__name__})")
        try:
            message = JsonMessage.model_validate(document)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise CliError(f"{where} is not a valid message: {problems}") from None
        if key_field is not None:
            if key_field not in document:
                raise CliError(f"{where} has no field {key_field!r} for --key-field")
            value = document[key_field]
            message._key = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        elif key is not None:
            message._key = key
        messages.append(message)
    return messages


def _parse_headers(pairs: Sequence[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"header {pair!r} is not NAME=VALUE", exit_code=2)
        headers[name] = value
    return headers


@app.command()
def publish(
    topic: Annotated[str, typer.Argument(help="Topic to publish to.")],
    payload: Annotated[str | None, typer.Argument(help="The message as JSON (an object, or an array of them).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="JSON lines or a JSON array; '-' for stdin.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Partition key (same key, same partition, in order).")
    ] = None,
    key_field: Annotated[
        str | None, typer.Option("--key-field", help="Take each message's partition key from this field.")
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="A header NAME=VALUE (repeatable).")
    ] = None,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Publish JSON messages (an argument, a file, or JSON lines on stdin)."""
    if key is not None and key_field is not None:
        raise CliError("give --key or --key-field, not both", exit_code=2)
    documents, source = _read_messages(payload, file)
    messages = _build_messages(documents, source, key, key_field)
    headers = _parse_headers(header or [])
    show_progress = file is not None and not json_output and len(messages) > PUBLISH_CHUNK

    async def work(broker: Broker) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        count = broker.settings.partition_count
        with _progress(show_progress) as progress:
            task = progress.add_task(f"publishing to {topic}", total=len(messages))
            for start in range(0, len(messages), PUBLISH_CHUNK):
                chunk = messages[start : start + PUBLISH_CHUNK]
                if len(chunk) == 1:
                    ids = [await broker.publish(topic, chunk[0], headers=headers or None)]
                else:
                    ids = await broker.publish_batch(topic, chunk, headers=headers or None)
                rows.extend(
                    {"message_id": mid, "partition": partition_for(m.partition_key, count)}
                    for mid, m in zip(ids, chunk, strict=True)
                )
                progress.advance(task, len(chunk))
        return rows

    rows = run_with_broker(Target(url, config, partition_count), work)
    if json_output:
        emit_json({"topic": topic, "published": len(rows), "messages": rows})
    elif len(rows) == 1:
        _out().print(
            f"published 1 message to {topic!r} (partition {rows[0]['partition']}): {rows[0]['message_id']}",
            markup=False,
        )
    else:
        _out().print(f"published {len(rows)} messages to {topic!r}", markup=False)
    return 0


# -- tail ------------------------------------------------------------------------------------


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
    console = _out()
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
                    "message": _payload(d.body),
                    "outcome": "unsettled",
                }
            )
        else:
            console.print(_delivery_line(topic, d.partition, d.message_id, d.attempt, _payload(d.body), "unsettled"))
    if not json_output:
        _err().print(
            f"peeked at {len(deliveries)} unsettled message(s) of {topic!r} for {group!r}; nothing settled",
            markup=False,
        )
    return 0


@app.command()
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
        _require_prometheus()
        from prometheus_client import CollectorRegistry

        from .metrics import MessagingMetrics

        plugin = MessagingMetrics(registry=CollectorRegistry(), prometheus=True, otel=False)
        registry.register(plugin, name=plugin_name)
    console = _out()
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
        from .metrics import exposition

        sys.stderr.write(exposition(plugin.registry))
    if not json_output:
        _err().print(f"handled {handled} message(s) of {topic!r} for {group!r} ({settle.value})", markup=False)
    if count is not None and handled < count:
        raise CliError(f"stopped after {handled} of {count} message(s)")
    return 0


# -- pending, health ---------------------------------------------------------------------------


@app.command()
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
    console = _out()
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


@app.command()
def health(
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Exit 0 when the broker answers, 1 when it does not (for probes)."""
    target = Target(url, config, partition_count)
    broker = target.broker()  # a bad URL or settings file is an error, not an unhealthy broker
    where = describe(broker)

    async def probe() -> tuple[bool, str | None]:
        try:
            opened = await open_broker(target)
        except CliError as exc:
            return False, str(exc)
        try:
            ok = await opened.is_healthy()
            return ok, None if ok else "the server did not answer"
        finally:
            await opened.close()

    healthy, error = asyncio.run(probe())
    if json_output:
        emit_json({"healthy": healthy, "provider": broker.provider, "url": where, "error": error})
    elif healthy:
        _out().print(f"healthy: {broker.provider} at {where}", markup=False)
    else:
        _out().print(f"unhealthy: {error}", markup=False)
    return 0 if healthy else 1


# -- dead letters ------------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    topic: Annotated[str, typer.Argument(help="Topic whose dead letters to list.")],
    group: GroupOption,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """The dead letters of GROUP on TOPIC, oldest first."""
    letters = run_with_broker(Target(url, config, partition_count), lambda b: b.dead_letters(topic, group))
    if json_output:
        emit_json([_letter_json(letter) for letter in letters])
        return 0
    if not letters:
        _out().print(f"no dead letters in {topic!r} for {group!r}", markup=False)
        return 0
    table = Table(title=f"dead letters: {topic} / {group}")
    table.add_column("message id", no_wrap=True, min_width=36)
    for name in ("partition", "attempts", "dead-lettered at", "error"):
        table.add_column(name, justify="right" if name in ("partition", "attempts") else "left")
    for letter in letters:
        table.add_row(
            letter.message_id,
            str(letter.partition),
            str(letter.attempts),
            letter.dead_lettered_at.strftime("%Y-%m-%d %H:%M:%S"),
            Text(_short(letter.error)),
        )
    _out().print(table)
    return 0


@dlq_app.command("show")
def dlq_show(
    message_id: Annotated[str, typer.Argument(help="Message id of the dead letter.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic.")],
    group: GroupOption,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """One dead letter in full: why, after how many attempts, headers and payload."""
    letters = run_with_broker(Target(url, config, partition_count), lambda b: b.dead_letters(topic, group))
    letter = next((item for item in letters if item.message_id == message_id), None)
    if letter is None:
        raise CliError(f"no dead letter {message_id!r} in {topic!r} for {group!r}")
    data = _letter_json(letter)
    if json_output:
        emit_json(data)
        return 0
    console = _out()
    table = Table.grid(padding=(0, 2))
    for name in ("message_id", "topic", "group", "partition", "partition_key", "attempts", "dead_lettered_at", "error"):
        table.add_row(Text(name, style="bold"), Text(str(data[name])))
    console.print(table)
    console.print(Text("headers", style="bold"))
    console.print_json(data=data["headers"])
    console.print(Text("payload", style="bold"))
    if isinstance(data["payload"], str):
        console.print(Text(data["payload"]))
    else:
        console.print_json(data=data["payload"])
    return 0


IdsOption = Annotated[list[str] | None, typer.Option("--id", help="A dead letter's message id (repeatable).")]


@dlq_app.command("replay")
def dlq_replay(
    topic: Annotated[str, typer.Argument(help="Topic whose dead letters to replay.")],
    group: GroupOption,
    ids: IdsOption = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter of the group.")] = False,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Publish dead letters back to TOPIC (for GROUP only) and remove them from the dead letters."""
    if bool(ids) == replay_all:
        raise CliError("say which dead letters to replay: --id ID (repeatable) or --all", exit_code=2)

    async def work(broker: Broker) -> tuple[int, list[str]]:
        letters = await broker.dead_letters(topic, group)
        present = [letter.message_id for letter in letters]
        if ids:
            known = set(present)
            wanted = list(dict.fromkeys(i for i in ids if i in known))
            missing = [i for i in dict.fromkeys(ids) if i not in known]
        else:
            wanted, missing = present, []
        replayed = 0
        with _progress(not json_output and len(wanted) > REPLAY_CHUNK) as progress:
            task = progress.add_task(f"replaying to {topic}", total=len(wanted))
            for start in range(0, len(wanted), REPLAY_CHUNK):
                chunk = wanted[start : start + REPLAY_CHUNK]
                replayed += await broker.replay_dead_letters(topic, group, chunk)
                progress.advance(task, len(chunk))
        return replayed, missing

    replayed, missing = run_with_broker(Target(url, config, partition_count), work)
    if json_output:
        emit_json({"topic": topic, "group": group, "replayed": replayed, "missing": missing})
    else:
        _out().print(f"replayed {replayed} dead letter(s) to {topic!r} for {group!r}", markup=False)
    if missing:
        raise CliError(
            f"{len(missing)} id(s) are not dead letters of {topic!r} for {group!r}: "
            + ", ".join(missing[:5])
            + (" …" if len(missing) > 5 else "")
        )
    return 0


@dlq_app.command("purge")
def dlq_purge(
    topic: Annotated[str, typer.Argument(help="Topic whose dead letters to delete.")],
    group: GroupOption,
    ids: IdsOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (for scripts).")] = False,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Delete dead letters of GROUP on TOPIC for good (all, or those given with --id). Asks first."""

    async def work(broker: Broker) -> int:
        letters = await broker.dead_letters(topic, group)
        doomed = [letter.message_id for letter in letters if not ids or letter.message_id in set(ids)]
        if not doomed:
            return 0
        if not yes:
            question = f"Delete {len(doomed)} dead letter(s) of {topic!r} for {group!r}? This cannot be undone"
            # typer's prompt reads stdin synchronously; nothing else runs on this loop meanwhile
            if not typer.confirm(question, default=False, err=True):
                raise CliError("nothing deleted")
        return await broker.transport.remove_dead_letters(topic, group, doomed)

    try:
        removed = run_with_broker(Target(url, config, partition_count), work)
    except typer.Abort:
        raise CliError("nothing deleted (no answer; use --yes in scripts)") from None
    if json_output:
        emit_json({"topic": topic, "group": group, "purged": removed})
    else:
        _out().print(f"purged {removed} dead letter(s) of {topic!r} for {group!r}", markup=False)
    return 0


# -- metrics -----------------------------------------------------------------------------------


@app.command("metrics")
def metrics_command(
    topic: Annotated[str | None, typer.Argument(help="Topic whose pending count to include.")] = None,
    groups: Annotated[list[str] | None, typer.Option("--group", "-g", help="Consumer group (repeatable).")] = None,
    serve: Annotated[
        int | None, typer.Option("--serve", help="Serve /metrics on this port (127.0.0.1) until Ctrl-C.")
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes with --serve.")
    ] = 15.0,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Broker health and pending counts as Prometheus text (or JSON), once or served over HTTP.

    Grafana-free: pipe it to a file for node_exporter's textfile collector, or curl --serve.
    """
    _require_prometheus()
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from .metrics import MessagingMetrics, exposition

    if groups and topic is None:
        raise CliError("give the TOPIC whose groups' pending counts to show", exit_code=2)
    lanes = [(topic, g) for g in (groups or [])] if topic is not None else []
    target_registry = CollectorRegistry()
    recorder = MessagingMetrics(registry=target_registry, prometheus=True, otel=False)
    up = Gauge("msgbroker_up", "1 when the broker answers.", ["messaging_system"], registry=target_registry)

    async def refresh(broker: Broker) -> dict[str, Any]:
        healthy = await broker.is_healthy()
        up.labels(broker.provider).set(1 if healthy else 0)
        counts = await recorder.refresh_pending(broker, lanes) if healthy else {}
        return {
            "healthy": healthy,
            "provider": broker.provider,
            "pending": [{"topic": t, "group": g, "pending": n} for (t, g), n in counts.items()],
        }

    async def work(broker: Broker) -> dict[str, Any]:
        if serve is None:
            return await refresh(broker)
        server, thread = start_http_server(serve, addr="127.0.0.1", registry=target_registry)
        _err().print(f"serving http://127.0.0.1:{server.server_port}/metrics (Ctrl-C to stop)", markup=False)
        try:
            while True:
                try:
                    await refresh(broker)
                except MsgBrokerError as exc:
                    _err().print(f"refresh failed: {exc}", markup=False)
                await asyncio.sleep(interval)
        finally:
            server.shutdown()
            thread.join(5)

    state = run_with_broker(Target(url, config, partition_count), work)
    if json_output:
        emit_json(state)
    else:
        sys.stdout.write(exposition(target_registry))
    return 0 if state["healthy"] else 1


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise CliError("metrics need prometheus-client: pip install 'msgbroker[prometheus]'") from None


# -- demo and bench ------------------------------------------------------------------------------

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _argv_main(entry: Callable[[list[str]], int | None], args: list[str]) -> int:
    try:
        return int(entry(args) or 0)
    except SystemExit as exc:  # argparse --help or a usage error
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def demo(ctx: typer.Context) -> int:
    """The seat-lock demo (arguments go to python -m msgbroker.demo; try --help)."""
    from . import demo as demo_module

    return _argv_main(demo_module.main, list(ctx.args))


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def bench(ctx: typer.Context) -> int:
    """The benchmark harness of bench/ (msgbroker-bench), when installed (arguments go to it; try --help)."""
    try:
        import msgbroker_bench  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CliError(
            "the benchmark harness is not installed: it is msgbroker-bench in the repository's bench/ "
            "folder (pip install -e bench, or run scripts/bench)"
        ) from None
    return _argv_main(msgbroker_bench.run, list(ctx.args))


# -- entry point ---------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"msgbroker: error: {_one_line(message)}\n")
    sys.stderr.flush()
    return code


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # `msgbroker tail ... | head`: the reader left, nothing to say
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # stops the interpreter's flush error at exit
        raise SystemExit(0) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``msgbroker`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with _quiet_broken_pipe():
            result = command.main(args=args, prog_name="msgbroker", standalone_mode=False)
    except CliError as exc:
        return _fail(str(exc), exc.exit_code)
    except typer.Abort:
        return _fail("aborted", 1)
    except typer.TyperException as exc:
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        code = getattr(exc, "exit_code", 2)
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(message + "\n")
            return int(code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _fail(f"{message}{hint}", int(code))
    except MsgBrokerError as exc:
        return _fail(str(exc), 1)
    except ValidationError as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except Exception as exc:
        if os.environ.get("MSGBROKER_DEBUG"):
            raise
        return _fail(f"unexpected {type(exc).__name__}: {exc} (set MSGBROKER_DEBUG=1 for the traceback)", 1)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
