"""msgbroker itself, on any provider: publish, publish_batch, subscribe with ack."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import msgbroker
from msgbroker import MessageContext

from ._driver import Consumers, Driver
from ._model import BenchMessage, Sink, key_of

__all__ = ["OursDriver"]


class OursDriver(Driver):
    """``msgbroker.connect(url)``: one connection publishes, one more per worker subscribes."""

    kind = "ours"

    def __init__(self, provider: str, url: str, partitions: int, overrides: dict[str, Any] | None = None) -> None:
        if provider == "memory":
            url = f"memory://bench-{uuid.uuid4().hex[:8]}"  # one shared in-process broker per driver
        self.provider = provider
        self.url = url
        self.partitions = partitions
        self.overrides = overrides or {}
        self.label = f"msgbroker ({provider})"
        self.config = (
            f"partition_count={partitions}, batch_size=100 (default), "
            + ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        ).rstrip(", ")
        self.broker: msgbroker.Broker | None = None
        self.used: dict[str, set[str]] = {}
        """Topics this driver published to, with the groups that read them (for the clean-up)."""

    def _connect(self) -> msgbroker.Broker:
        return msgbroker.connect(self.url, partition_count=self.partitions, **self.overrides)

    async def open(self) -> None:
        self.broker = await self._connect()

    async def close(self) -> None:
        if self.broker is not None:
            if self.provider == "rabbitmq":
                await self._retire_rabbitmq_topics()
            await self.broker.close()
        if self.provider == "memory":
            # a named in-memory broker lives as long as the process (msgbroker keeps it in a
            # registry and never drops it): drop ours, or every later cell pays the garbage
            # collector for all the messages the earlier cells left behind
            from msgbroker.testing import forget_memory_broker

            forget_memory_broker(self.url.removeprefix("memory://"))

    async def _retire_rabbitmq_topics(self) -> None:
        """Delete the quorum queues of every topic this driver used: RabbitMQ keeps durable
        queues until deleted, and thousands of idle quorum queues (each a Raft group) bring a
        2-core server to a halt. The provider can name them, but not list them."""
        assert self.broker is not None
        delete = getattr(self.broker.transport, "delete_topic", None)
        if delete is None:
            return
        for topic, groups in self.used.items():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(delete(topic, sorted(groups)), 30)
        self.used.clear()

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        assert self.broker is not None
        self.used.setdefault(topic, set())
        publish = self.broker.publish
        clock = time.perf_counter_ns
        for seq in seqs:
            await publish(topic, BenchMessage(key=key_of(seq), seq=seq, run=run, sent_ns=clock(), data=data))

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        assert self.broker is not None
        self.used.setdefault(topic, set())
        await self.broker.publish_batch(
            topic, [BenchMessage(key=key_of(seq), seq=seq, run=run, sent_ns=stamp, data=data) for seq in seqs]
        )

    def build_batches(self, seqs: range, run: int, data: str, size: int) -> list[list[BenchMessage]]:
        """Messages built ahead (the ``prebuilt`` publish variant)."""
        stamp = time.perf_counter_ns()
        built = [BenchMessage(key=key_of(seq), seq=seq, run=run, sent_ns=stamp, data=data) for seq in seqs]
        return [built[i:i + size] for i in range(0, len(built), size)]

    async def publish_built(self, topic: str, messages: list[BenchMessage]) -> None:
        assert self.broker is not None
        self.used.setdefault(topic, set())
        await self.broker.publish_batch(topic, messages)

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        record = sink.record
        self.used.setdefault(topic, set()).add(group)

        async def handle(ctx: MessageContext[BenchMessage]) -> None:
            message = ctx.message
            record(message.run, message.seq, message.sent_ns)
            await ctx.ack()

        members = [await self._connect() for _ in range(workers)]
        subs = [
            await member.subscribe(topic, group, handle, message_type=BenchMessage, ordered=ordered)
            for member in members
        ]

        async def close() -> None:
            await asyncio.gather(*(sub.close() for sub in subs), return_exceptions=True)
            await asyncio.gather(*(member.close() for member in members), return_exceptions=True)

        try:
            await _balanced(subs, members[0].transport.ASSIGNMENT, self.partitions, timeout=30.0)
        except BaseException:
            await close()
            raise
        return Consumers(close)


async def _balanced(subs: list[msgbroker.Subscription], mode: str, partitions: int, timeout: float) -> None:
    """Wait until the group's members hold every partition (each exactly once, and every member
    some, unless the provider lets every member poll every lane), so no rebalance is timed."""
    deadline = time.monotonic() + timeout
    while True:
        held = [set(sub.partitions) for sub in subs]
        union = set().union(*held)
        total = sum(len(h) for h in held)
        ok = len(union) == partitions and (
            mode == "shared" or (total == partitions and (len(subs) > partitions or all(held)))
        )
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"group not balanced after {timeout:.0f}s: {[len(h) for h in held]} of {partitions}")
        await asyncio.sleep(0.05)
