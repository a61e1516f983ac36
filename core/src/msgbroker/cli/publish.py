"""``msgbroker publish``: JSON messages from an argument, a file or stdin, in batches."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ConfigDict, PrivateAttr, ValidationError

from .._broker import Broker
from .._memory import ONE_PROCESS_HINT
from .._message import Message
from .._partitioner import partition_for
from ._errors import CliError
from ._options import ConfigOption, JsonOption, PartitionsOption, UrlOption
from ._render import emit_json, err, out, progress
from ._target import Target, describe, run_with_broker

PUBLISH_CHUNK = 500
"""Messages per ``publish_batch`` round trip when publishing many."""


class JsonMessage(Message):
    """A message of arbitrary JSON fields (what the CLI publishes); ``--key`` sets its partition key."""

    model_config = ConfigDict(extra="allow")
    _key: str | None = PrivateAttr(default=None)

    @property
    def partition_key(self) -> str:
        return self._key if self._key is not None else str(self.message_id)


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

    where: list[str] = []

    async def work(broker: Broker) -> list[dict[str, Any]]:
        if broker.provider == "memory":
            where.append(describe(broker))
        rows: list[dict[str, Any]] = []
        count = broker.settings.partition_count
        with progress(show_progress) as bar:
            task = bar.add_task(f"publishing to {topic}", total=len(messages))
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
                bar.advance(task, len(chunk))
        return rows

    rows = run_with_broker(Target(url, config, partition_count), work)
    if json_output:
        emit_json({"topic": topic, "published": len(rows), "messages": rows})
    elif len(rows) == 1:
        out().print(
            f"published 1 message to {topic!r} (partition {rows[0]['partition']}): {rows[0]['message_id']}",
            markup=False,
        )
    else:
        out().print(f"published {len(rows)} messages to {topic!r}", markup=False)
    if where:  # the one place a published message vanishes without a word otherwise
        err().print(
            f"note: {where[0]} is the in-process memory broker: the message lives only in this process and is gone "
            f"when the command exits (no worker or other command sees it); {ONE_PROCESS_HINT}",
            markup=False,
        )
    return 0


def register(app: typer.Typer) -> None:
    """Add ``publish`` to ``app``."""
    app.command()(publish)
