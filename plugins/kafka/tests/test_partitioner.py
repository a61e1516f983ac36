"""The core partitioner is Kafka's: aiokafka's DefaultPartitioner (the Java client's murmur2)
picks the same partition for every key, and records land where msgbroker computed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgbroker
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from msgbroker import Message, MessageContext


@given(st.text(max_size=64), st.integers(1, 4096))
@settings(max_examples=500)
def test_partition_for_is_aiokafkas_default_partitioner(key: str, count: int) -> None:
    data = key.encode("utf-8")
    assert msgbroker.murmur2(data) & 0x7FFFFFFF == murmur2(data) & 0x7FFFFFFF
    assert msgbroker.partition_for(key, count) == DefaultPartitioner()(data, list(range(count)), list(range(count)))


class Keyed(Message):
    """A message partitioned by ``key``."""

    key: str

    @property
    def partition_key(self) -> str:
        return self.key


async def test_records_land_where_kafkas_own_partitioner_puts_their_key(
    bootstrap_servers: str, connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    """msgbroker's publish and a plain aiokafka producer (no explicit partition) agree, on Kafka."""
    count, topic = 7, names("partitioner")
    broker = await connect(partition_count=count)
    keys = [f"session-{i}:area-{i * 7}" for i in range(40)]
    await broker.publish_batch(topic, [Keyed(key=k) for k in keys])
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap_servers)
    await plain.start()
    try:
        for key in keys:
            await plain.send(topic, b"plain", key=key.encode())
        await plain.flush()
    finally:
        await plain.stop()
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await reader.start()
    seen: dict[tuple[str, bytes], int] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(count)]
        reader.assign(tps)
        async with asyncio.timeout(30):
            while len(seen) < 2 * len(keys):
                for tp, records in (await reader.getmany(timeout_ms=500)).items():
                    for record in records:
                        kind = b"plain" if record.value == b"plain" else b"msgbroker"
                        seen[(record.key.decode(), kind)] = tp.partition
    finally:
        await reader.stop()
    for key in keys:
        expected = msgbroker.partition_for(key, count)
        assert seen[(key, b"msgbroker")] == expected, f"msgbroker put {key!r} elsewhere"
        assert seen[(key, b"plain")] == expected, f"Kafka's partitioner puts {key!r} in another partition"

    got: list[tuple[int, int]] = []
    everything = asyncio.Event()

    async def handle(ctx: MessageContext[Keyed]) -> None:
        got.append((ctx.partition, msgbroker.partition_for(ctx.message.key, count)))
        if len(got) == len(keys):
            everything.set()

    await broker.subscribe(topic, names("g"), handle)
    await asyncio.wait_for(everything.wait(), 30)
    assert all(delivered == computed for delivered, computed in got), "a handler saw another partition"
