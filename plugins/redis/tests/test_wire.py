"""The Redis carrier of msgbroker.wire on the real server: a group's dead-letter stream entry is
the letter's ``<topic>.dlq`` record (fields ``i k h b``, like a lane entry), and an entry written
before msgbroker.wire (the letter's fields ``e a p t`` apart from the original headers) still
reads back as the same letter."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgbroker
import redis.asyncio as aioredis
from msgbroker import Message, MessageContext, partition_for, wire
from msgbroker.testing import eventually
from msgbroker_redis import TopicKeys


class Keyed(Message):
    key: str

    @property
    def partition_key(self) -> str:
        return self.key


async def test_the_dead_letter_entry_is_the_dlq_record(connect: Any, raw: aioredis.Redis, prefix: str,
                                                       topic: str) -> None:
    async with connect() as broker:
        async def reject(ctx: MessageContext[Keyed]) -> None:
            await ctx.nak(requeue=False, error="rejected\nfor good")

        await broker.subscribe(topic, "g", reject)
        message = Keyed(key="k-1")
        await broker.publish(topic, message, headers={"tenant": "acme"})

        async def listed() -> bool:
            return len(await broker.dead_letters(topic, "g")) == 1

        await eventually(listed)
        [letter] = await broker.dead_letters(topic, "g")
        [(_, fields)] = await raw.xrange(TopicKeys(prefix, topic).dead("g"))
        assert set(fields) == {b"i", b"k", b"h", b"b"}
        assert json.loads(fields[b"h"]) == wire.dead_letter_headers(letter)
        assert (fields[b"i"].decode(), fields[b"k"].decode(), fields[b"b"]) == (
            str(message.message_id), "k-1", message.model_dump_json().encode())
        [(_, on_dlq)] = await raw.xrange(TopicKeys(prefix, wire.dead_letter_topic(topic)).stream(letter.partition))
        assert on_dlq == fields, "the group's entry and the <topic>.dlq entry are one record"
        assert (letter.error, letter.attempts, letter.partition, dict(letter.headers)) == (
            "rejected\nfor good", 1, partition_for("k-1", 4), {"tenant": "acme"})


async def test_an_entry_written_before_the_wire_module_still_reads_back(connect: Any, raw: aioredis.Redis,
                                                                         prefix: str, topic: str) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    await raw.xadd(TopicKeys(prefix, topic).dead("g"), {
        "i": "m-1", "p": 2, "e": "boom", "a": 3, "h": json.dumps({"tenant": "acme"}), "b": b'{"x":1}', "k": "key-1",
        "t": at.isoformat(),
    })
    async with connect() as broker:
        [letter] = await broker.dead_letters(topic, "g")
        assert letter == msgbroker.DeadLetter("m-1", topic, "g", 2, "boom", 3, {"tenant": "acme"}, b'{"x":1}',
                                              "key-1", at)
        assert await broker.replay_dead_letters(topic, "g") == 1
        assert await broker.dead_letters(topic, "g") == []
