"""The RabbitMQ carrier of msgbroker.wire on the real server: a letter in the group's letters
queue is its ``<topic>.dlq`` record with the partition key as ``msgbroker-key``; letters written
before msgbroker.wire, and those the broker dead-lettered itself past the delivery limit, read
back through the same definition."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import msgbroker
from msgbroker import DeadLetter, Message, MessageContext, wire
from msgbroker.testing import eventually
from msgbroker_rabbitmq._names import DELIVERY_LIMIT


class Keyed(Message):
    key: str

    @property
    def partition_key(self) -> str:
        return self.key


def _connect(url: str, prefix: str) -> msgbroker.Broker:
    return msgbroker.connect(url, partition_count=4, retry_delay=0,
                             rabbitmq={"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 300})


async def _letters_queue_messages(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        found = []
        while (message := await source.get(no_ack=False, fail=False)) is not None:
            found.append(message)
        await channel.close()  # every message goes back to the queue
        return found
    finally:
        await connection.close()


async def test_the_letters_queue_holds_the_dlq_record_and_the_key(amqp_url: str, prefix: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    async with _connect(amqp_url, prefix) as broker:
        async def reject(ctx: MessageContext[Keyed]) -> None:
            await ctx.nak(requeue=False, error="rejected\nfor good")

        await broker.subscribe(topic, "g", reject)
        message = Keyed(key="k-1")
        await broker.publish(topic, message, headers={"tenant": "acme"})

        async def listed() -> bool:
            return len(await broker.dead_letters(topic, "g")) == 1

        await eventually(listed)
        [letter] = await broker.dead_letters(topic, "g")
        queue = broker.transport.topology.letters_queue(topic, "g")  # type: ignore[attr-defined]
        [stored] = await _letters_queue_messages(amqp_url, queue)
        carried = {k: v for k, v in (stored.headers or {}).items() if k != "x-delivery-count"}  # RabbitMQ's own
        assert carried == {**wire.dead_letter_headers(letter), wire.KEY_HEADER: "k-1"}
        assert (stored.message_id, stored.body, stored.content_type) == (
            str(message.message_id), message.model_dump_json().encode(), wire.CONTENT_TYPE)
        assert (letter.error, letter.attempts, dict(letter.headers), letter.partition_key) == (
            "rejected\nfor good", 1, {"tenant": "acme"}, "k-1")


async def test_older_and_broker_made_letters_read_back(amqp_url: str, prefix: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with _connect(amqp_url, prefix) as broker:
        async def handle(ctx: MessageContext[Keyed]) -> None:
            pass

        subscription = await broker.subscribe(topic, "g", handle)  # declares the group's letters queue
        await subscription.close()
        queue = broker.transport.topology.letters_queue(topic, "g")  # type: ignore[attr-defined]
        older: dict[str, Any] = {  # what the provider wrote before msgbroker.wire
            "tenant": "acme", "msgbroker-dead-letter-error": "boom", "msgbroker-dead-letter-attempts": "3",
            "msgbroker-dead-letter-group": "g", "msgbroker-dead-letter-partition": "2",
            "msgbroker-dead-letter-at": at.isoformat(), "msgbroker-key": "key-1",
        }
        broker_made: dict[str, Any] = {  # dead-lettered by the broker past the lane queue's delivery limit
            "tenant": "acme", "msgbroker-key": "key-2",
            "x-death": [{"reason": "delivery_limit", "routing-keys": ["3"], "count": 1}],
        }
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            for message_id, headers in (("m-1", older), ("m-2", broker_made)):
                await channel.default_exchange.publish(
                    aio_pika.Message(b'{"x":1}', headers=headers, message_id=message_id), routing_key=queue)
        finally:
            await connection.close()
        first, second = await broker.dead_letters(topic, "g")
        assert first == DeadLetter("m-1", topic, "g", 2, "boom", 3, {"tenant": "acme"}, b'{"x":1}', "key-1", at)
        assert (second.message_id, second.group, second.partition, dict(second.headers), second.partition_key) == (
            "m-2", "g", 3, {"tenant": "acme"}, "key-2")
        assert f"delivery limit of {DELIVERY_LIMIT}" in second.error and "delivery_limit" in second.error
