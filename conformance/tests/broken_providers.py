"""Deliberately broken providers: the in-memory provider with one contract violation each.
The suite must fail every one of them (test_broken_providers.py)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import msgbroker
from msgbroker import Delivery, LaneConsumer, Transport, hookimpl
from msgbroker._memory import MemoryTransport, _MemoryConsumer, _Pending

__all__ = ["DuplicatingTransport", "LosingTransport", "LyingPendingTransport", "ReorderingTransport", "register"]


class _ReorderingConsumer(_MemoryConsumer):
    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deliveries = await super().poll(partitions, max_per_lane, timeout, wake)
        by_lane: dict[int, list[Delivery]] = {}
        for delivery in deliveries:
            by_lane.setdefault(delivery.partition, []).append(delivery)
        return [d for lane in by_lane.values() for d in reversed(lane)]  # the bug: a batch comes back reversed


class ReorderingTransport(MemoryTransport):
    """Hands each polled batch of a partition over in reverse order."""

    NAME: ClassVar[str] = "broken-reorder"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-reorder",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _ReorderingConsumer(self, topic, group, member_id)


class _LosingConsumer(_MemoryConsumer):
    async def stop(self, flush: bool) -> None:
        if not flush:  # the bug: a dying member's unsettled messages are dropped as if acked
            lanes = self._lanes()
            for partition in self._tokens:
                lanes[partition].pending.clear()
        await super().stop(flush)


class LosingTransport(MemoryTransport):
    """Loses the messages a member held when it dies."""

    NAME: ClassVar[str] = "broken-lose"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-lose",)

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _LosingConsumer(self, topic, group, member_id)


class _DuplicatingConsumer(_MemoryConsumer):
    """Reads every lane with a cursor of its own instead of the group's."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._cursor: dict[int, int] = {}

    async def open_lane(self, partition: int, lease: str | None) -> None:
        await super().open_lane(partition, lease)
        self._history[partition].clear()

    async def poll(
        self, partitions: Sequence[int], max_per_lane: int, timeout: float, wake: asyncio.Event
    ) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            if self._stopped:
                return []
            server = self._transport.server
            changed = server.changed
            logs = server.log_of(self._topic, self._transport._partitions)
            lanes = self._lanes()
            out: list[Delivery] = []
            for partition in partitions:
                entries, lane = logs[partition], lanes[partition]
                cursor = self._cursor.get(partition, 0)
                while cursor < len(entries) and len(out) < max_per_lane:
                    entry = entries[cursor]
                    pending = lane.pending.setdefault(entry.offset, _Pending(0))
                    pending.count += 1
                    lane.next_offset = max(lane.next_offset, cursor + 1)
                    out.append(self._delivery(entry, partition, pending))
                    cursor += 1
                self._cursor[partition] = cursor
            remaining = deadline - time.monotonic()
            if out or remaining <= 0 or wake.is_set():
                return out
            waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(wake.wait())]
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if wake.is_set():
                return []


class DuplicatingTransport(MemoryTransport):
    """Every member reads every partition with its own cursor: a group gets each message once
    per member."""

    NAME: ClassVar[str] = "broken-duplicate"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-duplicate",)
    ASSIGNMENT = "shared"

    def consumer(self, topic: str, group: str, member_id: str) -> LaneConsumer:
        return _DuplicatingConsumer(self, topic, group, member_id)


class LyingPendingTransport(MemoryTransport):
    """pending_count leaves out what is in flight or waiting for redelivery."""

    NAME: ClassVar[str] = "broken-pending"
    SCHEMES: ClassVar[tuple[str, ...]] = ("broken-pending",)

    async def pending_count(self, topic: str, group: str) -> int:
        server = self.server
        log_ = server.logs.get(topic)
        lanes = server.groups.get((topic, group))
        if log_ is None or lanes is None:
            return 0
        return sum(len(part) - lane.next_offset for part, lane in zip(log_, lanes, strict=True))


@hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    return [ReorderingTransport, LosingTransport, DuplicatingTransport, LyingPendingTransport]


def register() -> None:
    """Make the broken providers connectable by their schemes (idempotent)."""
    name = "msgbroker-conformance-broken-providers"
    if not msgbroker.registry.plugins.has_plugin(name):
        msgbroker.registry.register(sys.modules[__name__], name=name)
