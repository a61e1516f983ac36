"""What the conformance suite cannot see from outside: the file really is the broker."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import msgbroker
import pytest
from msgbroker import Message, MessageContext, wire
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


async def test_a_dead_letter_row_holds_its_dlq_record_and_older_rows_still_read(tmp_path: Path) -> None:
    """The ``dead_letters`` row keeps the letter's ``<topic>.dlq`` headers (msgbroker.wire); a row
    written before them (the original's headers only, the letter's fields in columns) reads the same."""
    path = tmp_path / "broker.db"
    async with msgbroker.connect(f"sqlite://{path}", partition_count=2) as broker:
        async def reject(ctx: MessageContext[Order]) -> None:
            await ctx.nak(requeue=False, error="no stock")

        await broker.subscribe("orders", "g", reject)
        await broker.publish("orders", Order(number=1), headers={"tenant": "acme"})

        async def listed() -> bool:
            return len(await broker.dead_letters("orders", "g")) == 1

        await eventually(listed, 10, "the dead letter")
        [letter] = await broker.dead_letters("orders", "g")
    db = sqlite3.connect(path)
    try:
        [(stored,)] = db.execute("SELECT headers FROM dead_letters").fetchall()
        assert json.loads(stored) == wire.dead_letter_headers(letter)
        db.execute("INSERT INTO dead_letters (topic, grp, message_id, partition, key, error, attempts, headers, "
                   "payload, at) VALUES ('orders', 'g', 'm-old', 1, 'k-old', 'boom', 3, '{\"tenant\": \"acme\"}', "
                   "x'7b7d', 1767323045.5)")
        db.commit()
    finally:
        db.close()
    async with msgbroker.connect(f"sqlite://{path}", partition_count=2) as broker:
        new, old = await broker.dead_letters("orders", "g")
    assert new == letter and (new.error, new.attempts, dict(new.headers)) == ("no stock", 1, {"tenant": "acme"})
    assert old == msgbroker.DeadLetter("m-old", "orders", "g", 1, "boom", 3, {"tenant": "acme"}, b"{}", "k-old",
                                       datetime.fromtimestamp(1767323045.5, UTC))
