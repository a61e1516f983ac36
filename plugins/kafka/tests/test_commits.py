"""Coalesced commits on Kafka: an ack of a first delivery waits for no commit; after a crash the
acks not committed yet come back once (one attempt more, never a failure, never a dead letter);
a message that kills every worker still reaches the dead letters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from msgbroker import Message, MessageContext

SLOW_COMMITS = {"commit_interval": 600, "commit_batch": 100_000}
"""The background commit never comes during a test: only the commits a poll, a careful message
or a close make."""


class Step(Message):
    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


async def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _until_committed(broker: Any, topic: str, group: str, text: str) -> None:
    """Wait until every partition of ``topic`` has a commit of ``group`` whose metadata holds ``text``."""
    from aiokafka.structs import TopicPartition
    from msgbroker_kafka import KafkaTransport

    transport = broker.live_transport()
    assert isinstance(transport, KafkaTransport)
    tps = [TopicPartition(transport.kafka_name(topic), p) for p in range(transport.settings.partition_count)]
    deadline = time.monotonic() + 30.0
    while True:
        found = await transport.committed_offsets(group, tps)
        if len(found) == len(tps) and all(text in (meta.metadata or "") for meta in found.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no commit naming {text!r} on every partition of {topic}: {found}")
        await asyncio.sleep(0.05)


async def test_acks_wait_for_no_commit_and_a_crash_redelivers_them_once_without_a_failure(
    connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    topic, group = names("coalesced"), names("g")
    # one allowed failure: a redelivery counted as a failure would go to the dead letters at once
    first = await connect(partition_count=1, max_retry_attempts=1, kafka=SLOW_COMMITS)
    observer = await connect(partition_count=1)
    seen: list[tuple[str, int, int]] = []

    def handler(member: str) -> Any:
        async def handle(ctx: MessageContext[Step]) -> None:
            await ctx.ack()
            seen.append((member, ctx.message.seq, ctx.delivery_attempt))

        return handle

    await first.subscribe(topic, group, handler("first"), message_type=Step)
    # The commit that follows an assignment (it names where the member's start markers begin)
    # carries the acks made before it: let it land first, or it may commit the five.
    await _until_committed(first, topic, group, "m=")
    await first.publish_batch(topic, [Step(key="k", seq=s) for s in range(5)])
    await _until(lambda: len(seen) == 5, "the first member to handle all five")
    # every ack returned, none committed: they wait for the next batch
    assert await observer.pending_count(topic, group) == 5
    await first.abort()  # a crash: the acks are lost
    second = await connect(partition_count=1, max_retry_attempts=1, kafka=SLOW_COMMITS)
    await second.subscribe(topic, group, handler("second"), message_type=Step)
    await _until(lambda: len(seen) == 10, "the second member to handle the five again")
    assert [(seq, attempt) for member, seq, attempt in seen if member == "second"] == [
        (s, 2) for s in range(5)
    ], f"the acked messages came back as {seen[5:]}: expected each once more, as attempt 2"
    assert await second.dead_letters(topic, group) == []
    # a redelivered message is handled carefully: its ack was committed before ack() returned
    assert await observer.pending_count(topic, group) == 0
    await second.abort()


async def test_a_message_that_kills_every_worker_reaches_the_dead_letters(
    connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    topic, group = names("poison"), names("g")
    settings: dict[str, Any] = {"partition_count": 1, "max_retry_attempts": 2, "kafka": SLOW_COMMITS}
    seen: list[tuple[int, int, int]] = []  # member, seq, attempt
    holding = asyncio.Event()

    def handler(member: int) -> Any:
        async def handle(ctx: MessageContext[Step]) -> None:
            seen.append((member, ctx.message.seq, ctx.delivery_attempt))
            if ctx.message.seq == 0:
                holding.set()
                await asyncio.Event().wait()  # the worker dies holding it

        return handle

    producer = await connect(partition_count=1)
    await producer.publish_batch(topic, [Step(key="k", seq=s) for s in range(2)])
    for member in range(3):
        holding.clear()
        broker = await connect(**settings)
        await broker.subscribe(topic, group, handler(member), message_type=Step)
        await asyncio.wait_for(holding.wait(), 60)
        await broker.abort()
    last = await connect(**settings)
    await last.subscribe(topic, group, handler(3), message_type=Step)
    await _until(lambda: any(seq == 1 for _, seq, _ in seen), "the message after the poison one")
    # the first crash is in doubt (the message may have been acked), the next ones count
    assert [(member, attempt) for member, seq, attempt in seen if seq == 0] == [(0, 1), (1, 2), (2, 3)]
    [letter] = await last.dead_letters(topic, group)
    assert letter.attempts == 4 and "the worker died" in letter.error, letter
    # what followed it was read ahead by every dead worker, handled by none: one attempt more at most
    assert [(member, attempt) for member, seq, attempt in seen if seq == 1] == [(3, 2)]


async def test_a_message_read_ahead_and_handed_back_at_a_close_is_no_attempt(
    connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    """One handler at a time over two partitions: the first partition's message holds the only
    slot while the second's is read (handed to its lane) but never handled; the member closes.
    Kafka has no per-message delivery count: the commit at the close recorded the second lane's
    head as begun ("cut short in its handler"), and the next owner was handed attempt 2 of a
    message no handler had seen. The engine hands such deliveries back (``unread``): attempt 1."""
    from msgbroker import partition_for

    topic, group = names("handback"), names("g")
    first = await connect(partition_count=2, max_concurrency=1, kafka=SLOW_COMMITS)
    keys = {partition_for(k, 2): k for k in (f"key-{i}" for i in range(20))}
    seen: list[tuple[str, int, int]] = []
    release = asyncio.Event()

    async def hold(ctx: MessageContext[Step]) -> None:
        seen.append(("first", ctx.message.seq, ctx.delivery_attempt))
        await release.wait()

    await first.publish(topic, Step(key=keys[0], seq=0))
    subscription = await first.subscribe(topic, group, hold, message_type=Step)
    await _until(lambda: len(seen) == 1, "the first message in its handler")
    await first.publish(topic, Step(key=keys[1], seq=1))
    # The second lane fetches its message within a poll or two and waits for the only slot
    # (had it not fetched it by the close, the next owner would see attempt 1 anyway).
    await asyncio.sleep(1.0)
    closing = asyncio.ensure_future(subscription.close())
    await asyncio.sleep(0.2)
    release.set()  # the handler in flight finishes within the grace period
    await closing
    assert seen == [("first", 0, 1)]

    second = await connect(partition_count=2, kafka=SLOW_COMMITS)

    async def record(ctx: MessageContext[Step]) -> None:
        seen.append(("second", ctx.message.seq, ctx.delivery_attempt))

    await second.subscribe(topic, group, record, message_type=Step)
    await _until(lambda: len(seen) == 2, "the second member to handle the message handed back")
    assert seen == [("first", 0, 1), ("second", 1, 1)]


async def test_counts_asked_together_on_a_new_connection_both_answer(
    connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    """The first calls that need the connection's offsets client, made together, share one: a
    second client started meanwhile and stopped again raised CancelledError to its caller (a
    member's first assignment met it when it read its log bounds beside another read)."""
    topics = [names(f"together-{i}") for i in range(4)]
    setup = await connect(partition_count=2)
    for i, topic in enumerate(topics):
        await setup.publish_batch(topic, [Step(key=f"k{n}", seq=n) for n in range(i + 1)])
    fresh = await connect(partition_count=2)
    counts = await asyncio.gather(*(fresh.pending_count(topic, names("g")) for topic in topics))
    assert counts == [1, 2, 3, 4]
