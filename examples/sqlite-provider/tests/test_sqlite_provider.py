"""What the conformance suite cannot see from outside: the file really is the broker."""

from __future__ import annotations

from pathlib import Path

import msgbroker
import pytest
from msgbroker import Message, MessageContext
from msgbroker_conformance import eventually
from msgbroker_sqlite import SqliteTransport


class Order(Message):
    number: int


def test_the_entry_point_registers_the_scheme() -> None:
    assert msgbroker.registry.by_scheme("sqlite") is SqliteTransport


def test_a_url_without_a_file_is_a_clear_error() -> None:
    with pytest.raises(msgbroker.ConfigurationError, match="needs a file"):
        msgbroker.connect("sqlite://")


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(msgbroker.ConfigurationError, match="colour"):
        msgbroker.connect("sqlite:///tmp/x.db?colour=blue")


async def test_messages_survive_closing_every_connection(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'broker.db'}"
    async with msgbroker.connect(url, partition_count=2) as broker:
        await broker.publish_batch("orders", [Order(number=i) for i in range(5)])
    seen: list[int] = []

    async def handle(ctx: MessageContext[Order]) -> None:
        seen.append(ctx.message.number)

    async with msgbroker.connect(url, partition_count=2) as broker:
        await broker.subscribe("orders", "billing", handle)
        await eventually(lambda: len(seen) == 5, 10, lambda: f"the 5 orders published earlier, got {seen}")
        assert sorted(seen) == list(range(5))
        assert await broker.pending_count("orders", "billing") == 0
