"""RabbitMQ-specific behaviour, against the real server: lanes spread over member processes,
failover after SIGKILL, a server restart mid-stream, routing and confirms, the topology."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import defaultdict
from typing import Any

import aio_pika
import msgbroker
import pytest
from msgbroker import Lane, Message, MessageContext, partition_for
from msgbroker_rabbitmq import RabbitMQSettings, RabbitMQTransport, Topology
from msgbroker_rabbitmq._consumer import RabbitMQLaneConsumer
from msgbroker_rabbitmq._names import DELIVERY_LIMIT


class Numbered(Message):
    """A message with a key (its partition key) and a sequence number per key."""

    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


def first_handling_order(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per key, the sequence numbers in the order they were first handled (redeliveries of a
    message already handled are allowed by at-least-once and are not an order violation)."""
    order: dict[str, list[int]] = defaultdict(list)
    for event in events:
        if event["seq"] not in order[event["key"]]:
            order[event["key"]].append(event["seq"])
    return order


async def pending_settles_at(broker: msgbroker.Broker, topic: str, group: str, expected: int) -> None:
    """pending_count reaches ``expected`` (bounded: the last acks may still be on their way)."""
    seen: list[int] = []
    for _ in range(200):
        seen.append(await broker.pending_count(topic, group))
        if seen[-1] == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pending_count stays {seen[-5:]}, expected {expected}")


def connect(url: str, prefix: str, partitions: int, **settings: Any) -> msgbroker.Broker:
    return msgbroker.connect(url, partition_count=partitions, retry_delay=0,
                             rabbitmq={"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 300}, **settings)


async def test_capabilities_declare_what_is_missing_with_reasons() -> None:
    caps = RabbitMQTransport.CAPABILITIES
    assert caps.persistent and caps.competing_consumers and caps.redelivery_on_crash and caps.server_restart
    assert not caps.retains_before_group and "first subscribe" in caps.reasons["retains_before_group"]
    assert caps.deduplication == "none" and "plugin" in caps.reasons["deduplication"]
    with pytest.raises(msgbroker.ConfigurationError, match="queue_type"):
        RabbitMQTransport(msgbroker.BrokerSettings(rabbitmq={"queue_type": "classic"}))
    with pytest.raises(msgbroker.ConfigurationError, match="delivery limit"):
        RabbitMQTransport(msgbroker.BrokerSettings(max_retry_attempts=DELIVERY_LIMIT))


async def test_lanes_spread_over_three_member_processes(
    amqp_url: str, prefix: str, members: Any, wait_for: Any
) -> None:
    partitions = 12
    topic, group = f"spread-{uuid.uuid4().hex[:6]}", "workers"
    procs = [await members(prefix, topic, group, partitions) for _ in range(3)]

    def spread() -> bool:
        shares = [set(m.partitions) for m in procs]
        held = [p for s in shares for p in s]
        return all(shares) and sorted(held) == list(range(partitions))

    await wait_for(spread, 30, lambda: f"lanes to spread over 3 processes: {[m.partitions for m in procs]}")
    async with connect(amqp_url, prefix, partitions) as producer:
        messages = [Numbered(key=f"k{i % 30}", seq=i // 30) for i in range(300)]
        await producer.publish_batch(topic, messages)
        await wait_for(lambda: sum(len(m.handled()) for m in procs) >= len(messages), 60,
                       lambda: f"{sum(len(m.handled()) for m in procs)} of {len(messages)} handled")
        await pending_settles_at(producer, topic, group, 0)
    handled = [e for m in procs for e in m.handled()]
    assert len(handled) == len(messages), "without faults every message is handled exactly once"
    assert all(m.handled() for m in procs), f"a member process got nothing: {[len(m.handled()) for m in procs]}"
    for m in procs:
        assert {e["partition"] for e in m.handled()} <= set(m.partitions), "a process handled a lane it does not own"
    for key, seqs in first_handling_order(handled).items():
        assert seqs == sorted(seqs), f"key {key} out of order: {seqs}"


@pytest.mark.parametrize("claim_timeout", [2.0, None], ids=["claim-2s", "default-settings"])
async def test_failover_after_sigkill_of_a_member_process(
    amqp_url: str, prefix: str, members: Any, wait_for: Any, claim_timeout: float | None
) -> None:
    """Also with the provider's default claim_timeout (issue: a dead member's partitions, and the
    message it held, must move within 10 s by default); the time is printed (pytest -s)."""
    partitions = 6
    topic, group = f"kill-{uuid.uuid4().hex[:6]}", "workers"
    # The victim's handler is slow, so that it is surely killed holding a message.
    procs = [await members(prefix, topic, group, partitions, seconds, claim_timeout) for seconds in (0.005, 0.3, 0.005)]
    await wait_for(lambda: all(m.partitions for m in procs), 30, lambda: f"spread: {[m.partitions for m in procs]}")
    victim = procs[1]
    async with connect(amqp_url, prefix, partitions) as producer:
        first = [Numbered(key=f"k{i % 18}", seq=i // 18) for i in range(180)]
        await producer.publish_batch(topic, first)
        await wait_for(lambda: len(victim.handled()) >= 2 and len(victim.started()) > len(victim.handled()), 30,
                       "the victim to be working on a message")
        victim.kill()
        await victim.process.wait()
        killed_at = time.time()
        second = [Numbered(key=f"k{i % 18}", seq=10 + i // 18) for i in range(180)]
        await producer.publish_batch(topic, second)
        survivors = [procs[0], procs[2]]
        wanted = {(m.key, m.seq) for m in first + second}

        def done() -> set[tuple[str, int]]:
            return {(e["key"], e["seq"]) for m in procs for e in m.handled()}

        await wait_for(lambda: done() >= wanted, 60, lambda: f"{len(wanted - done())} message(s) never handled")
        await wait_for(lambda: sorted(p for m in survivors for p in m.partitions) == list(range(partitions)), 30,
                       lambda: f"the survivors to own every lane: {[m.partitions for m in survivors]}")
        await pending_settles_at(producer, topic, group, 0)
    # What the victim started but did not finish came back to a survivor, counted as a new attempt.
    unfinished = {(e["key"], e["seq"]) for e in victim.started()} - {(e["key"], e["seq"]) for e in victim.handled()}
    retaken = [e for m in survivors for e in m.handled() if (e["key"], e["seq"]) in unfinished]
    assert unfinished and retaken and all(e["attempt"] >= 2 for e in retaken), (unfinished, retaken)
    ttl = claim_timeout or RabbitMQSettings().claim_timeout.total_seconds()
    print(f"failover (claim_timeout {ttl:g}s): the held message was handled again "
          f"{min(e['at'] for e in retaken) - killed_at:.1f}s after the kill")
    everything = [e for m in procs for e in m.handled()]
    for m in survivors:
        for key, seqs in first_handling_order(m.handled()).items():
            assert seqs == sorted(seqs), f"key {key} out of order on a survivor: {seqs}"
    assert len({(e["key"], e["seq"]) for e in everything}) == len(wanted)


async def test_server_restart_mid_stream_loses_nothing(
    amqp_url: str, prefix: str, wait_for: Any, restart_rabbitmq: Any
) -> None:
    partitions = 4
    topic, group = f"restart-{uuid.uuid4().hex[:6]}", "workers"
    handled: list[tuple[str, int]] = []

    async def handle(ctx: MessageContext[Numbered]) -> None:
        handled.append((ctx.message.key, ctx.message.seq))

    async with connect(amqp_url, prefix, partitions) as broker:
        await broker.subscribe(topic, group, handle)
        confirmed: list[Numbered] = []
        restarted = asyncio.Event()

        async def produce() -> None:
            seq = 0
            while not restarted.is_set() or seq < 40 + len(confirmed) // 8:
                message = Numbered(key=f"k{seq % 8}", seq=seq // 8)
                try:
                    await broker.publish(topic, message)
                except msgbroker.TransientError:
                    await asyncio.sleep(0.2)
                    continue  # not confirmed: the same message is published again
                confirmed.append(message)
                seq += 1
                await asyncio.sleep(0.01)

        producing = asyncio.create_task(produce())
        await wait_for(lambda: len(handled) >= 20, 30, "messages flowing before the restart")
        await restart_rabbitmq()
        restarted.set()
        await asyncio.wait_for(producing, 120)
        wanted = {(m.key, m.seq) for m in confirmed}
        await wait_for(lambda: set(handled) >= wanted, 90,
                       lambda: f"{len(wanted - set(handled))} confirmed message(s) not handled after the restart")
        assert await broker.is_healthy()
    for key, seqs in first_handling_order([{"key": k, "seq": s} for k, s in handled]).items():
        assert seqs == sorted(seqs), f"key {key} out of order across the restart: {seqs}"


async def test_messages_published_before_any_group_go_to_the_first_group(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    topic = f"backlog-{uuid.uuid4().hex[:6]}"
    seen: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def handler(group: str) -> Any:
        async def handle(ctx: MessageContext[Numbered]) -> None:
            seen[group].append((ctx.message.key, ctx.message.seq))
        return handle

    async with connect(amqp_url, prefix, 4) as broker:
        early = [Numbered(key=f"k{i % 3}", seq=i) for i in range(9)]
        await broker.publish_batch(topic, early)  # no group yet: kept in the topic's backlog
        assert await broker.pending_count(topic, "first") == 9
        await broker.subscribe(topic, "first", handler("first"))
        late = [Numbered(key=f"k{i % 3}", seq=100 + i) for i in range(9)]
        await broker.publish_batch(topic, late)
        await wait_for(lambda: len(seen["first"]) >= 18, 20, lambda: f"first group: {seen['first']}")
        await broker.subscribe(topic, "second", handler("second"))
        later = [Numbered(key="k0", seq=1000)]
        await broker.publish_batch(topic, later)
        await wait_for(lambda: len(seen["second"]) >= 1, 20, "the second group")
        await wait_for(lambda: len(seen["first"]) >= 19, 20, "the first group's last message")
    for key, seqs in first_handling_order([{"key": k, "seq": s} for k, s in seen["first"]]).items():
        assert seqs == sorted(seqs), f"the backlog must come before later messages of its partition: {key} {seqs}"
    assert seen["second"] == [("k0", 1000)], "a group created later gets only what is published after it subscribed"


async def test_publish_returns_after_the_confirm_and_unroutable_is_an_error(amqp_url: str, prefix: str) -> None:
    topic, group = f"confirm-{uuid.uuid4().hex[:6]}", "g"
    topology = Topology(prefix)

    async def hold(ctx: MessageContext[Numbered]) -> None:
        await asyncio.Event().wait()

    async with connect(amqp_url, prefix, 2) as broker:
        sub = await broker.subscribe(topic, group, hold)
        await sub.close()  # the group's queues exist, nobody reads them
        await broker.publish(topic, Numbered(key="a", seq=1))
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            queue = topology.lane_queue(topic, group, partition_for("a", 2))
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.message_count == 1, "publish returned before the message was stored"
            # The group's queue of partition 1 is gone: its messages wait in the topic's backlog.
            lost = next(k for k in (f"x{i}" for i in range(100)) if partition_for(k, 2) == 1)
            await channel.queue_delete(topology.lane_queue(topic, group, 1))
        finally:
            await connection.close()
        await broker.publish(topic, Numbered(key=lost, seq=2))
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            backlog = await channel.declare_queue(topology.backlog_queue(topic, 1), passive=True)
            assert backlog.declaration_result.message_count == 1, "the unroutable message was not kept"
            await channel.exchange_delete(topology.backlog_exchange(topic))  # now nothing can take it
        finally:
            await connection.close()
        with pytest.raises(msgbroker.PublishFailedError, match="unroutable"):
            await broker.publish(topic, Numbered(key=lost, seq=3))


async def test_a_different_partition_count_on_an_existing_topic_is_refused(amqp_url: str, prefix: str) -> None:
    topic = f"count-{uuid.uuid4().hex[:6]}"
    async with connect(amqp_url, prefix, 4) as broker:
        await broker.publish(topic, Numbered(key="a", seq=0))
    async with connect(amqp_url, prefix, 8) as other:
        with pytest.raises(msgbroker.ConfigurationError, match="partition_count=8"):
            await other.publish(topic, Numbered(key="a", seq=1))

        async def handle(ctx: MessageContext[Numbered]) -> None:
            return None

        with pytest.raises(msgbroker.ConfigurationError, match="partition count"):
            await other.subscribe(topic, "g", handle)


async def test_names_longer_than_amqp_allows_are_shortened_uniquely(amqp_url: str, prefix: str, wait_for: Any) -> None:
    topic, group = "t" * 200, "g" * 199 + "a"
    other_group = "g" * 199 + "b"
    topology = Topology(prefix)
    names = {topology.lane_queue(topic, group, 0), topology.lane_queue(topic, other_group, 0)}
    assert len(names) == 2 and all(len(n.encode()) <= 255 for n in names)
    got: list[int] = []

    async def handle(ctx: MessageContext[Numbered]) -> None:
        got.append(ctx.message.seq)

    async with connect(amqp_url, prefix, 2) as broker:
        await broker.subscribe(topic, group, handle)
        await broker.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(3)])
        await wait_for(lambda: len(got) >= 3, 20, "messages on a topic with a 200-character name")
    assert got == [0, 1, 2]


async def test_a_handover_keeps_order_and_recounts_nothing(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    """A graceful handover mid-stream: the new owner goes on in order. The broker has pushed up
    to ``prefetch`` (32) messages the old owner did not handle; they come back uncounted (the
    lane's note says they were handed back), so every message is handled once, as attempt 1."""
    topic, group = f"handover-{uuid.uuid4().hex[:6]}", "g"
    attempts: list[tuple[str, int, int]] = []

    def handler(member: str) -> Any:
        async def handle(ctx: MessageContext[Numbered]) -> None:
            attempts.append((member, ctx.message.seq, ctx.delivery_attempt))
            await asyncio.sleep(0.01)
        return handle

    async with connect(amqp_url, prefix, 1) as first, connect(amqp_url, prefix, 1) as second:
        holder = await first.subscribe(topic, group, handler("first"))
        await wait_for(lambda: holder.partitions == [0], 10, "the first member to own the lane")
        await first.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(60)])
        await wait_for(lambda: len(attempts) >= 10, 20, "the first member working")
        await second.subscribe(topic, group, handler("second"))
        await holder.close()  # hands the lane over mid-stream
        await wait_for(lambda: len({s for _, s, _ in attempts}) >= 60, 30, lambda: f"{len(attempts)} handled")
    assert [s for _, s, _ in attempts] == list(range(60)), "each message once, in order"
    taken_over = [a for a in attempts if a[0] == "second"]
    assert taken_over, "the second member never got the lane"
    recounted = [a for a in attempts if a[2] != 1]
    assert recounted == [], f"handed back unhandled, yet counted: {recounted}"


async def test_a_release_is_not_lost_when_an_acquire_is_refused_at_the_same_time(amqp_url: str, prefix: str) -> None:
    """A refused lease declaration closes its channel; a release running at that moment must
    still delete the lease queue (otherwise the lane stays held by nobody who reads it)."""
    topic, group = f"lease-{uuid.uuid4().hex[:6]}", "g"
    async with connect(amqp_url, prefix, 4) as a, connect(amqp_url, prefix, 4) as b:
        members = {}
        for name, broker in (("ma", a), ("mb", b)):
            member = broker.transport.consumer(topic, group, name)
            await member.start(None, None)  # type: ignore[arg-type]  # no engine: the primitives alone
            members[name] = member
        lanes = [Lane(topic, group, p) for p in range(4)]
        assert await a.transport.acquire_lease(lanes[0], "ma", 2) is not None
        held_by_b = await b.transport.acquire_lease(lanes[1], "mb", 2)
        assert held_by_b is not None
        assert await a.transport.acquire_lease(lanes[1], "ma", 2) is None, "a held lease was granted twice"
        for _ in range(5):
            refused, _ = await asyncio.gather(
                b.transport.acquire_lease(lanes[0], "mb", 2), b.transport.release_lease(lanes[1], held_by_b)
            )
            assert refused is None
            taken = await a.transport.acquire_lease(lanes[1], "ma", 2)
            assert taken is not None, "the released lease is still held"
            await a.transport.release_lease(lanes[1], taken)
            held_by_b = await b.transport.acquire_lease(lanes[1], "mb", 2)
            assert held_by_b is not None
        assert await a.transport.renew_leases({lanes[1]: "ma/1/stale"}, 2) == set()
        for member in members.values():
            await member.stop(flush=True)


async def test_pending_count_includes_what_another_process_holds(
    amqp_url: str, prefix: str, members: Any, wait_for: Any
) -> None:
    """RabbitMQ reports only ready messages; the census asks the group's members (here in
    another process) for what they hold unacked."""
    topic, group = f"census-{uuid.uuid4().hex[:6]}", "workers"
    worker = await members(prefix, topic, group, 2, 30.0)  # each message takes 30 s: the first stays in flight
    await wait_for(lambda: sorted(worker.partitions) == [0, 1], 20, "the member to own both lanes")
    async with connect(amqp_url, prefix, 2) as observer:
        await observer.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(3)])
        await wait_for(lambda: bool(worker.started()), 20, "the first message to be in a handler")
        assert await observer.pending_count(topic, group) == 3  # 2 ready + 1 in the other process's handler
        worker.kill()  # not a 30 s graceful close
        await worker.process.wait()
        assert await observer.pending_count(topic, group) == 3  # the killed member's message is ready again


async def test_a_retry_note_keeps_attempt_and_delay_across_a_crash(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    """Nak and delay stay on the member (local redelivery); the lane's retry note tells the next
    owner the attempt and the not-before when the member dies waiting."""
    topic, group = f"note-{uuid.uuid4().hex[:6]}", "g"
    delayed_until: list[float] = []

    async def first_owner(ctx: MessageContext[Numbered]) -> None:
        if ctx.delivery_attempt == 1:
            await ctx.nak(requeue=True)
        else:
            delayed_until.append(time.time() + 2.0)
            await ctx.delay(2.0)

    seen: list[tuple[int, int, float]] = []

    async def next_owner(ctx: MessageContext[Numbered]) -> None:
        seen.append((ctx.message.seq, ctx.delivery_attempt, time.time()))

    async with connect(amqp_url, prefix, 1) as first, connect(amqp_url, prefix, 1) as second:
        await first.subscribe(topic, group, first_owner)
        await first.publish_batch(topic, [Numbered(key="a", seq=0), Numbered(key="a", seq=1)])
        await wait_for(lambda: bool(delayed_until), 20, "the message to be naked, then delayed")
        await first.abort()  # dies while waiting out the delay: nothing settled, nothing released
        await second.subscribe(topic, group, next_owner)
        await wait_for(lambda: len(seen) >= 2, 30, lambda: f"the next owner to handle both: {seen}")
    (seq, attempt, at), after = seen[0], seen[1]
    assert seq == 0 and after[0] == 1, f"order lost across the crash: {seen}"
    assert attempt >= 3, f"the noted attempt was lost: the next owner saw attempt {attempt} after 2 deliveries"
    assert at >= delayed_until[0] - 0.01, f"redelivered {delayed_until[0] - at:.2f}s before the delay ended"


async def test_a_retry_note_of_the_next_message_keeps_the_acked_ones_attempts(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    """The lane's note holds one retry. Seq 0 is dead-lettered, seq 1 retried then acked, seq 2
    delayed — its note replaces seq 1's — and the member dies right after. Had seq 1's ack not
    gone out, seq 1 would come back counted from its broker returns alone: attempt 2 after
    attempt 2, where attempts must grow (docs/semantics.md rule 3). Every settlement wakes the
    acks, and a retry note is written only once the acks before it were taken."""
    for round_ in range(5):
        topic, group = f"acked-{uuid.uuid4().hex[:6]}", "g"
        delayed = asyncio.Event()
        handled: list[tuple[int, int]] = []

        async def first_owner(ctx: MessageContext[Numbered], handled: list[tuple[int, int]] = handled,
                              delayed: asyncio.Event = delayed) -> None:
            handled.append((ctx.message.seq, ctx.delivery_attempt))
            if ctx.message.seq == 0:
                await ctx.nak(requeue=False)
            elif ctx.message.seq == 1 and ctx.delivery_attempt == 1:
                await ctx.nak(requeue=True)  # the note: seq 1, attempt 2
            elif ctx.message.seq == 2:
                await ctx.delay(1.0)  # the note: seq 2 (seq 1 acked before it)
                delayed.set()

        seen: list[tuple[int, int]] = []

        async def next_owner(ctx: MessageContext[Numbered], seen: list[tuple[int, int]] = seen) -> None:
            seen.append((ctx.message.seq, ctx.delivery_attempt))

        async with connect(amqp_url, prefix, 1) as first, connect(amqp_url, prefix, 1) as second:
            await first.subscribe(topic, group, first_owner)
            await first.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(3)])
            await wait_for(delayed.is_set, 20, lambda h=handled: f"seq 2 to be delayed: {h}")
            await first.abort()
            await second.subscribe(topic, group, next_owner)
            await wait_for(lambda s=seen: any(seq == 2 for seq, _ in s), 60,
                           lambda s=seen: f"the next owner to handle seq 2: {s}")
        last = {seq: attempt for seq, attempt in handled}
        again = [(seq, attempt) for seq, attempt in seen if attempt <= last.get(seq, 0)]
        assert again == [], f"round {round_}: handled {handled}, then by the next owner {seen}: attempts must grow"


def _one_lane_member(amqp_url: str, prefix: str, max_retry_attempts: int | None = None,
                     **rabbitmq: Any) -> msgbroker.Broker:
    """A member of a one-partition topic whose lease runs out 2 s after it dies."""
    settings: dict[str, Any] = {"partition_count": 1,
                                "rabbitmq": {"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 300,
                                             **rabbitmq}}
    if max_retry_attempts is not None:
        settings["max_retry_attempts"] = max_retry_attempts
    return msgbroker.connect(amqp_url, **settings)


async def _close_while_handling(sub: Any, started: asyncio.Event, release: asyncio.Event, wait_for: Any) -> None:
    """Close ``sub`` while its handler holds the first message (the lane reads ahead
    meanwhile), then let the handler finish: the close hands the lane over."""
    await wait_for(started.is_set, 20, "the first member to begin handling")
    await asyncio.sleep(0.5)
    closing = asyncio.ensure_future(sub.close())
    await asyncio.sleep(0.1)
    release.set()
    await closing


async def test_a_lane_handed_over_while_it_holds_backlog_messages_keeps_their_order(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    """Messages published while no group was bound are read from the backlog with
    ``basic.get``; RabbitMQ 3.10 puts such messages back in the order of their delivery tags as
    text when their channel closes. A lane handed over while it held 29 of them reached its next
    owner as 9-18, 1, 19-28, 2, ...: they are now handed back in order before the close."""
    topic, group = f"backlog-{uuid.uuid4().hex[:6]}", "g"
    seen: list[tuple[int, int, int]] = []  # (member, seq, attempt)

    def connect_member() -> msgbroker.Broker:
        return _one_lane_member(amqp_url, prefix, max_retry_attempts=2)

    async with connect_member() as publisher:
        await publisher.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(30)])  # no group yet
        started, release = asyncio.Event(), asyncio.Event()

        async def held(ctx: MessageContext[Numbered]) -> None:
            seen.append((0, ctx.message.seq, ctx.delivery_attempt))
            started.set()
            await release.wait()  # the member reads the backlog ahead meanwhile

        async with connect_member() as worker:
            sub = await worker.subscribe(topic, group, held)
            await _close_while_handling(sub, started, release, wait_for)

        async def rest(ctx: MessageContext[Numbered]) -> None:
            seen.append((1, ctx.message.seq, ctx.delivery_attempt))

        async with connect_member() as worker:
            await worker.subscribe(topic, group, rest)
            await wait_for(lambda: {seq for _, seq, _ in seen} == set(range(30)), 30,
                           lambda: f"every message handled: {sorted({seq for _, seq, _ in seen})}")
    order = [seq for member, seq, _ in seen if member == 1]
    assert order == sorted(order), f"the next owner's order: {order}"
    assert [attempt for _, _, attempt in seen] == [1] * 30, f"attempts: {seen}"


async def test_a_member_killed_while_it_holds_backlog_messages_leaves_them_in_order(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    """A member that dies returns what it took from the backlog in the text order of the
    delivery tags (RabbitMQ 3.10); that is their order while the tags have as many digits, so a
    lane takes tag 10, 100, ... only once it holds nothing of the backlog. Before, a member
    killed holding tags 1-29 left them to the next owner as 9-18, 1, 19-28, 2, ..."""
    topic, group = f"backlog-{uuid.uuid4().hex[:6]}", "g"
    seen: list[tuple[int, int]] = []  # (member, seq)

    def connect_member() -> msgbroker.Broker:
        return _one_lane_member(amqp_url, prefix)

    async with connect_member() as publisher:
        await publisher.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(30)])  # no group yet
        started = asyncio.Event()

        async def stuck(ctx: MessageContext[Numbered]) -> None:
            seen.append((0, ctx.message.seq))
            started.set()
            await asyncio.Event().wait()  # the member dies handling it

        doomed = await connect_member()
        await doomed.subscribe(topic, group, stuck)
        await wait_for(started.is_set, 20, "the first member to begin handling")
        await asyncio.sleep(0.5)  # it reads the backlog ahead meanwhile
        await doomed.abort()

        async def rest(ctx: MessageContext[Numbered]) -> None:
            seen.append((1, ctx.message.seq))

        async with connect_member() as worker:
            await worker.subscribe(topic, group, rest)
            await wait_for(lambda: {seq for member, seq in seen if member == 1} == set(range(30)), 30,
                           lambda: f"every message handled by the next owner: {seen}")
    order = [seq for member, seq in seen if member == 1]
    assert order == sorted(order), f"the next owner's order: {order}"


async def test_messages_pushed_after_the_hand_over_note_are_noted_too(
    amqp_url: str, prefix: str, wait_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closing lane's acks make room in its prefetch, so the server may push more after the
    lane's note is written and before the channel's close is answered. Those pushes go back
    unhandled and RabbitMQ counts their return; unnoted, the next owner handed them as attempt 2
    (the conformance volume case, seed 30248668, dead-lettered a message after 2 failures). Here
    the room is made on purpose right after the note (one message it noted is acked, unhandled):
    every other message must still be first handled as attempt 1."""
    topic, group = f"late-{uuid.uuid4().hex[:6]}", "g"
    seen: list[tuple[int, int, int]] = []  # (member, seq, attempt)

    def connect_member() -> msgbroker.Broker:
        return _one_lane_member(amqp_url, prefix, max_retry_attempts=2, prefetch=4)

    note = RabbitMQLaneConsumer._note_handed_back
    made_room: list[int] = []

    async def note_then_make_room(self: RabbitMQLaneConsumer, lane: Any, late: bool = False) -> None:
        await (note(self, lane, late) if late else note(self, lane))
        if not late and not made_room and lane.outstanding:
            # Room for one push after the note: one message it noted, acked (gone unhandled).
            tag, delivery = max(lane.outstanding.items())
            made_room.append(json.loads(delivery.body)["seq"])
            await lane.raw.basic_ack(tag)
            await asyncio.sleep(0.05)  # the push it makes room for arrives before the close

    async with connect_member() as publisher:
        started, release = asyncio.Event(), asyncio.Event()

        async def held(ctx: MessageContext[Numbered]) -> None:
            seen.append((0, ctx.message.seq, ctx.delivery_attempt))
            started.set()
            await release.wait()  # the prefetch fills behind it

        monkeypatch.setattr(RabbitMQLaneConsumer, "_note_handed_back", note_then_make_room)
        async with connect_member() as worker:
            sub = await worker.subscribe(topic, group, held)
            # Published once the group's lane queue exists: pushed (the prefetch), not the backlog.
            await publisher.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(30)])
            await _close_while_handling(sub, started, release, wait_for)
        monkeypatch.undo()
        assert len(made_room) == 1, "room made after the note"
        expected = set(range(30)) - set(made_room)

        async def rest(ctx: MessageContext[Numbered]) -> None:
            seen.append((1, ctx.message.seq, ctx.delivery_attempt))

        async with connect_member() as worker:
            await worker.subscribe(topic, group, rest)
            await wait_for(lambda: {seq for _, seq, _ in seen} == expected, 30,
                           lambda: f"every message handled: {sorted({seq for _, seq, _ in seen})}")
            await pending_settles_at(worker, topic, group, 0)
            letters = [letter.message_id for letter in await worker.dead_letters(topic, group)]
    assert letters == [], f"dead-lettered: {letters} ({seen})"
    first: dict[int, int] = {}
    for _, seq, attempt in seen:
        first.setdefault(seq, attempt)
    later = {seq: attempt for seq, attempt in first.items() if attempt != 1}
    assert later == {}, f"first handled as a later attempt after one hand-over: {later} in {seen}"


async def test_messages_prefetched_through_hand_overs_are_no_attempts(
    amqp_url: str, prefix: str, wait_for: Any
) -> None:
    """A lane closed at a hand-over sends back what the server pushed ahead and no handler saw;
    RabbitMQ counts that return in ``x-delivery-count``. The lane's note says so, and the next
    owner hands those messages as the same attempt (docs/semantics.md rule 3): after more
    hand-overs than ``max_retry_attempts``, nothing is dead-lettered and every first handling is
    attempt 1. A message retried before its lane moved keeps its attempt and failure count."""
    topic, group = f"handback-{uuid.uuid4().hex[:6]}", "g"
    seen: list[tuple[int, int, int]] = []  # (member, seq, attempt)
    letters: list[str] = []
    members = 5

    def connect_member() -> msgbroker.Broker:
        return msgbroker.connect(amqp_url, partition_count=1, max_retry_attempts=2, retry_delay=1.0,
                                 rabbitmq={"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 300,
                                           "prefetch": 10})

    async with connect_member() as publisher:
        await publisher.publish_batch(topic, [Numbered(key="a", seq=i) for i in range(40)])
        for member in range(members):
            started, release = asyncio.Event(), asyncio.Event()

            async def handle(ctx: MessageContext[Numbered], member: int = member, started: asyncio.Event = started,
                             release: asyncio.Event = release) -> None:
                seen.append((member, ctx.message.seq, ctx.delivery_attempt))
                if member == 0 and ctx.message.seq == 0 and ctx.delivery_attempt == 1:
                    await ctx.nak(requeue=True)  # one failure; the lane moves during its retry delay
                    started.set()
                    return
                if not started.is_set():
                    started.set()
                    await release.wait()  # the server pushes the next ones meanwhile: read ahead

            async with connect_member() as worker:
                sub = await worker.subscribe(topic, group, handle)
                await wait_for(started.is_set, 20, lambda m=member: f"member {m} to begin handling (were the "
                                                                      f"messages dead-lettered unhandled? {seen})")
                await asyncio.sleep(0.5)  # the prefetch fills
                closing = asyncio.ensure_future(sub.close())
                await asyncio.sleep(0.1)
                release.set()
                await closing

        async def last(ctx: MessageContext[Numbered]) -> None:
            seen.append((members, ctx.message.seq, ctx.delivery_attempt))

        async with connect_member() as worker:
            await worker.subscribe(topic, group, last)
            await wait_for(lambda: {seq for _, seq, _ in seen} == set(range(40)), 30,
                           lambda: f"every message handled: {sorted({seq for _, seq, _ in seen})}")
            await pending_settles_at(worker, topic, group, 0)
            letters.extend(letter.message_id for letter in await worker.dead_letters(topic, group))
    assert letters == [], f"dead-lettered after hand-overs alone: {letters} ({seen})"
    first: dict[int, int] = {}
    for _, seq, attempt in seen:
        first.setdefault(seq, attempt)
    assert first[0] == 1 and [a for _, s, a in seen if s == 0][:2] == [1, 2], f"seq 0's attempts: {seen}"
    handovers = [seq for seq, attempt in first.items() if seq and attempt != 1]
    assert handovers == [], f"first handled as a later attempt after hand-overs: {handovers} in {seen}"


async def test_delete_topic_removes_its_queues(amqp_url: str, prefix: str, wait_for: Any) -> None:
    topic, group = f"retire-{uuid.uuid4().hex[:6]}", "g"
    got: list[int] = []

    async def handle(ctx: MessageContext[Numbered]) -> None:
        got.append(ctx.message.seq)

    async with connect(amqp_url, prefix, 2) as broker:
        sub = await broker.subscribe(topic, group, handle)
        await broker.publish(topic, Numbered(key="a", seq=0))
        await wait_for(lambda: got == [0], 20, "the message before retiring the topic")
        await sub.close()
        transport = broker.transport
        assert isinstance(transport, RabbitMQTransport)
        assert await transport.delete_topic(topic, [group]) == 2 + 1 + 1  # 2 lane queues, letters, marker
        topology = Topology(prefix)
        connection = await aio_pika.connect(amqp_url)
        try:
            for queue in (topology.lane_queue(topic, group, 0), topology.meta_queue(topic)):
                channel = await connection.channel()
                with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                    await channel.declare_queue(queue, passive=True)
        finally:
            await connection.close()
        await broker.publish(topic, Numbered(key="a", seq=1))  # declared again; kept in the backlog
        assert await broker.pending_count(topic, group) == 1


async def test_a_header_amqp_cannot_carry_is_refused_naming_it(amqp_url: str, prefix: str) -> None:
    # Found by tests/faults/test_headers.py: pamqp truncated a field name past 128 bytes, so the
    # header arrived under another name. Now the publish is refused and names the header.
    async with connect(amqp_url, prefix, 4) as broker:
        long_name = "h" * 129
        with pytest.raises(msgbroker.InvalidNameError, match=r"'hhhh.*129 bytes.*at most 128"):
            await broker.publish("hdr", Numbered(key="k", seq=1), headers={long_name: "v"})
        with pytest.raises(msgbroker.InvalidNameError, match=r"'x-death' .* reserved"):
            await broker.publish("hdr", Numbered(key="k", seq=1), headers={"x-death": "v"})
        seen: list[dict[str, str]] = []

        async def handle(ctx: MessageContext[Numbered]) -> None:
            seen.append(dict(ctx.headers))

        subscription = await broker.subscribe("hdr", "g", handle, message_type=Numbered)
        await broker.publish("hdr", Numbered(key="k", seq=2), headers={"h" * 128: "fits", "x-trace": "t"})
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert seen and seen[0].get("h" * 128) == "fits" and seen[0].get("x-trace") == "t"
        await subscription.close()
        transport: Any = broker.transport
        await transport.delete_topic("hdr", ["g"])


async def test_delete_topic_also_retires_its_dead_letter_topic(amqp_url: str, prefix: str, wait_for: Any) -> None:
    # found by the fuzzed-headers fault test: <topic>.dlq's backlog and marker queues were left
    topic, group = f"retire-{uuid.uuid4().hex[:6]}", "g"

    async def handle(ctx: MessageContext[Numbered]) -> None:
        await ctx.nak(requeue=False)

    async with connect(amqp_url, prefix, 2) as broker:
        sub = await broker.subscribe(topic, group, handle)
        await broker.publish(topic, Numbered(key="a", seq=0))

        async def one_letter() -> bool:
            return len(await broker.dead_letters(topic, group)) == 1

        for _ in range(200):
            if await one_letter():
                break
            await asyncio.sleep(0.05)
        assert await one_letter()
        await sub.close()
        transport = broker.transport
        assert isinstance(transport, RabbitMQTransport)
        topology = Topology(prefix)
        dlq_queues = [topology.meta_queue(f"{topic}.dlq"), *(topology.backlog_queue(f"{topic}.dlq", p) for p in (0, 1))]
        connection = await aio_pika.connect(amqp_url)
        try:
            existed = 0
            for queue in dlq_queues:
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                    await channel.declare_queue(queue, passive=True)
                    existed += 1
            assert existed >= 2, "the dead letter went to <topic>.dlq, which declares its marker and a backlog"
            await transport.delete_topic(topic, [group])
            for queue in dlq_queues:
                channel = await connection.channel()
                with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                    await channel.declare_queue(queue, passive=True)
        finally:
            await connection.close()
