"""A member's reading costs with the lanes that have work, not with the lanes it holds: the engine
keeps the lanes that want deliveries as they change (docs/benchmarks.md), and the in-memory
provider's poll looks only at the lanes asked for that may have something. What both must keep:
every lane that wants deliveries is asked for, none that is full or held back, and nothing a lane
has is left unread."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import msgbroker
import pytest
from msgbroker import Delivery, Lane, Message, MessageContext, partition_for
from msgbroker.testing import eventually


class Keyed(Message):
    key: str
    n: int = 0

    @property
    def partition_key(self) -> str:
        return self.key


def _key_for(partition: int, partitions: int, avoid: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    for i in range(10_000):
        key = f"k{i}"
        if partition_for(key, partitions) == partition and key not in avoid:
            return key
    raise AssertionError("no key found")


class _Listener:
    ordered = True
    closing = False

    async def assigned(self, partitions: Sequence[int]) -> None:
        pass

    async def revoked(self, partitions: Sequence[int]) -> None:
        pass


async def test_a_memory_poll_of_some_lanes_leaves_the_others_unread() -> None:
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=4) as broker:
        transport = broker.transport
        consumer = transport.consumer("t", "g", "member-a")
        await consumer.start(_Listener(), None)
        tokens = {}
        for p in range(4):
            token = await transport.acquire_lease(Lane("t", "g", p), "member-a", 30.0)
            assert token is not None
            tokens[p] = token
            await consumer.open_lane(p, token)
        keys = [_key_for(p, 4) for p in range(4)]
        await broker.publish_batch("t", [Keyed(key=keys[p], n=i) for i in range(3) for p in range(4)])

        def lanes(deliveries: list[Delivery]) -> dict[int, int]:
            counts: dict[int, int] = {}
            for d in deliveries:
                counts[d.partition] = counts.get(d.partition, 0) + 1
            return counts

        first = await consumer.poll((0, 1), 2, 0.0, asyncio.Event())  # 2 of each lane's 3
        assert lanes(first) == {0: 2, 1: 2}
        rest = await consumer.poll([0, 1, 2, 3], 10, 0.0, asyncio.Event())
        assert lanes(rest) == {0: 1, 1: 1, 2: 3, 3: 3}  # lanes 2 and 3 were not asked before: still unread
        assert await consumer.poll((0, 1, 2, 3), 10, 0.0, asyncio.Event()) == []

        await broker.publish("t", Keyed(key=keys[2], n=9))  # appended after lane 2 was read to its end
        again = await consumer.poll((0, 1, 2, 3), 10, 0.5, asyncio.Event())
        assert [(d.partition, d.attempt) for d in again] == [(2, 1)]

        # lane 3 handed back unsettled and opened again: its history comes first, counted again
        await consumer.close_lane(3)
        await consumer.open_lane(3, tokens[3])
        history = await consumer.poll((0, 1, 2, 3), 10, 0.0, asyncio.Event())
        assert [(d.partition, d.attempt) for d in history] == [(3, 2)] * 3
        assert [d.message_id for d in history] == [d.message_id for d in rest if d.partition == 3]
        await consumer.stop(flush=True)


async def test_the_read_loop_asks_only_for_the_lanes_that_want_deliveries() -> None:
    partitions = 8
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=partitions, batch_size=2,
                                 poll_timeout=0.02) as broker:
        busy = 5
        key = _key_for(busy, partitions)
        release = asyncio.Event()
        handled: list[int] = []

        async def handle(ctx: MessageContext[Keyed]) -> None:
            if ctx.partition == busy and ctx.message.n == 0:
                await release.wait()
            handled.append(ctx.message.n)

        subscription = await broker.subscribe("t", "g", handle, message_type=Keyed)
        runner = subscription._runner
        await eventually(lambda: len(subscription.partitions) == partitions)
        asked: list[Sequence[int]] = []
        poll = runner.consumer.poll

        async def recording_poll(lanes: Sequence[int], *args: object) -> list[Delivery]:
            asked.append(lanes)
            return await poll(lanes, *args)  # type: ignore[arg-type]

        runner.consumer.poll = recording_poll  # type: ignore[method-assign]
        await eventually(lambda: len(asked) >= 3)
        assert sorted(asked[-1]) == list(range(partitions))

        # batches of 2 (low water 1): the busy lane's buffer holds its head and one more, so it
        # wants nothing until its handler is released
        await broker.publish_batch("t", [Keyed(key=key, n=n) for n in range(3)])
        await eventually(lambda: asked and busy not in asked[-1])
        start = len(asked)
        await eventually(lambda: len(asked) >= start + 5)  # the loop goes on polling (timeouts)
        quiet = asked[start:]
        assert all(busy not in lanes and len(lanes) == partitions - 1 for lanes in quiet)
        assert len({id(lanes) for lanes in quiet}) == 1  # nothing changed: the same tuple, not rebuilt

        release.set()
        await eventually(lambda: handled == [0, 1, 2])
        await eventually(lambda: busy in asked[-1])
        assert sorted(asked[-1]) == list(range(partitions))


@pytest.mark.parametrize("bound", [1, 4])
async def test_lanes_open_concurrently_up_to_the_provider_s_bound(monkeypatch: pytest.MonkeyPatch, bound: int) -> None:
    """``LaneConsumer.OPENS_AT_ONCE``: a member taking many lanes opens them that many at a time
    (one after another by default), and every lane opened runs."""
    from msgbroker._memory import _MemoryConsumer

    open_lane = _MemoryConsumer.open_lane
    active, most = 0, 0

    async def slow_open(self: _MemoryConsumer, partition: int, lease: str | None) -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            await asyncio.sleep(0.01)
            await open_lane(self, partition, lease)
        finally:
            active -= 1

    monkeypatch.setattr(_MemoryConsumer, "open_lane", slow_open)
    monkeypatch.setattr(_MemoryConsumer, "OPENS_AT_ONCE", bound)
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=16) as broker:
        keys = [_key_for(p, 16) for p in range(16)]
        await broker.publish_batch("t", [Keyed(key=k) for k in keys])
        seen: set[int] = set()

        async def handle(ctx: MessageContext[Keyed]) -> None:
            seen.add(ctx.partition)

        subscription = await broker.subscribe("t", "g", handle, message_type=Keyed)
        assert subscription.partitions == list(range(16))
        await eventually(lambda: seen == set(range(16)), what="every lane handled its message")
    assert most == bound


async def test_a_lane_that_fails_to_open_does_not_keep_the_others_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from msgbroker._engine import SubscriptionRunner
    from msgbroker._memory import _MemoryConsumer

    open_lane = _MemoryConsumer.open_lane

    async def failing_open(self: _MemoryConsumer, partition: int, lease: str | None) -> None:
        await asyncio.sleep(0)
        if partition == 2:
            raise RuntimeError("lane 2 cannot open")
        await open_lane(self, partition, lease)

    monkeypatch.setattr(_MemoryConsumer, "open_lane", failing_open)
    monkeypatch.setattr(_MemoryConsumer, "OPENS_AT_ONCE", 3)
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=8) as broker:
        async def handle(message: Keyed) -> None:
            pass

        subscription = await broker.subscribe_to_partition("t", "g", 0, handle, message_type=Keyed)
        runner: SubscriptionRunner = subscription._runner
        with pytest.raises(RuntimeError, match="lane 2 cannot open"):
            await runner.assigned([1, 2, 3, 4, 5])
        assert runner.partitions == [0, 1, 3, 4, 5]
