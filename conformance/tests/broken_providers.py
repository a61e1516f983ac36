"""Deliberately broken providers: the in-memory provider with one contract violation each,
built on its public interface only (a wrapper around its consumer or one overridden method).
The suite must fail every one of them (test_broken_providers.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sys
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar, cast

import msgbroker
from msgbroker.spi import (
    AssignmentListener,
    DeadLetter,
    Delivery,
    GroupView,
    Lane,
    LaneConsumer,
    OutgoingRecord,
    Transport,
    hookimpl,
)

__all__ = ["BROKEN_TRANSPORTS", "BrokerRedeliveryTransport", "register", "set_seed"]

Memory = msgbroker.registry.by_name("memory")


class _Wrapped(LaneConsumer):
    """Every call passes to the memory provider's own consumer."""

    def __init__(self, inner: LaneConsumer) -> None:
        self.inner = inner

    async def start(self, listener: AssignmentListener, partition: int | None) -> None:
        await self.inner.start(listener, partition)

    async def open_lane(self, partition: int, lease: str | None) -> None:
        await self.inner.open_lane(partition, lease)

    async def close_lane(self, partition: int) -> None:
        await self.inner.close_lane(partition)

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        return await self.inner.poll(partitions, max_per_lane, timeout, wake)

    async def ack(self, delivery: Delivery) -> None:
        await self.inner.ack(delivery)

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        await self.inner.retry(delivery, attempt, not_before)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        await self.inner.dead_letter(delivery, letter)

    async def unread(self, deliveries: Sequence[Delivery]) -> None:
        await self.inner.unread(deliveries)

    async def stop(self, flush: bool) -> None:
        await self.inner.stop(flush)


class _ReorderingConsumer(_Wrapped):
    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deliveries = await super().poll(partitions, max_per_lane, timeout, wake)
        by_lane: dict[int, list[Delivery]] = {}
        for delivery in deliveries:
            by_lane.setdefault(delivery.partition, []).append(delivery)
        return [d for lane in by_lane.values() for d in reversed(lane)]  # the bug: a batch comes back reversed


class ReorderingTransport(Memory):  # type: ignore[valid-type,misc]
    """Hands each polled batch of a partition over in reverse order."""

    NAME: ClassVar[str] = "broken-reorder"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-reorder",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _ReorderingConsumer(super().consumer(topic, group, member_id))


class _LosingConsumer(_Wrapped):
    def __init__(self, inner: LaneConsumer) -> None:
        super().__init__(inner)
        self.unsettled: dict[int, Delivery] = {}

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deliveries = await super().poll(partitions, max_per_lane, timeout, wake)
        self.unsettled.update((id(d), d) for d in deliveries)
        return deliveries

    async def ack(self, delivery: Delivery) -> None:
        self.unsettled.pop(id(delivery), None)
        await super().ack(delivery)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        self.unsettled.pop(id(delivery), None)
        await super().dead_letter(delivery, letter)

    async def close_lane(self, partition: int) -> None:
        for key in [k for k, d in self.unsettled.items() if d.partition == partition]:
            del self.unsettled[key]
        await super().close_lane(partition)

    async def stop(self, flush: bool) -> None:
        if not flush:  # the bug: a dying member's unsettled messages are dropped as if acked
            for delivery in list(self.unsettled.values()):
                await self.inner.ack(delivery)
        await super().stop(flush)


class LosingTransport(Memory):  # type: ignore[valid-type,misc]
    """Loses the messages a member held when it dies."""

    NAME: ClassVar[str] = "broken-lose"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-lose",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _LosingConsumer(super().consumer(topic, group, member_id))


class DuplicatingTransport(Memory):  # type: ignore[valid-type,misc]
    """Every member reads every partition as a group of its own: a group gets each message once
    per member."""

    NAME: ClassVar[str] = "broken-duplicate"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-duplicate",)
    ASSIGNMENT = "shared"

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _Wrapped(super().consumer(topic, f"{group}-{member_id}", member_id))  # the bug


class LyingPendingTransport(Memory):  # type: ignore[valid-type,misc]
    """pending_count leaves out what is in flight or waiting for redelivery."""

    NAME: ClassVar[str] = "broken-pending"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-pending",)

    async def pending_count(self, topic: str, group: str) -> int:
        never_delivered = [d for d in await self.peek(topic, group, 1_000_000) if d.attempt == 0]
        return len(never_delivered)  # the bug: only what no member was handed yet


# -- one bug per rule (docs/semantics.md) and per item of issue #21 ------------------------------
#
# Each class below is the memory provider with exactly one contract violation, reached through
# its public interface (a wrapper around its consumer, an overridden Transport method) or, where
# no public call can express the bug, the memory server's plain state (``transport.server``).

_rare = random.Random(0)


def set_seed(seed: int) -> None:
    """Seed the low-rate bugs (the 1-in-50 reordering, the 1-in-1,000 loss)."""
    _rare.seed(seed)


class _DelayForgettingConsumer(_Wrapped):
    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        await self.inner.retry(delivery, attempt, None)  # the bug: the delay is not stored with the message


class DelayLostOnHandOverTransport(Memory):  # type: ignore[valid-type,misc]
    """Keeps a delay only in the member that asked for it: the next owner hands the message at once."""

    NAME: ClassVar[str] = "broken-delay-handover"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-delay-handover",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _DelayForgettingConsumer(super().consumer(topic, group, member_id))


class _BrokerRedeliveryConsumer(_Wrapped):
    """REDELIVERY = "broker" on top of the memory consumer: a retried message and what was read
    after it in its lane come back through ``poll``."""

    forget_delay = False

    def __init__(self, inner: LaneConsumer) -> None:
        super().__init__(inner)
        self.out: dict[int, list[Delivery]] = {}
        """Per lane, what poll handed out and nobody settled, in lane order."""
        self.again: dict[int, list[Delivery]] = {}

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        replay = [p for p in partitions if self.again.get(p)]
        if replay:
            out: list[Delivery] = []
            for partition in replay:
                queued = self.again[partition]
                queue, self.again[partition] = queued[:max_per_lane], queued[max_per_lane:]
                out += queue
                self.out.setdefault(partition, []).extend(queue)
            return out
        deliveries = await self.inner.poll(partitions, max_per_lane, timeout, wake)
        for delivery in deliveries:
            self.out.setdefault(delivery.partition, []).append(delivery)
        return deliveries

    def _settled(self, delivery: Delivery) -> None:
        lane = self.out.get(delivery.partition, [])
        self.out[delivery.partition] = [d for d in lane if d.position != delivery.position]

    async def ack(self, delivery: Delivery) -> None:
        self._settled(delivery)
        await self.inner.ack(delivery)

    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        self._settled(delivery)
        await self.inner.dead_letter(delivery, letter)

    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        if self.forget_delay:
            not_before = None  # the bug (in the broken subclass): the broker redelivers at once
        await self.inner.retry(delivery, attempt, not_before)
        lane = self.out.pop(delivery.partition, [])
        again = dataclasses.replace(delivery, attempt=attempt, not_before=not_before)
        self.again[delivery.partition] = [again, *(d for d in lane if d.position != delivery.position)]

    async def _hand_back(self, partitions: Sequence[int]) -> None:
        for partition in partitions:
            queued = self.again.pop(partition, [])
            self.out.pop(partition, None)
            if queued:
                await self.inner.unread(queued)

    async def close_lane(self, partition: int) -> None:
        await self._hand_back([partition])
        await self.inner.close_lane(partition)

    async def stop(self, flush: bool) -> None:
        if flush:
            await self._hand_back(list(self.again))
        await self.inner.stop(flush)


class BrokerRedeliveryTransport(Memory):  # type: ignore[valid-type,misc]
    """Not broken: the memory provider with the broker doing redelivery (the control of
    :class:`DelayIgnoredByBrokerTransport`)."""

    NAME: ClassVar[str] = "memory-broker-redelivery"
    SCHEMES: ClassVar[tuple[str, ...]] = ("memory-broker-redelivery",)
    REDELIVERY = "broker"

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _BrokerRedeliveryConsumer(super().consumer(topic, group, member_id))


class _DelayIgnoringConsumer(_BrokerRedeliveryConsumer):
    forget_delay = True


class DelayIgnoredByBrokerTransport(Memory):  # type: ignore[valid-type,misc]
    """REDELIVERY = "broker" whose broker redelivers a delayed message at once."""

    NAME: ClassVar[str] = "broken-delay-broker"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-delay-broker",)
    REDELIVERY = "broker"

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _DelayIgnoringConsumer(super().consumer(topic, group, member_id))


class _AttemptForgettingConsumer(_Wrapped):
    async def retry(self, delivery: Delivery, attempt: int, not_before: float | None) -> None:
        delivery.failures = None
        await self.inner.retry(delivery, 1, not_before)  # the bug: the broker's count starts again


class AttemptNotPersistedTransport(Memory):  # type: ignore[valid-type,misc]
    """Does not store the attempt a retry announced: the next owner counts from 1 again."""

    NAME: ClassVar[str] = "broken-attempt-reset"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-attempt-reset",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _AttemptForgettingConsumer(super().consumer(topic, group, member_id))


class _KeyLosingConsumer(_Wrapped):
    async def dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        await self.inner.dead_letter(delivery, dataclasses.replace(letter, partition_key=letter.message_id))


class LetterLosesKeyTransport(Memory):  # type: ignore[valid-type,misc]
    """Stores a dead letter without its partition key (the message id in its place)."""

    NAME: ClassVar[str] = "broken-letter-key"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-letter-key",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _KeyLosingConsumer(super().consumer(topic, group, member_id))


class LettersNewestFirstTransport(Memory):  # type: ignore[valid-type,misc]
    """Lists dead letters newest first."""

    NAME: ClassVar[str] = "broken-letters-order"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-letters-order",)

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        return list(reversed(await super().dead_letters(topic, group)))  # the bug


class _HeaderDroppingConsumer(_Wrapped):
    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deliveries = await super().poll(partitions, max_per_lane, timeout, wake)
        return [dataclasses.replace(d, headers={}) if d.attempt > 1 else d for d in deliveries]  # the bug


class RedeliveryDropsHeadersTransport(Memory):  # type: ignore[valid-type,misc]
    """A redelivered message (attempt > 1) comes without its headers."""

    NAME: ClassVar[str] = "broken-redelivery-headers"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-redelivery-headers",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _HeaderDroppingConsumer(super().consumer(topic, group, member_id))


class LongHeadersCutTransport(Memory):  # type: ignore[valid-type,misc]
    """Cuts header values to 255 characters (an AMQP short string)."""

    NAME: ClassVar[str] = "broken-long-headers"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-long-headers",)

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        for record in records:
            record.headers = {k: v[:255] for k, v in record.headers.items()}  # the bug
        await super().publish(records, dedup_window)


class RecordKeyDroppedTransport(Memory):  # type: ignore[valid-type,misc]
    """Stores records without their partition key."""

    NAME: ClassVar[str] = "broken-record-key"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-record-key",)

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        for record in records:
            record.key = ""  # the bug
        await super().publish(records, dedup_window)


class LargeMessageDroppedTransport(Memory):  # type: ignore[valid-type,misc]
    """Confirms, then drops, records over 256 KiB (the declared limit is 1 MiB)."""

    NAME: ClassVar[str] = "broken-large-drop"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-large-drop",)

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        await super().publish([r for r in records if len(r.body) <= 256 * 1024], dedup_window)  # the bug


class PendingOfNewGroupTransport(Memory):  # type: ignore[valid-type,misc]
    """pending_count is 0 for a group that never subscribed (it will get the whole backlog)."""

    NAME: ClassVar[str] = "broken-pending-new-group"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-pending-new-group",)

    async def pending_count(self, topic: str, group: str) -> int:
        if (topic, group) not in self.server.groups:
            return 0  # the bug
        return int(await super().pending_count(topic, group))


class PendingAcrossGroupsTransport(Memory):  # type: ignore[valid-type,misc]
    """pending_count answers for the topic's first group, whichever group is asked about."""

    NAME: ClassVar[str] = "broken-pending-groups"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-pending-groups",)

    async def pending_count(self, topic: str, group: str) -> int:
        first = next((g for t, g in self.server.groups if t == topic), group)  # the bug
        return int(await super().pending_count(topic, first))


class DedupMissesBatchTwinsTransport(Memory):  # type: ignore[valid-type,misc]
    """Deduplicates against what earlier calls published, not within one publish_batch."""

    NAME: ClassVar[str] = "broken-dedup-batch"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-dedup-batch",)

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        if dedup_window is None:
            await super().publish(records, None)
            return
        server = self.server
        now = time.monotonic()
        fresh = [r for r in records if server.dedup.get(r.message_id, 0.0) <= now]
        await super().publish(fresh, None)  # the bug: twins inside the batch both go out
        for record in fresh:
            server.dedup[record.message_id] = now + dedup_window


class DedupShortWindowTransport(Memory):  # type: ignore[valid-type,misc]
    """Keeps a quarter of the configured deduplication window."""

    NAME: ClassVar[str] = "broken-dedup-window"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-dedup-window",)

    async def publish(self, records: Sequence[OutgoingRecord], dedup_window: float | None) -> None:
        await super().publish(records, None if dedup_window is None else dedup_window / 4)  # the bug


class _UnfencedConsumer(_Wrapped):
    def __init__(self, inner: LaneConsumer, transport: Transport, topic: str, group: str) -> None:
        super().__init__(inner)
        self.transport, self.topic, self.group = transport, topic, group

    async def ack(self, delivery: Delivery) -> None:
        await self.inner.ack(delivery)
        lanes = self.transport.server.groups.get((self.topic, self.group))  # type: ignore[attr-defined]
        if lanes is not None:  # the bug: settles even when the lease was lost (the inner ack dropped it)
            lanes[delivery.partition].pending.pop(delivery.position, None)


class FencedMemberSettlesTransport(Memory):  # type: ignore[valid-type,misc]
    """A member that lost its lease still settles the lane's messages."""

    NAME: ClassVar[str] = "broken-fencing"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-fencing",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _UnfencedConsumer(super().consumer(topic, group, member_id), self, topic, group)


class LateHandOverTransport(Memory):  # type: ignore[valid-type,misc]
    """Hands a silent member's lanes over ten claim timeouts late."""

    NAME: ClassVar[str] = "broken-late-handover"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-late-handover",)

    async def acquire_lease(self, lane: Lane, member_id: str, ttl: float) -> str | None:
        lease = self.server.leases.get(lane)
        if lease is not None and lease.member != member_id and time.monotonic() < lease.expires + 9 * ttl:
            return None  # the bug: an expired lease is honoured nine claim timeouts longer
        return cast("str | None", await super().acquire_lease(lane, member_id, ttl))


class _RarelyReorderingConsumer(_Wrapped):
    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deliveries = await super().poll(partitions, max_per_lane, timeout, wake)
        by_lane: dict[int, list[Delivery]] = {}
        for delivery in deliveries:
            by_lane.setdefault(delivery.partition, []).append(delivery)
        for lane in by_lane.values():
            if len(lane) > 1 and _rare.random() < 1 / 50:
                lane[0], lane[1] = lane[1], lane[0]  # the bug, once in 50 batches
        return [d for lane in by_lane.values() for d in lane]


class RareReorderTransport(Memory):  # type: ignore[valid-type,misc]
    """Swaps the first two messages of one polled batch of a lane in 50."""

    NAME: ClassVar[str] = "broken-reorder-rare"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-reorder-rare",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _RarelyReorderingConsumer(super().consumer(topic, group, member_id))


class _RarelyLosingConsumer(_Wrapped):
    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        kept = []
        for delivery in await super().poll(partitions, max_per_lane, timeout, wake):
            if delivery.attempt == 1 and _rare.random() < 1 / 1000:
                await self.inner.ack(delivery)  # the bug: settled without a handler, once in 1,000
            else:
                kept.append(delivery)
        return kept


class RareLossTransport(Memory):  # type: ignore[valid-type,misc]
    """Loses one message in 1,000 (acked as it is read)."""

    NAME: ClassVar[str] = "broken-lose-rare"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-lose-rare",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _RarelyLosingConsumer(super().consumer(topic, group, member_id))

class ReplayRemovesByIdTransport(Memory):  # type: ignore[valid-type,misc]
    """Removes a replay's letters by message id (the interface's default): a letter of the same
    message stored since goes too."""

    NAME: ClassVar[str] = "broken-replay-by-id"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-replay-by-id",)

    async def remove_listed_dead_letters(self, topic: str, group: str, letters: Sequence[DeadLetter]) -> int:
        return await self.remove_dead_letters(topic, group, [letter.message_id for letter in letters])  # the bug


class DescribeShiftedTransport(Memory):  # type: ignore[valid-type,misc]
    """``describe`` puts each partition's pending count on the next partition (the total stays right)."""

    NAME: ClassVar[str] = "broken-describe-shifted"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-describe-shifted",)

    async def describe(self, topic: str, group: str) -> GroupView:
        view = cast("GroupView", await super().describe(topic, group))
        parts = view.partitions
        shifted = tuple(dataclasses.replace(p, pending=parts[p.partition - 1].pending) for p in parts)  # the bug
        return dataclasses.replace(view, partitions=shifted)


class DescribeGhostOwnerTransport(Memory):  # type: ignore[valid-type,misc]
    """``describe`` keeps naming a lane's last holder after its lease ended (a member gone)."""

    NAME: ClassVar[str] = "broken-describe-ghost"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-describe-ghost",)

    async def describe(self, topic: str, group: str) -> GroupView:
        view = cast("GroupView", await super().describe(topic, group))
        ghost = tuple(dataclasses.replace(p, owner="gone-member") if p.partition == 0 else p
                      for p in view.partitions)  # the bug
        return dataclasses.replace(view, partitions=ghost)


class ReplyCutTransport(Memory):  # type: ignore[valid-type,misc]
    """Cuts a reply's body to 16 bytes (a reply channel with a small size limit)."""

    NAME: ClassVar[str] = "broken-reply-cut"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-reply-cut",)

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        await super().send_reply(address, request_id, headers, body[:16])  # the bug


class ScheduleIgnoredTransport(Memory):  # type: ignore[valid-type,misc]
    """Publishes a scheduled message at once (its time ignored)."""

    NAME: ClassVar[str] = "broken-schedule-early"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-schedule-early",)

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        await self.publish([record], None)  # the bug


class CancelKeepsTransport(Memory):  # type: ignore[valid-type,misc]
    """``cancel_scheduled`` answers True and leaves the message scheduled."""

    NAME: ClassVar[str] = "broken-schedule-cancel"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-schedule-cancel",)

    cancelled: ClassVar[set[tuple[str, str]]] = set()

    async def cancel_scheduled(self, topic: str, message_id: str) -> bool:
        waiting = (topic, message_id) in self.server.scheduled and (topic, message_id) not in self.cancelled
        self.cancelled.add((topic, message_id))  # the bug: it stays scheduled
        return waiting


BROKEN_TRANSPORTS: list[type[Transport]] = [
    ReorderingTransport, LosingTransport, DuplicatingTransport, LyingPendingTransport,
    DelayLostOnHandOverTransport, DelayIgnoredByBrokerTransport, AttemptNotPersistedTransport,
    LetterLosesKeyTransport, LettersNewestFirstTransport, RedeliveryDropsHeadersTransport,
    LongHeadersCutTransport, RecordKeyDroppedTransport, LargeMessageDroppedTransport,
    PendingOfNewGroupTransport, PendingAcrossGroupsTransport, DedupMissesBatchTwinsTransport,
    DedupShortWindowTransport, FencedMemberSettlesTransport, LateHandOverTransport, RareReorderTransport,
    RareLossTransport, ReplayRemovesByIdTransport, DescribeShiftedTransport, DescribeGhostOwnerTransport,
    ReplyCutTransport, ScheduleIgnoredTransport, CancelKeepsTransport,
]


@hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    return [*BROKEN_TRANSPORTS, BrokerRedeliveryTransport]


def register() -> None:
    """Make the broken providers connectable by their schemes (idempotent)."""
    name = "msgbroker-conformance-broken-providers"
    if not msgbroker.registry.plugins.has_plugin(name):
        msgbroker.registry.register(sys.modules[__name__], name=name)


