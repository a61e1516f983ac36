"""Rule 14, scheduled messages (docs/semantics.md, "Scheduled messages"): the cases of a provider
that declares ``scheduling``, and one for every provider (the arguments, and the refusal of a
provider that declares it missing). Part of :class:`ConformanceSuite`."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import msgbroker
from msgbroker import MessageContext, partition_for

from ._cases import case, requires, requires_hook
from ._harness import ConformanceHarness
from ._support import ConformanceFailure, ConformanceMessage, Recorder, Scenario, Seen

__all__ = ["ScheduleCases"]

EPSILON = 0.005
"""Clock slack (seconds) for "not before its time"."""

SLACK = 3.0
"""Seconds (times the harness's multiplier) a due message may take, beyond the declared precision,
to go from its partition through a poll to the handler on a loaded machine."""


def _late_bound(s: Scenario, due: float) -> float:
    """How long from now to wait for a message due at ``due`` to be handled."""
    return max(0.0, due - time.time()) + s.capabilities.schedule_precision + SLACK


class ScheduleCases:
    """Scheduled messages, gated on the ``scheduling`` capability."""

    harness: ClassVar[ConformanceHarness | None] = None

    @requires("scheduling")
    @case("semantics", timeout=90.0, rules=("14", "2"))
    async def test_a_scheduled_message_waits_without_blocking_its_partition_then_takes_its_place(
        self, s: Scenario
    ) -> None:
        """A message published with ``delay`` is not handled before its time; a later message of
        its key, published without one, is handled first (the scheduled one blocks nothing); it
        is handled within the declared precision after its time, with its message id, key,
        partition and headers, as attempt 1; a message of its key published after its time comes
        after it (it took its place in its partition's order when due)."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        key = "seat-sched"
        scheduled = ConformanceMessage(key=key, seq=1, text="scheduled")
        before = time.time()
        returned = await broker.publish(topic, scheduled, delay=3.0, headers={"x-conformance-scheduled": "yes"})
        due = before + 3.0
        assert returned == str(scheduled.message_id), f"publish must return the message id, got {returned!r}"
        overtaking = ConformanceMessage(key=key, seq=0, text="published after, not scheduled")
        await broker.publish(topic, overtaking)
        await s.eventually(lambda: str(overtaking.message_id) in rec.acked_ids(),
                           lambda: f"the unscheduled message published after a scheduled one of its key to be "
                                   f"handled (a scheduled message must not block its partition): {rec.trace()}",
                           timeout=SLACK + 10)
        await s.eventually(lambda: str(scheduled.message_id) in rec.acked_ids(),
                           lambda: f"the scheduled message to be handled within its time plus the declared "
                                   f"precision ({s.capabilities.schedule_precision}s): handled {rec.trace()}",
                           timeout=_late_bound(s, due))
        seen = rec.of(str(scheduled.message_id))
        early = [x for x in seen if x.at < due - EPSILON]
        if early:
            raise ConformanceFailure(f"the scheduled message was handled {due - early[0].at:.2f}s before its time")
        first = seen[0]
        assert (first.key, first.partition, first.attempt) == (key, partition_for(key, 4), 1), (
            f"the scheduled message arrived with key {first.key!r}, partition {first.partition}, attempt "
            f"{first.attempt}; published with key {key!r} (partition {partition_for(key, 4)}), first attempt 1")
        assert first.message == scheduled, f"the scheduled message changed: {first.message!r} != {scheduled!r}"
        assert first.headers.get("x-conformance-scheduled") == "yes", (
            f"the scheduled message lost its header: {first.headers}")
        assert len(seen) == 1, f"the scheduled message was handled {len(seen)} times without a fault"
        after = ConformanceMessage(key=key, seq=2, text="published after its time")
        await broker.publish(topic, after)
        await s.eventually(lambda: str(after.message_id) in rec.acked_ids(), "the message published after its time")
        assert [seq for seq, _ in rec.trace(key)] == [0, 1, 2], (
            f"key {key!r} handled in the order {rec.trace(key)} (seq, attempt): expected the unscheduled message "
            "first, then the scheduled one when due, then the one published after its time")
        rec.assert_no_overlap()

    @requires("scheduling")
    @case("semantics", timeout=90.0, rules=("14",))
    async def test_a_cancelled_scheduled_message_is_never_delivered(self, s: Scenario) -> None:
        """``cancel_scheduled`` answers True for a waiting message and it is never handled;
        False for one cancelled already, an unknown id, and one delivered already; a message of
        the same key scheduled beside it is delivered as usual."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        cancelled = ConformanceMessage(key="cancel", seq=0, text="cancelled")
        kept = ConformanceMessage(key="cancel", seq=1, text="kept")
        at = datetime.now(UTC) + timedelta(seconds=2)
        await broker.publish(topic, cancelled, deliver_at=at)
        await broker.publish(topic, kept, deliver_at=at)
        first = await broker.cancel_scheduled(topic, str(cancelled.message_id))
        assert first is True, f"cancel_scheduled of a waiting message must return True, got {first!r}"
        again = await broker.cancel_scheduled(topic, str(cancelled.message_id))
        assert again is False, f"cancelling it a second time must return False, got {again!r}"
        unknown = await broker.cancel_scheduled(topic, str(uuid.uuid4()))
        assert unknown is False, f"cancelling an id never scheduled must return False, got {unknown!r}"
        await s.eventually(lambda: str(kept.message_id) in rec.acked_ids(),
                           lambda: f"the message scheduled beside the cancelled one to be handled: {rec.trace()}",
                           timeout=_late_bound(s, at.timestamp()))
        await asyncio.sleep(s.capabilities.schedule_precision + s.timeout(1.0))
        if rec.of(str(cancelled.message_id)):
            raise ConformanceFailure("a scheduled message that cancel_scheduled reported cancelled was delivered")
        done = await broker.cancel_scheduled(topic, str(kept.message_id))
        assert done is False, f"cancelling a message delivered already must return False, got {done!r}"

    @requires("scheduling")
    @case("semantics", timeout=90.0, rules=("14",))
    async def test_scheduling_a_waiting_message_id_again_replaces_it(self, s: Scenario) -> None:
        """A message id scheduled again while it waits is delivered once, as scheduled the second
        time (its new text, not before its new time)."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        first = ConformanceMessage(key="again", seq=0, text="first")
        second = ConformanceMessage(message_id=first.message_id, key="again", seq=0, text="second")
        await broker.publish(topic, first, delay=1.0)
        due = time.time() + 2.5
        await broker.publish(topic, second, deliver_at=datetime.fromtimestamp(due, UTC))
        await s.eventually(lambda: str(first.message_id) in rec.acked_ids(),
                           lambda: f"the message scheduled twice to be handled: {rec.trace()}",
                           timeout=_late_bound(s, due))
        await asyncio.sleep(s.capabilities.schedule_precision + s.timeout(1.0))
        seen = rec.of(str(first.message_id))
        assert [x.message.text for x in seen] == ["second"], (
            f"scheduling a waiting message id again must replace it: handled {[x.message.text for x in seen]}")
        assert seen[0].at >= due - EPSILON, f"handled {due - seen[0].at:.2f}s before its second time"

    @requires("scheduling", "kill_member")
    @case("semantics", timeout=120.0, rules=("14", "10"))
    async def test_a_scheduled_message_survives_its_publisher_and_a_crashed_consumer(self, s: Scenario) -> None:
        """The publisher closes and the only member crashes while the message waits: it is kept
        by the broker, not by them, and a member that starts after its time handles it."""
        publisher = await s.connect(partition_count=4)
        member = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await member.subscribe(topic, group, rec.handler("crashed"), message_type=ConformanceMessage)
        message = ConformanceMessage(key="survivor", seq=0)
        due = time.time() + 2.5
        await publisher.publish(topic, message, deliver_at=datetime.fromtimestamp(due, UTC))
        await publisher.close()
        await member.abort()
        assert not rec.seen, f"handled before its time: {rec.trace()}"
        await asyncio.sleep(max(0.0, due - time.time()))
        after = await s.connect(partition_count=4)
        await after.subscribe(topic, group, rec.handler("restarted"), message_type=ConformanceMessage)
        await s.eventually(lambda: str(message.message_id) in rec.acked_ids(),
                           lambda: "the scheduled message to be handled by a member started after its time, its "
                                   f"publisher closed and the earlier member crashed: handled {rec.trace()}",
                           timeout=s.failover_timeout() + _late_bound(s, due))
        assert [x.member for x in rec.seen] == ["restarted"], f"handled by {[x.member for x in rec.seen]}"

    @requires("scheduling", "server_restart")
    @requires_hook("restart_server")
    @case("resilience", timeout=240.0, rules=("14",))
    async def test_a_scheduled_message_survives_a_restart_of_the_server(self, s: Scenario) -> None:
        """Two messages scheduled a few seconds ahead, one cancelled; the server restarts while
        they wait: the other is handled after its time, the cancelled one never."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        rec = Recorder()
        await broker.subscribe(topic, group, rec.handler(), message_type=ConformanceMessage)
        kept = ConformanceMessage(key="restart", seq=0, text="kept")
        cancelled = ConformanceMessage(key="restart", seq=1, text="cancelled")
        due = time.time() + 4.0
        for message in (kept, cancelled):
            await broker.publish(topic, message, deliver_at=datetime.fromtimestamp(due, UTC))
        assert await broker.cancel_scheduled(topic, str(cancelled.message_id)) is True
        restart = getattr(s.harness, "restart_server")  # noqa: B009 - an optional hook
        await restart()
        await s.eventually(lambda: str(kept.message_id) in rec.acked_ids(),
                           lambda: f"the scheduled message to be handled after the server restarted: {rec.trace()}",
                           timeout=60 + _late_bound(s, due))
        early = [x for x in rec.of(str(kept.message_id)) if x.at < due - EPSILON]
        if early:
            raise ConformanceFailure(f"the scheduled message was handled {due - early[0].at:.2f}s before its time")
        await asyncio.sleep(s.capabilities.schedule_precision + s.timeout(1.0))
        if rec.of(str(cancelled.message_id)):
            raise ConformanceFailure("a scheduled message cancelled before the server restarted was delivered")

    @case("core", rules=("14", "api"))
    async def test_scheduling_arguments_and_the_capability_declaration(self, s: Scenario) -> None:
        """``deliver_at`` and ``delay`` together raise ConfigurationError naming both values (on
        every provider); without the ``scheduling`` capability, scheduling and
        ``cancel_scheduled`` raise CapabilityNotSupported naming it; with it, a ``deliver_at`` in
        the past is delivered at once and a naive datetime is refused."""
        broker = await s.connect(partition_count=4)
        topic, group = s.topic(), s.group()
        at = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
        try:
            await broker.publish(topic, ConformanceMessage(key="both"), deliver_at=at, delay=12.5)
        except msgbroker.ConfigurationError as exc:
            for value in (repr(at), "12.5"):
                assert value in str(exc), f"the error should name {value}: {exc}"
        else:
            raise ConformanceFailure("publish with both deliver_at and delay must raise ConfigurationError")
        if s.capabilities.scheduling == "none":
            for call in (broker.publish(topic, ConformanceMessage(key="k"), delay=1.0),
                         broker.cancel_scheduled(topic, str(uuid.uuid4()))):
                try:
                    await call
                except msgbroker.CapabilityNotSupported as exc:
                    assert "scheduling" in str(exc), f"the refusal does not name the capability: {exc}"
                else:
                    raise ConformanceFailure("scheduling is declared missing, yet the call succeeded (a silent "
                                             "no-op)")
            return
        try:
            await broker.publish(topic, ConformanceMessage(key="naive"), deliver_at=datetime(2031, 1, 1))
        except msgbroker.ConfigurationError as exc:
            assert "timezone" in str(exc), f"the error should say the datetime has no timezone: {exc}"
        else:
            raise ConformanceFailure("a naive deliver_at must raise ConfigurationError")
        rec = Recorder()
        started: list[float] = []

        async def note(ctx: MessageContext[ConformanceMessage], seen: Seen) -> None:
            started.append(seen.at)

        await broker.subscribe(topic, group, rec.handler(decide=note), message_type=ConformanceMessage)
        past = ConformanceMessage(key="past", seq=0)
        await broker.publish(topic, past, deliver_at=datetime.now(UTC) - timedelta(minutes=5))
        await s.eventually(lambda: str(past.message_id) in rec.acked_ids(),
                           "a message whose deliver_at is in the past to be delivered at once", timeout=SLACK + 7)
        gone = await broker.cancel_scheduled(topic, str(past.message_id))
        assert gone is False, f"a message delivered at once is not waiting: cancel_scheduled must be False, got {gone}"
