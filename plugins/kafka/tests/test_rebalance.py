"""Rebalances done right on Kafka: a member joining while messages are in flight loses
nothing, and no commit ever passes a message whose handler had not finished — neither on
revoke nor on a shutdown that cuts a handler short."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgbroker
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from msgbroker import Message, MessageContext
from msgbroker_kafka import MESSAGE_ID_HEADER, KafkaTransport
from msgbroker_kafka._assignor import PinningAssignor


class Seat(Message):
    """A seat-lock request: ``seq`` orders the requests of one ``key``."""

    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _positions(servers: str, topic: str, count: int) -> dict[str, tuple[int, int]]:
    """message id -> (partition, offset) of every record of ``topic``."""
    reader = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, auto_offset_reset="earliest")
    await reader.start()
    out: dict[str, tuple[int, int]] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(count)]
        reader.assign(tps)
        ends = await reader.end_offsets(tps)
        async with asyncio.timeout(30):
            while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
                for tp, records in (await reader.getmany(timeout_ms=200)).items():
                    for r in records:
                        out[dict(r.headers)[MESSAGE_ID_HEADER].decode()] = (tp.partition, r.offset)
    finally:
        await reader.stop()
    return out


class _CommitWatch:
    """Samples the group's committed offsets while a test runs: (time, partition, offset)."""

    def __init__(self, servers: str, topic: str, group: str, count: int) -> None:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=servers)
        self.tps = [TopicPartition(topic, p) for p in range(count)]
        self.group = group
        self.samples: list[tuple[float, int, int]] = []
        self.task: asyncio.Task[None] | None = None

    async def latest(self) -> dict[int, int]:
        found = await self.admin.list_consumer_group_offsets(self.group, partitions=self.tps)
        return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}

    async def _run(self) -> None:
        while True:
            for partition, offset in (await self.latest()).items():
                self.samples.append((time.monotonic(), partition, offset))
            await asyncio.sleep(0.03)

    async def __aenter__(self) -> _CommitWatch:
        await self.admin.start()
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.admin.close()


def _check_commits(samples: list[tuple[float, int, int]], finished: dict[str, float],
                   positions: dict[str, tuple[int, int]]) -> None:
    """Every committed offset c seen at time t: each record below c had finished before t."""
    done_at = {positions[mid]: at for mid, at in finished.items()}
    by_partition: dict[int, list[int]] = defaultdict(list)
    for partition, offset in positions.values():
        by_partition[partition].append(offset)
    for seen_at, partition, committed in samples:
        for offset in by_partition[partition]:
            if offset < committed:
                at = done_at.get((partition, offset))
                assert at is not None and at <= seen_at, (
                    f"offset {committed} of partition {partition} was committed while the message at "
                    f"offset {offset} was unfinished"
                )


async def test_a_rebalance_with_messages_in_flight_loses_nothing_and_commits_nothing_unsettled(
    bootstrap_servers: str, connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    count, topic, group = 4, names("rebalance"), names("g")
    first = await connect(partition_count=count, shutdown_timeout=20)
    second = await connect(partition_count=count, shutdown_timeout=20)
    release = asyncio.Event()
    blocked = asyncio.Event()
    finished: dict[str, float] = {}
    handled: list[tuple[str, str, int, str]] = []  # member, key, seq, message id

    def handler(member: str) -> Any:
        async def handle(ctx: MessageContext[Seat]) -> None:
            handled.append((member, ctx.message.key, ctx.message.seq, ctx.message_id))
            if ctx.message.key == "k0" and ctx.message.seq == 5 and not blocked.is_set():
                blocked.set()
                await release.wait()  # in flight while the group rebalances
            else:
                await asyncio.sleep(0.002)
            finished.setdefault(ctx.message_id, time.monotonic())

        return handle

    keys = [f"k{i}" for i in range(8)]
    messages = [Seat(key=k, seq=s) for s in range(25) for k in keys]
    async with _CommitWatch(bootstrap_servers, topic, group, count) as watch:
        sub_first = await first.subscribe(topic, group, handler("first"))
        await first.publish_batch(topic, messages)
        await asyncio.wait_for(blocked.wait(), 30)
        blocker = next(mid for _, k, s, mid in handled if k == "k0" and s == 5)
        joining = asyncio.create_task(second.subscribe(topic, group, handler("second")))
        # the revoke started (the first member stopped dispatching) and waits for the blocker
        await _until(lambda: sub_first.partitions == [], "the first member to stop dispatching on revoke")
        before_release = await watch.latest()
        release.set()
        sub_second = await joining
        wanted = {str(m.message_id) for m in messages}
        await _until(lambda: set(finished) >= wanted, "every message to be handled", timeout=60)
        await _until(lambda: bool(sub_second.partitions) and bool(sub_first.partitions), "partitions to spread")
        pending = [-1]
        deadline = time.monotonic() + 10
        while pending[-1] != 0 and time.monotonic() < deadline:  # the last acks commit in batches
            pending.append(await first.pending_count(topic, group))
            await asyncio.sleep(0.05)
        assert pending[-1] == 0, f"pending_count stays {pending[-1]} once every message was handled"
    positions = await _positions(bootstrap_servers, topic, count)
    blocker_at = positions[blocker]
    assert before_release.get(blocker_at[0], 0) <= blocker_at[1], (
        f"partition {blocker_at[0]} was committed to {before_release[blocker_at[0]]} while the message at "
        f"offset {blocker_at[1]} was still in its handler"
    )
    _check_commits(watch.samples, finished, positions)
    handled_ids = [mid for _, _, _, mid in handled]
    assert len(handled_ids) == len(set(handled_ids)), (
        "messages were handled twice: the revoked member did not commit what it had settled"
    )
    for key in keys:
        firsts: list[int] = []
        for _, k, seq, _ in handled:
            if k == key and seq not in firsts:
                firsts.append(seq)
        assert firsts == list(range(25)), f"{key} handled out of order across the rebalance: {firsts}"


async def test_a_close_that_cuts_a_handler_short_commits_nothing_past_it(
    bootstrap_servers: str, connect: Callable[..., Any], names: Callable[[str], str]
) -> None:
    """The handler outlives the grace period: it is cancelled, its message is not committed,
    and the next member gets it (counted as a second attempt) before what followed it."""
    count, topic, group = 2, names("shutdown"), names("g")
    first = await connect(partition_count=count, shutdown_timeout=0.5)
    stuck = asyncio.Event()
    seen: list[tuple[str, int, int]] = []

    async def slow(ctx: MessageContext[Seat]) -> None:
        seen.append(("first", ctx.message.seq, ctx.delivery_attempt))
        if ctx.message.seq == 2:
            stuck.set()
            await asyncio.sleep(60)  # cut short by close()

    await first.subscribe(topic, group, slow)
    messages = [Seat(key="only", seq=s) for s in range(5)]
    await first.publish_batch(topic, messages)
    await asyncio.wait_for(stuck.wait(), 30)
    await first.close()
    partition = msgbroker.partition_for("only", count)
    async with _CommitWatch(bootstrap_servers, topic, group, count) as watch:
        committed = await watch.latest()
    positions = await _positions(bootstrap_servers, topic, count)
    assert committed.get(partition) == positions[str(messages[2].message_id)][1], (
        f"after a close that cut message 2 short, partition {partition} is committed at {committed.get(partition)}"
    )
    second = await connect(partition_count=count)

    async def record(ctx: MessageContext[Seat]) -> None:
        seen.append(("second", ctx.message.seq, ctx.delivery_attempt))

    await second.subscribe(topic, group, record)
    await _until(lambda: len([s for s in seen if s[0] == "second"]) >= 3, "the rest of the partition")
    assert [(seq, attempt) for member, seq, attempt in seen if member == "second"] == [(2, 2), (3, 1), (4, 1)]


class _Blind:
    """Cluster metadata as a broker that has not yet heard of ``topic`` answers it (a topic just
    created reaches a cluster's brokers one after the other)."""

    def __init__(self, cluster: Any, topic: str) -> None:
        self.cluster, self.topic = cluster, topic

    def partitions_for_topic(self, topic: str) -> Any:
        return None if topic == self.topic else self.cluster.partitions_for_topic(topic)


async def test_a_group_assigned_while_the_metadata_lacked_its_topic_joins_again_once_it_lists_it(
    connect: Callable[..., Any], names: Callable[[str], str], monkeypatch: Any
) -> None:
    """The group's leader assigns from metadata that lacks the topic (the first assignment is
    computed as a broker of a cluster answers before the topic reached it): nobody gets a
    partition. aiokafka would look at the metadata again only after 5 minutes; the member asks
    for it at once, sees the topic and joins again, and what was published is delivered."""
    topic, group = names("blind"), names("g")
    broker = await connect(partition_count=4)
    transport = broker.live_transport()
    assert isinstance(transport, KafkaTransport)
    kafka_topic = transport.kafka_name(topic)
    assign = PinningAssignor.assign
    blinded: list[int] = []

    def first_blind(self: Any, cluster: Any, members: Any) -> Any:
        if not blinded:
            blinded.append(1)
            return assign(self, _Blind(cluster, kafka_topic), members)
        return assign(self, cluster, members)

    monkeypatch.setattr(PinningAssignor, "assign", first_blind)
    handled: list[int] = []

    async def handle(ctx: MessageContext[Seat]) -> None:
        handled.append(ctx.message.seq)

    await broker.subscribe(topic, group, handle)
    await broker.publish_batch(topic, [Seat(key=f"k{i}", seq=i) for i in range(8)])
    await _until(lambda: sorted(handled) == list(range(8)),
                 f"the 8 messages to be handled after the blind assignment (handled {sorted(handled)})", timeout=30)
    assert blinded == [1], "the first assignment was not computed from the blind metadata"


async def test_each_assigned_partition_starts_at_its_commit_or_at_its_first_offset_after_retention(
    connect: Callable[..., Any], names: Callable[[str], str], bootstrap_servers: str
) -> None:
    """A member points its consumer at each assigned partition's start itself: a group that never
    committed a partition starts at its first offset (also one retention moved past 0: records
    deleted before it are not asked for), a group that committed starts after its commit."""
    from aiokafka.admin.records_to_delete import RecordsToDelete

    topic, group = names("starts"), names("g")
    broker = await connect(partition_count=2)
    transport = broker.live_transport()
    assert isinstance(transport, KafkaTransport)
    kafka_topic = transport.kafka_name(topic)
    await broker.publish_batch(topic, [Seat(key=f"k{i}", seq=i) for i in range(40)])
    before = await _positions(bootstrap_servers, kafka_topic, 2)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:  # what retention does: the first records of partition 0 are gone, its log starts at 5
        await admin.delete_records({TopicPartition(kafka_topic, 0): RecordsToDelete(before_offset=5)})
    finally:
        await admin.close()
    kept = {mid for mid, (partition, offset) in before.items() if partition == 1 or offset >= 5}
    assert len(kept) == len(before) - 5, "partition 0 held fewer than 5 records: pick other keys"
    handled: list[str] = []

    async def handle(ctx: MessageContext[Seat]) -> None:
        handled.append(ctx.message_id)

    subscription = await broker.subscribe(topic, group, handle, message_type=Seat)
    await _until(lambda: len(handled) >= len(kept), f"the {len(kept)} records still kept to be handled")
    await asyncio.sleep(0.5)  # nothing else comes
    assert sorted(handled) == sorted(kept), "the new group did not start each partition at its first offset"
    await subscription.close()  # commits all of it
    more = await broker.publish_batch(topic, [Seat(key=f"k{i}", seq=100 + i) for i in range(10)])
    handled.clear()
    subscription = await broker.subscribe(topic, group, handle, message_type=Seat)
    await _until(lambda: len(handled) >= len(more), "the 10 messages published after the close to be handled")
    await asyncio.sleep(0.5)
    assert sorted(handled) == sorted(more), "the group did not start after its commits"
    await subscription.close()
