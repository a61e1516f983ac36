"""Publishing under concurrency: the order of one key's concurrent publishes, and a refusal
that concerns some messages of concurrent callers surfacing for exactly those, against the
real server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import msgbroker
import pytest
from msgbroker import Message, MessageContext, PublishFailedError
from msgbroker_rabbitmq import Topology, _publish


class Keyed(Message):
    key: str
    seq: int = 0

    @property
    def partition_key(self) -> str:
        return self.key


def _settings(prefix: str) -> dict[str, Any]:
    return {"partition_count": 4, "retry_delay": 0,
            "rabbitmq": {"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 300}}


async def test_concurrent_publishes_of_one_key_are_handled_in_the_order_they_were_called(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    """Callers that each await one publish() at a time share the connection's confirm channel:
    the calls of one key, started one after another, reach the lane in that order."""
    topic = f"pub-{uuid.uuid4().hex[:6]}"
    handled: list[int] = []

    async def handle(ctx: MessageContext[Keyed]) -> None:
        handled.append(ctx.message.seq)

    async with msgbroker.connect(amqp_url, **_settings(prefix)) as broker:
        await broker.subscribe(topic, "g", handle)
        # started in order on one loop, all in flight at once (no one waits for another's confirm)
        await asyncio.gather(*(broker.publish(topic, Keyed(key="one", seq=i)) for i in range(300)))
        await wait_for(lambda: len(handled) >= 300, 30, lambda: f"{len(handled)} of 300 handled")
        assert handled == list(range(300))


async def test_a_refused_partition_fails_exactly_its_own_concurrent_publishes(
    amqp_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One partition's messages are refused (basic.nack, for good here) while other callers
    publish to other partitions on the same channel: the refused ones raise
    PublishFailedError, every other publish returns normally (the channel the refusal closes
    under them is not their failure)."""
    monkeypatch.setattr(_publish, "PUBLISH_TIMEOUT", 3.0)
    topic = f"pub-{uuid.uuid4().hex[:6]}"

    async def handle(ctx: MessageContext[Keyed]) -> None:
        pass

    async with msgbroker.connect(amqp_url, **_settings(prefix)) as broker:
        await broker.subscribe(topic, "g", handle)
        topology: Topology = broker.transport.topology  # type: ignore[attr-defined]
        refused = msgbroker.partition_for("k0", 4)
        keys = [f"k{i}" for i in range(40)]
        bad = {k for k in keys if msgbroker.partition_for(k, 4) == refused}
        rejecting = f"{prefix}:rejecting"
        connection = await aio_pika.connect(amqp_url)
        try:
            underlay = await (await connection.channel()).get_underlay_channel()
            await underlay.queue_declare(rejecting, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
            await underlay.queue_bind(rejecting, topology.exchange(topic), routing_key=str(refused))

            async def caller(key: str) -> str:
                for seq in range(5):
                    await broker.publish(topic, Keyed(key=key, seq=seq))
                return "stored"

            results = await asyncio.gather(*(caller(k) for k in keys), return_exceptions=True)
            await underlay.queue_delete(rejecting)
        finally:
            await connection.close()
    outcome = dict(zip(keys, results, strict=True))
    assert {k for k, r in outcome.items() if isinstance(r, PublishFailedError)} == bad
    assert {k for k, r in outcome.items() if r == "stored"} == set(keys) - bad
