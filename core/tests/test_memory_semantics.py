"""docs/semantics.md on the in-memory provider: every rule, through the public API."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import defaultdict
from typing import Any

import msgbroker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgbroker import (
    AlreadySettledError,
    InvalidNameError,
    Message,
    MessageContext,
    MessageTooLargeError,
    OutgoingRecord,
    partition_for,
)
from msgbroker.testing import eventually


class Order(Message):
    key: str
    seq: int
    note: str = ""

    @property
    def partition_key(self) -> str:
        return self.key


def connect(name: str | None = None, **overrides: Any) -> msgbroker.Broker:
    options: dict[str, Any] = {"partition_count": 8, "retry_delay": 0, "memory": {"claim_timeout": 0.5}}
    options.update(overrides)
    return msgbroker.connect(f"memory://{name or uuid.uuid4().hex}", **options)


class Recorder:
    """Records every handling: (member, key, seq, attempt, partition)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int, int, int]] = []
        self.active: dict[int, int] = defaultdict(int)
        self.max_active_per_partition = 0

    def handler(self, member: str, fail: Any = None, work: float = 0.0):  # type: ignore[no-untyped-def]
        async def handle(ctx: MessageContext[Order]) -> None:
            self.active[ctx.partition] += 1
            self.max_active_per_partition = max(self.max_active_per_partition, self.active[ctx.partition])
            try:
                self.seen.append((member, ctx.message.key, ctx.message.seq, ctx.delivery_attempt, ctx.partition))
                if work:
                    await asyncio.sleep(work)
                if fail is not None:
                    await fail(ctx)
            finally:
                self.active[ctx.partition] -= 1

        return handle

    def keys_in_order(self) -> bool:
        last: dict[str, int] = {}
        for _, key, seq, _, _ in self.seen:
            if seq < last.get(key, -1):
                return False
            last[key] = seq
        return True

    def distinct(self) -> set[tuple[str, int]]:
        return {(k, s) for _, k, s, _, _ in self.seen}


async def test_round_trip_keeps_every_field() -> None:
    async with connect() as broker:
        got: list[MessageContext[Order]] = []

        async def handle(ctx: MessageContext[Order]) -> None:
            got.append(ctx)

        await broker.subscribe("orders", "g", handle)
        sent = Order(key="k1", seq=7, note="ünïcode ✓", correlation_id="corr-1")
        await broker.publish("orders", sent, headers={"tenant": "acme", "x/weird\"": "a b"})
        await eventually(lambda: len(got) == 1)
        ctx = got[0]
        assert ctx.message == sent
        assert ctx.message_id == str(sent.message_id)
        assert ctx.topic == "orders" and ctx.partition == partition_for("k1", 8)
        assert ctx.delivery_attempt == 1
        assert ctx.headers == {"tenant": "acme", "x/weird\"": "a b"}
        assert ctx.settled == "ack"


async def test_messages_published_before_the_first_worker_are_received() -> None:
    async with connect() as broker:
        await broker.publish_batch("t", [Order(key=f"k{i}", seq=i) for i in range(20)])
        rec = Recorder()
        await broker.subscribe("t", "late", rec.handler("a"))
        await eventually(lambda: len(rec.distinct()) == 20)


async def test_a_publisher_s_loop_lets_a_waiting_subscriber_run() -> None:
    # A publish yields to the event loop only while a consumer waits for news or was woken and
    # has not run yet: a publisher that publishes one message after another with nothing else
    # to await must still not keep a subscriber from handling until its loop ends (a network
    # round trip would not).
    async with connect() as broker:
        rec = Recorder()
        await broker.subscribe("t", "g", rec.handler("a"))
        await broker.publish("t", Order(key="warm", seq=0))
        await eventually(lambda: len(rec.seen) == 1)
        handled_while_publishing = 0
        for i in range(1, 501):
            await broker.publish("t", Order(key=f"k{i % 7}", seq=i))
            handled_while_publishing = len(rec.seen) - 1
        assert handled_while_publishing > 0
        await eventually(lambda: len(rec.distinct()) == 501)
        assert rec.keys_in_order()


async def test_every_group_gets_every_message_and_one_member_each_within_a_group() -> None:
    name = uuid.uuid4().hex
    brokers = [connect(name) for _ in range(4)]
    for b in brokers:
        await b.open()
    try:
        a, b = Recorder(), Recorder()
        for i, broker in enumerate(brokers[:2]):
            await broker.subscribe("t", "group-a", a.handler(f"a{i}"))
        for i, broker in enumerate(brokers[2:]):
            await broker.subscribe("t", "group-b", b.handler(f"b{i}"))
        await brokers[0].publish_batch("t", [Order(key=f"k{i % 13}", seq=i) for i in range(200)])
        await eventually(lambda: len(a.distinct()) == 200 and len(b.distinct()) == 200)
        assert len(a.seen) == 200 and len(b.seen) == 200  # no message twice within a group
        assert a.keys_in_order() and b.keys_in_order()
        assert a.max_active_per_partition == 1
    finally:
        for broker in brokers:
            await broker.close()


async def test_partitions_are_spread_over_members_and_move_when_one_leaves() -> None:
    name = uuid.uuid4().hex
    brokers = [connect(name) for _ in range(3)]
    for b in brokers:
        await b.open()
    try:
        rec = Recorder()
        subs = [await b.subscribe("t", "g", rec.handler(f"m{i}")) for i, b in enumerate(brokers)]
        await eventually(lambda: all(s.partitions for s in subs) and sum(len(s.partitions) for s in subs) == 8,
                         what="every member owns partitions")
        owned = [p for s in subs for p in s.partitions]
        assert sorted(owned) == list(range(8))
        await subs[0].close()
        await eventually(lambda: sorted(subs[1].partitions + subs[2].partitions) == list(range(8)),
                         what="the two others take all partitions")
    finally:
        for b in brokers:
            await b.close()


async def test_members_that_subscribe_together_take_their_share_without_a_hand_over() -> None:
    """Workers started together see each other before any takes a lane (docs/semantics.md,
    *Model*): each returns from subscribe() with its share, none with every lane to hand most of
    them over a moment later."""
    name = uuid.uuid4().hex
    brokers = [connect(name, partition_count=16) for _ in range(4)]
    for b in brokers:
        await b.open()
    try:
        rec = Recorder()
        subs = await asyncio.gather(*(b.subscribe("t", "g", rec.handler(f"m{i}")) for i, b in enumerate(brokers)))
        shares = [s.partitions for s in subs]
        assert sorted(p for share in shares for p in share) == list(range(16)), shares
        assert [len(share) for share in shares] == [4, 4, 4, 4], shares
    finally:
        for b in brokers:
            await b.close()


async def test_closing_one_of_three_subscribers_mid_stream_loses_nothing_and_keeps_order() -> None:
    name = uuid.uuid4().hex
    brokers = [connect(name) for _ in range(4)]
    for b in brokers:
        await b.open()
    try:
        producer, *workers = brokers
        rec = Recorder()
        subs = [await w.subscribe("t", "g", rec.handler(f"w{i}", work=0.001)) for i, w in enumerate(workers)]
        await eventually(lambda: all(s.partitions for s in subs))
        total = 600
        for start in range(0, total, 50):
            await producer.publish_batch("t", [Order(key=f"k{i % 17}", seq=i) for i in range(start, start + 50)])
            if start == 300:
                await eventually(lambda: any(m == "w0" for m, *_ in rec.seen), what="w0 handled something")
                await subs[0].close()
        await eventually(lambda: len(rec.distinct()) == total, timeout=20, what="all messages handled")
        assert rec.keys_in_order()

        async def settled() -> bool:  # the last handlers may still be finishing
            return await producer.pending_count("t", "g") == 0

        await eventually(settled, what="pending back to 0")
    finally:
        for b in brokers:
            await b.close()


async def test_a_crashed_member_s_message_is_redelivered_to_a_survivor_first_with_attempt_2() -> None:
    name = uuid.uuid4().hex
    victim, survivor = connect(name), connect(name)
    await victim.open()
    await survivor.open()
    try:
        started = asyncio.Event()
        seen: list[tuple[str, int, int]] = []

        async def stuck(ctx: MessageContext[Order]) -> None:
            seen.append(("victim", ctx.message.seq, ctx.delivery_attempt))
            started.set()
            await asyncio.sleep(3600)

        async def fine(ctx: MessageContext[Order]) -> None:
            seen.append(("survivor", ctx.message.seq, ctx.delivery_attempt))

        await victim.subscribe_to_partition("t", "g", partition_for("k", 8), stuck)
        await victim.publish_batch("t", [Order(key="k", seq=i) for i in range(3)])
        await asyncio.wait_for(started.wait(), 5)
        await victim.abort()  # dies mid-message: nothing settled, nothing released
        await survivor.subscribe("t", "g", fine)
        await eventually(lambda: len([s for s in seen if s[0] == "survivor"]) == 3, timeout=10)
        survived = [s for s in seen if s[0] == "survivor"]
        assert survived[0] == ("survivor", 0, 2)  # the head first, its crash counted
        assert [s[1] for s in survived] == [0, 1, 2]
    finally:
        await survivor.close()


async def test_a_long_handler_is_not_redelivered_while_its_owner_lives() -> None:
    name = uuid.uuid4().hex
    a, b = connect(name), connect(name)
    await a.open()
    await b.open()
    try:
        calls: list[str] = []

        async def slow(ctx: MessageContext[Order]) -> None:
            calls.append("a")
            await asyncio.sleep(2.0)  # four lease periods

        async def other(ctx: MessageContext[Order]) -> None:
            calls.append("b")

        await a.subscribe_to_partition("t", "g", partition_for("k", 8), slow)
        await a.publish("t", Order(key="k", seq=0))
        await eventually(lambda: calls == ["a"])
        await b.subscribe("t", "g", other)
        await eventually(lambda: a.transport.server.groups[("t", "g")][partition_for("k", 8)].pending == {},
                         timeout=10)
        assert calls == ["a"]
    finally:
        await a.close()
        await b.close()


async def test_nak_holds_the_partition_until_redelivered() -> None:
    async with connect() as broker:
        rec = Recorder()

        async def fail_first(ctx: MessageContext[Order]) -> None:
            if ctx.message.seq == 1 and ctx.delivery_attempt == 1:
                await ctx.nak(requeue=True)

        await broker.subscribe("t", "g", rec.handler("m", fail=fail_first))
        await broker.publish_batch("t", [Order(key="k", seq=i) for i in range(4)])
        await eventually(lambda: len(rec.seen) == 5)
        assert [(s, att) for _, _, s, att, _ in rec.seen] == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1)]


async def test_a_raising_handler_naks_and_a_returning_one_acks() -> None:
    async with connect() as broker:
        rec = Recorder()

        async def boom(ctx: MessageContext[Order]) -> None:
            if ctx.delivery_attempt == 1:
                raise RuntimeError("transient")

        await broker.subscribe("t", "g", rec.handler("m", fail=boom))
        await broker.publish("t", Order(key="k", seq=0))
        await eventually(lambda: len(rec.seen) == 2)

        async def settled() -> bool:
            return await broker.pending_count("t", "g") == 0

        await eventually(settled)
        assert [att for *_, att, _ in rec.seen] == [1, 2]


async def test_delay_redelivers_no_earlier_than_asked_and_keeps_order() -> None:
    async with connect() as broker:
        times: list[tuple[int, int, float]] = []

        async def handle(ctx: MessageContext[Order]) -> None:
            times.append((ctx.message.seq, ctx.delivery_attempt, time.monotonic()))
            if ctx.message.seq == 0 and ctx.delivery_attempt == 1:
                await ctx.delay(0.3)

        await broker.subscribe("t", "g", handle)
        await broker.publish_batch("t", [Order(key="k", seq=i) for i in range(3)])
        await eventually(lambda: len(times) == 4)
        assert [(s, a) for s, a, _ in times] == [(0, 1), (0, 2), (1, 1), (2, 1)]
        assert times[1][2] - times[0][2] >= 0.3  # safety: not before the delay


async def test_max_attempts_send_the_message_to_the_dead_letters_with_error_and_headers() -> None:
    async with connect(max_retry_attempts=3) as broker:
        rec = Recorder()

        async def always(ctx: MessageContext[Order]) -> None:
            raise ValueError(f"bad seat {ctx.message.seq}")

        await broker.subscribe("t", "g", rec.handler("m", fail=always))
        await broker.publish("t", Order(key="k", seq=5), headers={"h": "v"})
        await broker.publish("t", Order(key="k", seq=6))
        await eventually(lambda: broker.dead_letters("t", "g"), what="dead letters")

        async def two_dead() -> bool:
            return len(await broker.dead_letters("t", "g")) == 2

        await eventually(two_dead)
        first, _ = await broker.dead_letters("t", "g")
        assert first.attempts == 3 and "ValueError: bad seat 5" in first.error
        assert first.headers == {"h": "v"} and first.topic == "t" and first.group == "g"
        assert first.message(Order).seq == 5
        assert [a for _, _, s, a, _ in rec.seen if s == 5] == [1, 2, 3]
        assert await broker.pending_count("t", "g") == 0


async def test_nak_without_requeue_dead_letters_at_once_and_replay_brings_it_back() -> None:
    async with connect() as broker:
        handled: list[tuple[int, int]] = []

        async def handle(ctx: MessageContext[Order]) -> None:
            handled.append((ctx.message.seq, ctx.delivery_attempt))
            if ctx.headers.get("msgbroker-replay-group") is None:
                await ctx.nak(requeue=False, error="permanent: no such seat")

        await broker.subscribe("t", "g", handle)
        other: list[int] = []

        async def other_group(ctx: MessageContext[Order]) -> None:
            other.append(ctx.message.seq)

        await broker.subscribe("t", "other", other_group)
        await broker.publish("t", Order(key="k", seq=1))
        await eventually(lambda: len(handled) == 1 and len(other) == 1)

        async def dead() -> list[msgbroker.DeadLetter]:
            return await broker.dead_letters("t", "g")

        await eventually(lambda: dead(), what="dead letter")
        (letter,) = await dead()
        assert letter.error == "permanent: no such seat" and letter.attempts == 1
        assert await broker.replay_dead_letters("t", "g") == 1
        await eventually(lambda: len(handled) == 2)
        assert await dead() == []
        await asyncio.sleep(0.1)
        assert other == [1]  # the replay was for group g only


async def test_a_crash_on_the_last_allowed_attempt_still_reaches_the_dead_letters() -> None:
    name = uuid.uuid4().hex
    survivor = connect(name, max_retry_attempts=2)
    await survivor.open()
    try:
        for attempt in range(2):
            victim = connect(name, max_retry_attempts=2)
            await victim.open()
            started = asyncio.Event()

            async def stuck(ctx: MessageContext[Order], started: asyncio.Event = started) -> None:
                started.set()
                await asyncio.sleep(3600)

            await victim.subscribe_to_partition("t", "g", partition_for("k", 8), stuck)
            if attempt == 0:
                await victim.publish("t", Order(key="k", seq=0))
            await asyncio.wait_for(started.wait(), 5)
            await victim.abort()
            await asyncio.sleep(0.6)  # let the dead member's lease expire
        calls: list[int] = []

        async def never(ctx: MessageContext[Order]) -> None:
            calls.append(ctx.delivery_attempt)

        await survivor.subscribe("t", "g", never)

        async def dead() -> bool:
            return len(await survivor.dead_letters("t", "g")) == 1

        await eventually(dead, timeout=10)
        assert calls == []
        (letter,) = await survivor.dead_letters("t", "g")
        assert letter.attempts == 3 and "worker died" in letter.error
    finally:
        await survivor.close()


async def test_undecodable_and_wrong_schema_payloads_are_dead_lettered_and_the_worker_goes_on() -> None:
    async with connect() as broker:
        good: list[int] = []

        async def handle(ctx: MessageContext[Order]) -> None:
            good.append(ctx.message.seq)

        await broker.subscribe("t", "g", handle)
        p = partition_for("k", 8)
        await broker.transport.publish([
            OutgoingRecord("t", p, "k", "bad-bytes", {}, b"\xff\x00 not json"),
            OutgoingRecord("t", p, "k", "bad-schema", {}, b'{"key": "k", "seq": "not a number"}'),
        ], None)
        await broker.publish("t", Order(key="k", seq=3))
        await eventually(lambda: good == [3])

        async def two() -> bool:
            return len(await broker.dead_letters("t", "g")) == 2

        await eventually(two)
        letters = {d.message_id: d for d in await broker.dead_letters("t", "g")}
        assert "cannot decode as Order" in letters["bad-bytes"].error
        assert letters["bad-schema"].payload == b'{"key": "k", "seq": "not a number"}'


async def test_deduplication_within_the_window_and_after_it() -> None:
    async with connect(enable_deduplication=True, deduplication_window=0.3) as broker:
        got: list[int] = []

        async def handle(ctx: MessageContext[Order]) -> None:
            got.append(ctx.message.seq)

        await broker.subscribe("t", "g", handle)
        message = Order(key="k", seq=1)
        await broker.publish("t", message)
        await broker.publish("t", message)  # inside the window: not delivered again
        await broker.publish("t", Order(key="k", seq=2))
        await eventually(lambda: got == [1, 2])
        await asyncio.sleep(0.35)
        await broker.publish("t", message)  # after the window: a new delivery
        await eventually(lambda: got == [1, 2, 1])


async def test_pending_count_counts_ready_in_flight_and_delayed_and_is_exact_once_quiet() -> None:
    async with connect() as broker:
        assert await broker.pending_count("t", "g") == 0
        keys: dict[int, str] = {}
        for i in range(1000):
            keys.setdefault(partition_for(f"k{i}", 8), f"k{i}")
        await broker.publish_batch("t", [Order(key=keys[i % 8], seq=i) for i in range(8)])
        await broker.publish_batch("t", [Order(key=keys[0], seq=8), Order(key=keys[1], seq=9)])
        assert await broker.pending_count("t", "g") == 10  # group not yet subscribed: all retained
        gate = asyncio.Event()
        delayed: set[int] = set()

        async def handle(ctx: MessageContext[Order]) -> None:
            if ctx.message.seq == 0:
                await gate.wait()  # in flight
            elif ctx.message.seq == 1 and ctx.delivery_attempt == 1:
                delayed.add(1)
                await ctx.delay(60)  # waiting for redelivery

        sub = await broker.subscribe("t", "g", handle)
        await eventually(lambda: delayed == {1})

        async def four_left() -> bool:  # seq 0 in flight, 8 behind it; seq 1 delayed, 9 behind it
            return await broker.pending_count("t", "g") == 4

        await eventually(four_left)
        gate.set()

        async def two_left() -> bool:
            return await broker.pending_count("t", "g") == 2

        await eventually(two_left)
        await sub.close()
        assert await broker.pending_count("t", "g") == 2


async def test_subscribe_to_partition_is_exclusive_within_the_group() -> None:
    name = uuid.uuid4().hex
    a, b = connect(name), connect(name)
    await a.open()
    await b.open()
    try:
        rec = Recorder()
        sa = await a.subscribe_to_partition("t", "g", 3, rec.handler("a"))
        sb = await b.subscribe_to_partition("t", "g", 3, rec.handler("b"))
        keys = [k for k in (f"k{i}" for i in range(200)) if partition_for(k, 8) == 3][:5]
        await a.publish_batch("t", [Order(key=k, seq=i) for i, k in enumerate(keys)])
        await eventually(lambda: len(rec.seen) == len(keys))
        assert {m for m, *_ in rec.seen} == {"a"}
        assert sa.partitions == [3] and sb.partitions == []
        await sa.close()
        await a.publish("t", Order(key=keys[0], seq=99))
        await eventually(lambda: ("b", keys[0], 99) in {(m, k, s) for m, k, s, _, _ in rec.seen})
    finally:
        await a.close()
        await b.close()


async def test_settling_twice_is_an_error() -> None:
    async with connect() as broker:
        errors: list[BaseException] = []

        async def handle(ctx: MessageContext[Order]) -> None:
            await ctx.ack()
            try:
                await ctx.nak()
            except AlreadySettledError as exc:
                errors.append(exc)

        await broker.subscribe("t", "g", handle)
        await broker.publish("t", Order(key="k", seq=0))
        await eventually(lambda: len(errors) == 1)
        assert "already settled (ack)" in str(errors[0])


@pytest.mark.parametrize("name", ["", "a b", "a*", "a>", "x:y", ".hidden", "-x", "a..b", "end.", "ü", "a" * 201, "{t}",
                                  "orders\n", "g\r\n"])  # a trailing newline passed a "$"-anchored pattern
async def test_invalid_topic_and_group_names_are_refused_naming_the_value(name: str) -> None:
    async with connect() as broker:
        with pytest.raises(InvalidNameError, match=re.escape(repr(name)[:20])):
            await broker.publish(name, Order(key="k", seq=0))
        with pytest.raises(InvalidNameError):
            await broker.subscribe("t", name, Recorder().handler("m"))


async def test_an_oversize_message_is_refused_at_publish() -> None:
    async with connect(max_message_bytes=1000) as broker:
        with pytest.raises(MessageTooLargeError, match=r"is 2[0-9]{3} bytes; the limit is 1000"):
            await broker.publish("t", Order(key="k", seq=0, note="x" * 2000))


async def test_close_lets_in_flight_handlers_finish_and_acks_them() -> None:
    async with connect() as broker:
        finished: list[int] = []

        async def handle(ctx: MessageContext[Order]) -> None:
            await asyncio.sleep(0.2)
            finished.append(ctx.message.seq)

        sub = await broker.subscribe("t", "g", handle)
        await broker.publish_batch("t", [Order(key=f"k{i}", seq=i) for i in range(4)])
        await eventually(lambda: sub.partitions and True)
        await asyncio.sleep(0.05)
        await sub.close()
        assert finished  # in-flight handlers completed rather than being cut off
        assert await broker.pending_count("t", "g") == 4 - len(finished)


async def test_unordered_subscriptions_run_a_partition_concurrently() -> None:
    async with connect() as broker:
        rec = Recorder()
        await broker.subscribe("t", "g", rec.handler("m", work=0.05), ordered=False, max_concurrency=8)
        await broker.publish_batch("t", [Order(key="same", seq=i) for i in range(8)])
        await eventually(lambda: len(rec.seen) == 8)
        assert rec.max_active_per_partition > 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=40),
    members=st.integers(min_value=1, max_value=3),
    fail_every=st.integers(min_value=2, max_value=7),
)
def test_property_order_per_key_and_nothing_lost_with_failures(keys: list[str], members: int, fail_every: int) -> None:
    async def scenario() -> None:
        name = uuid.uuid4().hex
        brokers = [connect(name, max_retry_attempts=10) for _ in range(members)]
        for b in brokers:
            await b.open()
        try:
            rec = Recorder()
            count = 0

            async def flaky(ctx: MessageContext[Order]) -> None:
                nonlocal count
                count += 1
                if count % fail_every == 0:
                    raise RuntimeError("flaky")

            for i, b in enumerate(brokers):
                await b.subscribe("t", "g", rec.handler(f"m{i}", fail=flaky))
            await brokers[0].publish_batch("t", [Order(key=k, seq=i) for i, k in enumerate(keys)])
            await eventually(lambda: len(rec.distinct()) == len(keys), timeout=20)
            # first handling of each message, per key, in publish order
            firsts: dict[str, list[int]] = defaultdict(list)
            seen_ids: set[tuple[str, int]] = set()
            for _, k, s, _, _ in rec.seen:
                if (k, s) not in seen_ids:
                    seen_ids.add((k, s))
                    firsts[k].append(s)
            assert all(v == sorted(v) for v in firsts.values())
            assert rec.keys_in_order()
        finally:
            for b in brokers:
                await b.close()

    asyncio.run(scenario())


class BadKey(Message):
    @property
    def partition_key(self) -> str:
        return "seat-\udc80"


async def test_a_partition_key_that_is_not_utf8_is_refused_naming_it() -> None:
    async with connect() as broker:
        with pytest.raises(msgbroker.SerializationError, match=r"partition_key 'seat-\\udc80'"):
            await broker.publish("t", BadKey())
