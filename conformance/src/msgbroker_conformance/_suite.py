"""The contract cases: one per rule of docs/semantics.md (and its parts), each small and bounded.

Subclass :class:`ConformanceSuite` with a ``harness`` to run them all against a provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, ClassVar

import msgbroker
from msgbroker import Message, MessageContext, OutgoingRecord, partition_for, wire

from ._cases import case, requires, requires_hook
from ._harness import ConformanceHarness, merge_settings
from ._request_cases import RequestReplyCases
from ._schedule_cases import ScheduleCases
from ._support import (
    DEFAULT_SETTINGS,
    ConformanceFailure,
    ConformanceMessage,
    Recorder,
    Scenario,
    Seen,
    keys_in_partition,
)

__all__ = ["ConformanceSuite", "FencingCases"]

EPSILON = 0.005
"""Clock slack (seconds) for the "not before its delay" checks."""

WEIRD_HEADERS: dict[str, str] = {
    "x-conformance-slashes": "a/b\\c//d",
    "x-conformance-quotes": "'single' \"double\" `back`",
    "x-conformance-unicode": "naïve – 日本語 – 🎫",  # noqa: RUF001 - the dash is the point
    "x-conformance-ascii": "".join(chr(i) for i in range(32, 127)),
    "x-conformance-tab": "a\tb",
    "x-conformance-empty": "",
    "x-conformance-spaces": "  padded  ",
    "X-Conformance-Case": "MixedCase",
}
"""Header values that break naive encodings (Go CDK's weird strings, the printable part)."""


class OpaqueMessage(Message):
    """A message with a field pydantic cannot serialise (publishing it must fail at the call)."""

    key: str = "opaque"
    blob: Any = None


def _ids(messages: list[ConformanceMessage]) -> list[str]:
    return [str(m.message_id) for m in messages]


def _missing(expected: set[str], got: set[str]) -> str:
    lost = sorted(expected - got)
    return f"{len(lost)} of {len(expected)} message(s) not handled, e.g. {lost[:3]}"


class ConformanceSuite(RequestReplyCases, ScheduleCases):
    """The msgbroker contract (docs/semantics.md) as pytest tests.

    Activate it in your provider's tests by subclassing with a harness::

        class TestMyConformance(ConformanceSuite):
            harness = MyHarness()

    Each case gets a fresh namespace and unique topic/group names; cases whose capability the
    provider declares missing are skipped naming it; nothing else is ever skipped.
    """

    harness: ClassVar[ConformanceHarness | None] = None

    # -- §2/§3 basics ---------------------------------------------------------------------------

    @case("core", rules=("api", "shape"))
    async def test_round_trip_keeps_every_field(self, s: Scenario) -> None:
        """Payload, ids, correlation id, timestamps, headers, key, partition and attempt arrive
        exactly as published (single and batch publish)."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        single = ConformanceMessage(key="clé/ключ 🎫", seq=1, text="x" * 2000 + " ünïcödé", tags=["a", "", "ß"],
                                    correlation_id="corr-1")
        batch = [ConformanceMessage(key=f"batch-{i}", seq=i, text=f"b{i}") for i in range(3)]
        first = await broker.publish(topic, single, headers=WEIRD_HEADERS)
        assert first == str(single.message_id), "publish must return the message id"
        ids = await broker.publish_batch(topic, batch, headers={"x-conformance-batch": "yes"})
        assert ids == _ids(batch), "publish_batch must return the ids in order"
        expected = {str(m.message_id): (m, h) for m, h in
                    [(single, WEIRD_HEADERS), *((m, {"x-conformance-batch": "yes"}) for m in batch)]}
        await s.eventually(lambda: rec.acked_ids() >= set(expected), lambda: _missing(set(expected), rec.acked_ids()))
        for seen in rec.seen:
            original, headers = expected[seen.message_id]
            assert seen.message == original, f"payload changed in transit: {seen.message!r} != {original!r}"
            assert seen.attempt == 1, f"first delivery must have delivery_attempt 1, got {seen.attempt}"
            assert seen.partition == partition_for(original.partition_key, 4), (
                f"message with key {original.partition_key!r} arrived on partition {seen.partition}, the partitioner "
                f"says {partition_for(original.partition_key, 4)}"
            )
            for name, value in headers.items():
                assert seen.headers.get(name) == value, (
                    f"header {name!r}={value!r} arrived as {seen.headers.get(name)!r}"
                )
        assert len(rec.seen) == len(expected), f"{len(rec.seen)} deliveries for {len(expected)} messages"

    @case("core", rules=("1", "3"))
    async def test_handler_return_acks_and_raise_retries(self, s: Scenario) -> None:
        """Returning without settling acks; raising naks with requeue; settling twice raises."""
        broker = await s.connect(max_retry_attempts=5)
        topic, group = s.topic(), s.group()

        async def decide(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.seq == 1 and seen.attempt == 1:
                raise RuntimeError("conformance: fail once")
            if seen.seq == 2:
                await ctx.ack()
                try:
                    await ctx.ack()
                except msgbroker.AlreadySettledError:
                    rec.errors.append(msgbroker.AlreadySettledError("expected"))

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=decide), message_type=ConformanceMessage)
        await broker.publish_batch(topic, [ConformanceMessage(key="one", seq=i) for i in range(4)])
        await s.eventually(lambda: len(rec.acked()) >= 4, lambda: f"handled so far: {rec.trace()}")
        assert rec.trace() == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1)], (
            f"expected (seq, attempt) [(0,1), (1,1), (1,2), (2,1), (3,1)], got {rec.trace()}"
        )
        assert len(rec.errors) == 1, "acking twice must raise AlreadySettledError"

    @case("core", rules=("api",))
    async def test_health_reports_the_connection(self, s: Scenario) -> None:
        """``is_healthy`` is True while connected, False after close, and never raises."""
        broker = await s.connect()
        assert await broker.is_healthy() is True, "a fresh connection must be healthy"
        await broker.close()
        assert await broker.is_healthy() is False, "a closed broker must not be healthy"
        try:
            await broker.publish(s.topic(), ConformanceMessage(key="k"))
        except msgbroker.BrokerClosedError:
            pass
        else:
            raise ConformanceFailure("publish on a closed broker must raise BrokerClosedError")

    @case("core", rules=("api", "8"))
    async def test_capability_declarations_match_the_calls(self, s: Scenario) -> None:
        """Both directions of the declaration: a call behind a declared capability works; one
        behind a capability declared missing raises CapabilityNotSupported naming it (never a
        silent no-op)."""
        caps = s.capabilities
        broker = await s.connect(enable_deduplication=True, deduplication_window=s.harness.dedup_window)
        topic, group = s.topic(), s.group()
        if caps.deduplication == "none":
            await _expect(broker.publish(topic, ConformanceMessage(key="cap")), msgbroker.CapabilityNotSupported,
                          "deduplication")
        else:
            await broker.publish(topic, ConformanceMessage(key="cap"))

        async def idle(ctx: MessageContext[ConformanceMessage]) -> None:
            return None

        if not caps.partition_exclusive:
            await _expect(broker.subscribe_to_partition(topic, group, 0, idle, message_type=ConformanceMessage),
                          msgbroker.CapabilityNotSupported, "partition_exclusive")
        else:
            pinned = await broker.subscribe_to_partition(topic, s.group("pinned"), 0, idle,
                                                         message_type=ConformanceMessage)
            await pinned.close()
        refused: list[BaseException] = []

        async def try_delay(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.attempt == 1:
                try:
                    await ctx.delay(0.01)
                except msgbroker.CapabilityNotSupported as exc:
                    refused.append(exc)

        rec = Recorder()
        plain = await s.connect()
        delay_topic = s.topic("delay")
        await plain.subscribe(delay_topic, group, rec.handler(decide=try_delay), message_type=ConformanceMessage)
        await plain.publish(delay_topic, ConformanceMessage(key="cap"))
        if caps.delay:
            await s.eventually(lambda: [x.attempt for x in rec.seen] == [1, 2], lambda: f"attempts {rec.trace()}")
            assert not refused, f"delay is declared but ctx.delay raised {refused[0]!r}"
        else:
            await s.eventually(lambda: bool(refused), "ctx.delay to raise CapabilityNotSupported")
            assert "delay" in str(refused[0]), f"the refusal does not name the capability: {refused[0]}"

    # -- §3.4 consumer groups -------------------------------------------------------------------

    @case("core", rules=("shape",))
    async def test_every_group_gets_every_message(self, s: Scenario) -> None:
        """Three groups on one topic each handle every message published after they subscribed."""
        broker = await s.connect(partition_count=4)
        topic = s.topic()
        recorders = {s.group(f"g{i}"): Recorder() for i in range(3)}
        for group, rec in recorders.items():
            await broker.subscribe(topic, group, rec.handler(group), message_type=ConformanceMessage)
        messages = [ConformanceMessage(key=f"k{i % 5}", seq=i) for i in range(20)]
        await broker.publish_batch(topic, messages)
        wanted = set(_ids(messages))
        for group, rec in recorders.items():
            await _eventually_all(s, rec, wanted, f"group {group}")
        for group, rec in recorders.items():
            assert len(rec.seen) == len(wanted), f"group {group} handled {len(rec.seen)} deliveries for 20 messages"

    @requires("retains_before_group")
    @case("semantics", rules=("7", "shape"))
    async def test_a_new_group_gets_the_retained_backlog(self, s: Scenario) -> None:
        """A group that subscribes after the producer published still gets those messages."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        messages = [ConformanceMessage(key=f"k{i % 3}", seq=i) for i in range(10)]
        await broker.publish_batch(topic, messages)
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        wanted = set(_ids(messages))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()))

    @case("core", rules=("shape",))
    async def test_each_message_goes_to_one_member_of_a_group(self, s: Scenario) -> None:
        """With three members in a group and no faults, every message is handled exactly once,
        by one member, and (with competing consumers) every member gets a share."""
        count = 6
        brokers = [await s.connect(partition_count=count) for _ in range(3)]
        topic, group = s.topic(), s.group()
        rec = Recorder()
        subs = [await b.subscribe(topic, group, rec.handler(f"m{i}"), message_type=ConformanceMessage)
                for i, b in enumerate(brokers)]
        await _wait_spread(s, brokers[0], subs, count)
        keys = [k for p in range(count) for k in keys_in_partition(p, count, 2, prefix=f"p{p}")]
        messages = [ConformanceMessage(key=k, seq=n) for n in range(3) for k in keys]
        await brokers[0].publish_batch(topic, messages)
        wanted = set(_ids(messages))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()))
        dupes = [(mid, [x.member for x in rec.of(mid)]) for mid in wanted if len(rec.of(mid)) > 1]
        assert not dupes, f"without faults, messages were handled more than once in one group: {dupes[:3]}"
        rec.assert_no_overlap()
        if s.capabilities.competing_consumers and brokers[0].transport.ASSIGNMENT != "shared":
            idle = [f"m{i}" for i in range(3) if not rec.by_member(f"m{i}")]
            assert not idle, f"members {idle} got no messages although each holds partitions"

    # -- §3.3 order -----------------------------------------------------------------------------

    @case("core", rules=("2", "shape"))
    async def test_order_per_partition_under_concurrency(self, s: Scenario) -> None:
        """Many keys published concurrently to two members: each key's messages are handled in
        publish order, and no two handlers of one partition ever overlap."""
        count = 8
        brokers = [await s.connect(partition_count=count) for _ in range(2)]
        topic, group = s.topic(), s.group()
        rec = Recorder()
        rng = s.rng

        async def jitter(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.003)

        subs = [await b.subscribe(topic, group, rec.handler(f"m{i}", jitter), message_type=ConformanceMessage)
                for i, b in enumerate(brokers)]
        await _wait_spread(s, brokers[0], subs, count)
        keys = [f"key-{i}" for i in range(16)]
        per_key = 5

        async def produce(key: str) -> None:
            for seq in range(per_key):
                await brokers[seq % 2].publish(topic, ConformanceMessage(key=key, seq=seq))

        await asyncio.gather(*(produce(k) for k in keys))
        await s.eventually(lambda: len({(x.key, x.seq) for x in rec.acked()}) >= len(keys) * per_key,
                           lambda: f"{len(rec.acked())} of {len(keys) * per_key} handled")
        for key in keys:
            trace = [seq for seq, _ in rec.trace(key)]
            assert trace == sorted(trace) and sorted(set(trace)) == list(range(per_key)), (
                f"key {key!r} handled out of order: seq {trace}"
            )
            parts = {x.partition for x in rec.seen if x.key == key}
            assert parts == {partition_for(key, count)}, f"key {key!r} arrived on partitions {parts}"
        rec.assert_no_overlap()

    @case("core", rules=("2", "3"))
    async def test_an_unordered_subscription_still_handles_everything(self, s: Scenario) -> None:
        """ordered=False (the opt-out of docs/semantics.md's order) gives up order, never delivery: with retries and
        concurrent handlers, every message is handled to an ack, none more than needed."""
        broker = await s.connect(partition_count=2, max_retry_attempts=5)
        topic, group = s.topic(), s.group()

        delayed = s.capabilities.delay
        asked: dict[str, float] = {}

        async def decide(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            await asyncio.sleep(0.002)
            if seen.seq % 5 == 0 and seen.attempt == 1:
                await ctx.nak(requeue=True)
            elif delayed and seen.seq % 5 == 2 and seen.attempt == 1:
                asked[seen.message_id] = time.time()
                await ctx.delay(0.2)

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=decide), message_type=ConformanceMessage,
                               ordered=False, max_concurrency=4)
        messages = [ConformanceMessage(key=f"u{i % 2}", seq=i) for i in range(20)]
        await broker.publish_batch(topic, messages)
        wanted = set(_ids(messages))
        await _eventually_all(s, rec, wanted, "the unordered subscription")
        for message in messages:
            attempts = [x.attempt for x in rec.of(str(message.message_id))]
            again = message.seq % 5 == 0 or (delayed and message.seq % 5 == 2)
            expected = [1, 2] if again else [1]
            assert attempts == expected, f"message {message.seq} was handled with attempts {attempts}, not {expected}"
        for message_id, at in asked.items():
            second = rec.of(message_id)[1]
            assert second.at >= at + 0.2 - EPSILON, (
                f"an unordered subscription redelivered message {second.seq} {at + 0.2 - second.at:.3f}s before "
                f"its 0.2s delay"
            )

    @case("core", rules=("2", "3"))
    async def test_nak_requeue_holds_the_partition_and_redelivers_first(self, s: Scenario) -> None:
        """A nak(requeue=True) message comes back (attempt + 1) before anything after it in its
        partition."""
        broker = await s.connect(max_retry_attempts=5)
        topic, group = s.topic(), s.group()

        async def decide(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.key == "held" and seen.seq == 0 and seen.attempt < 3:
                await ctx.nak(requeue=True)

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=decide), message_type=ConformanceMessage)
        await broker.publish_batch(topic, [ConformanceMessage(key="held", seq=i) for i in range(3)])
        await s.eventually(lambda: len(rec.acked()) >= 3, lambda: f"handled so far: {rec.trace()}")
        assert rec.trace("held") == [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1)], (
            f"nak broke the partition order: expected (seq, attempt) [(0,1), (0,2), (0,3), (1,1), (2,1)], "
            f"got {rec.trace('held')}"
        )

    @case("core", rules=("1", "4", "7"))
    async def test_nak_without_requeue_dead_letters(self, s: Scenario) -> None:
        """nak(requeue=False) dead-letters at once with the error; it is never redelivered and
        the partition goes on."""
        broker = await s.connect()
        topic, group = s.topic(), s.group()

        async def decide(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.seq == 0:
                await ctx.nak(requeue=False, error="rejected by the conformance suite")

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=decide), message_type=ConformanceMessage)
        first, second = ConformanceMessage(key="k", seq=0), ConformanceMessage(key="k", seq=1)
        await broker.publish_batch(topic, [first, second], headers={"x-conformance": "nak"})
        await s.eventually(lambda: str(second.message_id) in rec.acked_ids(), lambda: f"trace {rec.trace()}")
        letters = await _eventually_letters(s, broker, topic, group, 1)
        letter = letters[0]
        assert letter.message_id == str(first.message_id), f"dead letter {letter.message_id} is not the naked message"
        assert "rejected by the conformance suite" in letter.error, f"dead letter error {letter.error!r}"
        assert letter.attempts == 1, f"dead letter after one delivery says attempts={letter.attempts}"
        assert letter.headers.get("x-conformance") == "nak", f"original headers lost: {dict(letter.headers)}"
        assert rec.trace() == [(0, 1), (1, 1)], f"a naked-without-requeue message came back: {rec.trace()}"
        if s.capabilities.pending_count_exact:
            await s.eventually(lambda: _pending_is(broker, topic, group, 0), "pending_count to reach 0")

    @requires("delay")
    @case("semantics", rules=("2",))
    async def test_delay_redelivers_no_earlier_and_holds_the_partition(self, s: Scenario) -> None:
        """ctx.delay(d) redelivers not before d has passed (attempt + 1) and nothing after it in
        its partition is handled meanwhile."""
        broker = await s.connect()
        topic, group = s.topic(), s.group()
        delay = 0.3
        asked: dict[str, float] = {}

        async def decide(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.seq == 0 and seen.attempt == 1:
                asked[seen.message_id] = time.time()
                await ctx.delay(delay)
            elif seen.seq == 1 and seen.attempt == 1:
                asked[seen.message_id] = time.time()
                await ctx.delay(timedelta(seconds=delay))

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=decide), message_type=ConformanceMessage)
        await broker.publish_batch(topic, [ConformanceMessage(key="k", seq=i) for i in range(3)])
        await s.eventually(lambda: len(rec.acked()) >= 3, lambda: f"handled so far: {rec.trace()}")
        assert rec.trace() == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)], (
            f"delay broke the partition order: expected (seq, attempt) [(0,1), (0,2), (1,1), (1,2), (2,1)], "
            f"got {rec.trace()}"
        )
        for seen in rec.seen:
            if seen.attempt == 2:
                early = asked[seen.message_id] + delay - seen.at
                assert early <= EPSILON, f"message {seen.seq} was redelivered {early:.3f}s before its delay of {delay}s"

    # -- §3.5 attempts and dead letters ---------------------------------------------------------

    @requires("redelivery_on_crash", "kill_member")
    @case("semantics", rules=("3", "10"))
    async def test_delivery_attempt_counts_a_delivery_to_a_member_that_died(self, s: Scenario) -> None:
        """A member dies (abort) mid-message: another member gets it with delivery_attempt 2,
        and what followed it in the partition after it."""
        first_broker = await s.connect(partition_count=1)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        stuck = asyncio.Event()

        async def hang(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            await stuck.wait()  # never set: this member dies holding the message

        await first_broker.subscribe(topic, group, rec.handler("dying", hang), message_type=ConformanceMessage)
        messages = [ConformanceMessage(key="k", seq=i) for i in range(3)]
        await first_broker.publish_batch(topic, messages)
        await s.eventually(lambda: rec.by_member("dying"), "the first member to receive the message")
        survivor = await s.connect(partition_count=1)
        await survivor.subscribe(topic, group, rec.handler("survivor"), message_type=ConformanceMessage)
        await first_broker.abort()
        wanted = set(_ids(messages))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()),
                           timeout=s.failover_timeout())
        taken_over = [x for x in rec.by_member("survivor") if x.seq == 0]
        assert taken_over and taken_over[0].attempt == 2, (
            f"the message the dead member held came back with delivery_attempt "
            f"{[x.attempt for x in taken_over]}, expected 2"
        )
        assert [x.seq for x in rec.by_member("survivor")][:3] == [0, 1, 2], "order lost on failover"

    @requires("delay", "competing_consumers")
    @case("semantics", rules=("2", "3", "9"))
    async def test_a_hand_over_during_a_delay_costs_no_attempt(self, s: Scenario) -> None:
        """A member fails a message once, delays it, and closes while the delay is waited out:
        the next owner is handed attempt 3 (a delay is no failed attempt, and the attempt the
        delay announced was never handed), and the message is dead-lettered only after
        max_retry_attempts failures that handlers saw (attempts 1, 3 and 4)."""
        first = await s.connect(partition_count=1)
        topic, group = s.topic(), s.group()
        rec = Recorder()

        asked: list[float] = []
        delay = 1.0

        async def fail_then_delay(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.attempt == 1:
                raise RuntimeError("conformance failure on attempt 1")
            asked.append(time.time())
            await ctx.delay(delay)  # the member closes while this delay is waited out

        async def fail(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            raise RuntimeError(f"conformance failure on attempt {seen.attempt}")

        subscription = await first.subscribe(topic, group, rec.handler("first", fail_then_delay),
                                             message_type=ConformanceMessage)
        message = ConformanceMessage(key="k", seq=0)
        await first.publish(topic, message)
        await s.eventually(lambda: [x.outcome for x in rec.by_member("first")] == ["raised", "retry"],
                           lambda: f"the first member's handlings: {rec.trace()}")
        await subscription.close()
        second = await s.connect(partition_count=1)
        await second.subscribe(topic, group, rec.handler("second", fail), message_type=ConformanceMessage)

        async def dead() -> bool:
            return any(x.message_id == str(message.message_id) for x in await second.dead_letters(topic, group))

        await s.eventually(dead, lambda: f"no dead letter; handlings {rec.trace()}", timeout=s.failover_timeout())
        attempts = [(x.member, x.attempt) for x in rec.seen]
        assert attempts == [("first", 1), ("first", 2), ("second", 3), ("second", 4)], (
            f"handlings (member, delivery_attempt) {attempts}: expected the delay to cost no attempt and the "
            f"dead letter only after the third failure a handler saw"
        )
        letters = [x for x in await second.dead_letters(topic, group) if x.message_id == str(message.message_id)]
        assert letters[0].attempts == 4, f"the dead letter says {letters[0].attempts} attempts, expected 4"
        early = asked[0] + delay - rec.by_member("second")[0].at
        assert early <= EPSILON, (
            f"the next owner was handed the message {early:.3f}s before its {delay}s delay ended: a delay must "
            f"be kept with the message when its lane moves (docs/semantics.md, rule 2)"
        )

    @case("core", rules=("3", "4"))
    async def test_max_attempts_dead_letters_with_error_attempts_and_headers(self, s: Scenario) -> None:
        """A message that always fails is handled max_retry_attempts times, then goes to
        ``<topic>.dlq`` and ``dead_letters`` with the last error, the attempt count and its
        original headers and payload; the partition goes on."""
        broker = await s.connect(max_retry_attempts=3)
        topic, group = s.topic(), s.group()

        async def decide(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.seq == 0:
                raise RuntimeError(f"conformance failure on attempt {seen.attempt}")

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=decide), message_type=ConformanceMessage)
        poison, after = ConformanceMessage(key="k", seq=0, text="poison"), ConformanceMessage(key="k", seq=1)
        await broker.publish_batch(topic, [poison, after], headers={"x-conformance": "dlq", "x-trace": "t-1"})
        await s.eventually(lambda: str(after.message_id) in rec.acked_ids(), lambda: f"trace {rec.trace()}")
        assert rec.trace() == [(0, 1), (0, 2), (0, 3), (1, 1)], (
            f"expected (seq, attempt) [(0,1), (0,2), (0,3), (1,1)], got {rec.trace()}"
        )
        letter = (await _eventually_letters(s, broker, topic, group, 1))[0]
        assert letter.message_id == str(poison.message_id)
        assert "conformance failure on attempt 3" in letter.error, f"dead letter error {letter.error!r}"
        assert letter.attempts == 3, f"dead letter attempts={letter.attempts}, expected 3"
        assert letter.topic == topic and letter.group == group, f"dead letter names {letter.topic}/{letter.group}"
        assert letter.partition == partition_for("k", 4)
        for name, value in {"x-conformance": "dlq", "x-trace": "t-1"}.items():
            assert letter.headers.get(name) == value, f"original header {name!r} lost: {dict(letter.headers)}"
        assert letter.message(ConformanceMessage) == poison, "the dead letter's payload is not the original"
        dlq = Recorder()
        await broker.subscribe(f"{topic}.dlq", s.group("dlq-reader"), dlq.handler(), message_type=ConformanceMessage)
        await s.eventually(lambda: str(poison.message_id) in dlq.acked_ids(), f"the dead letter on {topic}.dlq")
        on_dlq = dlq.of(str(poison.message_id))[0]
        assert on_dlq.message == poison and on_dlq.headers.get("x-trace") == "t-1", (
            f"{topic}.dlq carries {on_dlq.message!r} with headers {on_dlq.headers}"
        )

    @case("core", rules=("4", "5"))
    async def test_dead_letters_can_be_listed_and_replayed(self, s: Scenario) -> None:
        """Dead letters are listed per group; replaying some (by id) or all publishes them back
        for that group only and removes them from the list."""
        broker = await s.connect(partition_count=4)
        topic, group, other = s.topic(), s.group(), s.group("other")
        rejected: set[str] = set()

        async def reject_once(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.message_id not in rejected:
                rejected.add(seen.message_id)
                await ctx.nak(requeue=False, error="rejected once")

        rec, bystander = Recorder(), Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=reject_once), message_type=ConformanceMessage)
        await broker.subscribe(topic, other, bystander.handler(), message_type=ConformanceMessage)
        messages = [ConformanceMessage(key=f"r{i}", seq=i) for i in range(3)]
        await broker.publish_batch(topic, messages)
        letters = await _eventually_letters(s, broker, topic, group, 3)
        assert {x.message_id for x in letters} == set(_ids(messages)), "dead_letters lists other messages"
        assert await broker.dead_letters(topic, other) == [], "another group's dead letters leaked"
        chosen = str(messages[1].message_id)
        assert await broker.replay_dead_letters(topic, group, ids=[chosen]) == 1
        await s.eventually(lambda: chosen in rec.acked_ids(), "the replayed dead letter to be handled again")
        left = {x.message_id for x in await broker.dead_letters(topic, group)}
        assert left == set(_ids(messages)) - {chosen}, f"after replaying one, dead_letters lists {left}"
        assert await broker.replay_dead_letters(topic, group) == 2
        wanted = set(_ids(messages))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()))
        assert await broker.dead_letters(topic, group) == [], "replayed dead letters must be removed"
        # A sentinel per key after the replays: once the bystander group handled it, it has passed
        # the replayed copies in that partition, which it must not have been handed.
        sentinels = [ConformanceMessage(key=m.key, seq=100) for m in messages]
        await broker.publish_batch(topic, sentinels)
        await s.eventually(lambda: bystander.acked_ids() >= set(_ids(sentinels)), "the bystander group's sentinels")
        again = [mid for mid in _ids(messages) if len(bystander.of(mid)) > 1]
        assert not again, f"replays for {group} were handed to the group {other}: {again}"

    @case("core", rules=("4", "5"))
    async def test_a_replay_removes_only_the_letters_it_listed(self, s: Scenario) -> None:
        """A replay removes exactly the letters it listed (``remove_listed_dead_letters``): a
        replayed message that fails again and is dead-lettered again before the replay removes
        what it listed keeps its new letter — removed by message id, that letter (and the
        message) would be lost."""
        broker = await s.connect(partition_count=2)
        topic, group = s.topic(), s.group()

        async def reject(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            await ctx.nak(requeue=False, error="rejected every time")

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=reject), message_type=ConformanceMessage)
        message = ConformanceMessage(key="again", seq=0)
        await broker.publish(topic, message)
        listed = await _eventually_letters(s, broker, topic, group, 1)
        assert await broker.replay_dead_letters(topic, group) == 1
        newer: list[msgbroker.DeadLetter] = []

        async def dead_lettered_again() -> bool:
            newer[:] = await broker.dead_letters(topic, group)
            return bool(newer) and newer[0].dead_lettered_at != listed[0].dead_lettered_at

        await s.eventually(dead_lettered_again, "the replayed message to be dead-lettered again")
        # What the replay listed is gone; removing it again (as a replay whose removal came after
        # the message was dead-lettered again) must leave the newer letter of the same message.
        removed = await broker.transport.remove_listed_dead_letters(topic, group, listed)
        left = await broker.dead_letters(topic, group)
        assert removed == 0 and [x.dead_lettered_at for x in left] == [newer[0].dead_lettered_at], (
            f"removing the letter the replay listed removed {removed} letter(s) and left {left}: "
            "a letter of the same message stored since must stay"
        )

    @requires("delay", "competing_consumers")
    @case("semantics", rules=("api", "4", "9"))
    async def test_the_envelope_survives_retries_and_a_hand_over(self, s: Scenario) -> None:
        """Headers with long values and a message just under the size limit arrive whole on every
        delivery: the first, a local retry, the next owner's after a hand-over, and in the dead
        letter (payload byte for byte, the record key as the letter's partition key)."""
        first = await s.connect(partition_count=1)
        limit = min(s.capabilities.max_message_bytes, first.settings.max_message_bytes)
        long_headers = {"x-conformance-long": "".join(chr(33 + i % 94) for i in range(4000)),
                        "x-conformance-unicode-long": "ß🎫" * 600, "x-conformance": "envelope"}
        small = ConformanceMessage(key="envelope-key", seq=0, text="headers")
        big = ConformanceMessage(key="envelope-key", seq=1, text="")
        big.text = "y" * (limit - 1024 - len(big.model_dump_json()))
        topic, group = s.topic(), s.group()
        rec = Recorder()

        async def fail_then_delay(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.attempt == 1:
                raise RuntimeError("conformance failure on attempt 1")
            await ctx.delay(0.5)  # the member closes while this delay is waited out

        async def fail_then_reject(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.seq == 1 and seen.attempt == 1:
                raise RuntimeError("conformance failure on attempt 1")
            if seen.seq == 1:
                await ctx.nak(requeue=False, error="envelope: rejected")

        subscription = await first.subscribe(topic, group, rec.handler("first", fail_then_delay),
                                             message_type=ConformanceMessage)
        await first.publish(topic, small, headers=long_headers)
        await first.publish(topic, big, headers={"x-conformance": "big"})
        await s.eventually(lambda: [x.outcome for x in rec.by_member("first")] == ["raised", "retry"],
                           lambda: f"the first member's handlings: {rec.trace()}")
        await subscription.close()
        second = await s.connect(partition_count=1)
        await second.subscribe(topic, group, rec.handler("second", fail_then_reject), message_type=ConformanceMessage)

        async def dead() -> bool:
            return any(x.message_id == str(big.message_id) for x in await second.dead_letters(topic, group))

        await s.eventually(dead, lambda: f"the big message's dead letter; handlings {rec.trace()}",
                           timeout=s.failover_timeout())
        expected = {str(small.message_id): (small, long_headers), str(big.message_id): (big, {"x-conformance": "big"})}
        for seen in rec.seen:
            original, headers = expected[seen.message_id]
            where = f"{seen.member}'s delivery attempt {seen.attempt} of message {seen.seq}"
            assert seen.message == original, f"{where} changed the payload ({len(seen.message.text)} text characters)"
            for name, value in headers.items():
                got = seen.headers.get(name)
                assert got == value, (
                    f"{where} carries header {name!r} as {got[:40] + '...' if got else got!r} "
                    f"({len(got or '')} characters; published {len(value)})"
                )
        handled = [(x.member, x.seq, x.attempt) for x in rec.seen]
        assert handled == [("first", 0, 1), ("first", 0, 2), ("second", 0, 3), ("second", 1, 1), ("second", 1, 2)], (
            f"handlings (member, seq, attempt) {handled}"
        )
        letter = next(x for x in await second.dead_letters(topic, group) if x.message_id == str(big.message_id))
        assert letter.payload == big.model_dump_json().encode() or letter.message(ConformanceMessage) == big, (
            f"the dead letter's payload is not the original ({len(letter.payload)} bytes)"
        )
        assert letter.partition_key == big.key, (
            f"the dead letter's partition key is {letter.partition_key!r}, the record's key is {big.key!r}"
        )
        assert letter.headers.get("x-conformance") == "big", f"the dead letter's headers {dict(letter.headers)}"

    @case("core", rules=("4", "5"))
    async def test_dead_letters_are_listed_oldest_first_with_their_keys(self, s: Scenario) -> None:
        """Three messages of one partition, each rejected in turn: ``dead_letters`` lists them in
        the order they were dead-lettered, each with its partition and partition key; replayed,
        they come back on that partition in that order, and rejected again keep their keys."""
        count, partition = 4, 3
        broker = await s.connect(partition_count=count)
        topic, group = s.topic(), s.group()
        keys = keys_in_partition(partition, count, 3, prefix="dl")
        messages = [ConformanceMessage(key=k, seq=i) for i, k in enumerate(keys)]
        rejections: dict[str, int] = {}
        replayed = asyncio.Event()

        async def reject_twice(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            rejections[seen.message_id] = rejections.get(seen.message_id, 0) + 1
            if rejections[seen.message_id] == 2:
                # rejected again only once the replay returned (it removes the old letters by id)
                await asyncio.wait_for(replayed.wait(), s.timeout(10))
            if rejections[seen.message_id] <= 2:
                await ctx.nak(requeue=False, error=f"rejected {seen.key}")

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=reject_twice), message_type=ConformanceMessage)
        await broker.publish_batch(topic, messages)
        letters = await _eventually_letters(s, broker, topic, group, 3)
        listed = [(x.message_id, x.partition, x.partition_key) for x in letters]
        wanted = [(str(m.message_id), partition, m.key) for m in messages]
        assert listed == wanted, (
            f"dead_letters lists (message id, partition, partition key) {listed}; dead-lettered in the order "
            f"{wanted} (oldest first)"
        )
        assert await broker.replay_dead_letters(topic, group) == 3
        replayed.set()
        letters = []

        async def again() -> bool:
            letters[:] = await broker.dead_letters(topic, group)
            return len(letters) == 3 and all(rejections.get(str(m.message_id)) == 2 for m in messages)

        await s.eventually(again, lambda: f"the replayed messages to be dead-lettered again: handled {rec.trace()}, "
                                          f"listed {[(x.message_id[:8], x.partition_key) for x in letters]}")
        handled = [(x.key, x.partition) for x in rec.seen[3:]]
        assert handled == [(m.key, partition) for m in messages], (
            f"replays were handled as (key, partition) {handled}, expected the dead-letter order on partition "
            f"{partition}"
        )
        relisted = [(x.message_id, x.partition, x.partition_key) for x in letters]
        assert relisted == wanted, f"after a replay, dead_letters lists {relisted}, expected {wanted}"

    @case("core", rules=("api", "4"))
    async def test_records_and_dead_letters_keep_the_wire_format(self, s: Scenario) -> None:
        """The wire format's test vectors (``msgbroker.wire.vectors()``, docs/wire-format.md) on
        the real broker: each vector message, published as its record, reaches the handler with its
        id, partition, fields and exactly its headers (no carrier header leaks in); dead-lettered,
        the record a plain subscriber of ``<topic>.dlq`` receives carries exactly the vector's
        headers (with this run's group, attempt count and time; never the original's replay group,
        or other groups would skip it), and ``dead_letters`` returns the letter's fields, the
        payload byte for byte."""
        vectors = wire.vectors()
        broker = await s.connect(partition_count=vectors["partition_count"])
        topic, group, reader = s.topic(), s.group(), s.group("dlq-reader")
        letters: dict[str, dict[str, Any]] = {v["letter"]["message_id"]: v for v in vectors["dead_letters"]
                                              if "letter" in v}
        records: dict[str, OutgoingRecord] = {}
        fields: dict[str, dict[str, Any]] = {}
        for vector in vectors["messages"]:
            r = vector["record"]
            records[r["message_id"]] = OutgoingRecord(topic, r["partition"], r["key"], r["message_id"],
                                                      dict(r["headers"]), r["body"].encode("utf-8"))
            fields[r["message_id"]] = vector["decoded"]
        for message_id, vector in letters.items():
            if message_id not in records:  # a letter of no vector message: publish its original
                original = vector["letter"]
                headers = {k: group if k == wire.REPLAY_GROUP_HEADER else v for k, v in original["headers"].items()}
                records[message_id] = OutgoingRecord(topic, original["partition"], original["partition_key"],
                                                     message_id, headers, original["payload"].encode("utf-8"))
                fields[message_id] = json.loads(original["payload"])
        seen: dict[str, list[tuple[int, dict[str, str], dict[str, Any]]]] = {}
        on_dlq: dict[str, list[tuple[int, dict[str, str], dict[str, Any]]]] = {}

        async def handle(ctx: MessageContext[Message]) -> None:
            seen.setdefault(ctx.message_id, []).append(
                (ctx.partition, dict(ctx.headers), ctx.message.model_dump(mode="json")))
            if ctx.message_id in letters:
                await ctx.nak(requeue=False, error=letters[ctx.message_id]["letter"]["error"])

        async def read(ctx: MessageContext[Message]) -> None:
            on_dlq.setdefault(ctx.message_id, []).append(
                (ctx.partition, dict(ctx.headers), ctx.message.model_dump(mode="json")))

        await broker.subscribe(topic, group, handle, message_type=Message)
        await broker.subscribe(wire.dead_letter_topic(topic), reader, read, message_type=Message)
        await broker.transport.publish(list(records.values()), None)
        await s.eventually(lambda: set(seen) >= set(records),
                           lambda: f"vector messages not handled: {sorted(set(records) - set(seen))}")
        await s.eventually(lambda: set(on_dlq) >= set(letters),
                           lambda: f"dead letters not received from {topic}.dlq by another group: "
                                   f"{sorted(set(letters) - set(on_dlq))}")
        for message_id, record in records.items():
            got = seen[message_id][0]
            assert got == (record.partition, record.headers, fields[message_id]), (
                f"vector message {message_id} arrived as (partition, headers, fields) {got}, published "
                f"{(record.partition, record.headers, fields[message_id])}")
        listed = {x.message_id: x for x in await _eventually_letters(s, broker, topic, group, len(letters))}
        for message_id, vector in letters.items():
            letter, record = listed[message_id], records[message_id]
            partition, headers, dlq_fields = on_dlq[message_id][0]
            expected = {**vector["record"]["headers"], wire.DEAD_LETTER_GROUP: group,
                        wire.DEAD_LETTER_ATTEMPTS: "1", wire.DEAD_LETTER_AT: wire.format_time(letter.dead_lettered_at)}
            assert headers == expected, (
                f"the {topic}.dlq record of {message_id} carries headers {headers}; the wire format says {expected}")
            assert (partition, dlq_fields) == (record.partition, fields[message_id]), (
                f"the {topic}.dlq record of {message_id} is on partition {partition} with fields {dlq_fields}")
            decoded = vector["decoded"]
            assert (letter.topic, letter.group, letter.partition, letter.error, letter.attempts, dict(letter.headers),
                    letter.payload, letter.partition_key) == (
                topic, group, record.partition, decoded["error"], 1, decoded["headers"], record.body, record.key), (
                f"dead_letters returned {letter!r} for vector {vector['name']!r}")

    # -- §3.7 deduplication ---------------------------------------------------------------------

    @requires("deduplication")
    @case("semantics", rules=("8",))
    async def test_dedup_drops_a_repeat_inside_the_window_only(self, s: Scenario) -> None:
        """With enable_deduplication, the same message id published again inside the window is
        not delivered; distinct ids are never collapsed; after the window it is delivered again."""
        window = s.harness.dedup_window
        broker = await s.connect(enable_deduplication=True, deduplication_window=window)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        original = ConformanceMessage(key="d", seq=0)
        twin = ConformanceMessage(key="d", seq=0)  # same content, its own id: not a duplicate
        fresh = ConformanceMessage(key="d", seq=2)  # first seen twice inside one batch
        started = time.monotonic()
        await broker.publish(topic, original)
        await broker.publish(topic, original)
        await broker.publish_batch(topic, [original, twin, fresh, fresh])
        # the same id again once half the window has passed: still inside it
        await asyncio.sleep(max(0.0, window / 2 - (time.monotonic() - started)))
        await broker.publish(topic, original)
        sentinel = ConformanceMessage(key="d", seq=1)
        await broker.publish(topic, sentinel)
        inside = time.monotonic() - started
        await s.eventually(lambda: str(sentinel.message_id) in rec.acked_ids(), "the sentinel after the repeats")
        if inside < window:  # the repeats really were inside the window (a slow server can't fake a pass)
            assert len(rec.of(str(original.message_id))) == 1, (
                f"a repeated message id inside the {window}s window (the last at {window / 2:.2f}s) was delivered "
                f"{len(rec.of(str(original.message_id)))} times"
            )
        assert len(rec.of(str(fresh.message_id))) == 1, (
            f"a message id published twice in one publish_batch was delivered {len(rec.of(str(fresh.message_id)))} "
            f"times"
        )
        assert len(rec.of(str(twin.message_id))) == 1, "a distinct message id was collapsed by deduplication"
        await asyncio.sleep(max(0.0, window - (time.monotonic() - started)) + 0.2 * s.multiplier)
        await broker.publish(topic, original)
        await s.eventually(lambda: len(rec.of(str(original.message_id))) >= 2,
                           f"the message id republished after the {window}s window to be delivered again")

    # -- §3.8 pending count ---------------------------------------------------------------------

    @requires("pending_count_exact")
    @case("semantics", rules=("7",))
    async def test_pending_count_counts_ready_in_flight_and_delayed(self, s: Scenario) -> None:
        """pending_count = not yet settled by the group: in flight, waiting behind it, and (when
        delay is supported) delayed; exact once quiet."""
        count = 4
        broker = await s.connect(partition_count=count)
        topic, group = s.topic(), s.group()
        assert await broker.pending_count(topic, group) == 0, "pending_count of an empty topic must be 0"
        hold_key, delay_key, done_key = (keys_in_partition(p, count, 1, prefix="pc")[0] for p in range(3))
        release = asyncio.Event()
        use_delay = bool(s.capabilities.delay)

        async def decide(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            if seen.key == hold_key and seen.seq == 0:
                await release.wait()
            elif seen.key == delay_key and seen.attempt == 1:
                await ctx.delay(3600)

        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(decide=decide), message_type=ConformanceMessage)
        messages = [ConformanceMessage(key=hold_key, seq=i) for i in range(3)]
        messages += [ConformanceMessage(key=done_key, seq=i) for i in range(3)]
        if use_delay:
            messages.append(ConformanceMessage(key=delay_key, seq=0))
        await broker.publish_batch(topic, messages)
        held = 3 + (1 if use_delay else 0)  # 1 in flight + 2 behind it (+ 1 delayed)
        await s.eventually(lambda: len([x for x in rec.acked() if x.key == done_key]) == 3, "the free partition")
        await s.eventually(lambda: rec.of(str(messages[0].message_id)), "the held message to be in flight")
        if use_delay:
            await s.eventually(lambda: any(x.key == delay_key for x in rec.seen), "the delayed message")
        try:
            await _eventually_pending(s, broker, topic, group, held)
        finally:
            release.set()  # a failing provider must not keep the handler (and the close) waiting
        await s.eventually(lambda: len([x for x in rec.acked() if x.key == hold_key]) == 3, "the held partition")
        await _eventually_pending(s, broker, topic, group, held - 3)

    @requires("pending_count_exact")
    @case("semantics", rules=("7",))
    async def test_pending_count_is_per_group_and_counts_before_the_first_subscribe(self, s: Scenario) -> None:
        """pending_count answers for the group asked about: a group that never subscribed counts
        every retained message; a group whose handler holds its partition counts everything it
        has not settled while another group on the topic has handled all."""
        retains = bool(s.capabilities.retains_before_group)
        broker = await s.connect(partition_count=4)
        topic, done, holding, never = s.topic(), s.group("done"), s.group("holding"), s.group("never")
        release = asyncio.Event()

        async def hold(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            await release.wait()

        finished, held = Recorder(), Recorder()
        messages = [ConformanceMessage(key="pending-key", seq=i) for i in range(5)]
        if retains:
            await broker.publish_batch(topic, messages)
            await _eventually_pending(s, broker, topic, never, len(messages))
        await broker.subscribe(topic, done, finished.handler(), message_type=ConformanceMessage)
        await broker.subscribe(topic, holding, held.handler(decide=hold), message_type=ConformanceMessage)
        if not retains:
            await broker.publish_batch(topic, messages)
        try:
            await s.eventually(lambda: finished.acked_ids() >= set(_ids(messages)), "the first group to handle all")
            await s.eventually(lambda: held.seen, "the holding group's handler to hold the first message")
            await _eventually_pending(s, broker, topic, done, 0)
            await _eventually_pending(s, broker, topic, holding, len(messages))
            if retains:
                await _eventually_pending(s, broker, topic, never, len(messages))
        finally:
            release.set()
        await _eventually_pending(s, broker, topic, holding, 0)

    @requires("pending_count_exact")
    @case("semantics", rules=("shape", "7"))
    async def test_describe_matches_the_model(self, s: Scenario) -> None:
        """``Transport.describe``, the operators' read model (docs/dashboard.md), against the
        model: every partition listed once; pending per partition adds up to ``pending_count``
        and equals ``pending_by_partition`` and the partitioner's count; owners are live members
        holding what the members say they hold; a held lane's head is the message its handler
        holds, with its attempt; after release everything is 0 and no head is left."""
        count = 4
        broker = await s.connect(partition_count=count)
        topic, group = s.topic(), s.group()
        release = asyncio.Event()

        async def hold(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            await release.wait()

        rec = Recorder()
        per = {0: 1, 1: 3, 2: 0, 3: 2}
        messages = [ConformanceMessage(key=key, seq=i) for p, n in per.items()
                    for i, key in enumerate(keys_in_partition(p, count, n, prefix="describe"))]
        await broker.subscribe(topic, group, rec.handler(decide=hold), message_type=ConformanceMessage)
        await broker.publish_batch(topic, messages)
        busy = {p for p, n in per.items() if n}
        try:
            await s.eventually(lambda: {x.partition for x in rec.seen} >= busy,
                               lambda: f"a message held on each of the partitions {sorted(busy)}: {rec.trace()}")
            await _eventually_pending(s, broker, topic, group, len(messages))
            view = await broker.transport.describe(topic, group)
            assert (view.topic, view.group) == (topic, group), f"describe answered for {view.topic}/{view.group}"
            listed = [x.partition for x in view.partitions]
            assert listed == list(range(count)), f"describe must list partitions 0..{count - 1} once, listed {listed}"
            assert view.pending == len(messages), f"describe's pending {view.pending}, pending_count {len(messages)}"
            assert view.dead_letters == 0, f"describe counts {view.dead_letters} dead letters, there are none"
            counted = {x.partition: x.pending for x in view.partitions}
            if any(n is not None for n in counted.values()):
                assert counted == per, f"pending per partition: describe says {counted}, published {per}"
                with contextlib.suppress(msgbroker.CapabilityNotSupported):
                    by = await broker.transport.pending_by_partition(topic, group)
                    assert {p: by.get(p, 0) for p in range(count)} == counted, (
                        f"describe's pending per partition {counted} != pending_by_partition {dict(by)}"
                    )
            held = {x.partition: x for x in rec.seen}
            for part in view.partitions:
                if part.head is not None:
                    assert part.partition in held, f"partition {part.partition} is empty, describe's head {part.head}"
                    assert part.head == held[part.partition].message_id, (
                        f"partition {part.partition}: describe's head {part.head}, the handler holds "
                        f"{held[part.partition].message_id}"
                    )
                    assert part.attempt is not None and part.attempt >= 1, (
                        f"partition {part.partition}: the held head has attempt {part.attempt}, delivered once"
                    )
                if part.oldest_age is not None:
                    assert part.oldest_age >= 0, f"partition {part.partition}: negative age {part.oldest_age}"
            if view.members is not None:
                ids = [m.member_id for m in view.members]
                assert len(ids) == len(set(ids)) >= 1, f"describe's members {ids}: one live member, listed once"
                holds = {p: m.member_id for m in view.members for p in m.partitions}
                owners = {x.partition: x.owner for x in view.partitions if x.owner is not None}
                assert set(owners.values()) <= set(ids), f"owners {owners} are not all live members {ids}"
                if view.owners_known:
                    assert owners == holds, f"partition owners {owners} != what the members hold {holds}"
                    assert set(owners) >= busy, f"partitions {sorted(busy - set(owners))} are held but have no owner"
        finally:
            release.set()
        await _eventually_pending(s, broker, topic, group, 0)
        last: list[Any] = []

        async def drained() -> bool:
            last[:] = [await broker.transport.describe(topic, group)]
            return last[0].pending == 0 and all(not x.pending and x.head is None for x in last[0].partitions)

        await s.eventually(drained, lambda: f"describe to show nothing pending, it shows {last[:1]}")

    # -- §3.4 assignment and failover -----------------------------------------------------------

    @requires("competing_consumers")
    @case("semantics", rules=("shape", "9"))
    async def test_partitions_spread_and_move_when_a_member_closes(self, s: Scenario) -> None:
        """Partitions are spread over the live members; when one closes, the others take its
        partitions and handle what is published to them."""
        count = 6
        brokers = [await s.connect(partition_count=count) for _ in range(3)]
        topic, group = s.topic(), s.group()
        rec = Recorder()
        subs = [await b.subscribe(topic, group, rec.handler(f"m{i}"), message_type=ConformanceMessage)
                for i, b in enumerate(brokers)]
        await _wait_spread(s, brokers[0], subs, count)
        await brokers[2].close()
        await _wait_spread(s, brokers[0], subs[:2], count)
        messages = [ConformanceMessage(key=keys_in_partition(p, count, 1, prefix="mv")[0]) for p in range(count)]
        await brokers[0].publish_batch(topic, messages)
        wanted = set(_ids(messages))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()))
        assert not rec.by_member("m2"), "a closed member handled messages"

    @requires("kill_member")
    @case("semantics", rules=("shape", "10"))
    async def test_partitions_move_when_a_member_stops_heartbeating(self, s: Scenario) -> None:
        """A member that dies (abort: no leave, no release) loses its partitions to the live
        member within the claim timeout."""
        count = 4
        brokers = [await s.connect(partition_count=count) for _ in range(2)]
        topic, group = s.topic(), s.group()
        rec = Recorder()
        subs = [await b.subscribe(topic, group, rec.handler(f"m{i}"), message_type=ConformanceMessage)
                for i, b in enumerate(brokers)]
        await _wait_spread(s, brokers[0], subs, count)
        await brokers[1].abort()
        await s.eventually(lambda: set(subs[0].partitions) == set(range(count)),
                           lambda: f"the survivor to own every partition, it owns {subs[0].partitions}",
                           timeout=s.failover_timeout())
        messages = [ConformanceMessage(key=keys_in_partition(p, count, 1, prefix="hb")[0]) for p in range(count)]
        await brokers[0].publish_batch(topic, messages)
        wanted = set(_ids(messages))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()),
                           timeout=s.failover_timeout())

    @requires("partition_exclusive")
    @case("semantics", rules=("shape",))
    async def test_subscribe_to_partition_is_exclusive(self, s: Scenario) -> None:
        """Two members asking for the same partition: one holds it and gets all its messages
        (and none of other partitions); the other takes over only when the first closes."""
        count, partition = 4, 2
        first, second = await s.connect(partition_count=count), await s.connect(partition_count=count)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        holder = await first.subscribe_to_partition(topic, group, partition, rec.handler("first"),
                                                    message_type=ConformanceMessage)
        waiting = await second.subscribe_to_partition(topic, group, partition, rec.handler("second"),
                                                      message_type=ConformanceMessage)
        keys = keys_in_partition(partition, count, 3, prefix="ex")
        elsewhere = [keys_in_partition(p, count, 1, prefix="ex")[0] for p in range(count) if p != partition]
        batch = [ConformanceMessage(key=k, seq=0) for k in keys + elsewhere]
        await first.publish_batch(topic, batch)
        mine = set(_ids(batch[: len(keys)]))
        await s.eventually(lambda: rec.acked_ids() >= mine, lambda: _missing(mine, rec.acked_ids()))
        assert all(x.member == "first" for x in rec.seen), "the second member got messages of a held partition"
        assert all(x.partition == partition for x in rec.seen), (
            f"a partition subscription got messages of partitions {sorted({x.partition for x in rec.seen})}"
        )
        assert holder.partitions == [partition], f"the holder reads partitions {holder.partitions}, not [{partition}]"
        assert waiting.partitions == [], f"the waiting member claims partitions {waiting.partitions}"
        await holder.close()
        later = [ConformanceMessage(key=k, seq=1) for k in keys]
        await second.publish_batch(topic, later)
        wanted = set(_ids(later))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()),
                           timeout=s.failover_timeout())
        assert all(x.member == "second" for x in rec.seen if x.seq == 1), "a closed partition holder got messages"
        assert not [x for x in rec.seen if x.member == "second" and x.seq == 0], (
            "the second member handled messages the first had already acked"
        )

    # -- §3.10 bad input ------------------------------------------------------------------------

    @case("core", rules=("names", "api"))
    async def test_invalid_names_and_payloads_are_rejected_naming_the_value(self, s: Scenario) -> None:
        """Invalid topic/group/header names, oversize and unserialisable messages fail at the
        call with an error naming the bad value; the broker keeps working."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        good = ConformanceMessage(key="k")

        async def handler(ctx: MessageContext[ConformanceMessage]) -> None:
            return None

        for bad in ["", "has space", "semi;colon", ".hidden", "-dash", "a..b", "trailing.", "sl/ash", "x" * 201,
                    "ünï"]:
            for call in (lambda b=bad: broker.publish(b, good),
                         lambda b=bad: broker.subscribe(b, group, handler, message_type=ConformanceMessage),
                         lambda b=bad: broker.subscribe(topic, b, handler, message_type=ConformanceMessage)):
                await _expect(call(), msgbroker.InvalidNameError, repr(bad) if len(bad) < 50 else bad[:40])
        await _expect(broker.publish(topic, good, headers={"x-bad": 1}),  # type: ignore[dict-item]
                      msgbroker.InvalidNameError, "x-bad")
        limit = min(s.capabilities.max_message_bytes, broker.settings.max_message_bytes)
        await _expect(broker.publish(topic, ConformanceMessage(key="big", text="x" * limit)),
                      msgbroker.MessageTooLargeError, str(limit))
        await _expect(broker.publish(topic, OpaqueMessage(blob=object())), msgbroker.SerializationError,
                      "OpaqueMessage")
        await _expect(broker.publish(topic, {"key": "not a message"}),  # type: ignore[arg-type]
                      msgbroker.SerializationError, "dict")
        await _expect(broker.subscribe_to_partition(topic, group, 99, handler), msgbroker.ConfigurationError, "99")
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        await broker.publish(topic, good)
        await s.eventually(lambda: str(good.message_id) in rec.acked_ids(), "a good message after the bad calls")

    @case("core", rules=("6",))
    async def test_undecodable_bytes_are_dead_lettered_and_the_worker_goes_on(self, s: Scenario) -> None:
        """Malformed bytes and valid JSON of the wrong shape on the wire are dead-lettered with
        the decode error; the messages after them are handled."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        key = "poison"
        partition = partition_for(key, 4)
        garbage = OutgoingRecord(topic, partition, key, str(uuid.uuid4()), {"x-conformance": "garbage"},
                                 b"\xff\xfe not json \x00")
        wrong = OutgoingRecord(topic, partition, key, str(uuid.uuid4()), {"x-conformance": "wrong-shape"},
                               b'{"seq": "not a number"}')
        await broker.transport.publish([garbage, wrong], None)
        after = ConformanceMessage(key=key, seq=1)
        await broker.publish(topic, after)
        await s.eventually(lambda: str(after.message_id) in rec.acked_ids(), "the good message after the bad bytes")
        letters = {x.message_id: x for x in await _eventually_letters(s, broker, topic, group, 2)}
        for record in (garbage, wrong):
            letter = letters.get(record.message_id)
            assert letter is not None, f"undecodable message {record.headers} was not dead-lettered"
            assert "decode" in letter.error.lower() or "valid" in letter.error.lower(), (
                f"dead letter error does not say why: {letter.error!r}"
            )
            assert letter.payload == record.body, "the dead letter must keep the original bytes"
            assert letter.headers.get("x-conformance") == record.headers["x-conformance"]
        assert len(rec.seen) == 1, "the handler was called with an undecodable message"

    # -- §3.11 shutdown -------------------------------------------------------------------------

    @case("core", rules=("9", "2"))
    async def test_close_under_load_loses_nothing(self, s: Scenario) -> None:
        """A member closes while messages stream in: its in-flight handlers finish, and every
        published message is handled by the group."""
        count = 4
        brokers = [await s.connect(partition_count=count) for _ in range(2)]
        topic, group = s.topic(), s.group()
        rec = Recorder()

        async def work(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            await asyncio.sleep(0.002)

        for i, b in enumerate(brokers):
            await b.subscribe(topic, group, rec.handler(f"m{i}", work), message_type=ConformanceMessage)
        producer = await s.connect(partition_count=count)
        messages = [ConformanceMessage(key=f"load-{i % 12}", seq=i // 12) for i in range(72)]

        async def produce() -> None:
            for i in range(0, len(messages), 4):
                await producer.publish_batch(topic, messages[i:i + 4])
                await asyncio.sleep(0)

        publishing = asyncio.create_task(produce())
        await s.eventually(lambda: len(rec.acked()) >= 12, "the first messages to be handled")
        await brokers[0].close()
        await publishing
        wanted = set(_ids(messages))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()),
                           timeout=s.failover_timeout())
        unfinished = [x for x in rec.by_member("m0") if x.outcome is None]
        assert not unfinished, f"close() cut {len(unfinished)} in-flight handler(s) short"
        for key in {m.key for m in messages}:
            firsts = []
            for x in rec.seen:
                if x.key == key and x.seq not in firsts:
                    firsts.append(x.seq)
            assert firsts == sorted(firsts), f"key {key!r} handled out of order across the close: {firsts}"
        if s.capabilities.pending_count_exact:
            await _eventually_pending(s, producer, topic, group, 0)

    # -- §3.1 resilience ------------------------------------------------------------------------

    @requires("server_restart")
    @requires_hook("restart_server")
    @case("resilience", timeout=180.0, rules=("api",))
    async def test_reconnect_after_server_restart(self, s: Scenario) -> None:
        """The server restarts under a running subscription: the broker becomes healthy again by
        itself and every confirmed message is handled."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        before = [ConformanceMessage(key=f"r{i}", seq=i) for i in range(5)]
        await broker.publish_batch(topic, before)
        await s.eventually(lambda: rec.acked_ids() >= set(_ids(before)), "the messages before the restart")
        restart = getattr(s.harness, "restart_server")  # noqa: B009 - an optional hook
        await restart()
        healthy = await _wait_healthy(s, broker)
        assert healthy, "the broker did not become healthy again after the server restart"
        confirmed: list[ConformanceMessage] = []
        for i in range(5):
            message = ConformanceMessage(key=f"r{i}", seq=10 + i)
            for _ in range(50):
                try:
                    await broker.publish(topic, message)
                except msgbroker.TransientError:
                    await asyncio.sleep(0.2)
                    continue
                confirmed.append(message)
                break
        assert confirmed, "no publish succeeded after the restart"
        wanted = set(_ids(before + confirmed))
        await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: _missing(wanted, rec.acked_ids()),
                           timeout=60)


    # -- the volume tier ------------------------------------------------------------------------

    @case("model", timeout=900.0, rules=("2", "3", "4", "10", "12", "shape"))
    async def test_volume_against_the_reference_model(self, s: Scenario) -> None:
        """``harness.volume`` messages over many keys and 8 partitions, with random naks, raises,
        rejects and delays, while members join, crash and leave: every delivery checked against
        the model as it happens (order per partition, attempts, delays, nothing after an ack or a
        dead letter), and at the end every message acked or dead-lettered for a reason."""
        from ._volume import run_volume

        counts = await run_volume(s, s.harness.volume_size())
        assert counts["messages"] == s.harness.volume_size()

    # -- rule 11: fencing ----------------------------------------------------------------------

    @requires("kill_member", "redelivery_on_crash", "competing_consumers")
    @case("semantics", timeout=240.0, rules=("11", "10"))
    async def test_a_member_that_lost_its_lease_cannot_settle(self, s: Scenario) -> None:
        """A member whose event loop is blocked past its claim timeout (a paused process: its own
        loop in a thread, blocked by its handler) loses the lane to a second member, which is handed
        the message again; the paused member then resumes and acks — that ack must not settle the
        message. The second member dies holding it, and the message comes back to the first."""
        from ._stateful import _LoopThread

        topic, group = s.topic(), s.group()
        paused = _LoopThread()
        got, resume, late_ack = threading.Event(), threading.Event(), threading.Event()
        seen_a: list[tuple[int, str | None]] = []

        async def handle_a(ctx: MessageContext[ConformanceMessage]) -> None:
            seen_a.append((ctx.delivery_attempt, None))
            if len(seen_a) == 1:
                got.set()
                resume.wait(s.timeout(4 * s.failover_timeout()))  # blocks this member's whole loop: no heartbeats
                try:
                    await ctx.ack()
                    seen_a[0] = (seen_a[0][0], "acked late")
                except Exception as exc:  # a provider may refuse the late ack loudly: as good as dropping it
                    seen_a[0] = (seen_a[0][0], f"late ack refused: {type(exc).__name__}")
                finally:
                    late_ack.set()
            else:
                await ctx.ack()
                seen_a[-1] = (ctx.delivery_attempt, "ack")

        async def open_a() -> msgbroker.Broker:
            broker = s.harness.connect(s.namespace, **merge_settings(DEFAULT_SETTINGS, {"partition_count": 1}))
            await broker.open()
            await broker.subscribe(topic, group, handle_a, message_type=ConformanceMessage)
            return broker

        first = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(open_a(), paused.loop))
        try:
            second = await s.connect(partition_count=1)
            message = ConformanceMessage(key="fenced", seq=0)
            await second.publish(topic, message)
            await s.eventually(got.is_set, "the first member to be handed the message")
            rec = Recorder()
            hold = asyncio.Event()

            async def die_holding(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
                await hold.wait()  # never set: this member is aborted holding the message

            await second.subscribe(topic, group, rec.handler("second", die_holding), message_type=ConformanceMessage)
            await s.eventually(lambda: rec.seen, lambda: f"the second member to take the lane of the paused one "
                               f"(claim timeout {s.claim_timeout()}s) and be handed the message",
                               timeout=s.failover_timeout())
            resume.set()
            await s.eventually(late_ack.is_set, "the paused member to resume and ack late")
            await second.abort()
            await s.eventually(lambda: len(seen_a) > 1 and seen_a[-1][1] == "ack",
                               lambda: f"the message to come back to the first member after the second died "
                                       f"holding it: the first member's handlings {seen_a} (a late ack of a "
                                       f"member that lost its lease settled it: it is lost)",
                               timeout=s.failover_timeout())
            attempts = [seen_a[0][0], rec.seen[0].attempt, seen_a[-1][0]]
            assert attempts == sorted(set(attempts)), f"delivery attempts first, second, first again: {attempts}"
        finally:
            resume.set()

            async def close_a() -> None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(first.close(), 20)

            with contextlib.suppress(Exception):
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close_a(), paused.loop))
            await asyncio.to_thread(paused.close)

    # -- the reference model --------------------------------------------------------------------

    @case("model", timeout=600.0, rules=("2", "3", "4", "7", "10", "12"))
    async def test_state_machine_against_the_reference_model(self, s: Scenario) -> None:
        """Hypothesis drives publish / handle / ack / nak / delay / crash / join against the
        provider and a pure-Python model (see msgbroker_conformance._stateful)."""
        from ._stateful import run_machine

        await asyncio.to_thread(run_machine, s.harness, s.seed)


class FencingCases:
    """Kept so that provider tests written as ``class TestX(ConformanceSuite, FencingCases)`` still
    import: the fencing case (rule 11) is part of :class:`ConformanceSuite` now."""

    harness: ClassVar[ConformanceHarness | None] = None


# -- helpers ----------------------------------------------------------------------------------


async def _wait_spread(s: Scenario, broker: msgbroker.Broker, subs: list[msgbroker.Subscription], count: int) -> None:
    """Wait until every partition is read by a member and (for lease or native assignment)
    every member holds some and none is held twice."""
    shared = broker.transport.ASSIGNMENT == "shared"
    spread = s.capabilities.competing_consumers

    def settled() -> bool:
        held = [p for sub in subs for p in sub.partitions]
        if set(held) != set(range(count)):
            return False
        if shared:
            return True
        if len(held) != len(set(held)):
            return False
        return not spread or all(sub.partitions for sub in subs)

    await s.eventually(settled, lambda: f"partitions to spread over the members: {[sub.partitions for sub in subs]}",
                       timeout=s.failover_timeout())


async def _eventually_all(s: Scenario, rec: Recorder, wanted: set[str], who: str) -> None:
    await s.eventually(lambda: rec.acked_ids() >= wanted, lambda: f"{who}: {_missing(wanted, rec.acked_ids())}")


async def _pending_is(broker: msgbroker.Broker, topic: str, group: str, expected: int) -> bool:
    return await broker.pending_count(topic, group) == expected


async def _eventually_pending(s: Scenario, broker: msgbroker.Broker, topic: str, group: str, expected: int) -> None:
    last: list[int] = []

    async def check() -> bool:
        last.append(await broker.pending_count(topic, group))
        return last[-1] == expected

    await s.eventually(check, lambda: f"pending_count to be {expected} once quiet, it stays {last[-1:]}")


async def _eventually_letters(
    s: Scenario, broker: msgbroker.Broker, topic: str, group: str, n: int
) -> list[msgbroker.DeadLetter]:
    letters: list[msgbroker.DeadLetter] = []

    async def check() -> bool:
        letters[:] = await broker.dead_letters(topic, group)
        return len(letters) >= n

    await s.eventually(check, lambda: f"{n} dead letter(s) for {group} on {topic}, found {len(letters)}")
    return letters


async def _expect(call: Any, error: type[BaseException], mentions: str) -> None:
    try:
        await call
    except error as exc:
        assert mentions in str(exc), f"{type(exc).__name__} does not name the bad value {mentions!r}: {exc}"
    else:
        raise ConformanceFailure(f"expected {error.__name__} naming {mentions!r}, the call succeeded")


async def _wait_healthy(s: Scenario, broker: msgbroker.Broker) -> bool:
    deadline = time.monotonic() + s.timeout(60)
    while time.monotonic() < deadline:
        if await broker.is_healthy():
            return True
        await asyncio.sleep(0.1)
    return False
