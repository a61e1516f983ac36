"""``Transport.describe`` and ``topics`` on the real NATS server: what the dashboard shows
(docs/dashboard.md) read from the server's own state — the pins bucket's members and lease
holders, the streams and their durable consumers."""

from __future__ import annotations

import asyncio
from typing import Any

import msgbroker
from msgbroker import Message, MessageContext
from nats.aio.client import Client


class Job(Message):
    pass


async def _until(check: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        last = await check()
        if last:
            return last
        assert asyncio.get_running_loop().time() < deadline, f"waited {timeout:g}s for {what}; last {last!r}"
        await asyncio.sleep(0.1)


async def test_describe_and_topics_read_the_servers_state(connect: Any, topic: str, raw: Client) -> None:
    async with connect() as broker, connect() as other:
        release = asyncio.Event()

        async def hold(ctx: MessageContext[Job]) -> None:
            await release.wait()

        sub = await broker.subscribe(topic, "holders", hold, message_type=Job)
        await other.publish(f"{topic}.dlq", Job())  # a dead-letter topic is not listed
        ids = await other.publish_batch(topic, [Job() for _ in range(8)])
        view = await _until(lambda: _held(broker, topic), "every partition held, a head on each busy one")
        assert [m.member_id for m in view.members] == [sub.member_id]
        assert view.members[0].partitions == (0, 1, 2, 3) and view.members[0].joined_at is None
        assert {p.owner for p in view.partitions} == {sub.member_id}
        assert view.pending == 8 and {p.head for p in view.partitions if p.head} <= set(ids)
        listed = await broker.transport.topics()
        assert listed.get(topic) == ["holders"], listed
        assert f"{topic}.dlq" not in listed
        release.set()
        await _until(lambda: _pending(broker, topic, 0), "every message handled")
        await sub.close()
        await _until(lambda: _left(broker, topic), "the member gone and its leases released")


async def _held(broker: msgbroker.Broker, topic: str) -> Any:
    view = await broker.transport.describe(topic, "holders")
    busy = [p for p in view.partitions if p.pending]
    return view if view.members and all(p.owner for p in view.partitions) and all(p.head for p in busy) else None


async def _left(broker: msgbroker.Broker, topic: str) -> Any:
    view = await broker.transport.describe(topic, "holders")
    return view if not view.members and not any(p.owner for p in view.partitions) else None


async def _pending(broker: msgbroker.Broker, topic: str, count: int) -> bool:
    view = await broker.transport.describe(topic, "holders")
    return view.pending == count and all(p.head is None for p in view.partitions)
