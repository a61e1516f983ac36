"""What the NATS provider does underneath, checked against the real nats-server: where streams,
subjects and consumers live, native dedup, failover after a member process is killed, a server
restart mid-stream, long handlers kept alive with +WPI, stale pull requests, settings from the
seed's appsettings.json."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgbroker
import nats.errors
import nats.js.errors
import pytest
from msgbroker import BrokerSettings, ConfigurationError, Message, MessageContext, partition_for
from msgbroker_nats import NatsSettings, NatsTransport, TopicLayout
from msgbroker_nats._settings import server_urls
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

REPO = Path(__file__).resolve().parents[3]
MEMBER = Path(__file__).with_name("_member.py")
SEED = REPO.parent / "shared" / "seed" / "appsettings.json"


class Item(Message):
    key: str
    n: int

    @property
    def partition_key(self) -> str:
        return self.key


async def eventually(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    """Wait (bounded) until ``condition()`` — sync or async — is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


class Record:
    """What handlers saw: (member, key, n, attempt) in handling order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int, int]] = []

    def handler(self, member: str, hold: Callable[[Item], Awaitable[None]] | None = None) -> Any:
        async def handle(ctx: MessageContext[Item]) -> None:
            if hold is not None:
                await hold(ctx.message)
            self.seen.append((member, ctx.message.key, ctx.message.n, ctx.delivery_attempt))

        return handle

    def ns(self, key: str) -> list[int]:
        return [n for _, k, n, _ in self.seen if k == key]


# -- layout ------------------------------------------------------------------------------------


def test_names_escape_dots_one_to_one() -> None:
    layout = TopicLayout("MSGBROKER", "orders.eu")
    assert layout.stream == "MSGBROKER_orders~eu"
    assert layout.subjects == "MSGBROKER.orders.eu.*"
    assert layout.subject(3) == "MSGBROKER.orders.eu.3"
    assert layout.dead_letters.stream == "MSGBROKER_orders~eu~dlq"
    assert TopicLayout.consumer("billing.v2", 7) == "billing~v2_7"
    assert TopicLayout("P", "a_b").stream != TopicLayout("P", "a.b").stream
    assert TopicLayout.partition_count_of(layout.description(16)) == 16


def test_a_bad_stream_prefix_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"stream_prefix='A\.B'"):
        msgbroker.connect("nats://127.0.0.1:1", nats={"stream_prefix": "A.B"})
    with pytest.raises(ConfigurationError, match=r"stream_prefix='AB\\n'"):  # "$" matched before a final newline
        msgbroker.connect("nats://127.0.0.1:1", nats={"stream_prefix": "AB\n"})


# -- on the server -------------------------------------------------------------------------------


async def test_streams_subjects_and_consumers_live_under_the_stream_prefix(
    connect: Any, raw: Client, prefix: str
) -> None:
    topic = "orders.eu"
    item = Item(key="seat-42", n=0)
    async with connect(partition_count=4) as broker:
        await broker.publish(topic, item)
        jsm = raw.jsm()
        info = await jsm.stream_info(f"{prefix}_orders~eu")
        assert info.config.subjects == [f"{prefix}.orders.eu.*"]
        assert str(getattr(info.config.storage, "value", info.config.storage)) == "file"
        assert TopicLayout.partition_count_of(info.config.description) == 4
        partition = partition_for("seat-42", 4)
        stored = await jsm.get_msg(f"{prefix}_orders~eu", seq=1)
        assert stored.subject == f"{prefix}.orders.eu.{partition}"
        assert stored.headers is not None and "Nats-Msg-Id" not in stored.headers  # no dedup asked for

        record = Record()
        await broker.subscribe(topic, "billing.v2", record.handler("a"))
        await eventually(lambda: record.ns("seat-42") == [0], "the message to be handled")
        for p in range(4):
            consumer = await jsm.consumer_info(f"{prefix}_orders~eu", f"billing~v2_{p}")
            config = consumer.config
            assert config.filter_subject == f"{prefix}.orders.eu.{p}"
            assert config.max_ack_pending == 2 * 64  # nats.max_ack_pending, with room for acks on their way
            assert config.ack_policy == AckPolicy.EXPLICIT
            assert config.deliver_policy == DeliverPolicy.ALL
            assert config.max_deliver == -1
            assert config.ack_wait == 2.0


async def test_a_wrong_partition_count_on_an_existing_stream_is_refused(connect: Any, raw: Client, topic: str) -> None:
    async with connect(partition_count=4) as broker:
        await broker.publish(topic, Item(key="k", n=0))
    async with connect(partition_count=8) as other:
        with pytest.raises(ConfigurationError, match="partition_count=4"):
            await other.publish(topic, Item(key="k", n=1))
        with pytest.raises(ConfigurationError, match="partition_count=4"):
            await other.subscribe(topic, "g", Record().handler("b"))


async def test_dedup_is_jetstreams_own_msg_id_within_the_window(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    item = Item(key="k", n=0)
    async with connect(enable_deduplication=True, deduplication_window=30) as broker:
        await broker.publish(topic, item)
        await broker.publish(topic, item)
        await broker.publish_batch(topic, [item, Item(key="k", n=1)])
        jsm = raw.jsm()
        info = await jsm.stream_info(f"{prefix}_{topic}")
        assert info.config.duplicate_window == 30.0
        assert info.state.messages == 2, "the server stored a repeated Nats-Msg-Id inside the window"
        stored = await jsm.get_msg(f"{prefix}_{topic}", seq=1)
        assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == str(item.message_id)
    async with connect() as plain:  # without deduplication the same id is a new message (replays)
        await plain.publish(topic, item)
        assert (await raw.jsm().stream_info(f"{prefix}_{topic}")).state.messages == 3


async def test_a_publish_to_a_stream_deleted_behind_its_back_is_stored_in_the_stream_made_again(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    """The stream's 503 (no stream takes the subject) is the provider's own ack reading's to
    see: the messages were not stored, so they go again once the stream is made again."""
    async with connect(partition_count=2) as broker:
        await broker.publish(topic, Item(key="k", n=0))
        jsm = raw.jsm()
        await jsm.delete_stream(f"{prefix}_{topic}")
        await broker.publish(topic, Item(key="k", n=1))
        assert (await jsm.stream_info(f"{prefix}_{topic}")).state.messages == 1
        await jsm.delete_stream(f"{prefix}_{topic}")
        await broker.publish_batch(topic, [Item(key=f"k{n}", n=n) for n in range(300)])
        assert (await jsm.stream_info(f"{prefix}_{topic}")).state.messages == 300


async def test_publishes_that_start_together_on_a_new_connection_are_all_confirmed(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    """The first publishes of a connection subscribe to its ack inbox; fifty that start at once
    share that one subscription. Here the subscribing takes a moment (as it does when the server
    is asked to confirm it), so the others come while it is made."""
    record = Record()
    async with connect(partition_count=4) as broker:
        await broker.subscribe(topic, "g", record.handler("member"))  # the stream is open: no publish waits for it
        nc = broker.transport.nc
        subscribe = nc.subscribe

        async def slow_subscribe(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.05)
            return await subscribe(*args, **kwargs)

        nc.subscribe = slow_subscribe
        await asyncio.gather(*(broker.publish(topic, Item(key=f"k{n}", n=n)) for n in range(50)))
        assert (await raw.jsm().stream_info(f"{prefix}_{topic}")).state.messages == 50
        await eventually(lambda: len(record.seen) == 50, "the fifty handled")


async def test_a_message_the_stream_refuses_fails_the_publish_naming_the_reason(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    """A stream's error answer (here: full, with discard new) is a PublishFailedError naming the
    message and the server's reason, for one publish and for a batch."""
    from msgbroker import PublishFailedError
    from nats.js.api import DiscardPolicy

    async with connect(partition_count=2) as broker:
        await broker.publish(topic, Item(key="k", n=0))
        jsm = raw.jsm()
        config = (await jsm.stream_info(f"{prefix}_{topic}")).config
        await jsm.update_stream(replace(config, max_msgs=2, discard=DiscardPolicy.NEW))
        await broker.publish(topic, Item(key="k", n=1))
        refused = Item(key="k", n=2)
        with pytest.raises(PublishFailedError, match=f"refused message {refused.message_id}.*maximum messages"):
            await broker.publish(topic, refused)
        with pytest.raises(PublishFailedError, match="maximum messages"):
            await broker.publish_batch(topic, [Item(key="k", n=n) for n in range(3, 10)])
        assert (await jsm.stream_info(f"{prefix}_{topic}")).state.messages == 2


async def test_an_existing_consumer_is_updated_or_refused_with_a_clear_message(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    async with connect(partition_count=2) as broker:
        await broker.publish(topic, Item(key="k", n=0))
        jsm = raw.jsm()
        stream = f"{prefix}_{topic}"
        await jsm.add_consumer(stream, ConsumerConfig(
            durable_name="g_0", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=60, max_ack_pending=1000, filter_subject=f"{prefix}.{topic}.0"))
        await jsm.add_consumer(stream, ConsumerConfig(
            durable_name="h_1", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW,
            filter_subject=f"{prefix}.{topic}.1"))
        sub = await broker.subscribe(topic, "g", Record().handler("a"))
        updated = await jsm.consumer_info(stream, "g_0")
        assert (updated.config.ack_wait, updated.config.max_ack_pending) == (2.0, 2 * 64)
        await sub.close()
        with pytest.raises(ConfigurationError, match=r"'h_1'.*nats consumer rm"):
            await broker.subscribe(topic, "h", Record().handler("b"))


async def test_a_subscribe_lists_the_group_s_consumers_and_creates_only_those_missing_or_changed(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    """Each lane's consumer used to be created (or updated) with its own request at every
    subscribe, one per partition: the consumers are listed first and only those missing or with
    other settings are sent."""
    stream = f"{prefix}_{topic}"
    creates: list[str] = []

    async def seen(msg: Any) -> None:
        if ".CREATE." in msg.subject and stream in msg.subject:
            creates.append(msg.subject)

    watch = await raw.subscribe("$JS.API.CONSUMER.>", cb=seen)
    try:
        async with connect(partition_count=8) as broker:
            record = Record()
            await broker.publish(topic, Item(key="k", n=0))
            sub = await broker.subscribe(topic, "g", record.handler("a"))
            await raw.flush()
            await eventually(lambda: len(creates) == 8, "a create request per lane on the first subscribe")
            await sub.close()

            jsm = raw.jsm()
            await jsm.delete_consumer(stream, "g_5")
            changed = (await jsm.consumer_info(stream, "g_3")).config
            changed.max_ack_pending = 7
            await jsm.add_consumer(stream, changed)
            await raw.flush()
            creates.clear()
            sub = await broker.subscribe(topic, "g", record.handler("b"))
            await broker.publish(topic, Item(key="k", n=1))
            await eventually(lambda: record.ns("k") == [0, 1], "both messages handled once, in order")
            await raw.flush()
            assert sorted(s.rsplit(".", 1)[-1] for s in creates) == ["g_3", "g_5"]
            assert (await jsm.consumer_info(stream, "g_3")).config.max_ack_pending == 2 * 64
            assert (await jsm.consumer_info(stream, "g_5")).config.filter_subject == f"{prefix}.{topic}.5"
            await sub.close()
    finally:
        await watch.unsubscribe()


async def test_a_dead_members_pull_requests_take_nothing(connect: Any, raw: Client, topic: str) -> None:
    """A member that dies idle leaves pull requests behind; the server must not hand the next
    message to them (it would come back only after ack_wait, as a second attempt)."""
    dead, live = connect(partition_count=1), connect(partition_count=1)
    await dead.open()
    await live.open()
    try:
        record = Record()
        await dead.subscribe(topic, "g", record.handler("dead"))
        await dead.abort()
        await live.subscribe(topic, "g", record.handler("live"))
        await live.publish(topic, Item(key="k", n=0))
        await eventually(lambda: record.seen, "the message to be handled")
        assert record.seen == [("live", "k", 0, 1)]
    finally:
        await live.close()


async def test_a_consumer_rewound_by_a_redelivery_to_a_dead_request_hands_nothing_twice(
    connect: Any, raw: Client, topic: str
) -> None:
    """nats-server 2.9.10: a message the server takes to redeliver while the lane's only pull
    request is dead moves the consumer's stream pointer back onto that message, so once it is
    acked the consumer delivers it again as new (delivery count 1), to the next member that
    asks. Here a raw client plays the member that nak'ed with a delay and then died (its pull
    request stays queued without interest); two members join. The message is handled once, the
    next one after it, and pending_count never counts the rewound message twice."""
    other, lane_key = "d", "k"  # partitions 1 and 0 of 2
    producer, first, second = connect(partition_count=2), connect(partition_count=2), connect(partition_count=2)
    async with producer, first, second:
        transport = producer.transport
        layout = transport.layout(topic)
        await producer.publish(topic, Item(key=other, n=0))  # sequence 1, the other lane
        await producer.publish(topic, Item(key=lane_key, n=0))  # sequence 2, lane 0
        await transport.ensure_consumer(layout, "g", 0)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{layout.stream}.{layout.consumer('g', 0)}"

        inbox = raw.new_inbox()
        sub = await raw.subscribe(inbox)
        await raw.publish(next_subject, b'{"batch":1,"expires":5000000000}', reply=inbox)
        msg = await sub.next_msg(timeout=5)
        assert msg.metadata.sequence.stream == 2
        await raw.publish(msg.reply, b'-NAK {"delay":100000000}')  # back in 0.1 s
        dead = raw.new_inbox()
        dead_sub = await raw.subscribe(dead)
        await raw.publish(next_subject, b'{"batch":1,"expires":60000000000}', reply=dead)
        await raw.flush()
        await dead_sub.unsubscribe()  # the request stays queued, its interest gone
        await raw.flush()
        # No consumer-info request until the server tried the redelivery: it would drop the dead
        # request first. Then the pointer is behind the message in flight.
        await asyncio.sleep(1.0)
        jsm = raw.jsm()

        async def rewound() -> bool:
            info = await jsm.consumer_info(layout.stream, layout.consumer("g", 0))
            return info.num_ack_pending == 1 and info.delivered.stream_seq == 1

        version = raw.connected_server_version
        if (version.major, version.minor) == (2, 9):
            await eventually(rewound, "the consumer to be rewound onto the message in flight")
            # Lane 0's message counts twice (in flight, and again behind the rewound pointer)
            # until it is settled: many messages may be in flight, so no one of them is singled out.
            assert await producer.pending_count(topic, "g") == 3
        else:  # not so on nats-server 2.15.3: the pointer stays on the message in flight
            info = await jsm.consumer_info(layout.stream, layout.consumer("g", 0))
            assert (info.num_ack_pending, info.delivered.stream_seq) == (1, 2), info
            assert await producer.pending_count(topic, "g") == 2  # lane 0: 1 in flight; lane 1: 1 new

        record = Record()
        await first.subscribe(topic, "g", record.handler("first"))
        await second.subscribe(topic, "g", record.handler("second"))
        await eventually(lambda: record.ns(lane_key), "the message back after ack_wait")
        await producer.publish(topic, Item(key=lane_key, n=1))
        await eventually(lambda: record.ns(lane_key)[-1:] == [1], "the next message of the lane")
        assert record.ns(lane_key) == [0, 1]
        assert record.ns(other) == [0]
        await eventually(lambda: _pending_is(producer, topic, 0), "nothing pending at the end")


async def test_a_delivery_lost_as_a_member_closed_is_waited_for_and_not_an_attempt(
    connect: Any, raw: Client, topic: str
) -> None:
    """A member that closes while its pull request is open can lose a delivery: the server sent
    the next message to its inbox just before it saw the unsubscribe (on a cluster, while the
    unsubscribe travels between nodes), counted it delivered, and redelivers it only after
    ack_wait. Here a raw client plays that member's last delivery (taken, never settled) after
    the member closed the lane. The next owner must not hand the message after it first (that
    overtook it: an order violation), and the lost delivery is not an attempt."""
    first, second = connect(partition_count=1), connect(partition_count=1)
    record = Record()
    async with first, second:
        transport = first.transport
        layout = transport.layout(topic)
        sub = await first.subscribe(topic, "g", record.handler("first"))
        await first.publish(topic, Item(key="k", n=0))
        await eventually(lambda: record.ns("k") == [0], "the first message handled")
        await sub.close()
        await first.publish(topic, Item(key="k", n=1))
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{layout.stream}.{layout.consumer('g', 0)}"
        inbox = raw.new_inbox()
        lost = await raw.subscribe(inbox)
        await raw.publish(next_subject, b'{"batch":1,"expires":5000000000}', reply=inbox)
        msg = await lost.next_msg(timeout=5)  # delivered, never reaches a member
        assert msg.metadata.sequence.stream == 2
        await lost.unsubscribe()
        await first.publish(topic, Item(key="k", n=2))
        await second.subscribe(topic, "g", record.handler("second"))
        await eventually(lambda: len(record.ns("k")) == 3, "the lost message back after ack_wait")
        assert record.seen == [("first", "k", 0, 1), ("second", "k", 1, 1), ("second", "k", 2, 1)]


async def test_a_delivery_lost_while_a_member_owns_the_lane_is_waited_for(
    connect: Any, raw: Client, topic: str
) -> None:
    """A delivery of the lane's consumer can go to a pull request that is not the owner's and
    be lost: on a cluster, a request of a member that closed the lane (its unsubscribe still
    travelling between nodes) waits at the consumer beside the owner's, and the server serves
    waiting requests in turn. Here a raw client's request plays that one: it takes a message in
    the middle of the lane and never settles it. The owner sees a gap in the consumer's delivery
    sequence and hands nothing after it until the message is back (after ack_wait): the message
    behind it must not overtake it (it did before), and the lost delivery is not an attempt."""
    member = connect(partition_count=1)
    record = Record()
    async with member:
        layout = member.transport.layout(topic)
        await member.subscribe(topic, "g", record.handler("member"))
        await member.publish(topic, Item(key="k", n=0))
        await eventually(lambda: record.ns("k") == [0], "the first message handled")
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{layout.stream}.{layout.consumer('g', 0)}"
        inbox = raw.new_inbox()
        thief = await raw.subscribe(inbox)
        await raw.publish(next_subject, b'{"batch":1,"expires":30000000000}', reply=inbox)
        await raw.flush()
        n = 1
        taken = None
        while taken is None and n < 20:
            await member.publish(topic, Item(key="k", n=n))
            n += 1
            with contextlib.suppress(nats.errors.TimeoutError):
                taken = await thief.next_msg(timeout=0.3)
        assert taken is not None, "the server never served the second pull request while the member's waited"
        await thief.unsubscribe()
        stolen = Item.model_validate_json(taken.data).n
        await member.publish(topic, Item(key="k", n=n))  # behind the stolen one
        await eventually(lambda: len(record.ns("k")) == n + 1, "the stolen message back after ack_wait")
        # In order, and the lost delivery is not an attempt.
        assert record.seen == [("member", "k", i, 1) for i in range(n + 1)], f"stolen: {stolen}"


@pytest.mark.parametrize("leaves", ["dies", "closes"])
async def test_a_delayed_message_of_a_member_that_left_keeps_counting_its_attempts(
    connect: Any, raw: Client, topic: str, leaves: str
) -> None:
    """A member delays a message and dies, or closes its subscription, before it is due: the
    server redelivers it into the member's dead pull request (on nats-server 2.9.10 that rewinds
    the consumer, and the message comes to the next member again as new, delivery count 1). The
    next member's attempt is the second all the same (its attempt record says so), never a first
    again (the conformance state machine saw both)."""
    dead, live = connect(partition_count=1), connect(partition_count=1)
    record = Record()
    delayed = asyncio.Event()

    async def delay_once(ctx: MessageContext[Item]) -> None:
        record.seen.append(("dead", ctx.message.key, ctx.message.n, ctx.delivery_attempt))
        await ctx.delay(0.3)
        delayed.set()

    await dead.open()
    async with live:
        sub = await dead.subscribe(topic, "g", delay_once)
        await dead.publish(topic, Item(key="k", n=0))
        await asyncio.wait_for(delayed.wait(), 10)
        if leaves == "dies":
            await dead.abort()
        else:
            await sub.close()
        await asyncio.sleep(1.0)  # due meanwhile: sent to the dead member's request
        await live.subscribe(topic, "g", record.handler("live"))
        await eventually(lambda: len(record.seen) == 2, "the message handled by the live member")
        assert record.seen == [("dead", "k", 0, 1), ("live", "k", 0, 2)]
    if leaves == "closes":
        await dead.close()


async def _pending_is(broker: msgbroker.Broker, topic: str, count: int) -> bool:
    return await broker.pending_count(topic, "g") == count


async def test_a_long_handler_on_a_live_member_is_not_redelivered(connect: Any, raw: Client, topic: str) -> None:
    """+WPI keeps a message that runs past ack_wait with its live member."""
    ack_wait = 1.0
    first, second = connect(partition_count=1, nats={"ack_wait": ack_wait}), connect(
        partition_count=1, nats={"ack_wait": ack_wait})
    release = asyncio.Event()
    started = asyncio.Event()

    async def hold(item: Item) -> None:
        if item.n == 0:
            started.set()
            await release.wait()

    async with first, second:
        record = Record()
        await first.subscribe(topic, "g", record.handler("first", hold))
        await first.publish_batch(topic, [Item(key="k", n=0), Item(key="k", n=1)])
        await asyncio.wait_for(started.wait(), 10)
        await second.subscribe(topic, "g", record.handler("second", hold))
        # Observe for several ack_wait periods: nobody else may get message 0 (or 1, behind it).
        await asyncio.sleep(3.5 * ack_wait)
        assert record.seen == [], f"redelivered while its handler was running: {record.seen}"
        release.set()
        await eventually(lambda: record.ns("k") == [0, 1], "both messages, in order")
        assert [attempt for *_, attempt in record.seen] == [1, 1]
        assert await first.pending_count(topic, "g") == 0


@pytest.mark.parametrize("ack_wait", [2.0, None], ids=["ack-wait-2s", "default-settings"])
async def test_a_killed_member_process_hands_its_in_flight_message_over(
    connect: Any, raw: Client, prefix: str, topic: str, nats_url: str, tmp_path: Path, ack_wait: float | None
) -> None:
    """SIGKILL a member process mid-handler: after ack_wait a live member gets the message (as
    attempt 2) before everything behind it, and nothing is lost. Also with the provider's default
    ack_wait (issue: a dead member's message must move within 10 s by default); the time is
    printed (pytest -s)."""
    path = tmp_path / "record.txt"
    path.touch()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(MEMBER), nats_url, prefix, topic, "g", "2", "2", str(path),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
             "MEMBER_ACK_WAIT": "default" if ack_wait is None else str(ack_wait)},
    )
    wait = ack_wait or NatsSettings().ack_wait.total_seconds()
    try:
        await eventually(lambda: "ready" in path.read_text(), "the member process to subscribe")
        async with connect(partition_count=2, nats={"ack_wait": wait}) as broker:
            await broker.publish_batch(topic, [Item(key="a", n=n) for n in range(5)])
            await eventually(lambda: "holding:a:2" in path.read_text(), "the member to hold message 2")
            record = Record()
            await broker.subscribe(topic, "g", record.handler("live"))
            process.send_signal(signal.SIGKILL)
            await process.wait()
            killed_at = time.monotonic()
            await eventually(lambda: record.ns("a")[:1] == [2], "the held message on the live member", 60)
            print(f"failover (ack_wait {wait:g}s): the held message was handled again "
                  f"{time.monotonic() - killed_at:.1f}s after the kill")
            await eventually(lambda: record.ns("a") == [2, 3, 4], "the rest of the lane on the live member")
            handled_there = [line for line in path.read_text().splitlines() if line.startswith("a:")]
            assert [line.split(":")[1] for line in handled_there] == ["0", "1"]
            assert record.seen[0][3] == 2, "the killed member's message must come back as attempt 2"
            assert await broker.pending_count(topic, "g") == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_server_restart_mid_stream_loses_nothing(connect: Any, raw: Client, topic: str) -> None:
    """Publishing and handling go on while nats-server restarts (file storage): every message
    published is handled, first handlings in order per key, and nothing stays unsettled. A
    restart longer than the lease time (1 s with the tests' ack_wait) ends the member's leases
    on nats-server 2.10 and later, which expire the bucket's keys as it starts again: acks sent
    meanwhile are dropped (fenced), and those messages come back and are handled again —
    duplicates, never a loss or a reorder of first handlings."""
    keys = [f"k{i}" for i in range(8)]
    restarted = asyncio.Event()
    published: list[int] = []
    async with connect(partition_count=4, enable_deduplication=True, deduplication_window=120) as broker:
        record = Record()
        await broker.subscribe(topic, "g", record.handler("a"))

        async def publish_until_after_the_restart() -> None:
            after = 0
            n = 0
            while after < 10:
                batch = [Item(key=k, n=n) for k in keys]
                while True:  # a publish cut by the restart is retried; dedup keeps it once
                    try:
                        await broker.publish_batch(topic, batch)
                        break
                    except msgbroker.TransientError:
                        await asyncio.sleep(0.1)
                published.append(n)
                n += 1
                after += 1 if restarted.is_set() else 0
                await asyncio.sleep(0.02)

        publisher = asyncio.create_task(publish_until_after_the_restart())
        await eventually(lambda: len(record.seen) >= 40, "some messages before the restart")
        process = await asyncio.create_subprocess_exec(
            str(REPO / "scripts" / "brokers"), "restart", "nats",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()[-2000:]
        restarted.set()
        await asyncio.wait_for(publisher, 60)
        total = len(published)
        await eventually(lambda: all(total - 1 in record.ns(k) for k in keys), "every key to the end", 60)
        await eventually(lambda: broker.is_healthy(), "the broker to be healthy again")

        async def settled() -> bool:
            return await broker.pending_count(topic, "g") == 0

        await eventually(settled, "nothing unsettled", 30)
        for key in keys:
            seen = record.ns(key)
            assert sorted(set(seen)) == list(range(total)), f"{key}: lost {set(range(total)) - set(seen)}"
            firsts = list(dict.fromkeys(seen))
            assert firsts == sorted(firsts), f"{key} first handled out of order: {firsts}"


async def _brokers(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "brokers"), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    assert process.returncode == 0, f"scripts/brokers {' '.join(args)}: {output.decode()[-2000:]}"


async def test_publishes_the_server_does_not_answer_are_indeterminate_at_the_deadline_and_later_ones_are_stored(
    connect: Any, raw: Client, topic: str, monkeypatch: Any
) -> None:
    """Single ``publish()`` calls wait for their acks without a timer each (see
    ``NatsTransport._publish_one``): one task fails them at the publish deadline. The server is
    paused (SIGSTOP) while several callers publish: each gets PublishIndeterminateError once the
    deadline (1.5 s here, 10 s by default) passed, not later and not never; after the server
    resumes, a publish is confirmed and stored."""
    monkeypatch.setattr("msgbroker_nats._transport._PUBLISH_TIMEOUT", 1.5)
    async with connect(partition_count=4) as broker:
        await broker.publish(topic, Item(key="k", n=0))  # the stream exists: the pause hits the acks only
        await _brokers("pause", "nats")
        try:
            started = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(broker.publish(topic, Item(key=f"k{i}", n=i)) for i in range(1, 6)),
                               return_exceptions=True), 30)
            waited = time.monotonic() - started
        finally:
            await _brokers("resume", "nats")
        kinds = [type(r).__name__ for r in results]
        assert kinds == ["PublishIndeterminateError"] * 5, f"publishes while the server was paused: {results}"
        assert waited >= 1.4, f"the publishes gave up after {waited:.2f}s, before their 1.5-s deadline"
        await broker.publish(topic, Item(key="k", n=6))
        record = Record()
        await broker.subscribe(topic, "g", record.handler("a"))
        await eventually(lambda: record.ns("k") == [0, 6], f"n=0 and n=6 of key k to be handled: {record.ns('k')}")


async def test_a_round_trip_cut_short_leaves_the_connection_reading(connect: Any, topic: str) -> None:
    """A flush (PING) whose waiter is cancelled before its PONG is read — what ``is_healthy()``
    or ``pending_count()`` leave behind while the server is paused — must not end nats-py's read
    loop: nats-py 2.16 sets the result of the cancelled future, and the connection then wrote
    but read nothing until a stale-connection reconnect (publishes unconfirmed, so retried and
    stored again). Deterministic: the flush task sends its PING and is cancelled before the
    event loop can read the PONG."""
    async with connect(partition_count=1) as broker:
        nc = broker.transport.nc
        flush = asyncio.ensure_future(nc.flush(timeout=5))
        await asyncio.sleep(0)  # the PING is written and its future queued; the PONG is not read yet
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        await broker.publish(topic, Item(key="k", n=1))  # confirmed: the read loop still runs
        record = Record()
        await broker.subscribe(topic, "g", record.handler("a"))
        await eventually(lambda: record.ns("k") == [1], "the message to be handled")
        assert await broker.is_healthy()


async def test_the_seeds_appsettings_nats_section_drives_the_provider(
    nats_url: str, raw: Client, tmp_path: Path, topic: str, delete_streams: Any
) -> None:
    if not SEED.is_file():
        pytest.fail(f"the seed's settings file {SEED} is missing", pytrace=False)
    settings = BrokerSettings.from_file(SEED, provider="nats", nats={"url": nats_url})
    assert settings.nats.stream_prefix == "MSGBROKER"
    assert settings.nats.ack_wait.total_seconds() == 30
    assert settings.nats.max_age.total_seconds() == 7 * 86400
    assert settings.nats.max_deliver == 5
    try:
        async with msgbroker.connect(settings, partition_count=2) as broker:
            assert isinstance(broker.transport, NatsTransport)
            await broker.publish(topic, Item(key="k", n=0))
            record = Record()
            await broker.subscribe(topic, "g", record.handler("a"))
            await eventually(lambda: record.ns("k") == [0], "the message")
            jsm = raw.jsm()
            stream = await jsm.stream_info(f"MSGBROKER_{topic}")
            assert stream.config.max_age == 7 * 86400
            consumer = await jsm.consumer_info(f"MSGBROKER_{topic}", "g_0")
            assert consumer.config.ack_wait == 30.0
            assert consumer.config.max_deliver == -1  # MaxDeliver never lets the server drop: see the docs
    finally:
        jsm = raw.jsm()
        for name in (f"MSGBROKER_{topic}", f"MSGBROKER_{topic}~dlq"):
            try:
                await jsm.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass

    # A changed copy: what the file says is what the server gets.
    text = SEED.read_text(encoding="utf-8").replace('"StreamPrefix": "MSGBROKER"', '"StreamPrefix": "SEEDCOPY"')
    text = text.replace('"AckWait": "00:00:30"', '"AckWait": "00:00:07"')
    copy = tmp_path / "appsettings.json"
    copy.write_text(text, encoding="utf-8")
    changed = BrokerSettings.from_file(copy, provider="nats", nats={"url": nats_url})
    try:
        async with msgbroker.connect(changed, partition_count=2) as broker:
            await broker.subscribe(topic, "g", Record().handler("a"))
            consumer = await raw.jsm().consumer_info(f"SEEDCOPY_{topic}", "g_1")
            assert consumer.config.ack_wait == 7.0
    finally:
        await delete_streams(raw, "SEEDCOPY")


async def test_pending_by_partition_and_peek_read_without_delivering(connect: Any, raw: Client, topic: str) -> None:
    release = asyncio.Event()

    async def hold(item: Item) -> None:
        if item.n == 1:
            await release.wait()

    async with connect(partition_count=2) as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)
        items = [Item(key="a", n=n) for n in range(4)]
        await broker.publish_batch(topic, items)
        partition = partition_for("a", 2)
        assert await transport.pending_by_partition(topic, "g") == {partition: 4}
        peeked = await transport.peek(topic, "g", 10)
        assert [d.message_id for d in peeked] == [str(i.message_id) for i in items]
        assert {d.attempt for d in peeked} == {0}
        record = Record()
        await broker.subscribe(topic, "g", record.handler("a", hold))
        await eventually(lambda: record.ns("a") == [0], "message 0, with message 1 held in its handler")
        async def three_left() -> bool:
            return await transport.pending_by_partition(topic, "g") == {partition: 3}

        await eventually(three_left, "3 pending: message 1 in its handler, 2 and 3 read ahead behind it")
        peeked = await transport.peek(topic, "g", 2)
        assert [d.message_id for d in peeked] == [str(i.message_id) for i in items[1:3]]
        assert [d.attempt for d in peeked] == [1, 1]  # read ahead: delivered to the member once
        release.set()
        await eventually(lambda: record.ns("a") == [0, 1, 2, 3], "the rest")
        assert await transport.pending_by_partition(topic, "g") == {}


async def test_a_message_that_kills_its_workers_reaches_the_dead_letters_one_crash_later(
    connect: Any, raw: Client, topic: str
) -> None:
    """A first delivery that dies with its member is in doubt (it may have been read ahead, or
    acked a moment before): the next member gets it as attempt 2, not counted as a failure, and
    records that attempt's start before its handler runs; when that member dies too, the next
    one counts the failure and — past max_retry_attempts — dead-letters it unhandled."""
    first, second, live = (connect(partition_count=1, max_retry_attempts=1) for _ in range(3))
    started: list[int] = []

    async def hang(ctx: MessageContext[Item]) -> None:
        started.append(ctx.delivery_attempt)
        await asyncio.Event().wait()

    await first.open()
    await second.open()
    async with live:
        await first.subscribe(topic, "g", hang, message_type=Item)
        item = Item(key="k", n=0)
        await live.publish(topic, item)
        await eventually(lambda: started == [1], "the first member to start the message")
        await first.abort()
        await second.subscribe(topic, "g", hang, message_type=Item)
        await eventually(lambda: started == [1, 2], "the second member to start it as attempt 2")
        await second.abort()
        record = Record()
        await live.subscribe(topic, "g", record.handler("live"))

        async def dead_lettered() -> bool:
            return bool(await live.dead_letters(topic, "g"))

        await eventually(dead_lettered, "the message in the dead letters after the second crash")
        (letter,) = await live.dead_letters(topic, "g")
        assert letter.message_id == str(item.message_id)
        assert letter.attempts == 3 and "died" in letter.error
        assert record.seen == [], "a message past its last attempt must not be handled again"
        assert await live.pending_count(topic, "g") == 0


async def test_no_server_at_the_url_is_a_connection_error_naming_it() -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    with pytest.raises(msgbroker.BrokerConnectionError, match=f"127.0.0.1:{port}"):
        await asyncio.wait_for(msgbroker.connect(url).open(), 30)


async def test_a_pinned_partition_stays_with_its_holder_until_it_closes(connect: Any, raw: Client, topic: str) -> None:
    count, partition = 4, 1
    shared, pinned = connect(partition_count=count), connect(partition_count=count)
    async with shared, pinned:
        record = Record()
        holder = await pinned.subscribe_to_partition(topic, "g", partition, record.handler("pinned"))
        everywhere = await shared.subscribe(topic, "g", record.handler("shared"))
        await eventually(lambda: len(everywhere.partitions) == count - 1, "the shared member to take the others")
        assert partition not in everywhere.partitions and holder.partitions == [partition]
        keys = [f"key-{i}" for i in range(40)]
        await shared.publish_batch(topic, [Item(key=k, n=0) for k in keys])
        await eventually(lambda: len(record.seen) == len(keys), "every message")
        for member, key, _, _ in record.seen:
            assert (member == "pinned") == (partition_for(key, count) == partition), (member, key)
        await holder.close()
        await eventually(lambda: partition in everywhere.partitions, "the shared member to take the lane")
        await shared.publish(topic, Item(key=next(k for k in keys if partition_for(k, count) == partition), n=1))
        await eventually(lambda: any(n == 1 and m == "shared" for m, _, n, _ in record.seen),
                         "the lane on the shared member")


async def test_a_delay_is_not_counted_as_a_failure_by_the_next_member(connect: Any, raw: Client, topic: str) -> None:
    """The failed-attempt record travels with the message (KV bucket ``<prefix>_attempts``):
    delayed on one member, failed once on the next, it is retried, not dead-lettered."""
    first, second = connect(partition_count=1, max_retry_attempts=2), connect(partition_count=1, max_retry_attempts=2)
    delayed = asyncio.Event()

    async def delay_it(ctx: MessageContext[Item]) -> None:
        await ctx.delay(0.3)
        delayed.set()

    attempts: list[int] = []

    async def fail_once(ctx: MessageContext[Item]) -> None:
        attempts.append(ctx.delivery_attempt)
        if len(attempts) == 1:
            raise RuntimeError("the one real failure")

    async with first, second:
        sub = await first.subscribe(topic, "g", delay_it)
        await first.publish(topic, Item(key="k", n=0))
        await asyncio.wait_for(delayed.wait(), 10)
        await sub.close()
        await second.subscribe(topic, "g", fail_once)
        await eventually(lambda: len(attempts) == 2, "a failure, then a successful attempt")
        assert attempts == [2, 3]
        assert await second.dead_letters(topic, "g") == []
        assert await second.pending_count(topic, "g") == 0


# -- clusters: several servers, replicas (against the single server) -------------------------------


def test_several_servers_and_replicas_are_settings() -> None:
    settings = BrokerSettings(nats={"url": ["nats://n1:4222", "nats://n2:4222"], "replicas": 3})
    assert settings.nats.url == "nats://n1:4222,nats://n2:4222"
    assert server_urls(settings.nats.url) == ["nats://n1:4222", "nats://n2:4222"]
    assert server_urls("nats://a:1, nats://b:2,") == ["nats://a:1", "nats://b:2"]
    assert BrokerSettings().nats.replicas == 1
    for bad in (0, 6):
        with pytest.raises(ConfigurationError, match=r"nats\.replicas"):
            BrokerSettings(nats={"replicas": bad})


async def test_a_list_of_servers_connects_to_one_that_answers(nats_url: str, prefix: str, topic: str) -> None:
    """The first server is not there: nats-py goes on to the next one of its ``servers``."""
    async with msgbroker.connect(f"nats://127.0.0.1:1,{nats_url}", nats={"stream_prefix": prefix}) as broker:
        await broker.publish(topic, Item(key="k", n=1))
        assert await broker.pending_count(topic, "g") == 1


async def test_more_replicas_than_a_single_server_keeps_are_refused_naming_the_setting(connect: Any,
                                                                                        topic: str) -> None:
    async with connect(nats={"replicas": 3}) as broker:
        with pytest.raises(ConfigurationError, match=r"nats\.replicas=3"):
            await broker.publish(topic, Item(key="k", n=1))


@pytest.mark.parametrize("partitions", [4, 64])
async def test_a_group_past_the_stream_s_consumer_limit_is_refused_naming_nats_max_consumers(
    connect: Any, raw: Client, topic: str, partitions: int
) -> None:
    """Each group takes a consumer per partition, and a stream may have ``nats.max_consumers``
    (nats-server 2.15 sets 1,000 on a stream that sets none: 1,024 partitions did not fit one
    group). The stream is created with the setting; a group past it is refused in an error that
    names the setting, not one that calls the consumer's settings unchangeable. With more lanes
    than a member opens at once (64) the consumers are made as the lanes open: the refusal
    still reaches ``subscribe``."""
    limit = partitions + partitions // 2
    async with connect(partition_count=partitions, nats={"max_consumers": limit}) as broker:
        await broker.publish(topic, Item(key="k", n=1))
        layout = broker.live_transport().layout(topic)  # type: ignore[attr-defined]
        info = await raw.jsm().stream_info(layout.stream)
        assert info.config.max_consumers == limit, f"created with max_consumers={info.config.max_consumers}"
        await broker.subscribe(topic, "first", Record().handler("a"))
        with pytest.raises(ConfigurationError, match=rf"nats\.max_consumers \(now {limit}") as refused:
            await broker.subscribe(topic, "second", Record().handler("b"))
        assert "cannot be changed" not in str(refused.value), str(refused.value)


async def test_a_stream_s_consumer_limit_is_raised_to_nats_max_consumers_where_the_server_allows_it(
    connect: Any, raw: Client, topic: str
) -> None:
    """A stream created with a smaller limit (nats-server 2.15's default, or a smaller setting
    before) gets ``nats.max_consumers`` when a connection with a larger one opens it: nats-server
    2.13 and later change it in place; an older server refuses, and the limit stays (the
    consumer that does not fit then names the setting, see the test above)."""
    async with connect(partition_count=4, nats={"max_consumers": 4}) as first:
        await first.publish(topic, Item(key="k", n=1))
    async with connect(partition_count=4, nats={"max_consumers": 12}) as second:
        await second.publish(topic, Item(key="k", n=2))
        layout = second.live_transport().layout(topic)  # type: ignore[attr-defined]
        info = await raw.jsm().stream_info(layout.stream)
        server = raw.connected_server_version
        version = (server.major, server.minor)
        if version >= (2, 13):
            assert info.config.max_consumers == 12, f"max_consumers stayed {info.config.max_consumers} on {version}"
            await second.subscribe(topic, "first", Record().handler("a"))
            await second.subscribe(topic, "second", Record().handler("b"))  # 8 consumers: past the old 4
        else:
            assert info.config.max_consumers == 4, f"max_consumers {info.config.max_consumers} on {version}"


async def test_a_heartbeat_waits_a_moment_for_the_pins_bucket_to_answer_again(
    connect: Any, raw: Client, prefix: str, topic: str
) -> None:
    """A cluster electing a leader for the pins bucket's stream (a node restarted) answers a
    write with "no responders" for a moment: a subscribe's first heartbeat then failed the
    subscribe (seen in the cluster conformance run). The stream gone for 0.3 s stands in for the
    election here: the heartbeat goes through once it is back."""
    async with connect() as broker:
        transport = broker.transport
        assert isinstance(transport, NatsTransport)
        assert await transport.heartbeat(topic, "g", "m1", 5) == ["m1"]
        js = raw.jsm()
        name = f"KV_{prefix}_pins"
        config = (await js.stream_info(name)).config
        await js.delete_stream(name)

        async def back() -> None:
            await asyncio.sleep(0.3)
            await js.add_stream(config)

        returning = asyncio.create_task(back())
        assert await transport.heartbeat(topic, "g", "m2", 5) == ["m2"]
        await returning



class _Listener:
    """The engine's side of an ordered subscription, for a lane consumer driven by hand."""

    ordered = True
    closing = False

    async def assigned(self, partitions: Any) -> None:
        pass

    async def revoked(self, partitions: Any) -> None:
        pass


async def _next_delivery(consumer: Any) -> Any:
    wake = asyncio.Event()
    for _ in range(100):
        got = await consumer.poll([0], 1, 0.2, wake)
        if got:
            return got[0]
    raise AssertionError("nothing delivered within 20 s")


async def test_a_redelivery_whose_start_was_recorded_as_its_lane_closed_is_not_a_failure(
    connect: Any, topic: str
) -> None:
    """Before a handler gets a redelivered message, its member records that this delivery began
    (so that a death in it counts as a failure). When the lane closes while that record is being
    written, no handler gets the delivery and it is handed back as read ahead: the next member
    counted the recorded start as one more failure all the same, and dead-lettered the message an
    attempt early (the conformance volume tier: handled 3 times with max_retry_attempts=4, dead-
    lettered, and the next message of its partition handed before it was settled). The lane
    consumers are driven as the engine drives them, the lane closed as at a rebalance."""
    broker = connect(partition_count=1, max_retry_attempts=4)
    async with broker:
        await broker.publish(topic, Item(key="k", n=0))
        transport = broker.transport
        first = transport.consumer(topic, "g", "first")
        await first.start(_Listener(), None)
        await first.open_lane(0, None)
        delivery = await _next_delivery(first)
        for failures in (1, 2):  # two handlings failed (the engine's retry)
            delivery.failures = failures
            await first.retry(delivery, delivery.attempt + 1, None)
            delivery.attempt += 1
            if failures == 1:
                delivery = await _next_delivery(first)
        real = first._record_start
        recorded = asyncio.Event()

        async def slow_start(*args: Any) -> None:
            await real(*args)  # the third delivery's start is written; the answer comes late
            recorded.set()
            await asyncio.sleep(0.5)

        first._record_start = slow_start
        polling = asyncio.ensure_future(first.poll([0], 1, 5.0, asyncio.Event()))
        await asyncio.wait_for(recorded.wait(), 10)
        await first.close_lane(0)  # revoked meanwhile
        assert await polling == []  # no handler got the third delivery
        await first.stop(True)
        second = transport.consumer(topic, "g", "second")
        await second.start(_Listener(), None)
        await second.open_lane(0, None)
        again = await _next_delivery(second)
        assert (again.attempt, again.failures) == (3, 2)
        await second.ack(again)
        await second.stop(True)


async def test_a_redelivery_handed_by_a_poll_still_running_as_its_lane_closed_is_not_a_failure(
    connect: Any, topic: str
) -> None:
    """A poll hands the lanes' messages one lane after another: a redelivery of lane 0 has its
    start recorded and is taken, then the poll waits on lane 1 (its own start record) while lane
    0 is revoked. No handler got lane 0's redelivery (the engine drops what a poll brings for a
    lane it stopped, later), so the close counts it as read ahead and says in its record that it
    began no handling; the next member counted one failure too many before."""
    broker = connect(partition_count=2, max_retry_attempts=4)
    keys = {partition_for(f"k{n}", 2): f"k{n}" for n in range(20)}
    async with broker:
        for partition in (0, 1):
            await broker.publish(topic, Item(key=keys[partition], n=partition))
        transport = broker.transport
        first = transport.consumer(topic, "g", "first")
        await first.start(_Listener(), None)
        await first.open_lane(0, None)
        await first.open_lane(1, None)
        wake = asyncio.Event()
        deliveries: dict[int, Any] = {}
        while len(deliveries) < 2:
            for delivery in await first.poll([0, 1], 1, 0.2, wake):
                deliveries[delivery.partition] = delivery
        for failures in (1, 2):  # two handlings of each failed (the engine's retry)
            for partition in (0, 1):
                delivery = deliveries[partition]
                delivery.failures = failures
                await first.retry(delivery, delivery.attempt + 1, None)
                delivery.attempt += 1
            if failures == 1:
                deliveries.clear()
                while len(deliveries) < 2:
                    for delivery in await first.poll([0, 1], 1, 0.2, wake):
                        deliveries[delivery.partition] = delivery
        real = first._record_start
        waiting = asyncio.Event()

        async def slow_on_lane_1(lane: Any, item: Any, failures: int) -> None:
            await real(lane, item, failures)
            if lane.partition == 1:
                waiting.set()
                await asyncio.sleep(1.0)

        first._record_start = slow_on_lane_1
        await asyncio.sleep(0.3)  # both third deliveries are in
        polling = asyncio.ensure_future(first.poll([0, 1], 1, 5.0, wake))
        await asyncio.wait_for(waiting.wait(), 10)
        await first.close_lane(0)  # revoked while the poll still runs
        second = transport.consumer(topic, "g", "second")
        await second.start(_Listener(), None)
        await second.open_lane(0, None)
        again = await _next_delivery(second)
        assert (again.attempt, again.failures) == (3, 2)
        taken = await polling  # what the engine then drops (its lane stopped) and unreads
        await first.unread([d for d in taken if d.partition == 0])
        await second.ack(again)
        await second.stop(True)
        await first.stop(True)
