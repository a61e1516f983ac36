"""Deliberately broken providers: the in-memory provider with one contract violation each,
built on its public interface only (a wrapper around its consumer or one overridden method).
The suite must fail every one of them (test_broken_providers.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import ClassVar

import msgbroker
from msgbroker.spi import AssignmentListener, DeadLetter, Delivery, LaneConsumer, Transport, hookimpl

__all__ = ["DuplicatingTransport", "LosingTransport", "LyingPendingTransport", "ReorderingTransport", "register"]

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


@hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    return [ReorderingTransport, LosingTransport, DuplicatingTransport, LyingPendingTransport]


def register() -> None:
    """Make the broken providers connectable by their schemes (idempotent)."""
    name = "msgbroker-conformance-broken-providers"
    if not msgbroker.registry.plugins.has_plugin(name):
        msgbroker.registry.register(sys.modules[__name__], name=name)


