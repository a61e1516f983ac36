"""The engine's concurrency on the in-memory provider: the bounded worker pool of unordered
subscriptions, the semaphore of ordered ones, and what a stopped lane leaves for the next owner.

Events gate the handlers; nothing here asserts a duration."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgbroker
import pytest
from msgbroker import Message, MessageContext
from msgbroker.testing import eventually


class Job(Message):
    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


def connect(name: str | None = None, **overrides: Any) -> msgbroker.Broker:
    options: dict[str, Any] = {"partition_count": 8, "retry_delay": 0, "memory": {"claim_timeout": 0.5}}
    options.update(overrides)
    return msgbroker.connect(f"memory://{name or uuid.uuid4().hex}", **options)


class Gate:
    """Handlers that block until released, counting how many run at once."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.active = 0
        self.peak = 0
        self.active_per_partition: dict[int, int] = {}
        self.peak_per_partition = 0
        self.handled: list[tuple[str, int, int]] = []  # (key, seq, attempt), when the handler ends

    async def handle(self, ctx: MessageContext[Job]) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        per = self.active_per_partition[ctx.partition] = self.active_per_partition.get(ctx.partition, 0) + 1
        self.peak_per_partition = max(self.peak_per_partition, per)
        try:
            await self.open.wait()
            self.handled.append((ctx.message.key, ctx.message.seq, ctx.delivery_attempt))
        finally:
            self.active -= 1
            self.active_per_partition[ctx.partition] -= 1


def _handler_tasks(topic: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(("msgbroker-worker-", "msgbroker-h-"))
            and not t.done()]


@pytest.mark.parametrize(("limit", "where"), [(3, "subscribe"), (2, "settings"), (100, "default")])
async def test_unordered_runs_at_most_its_concurrency_limit_with_no_task_per_message(limit: int, where: str) -> None:
    overrides = {"max_concurrency": limit} if where == "settings" else {}
    async with connect(**overrides) as broker:
        gate = Gate()
        kwargs = {"max_concurrency": limit} if where == "subscribe" else {}
        await broker.subscribe("t", "g", gate.handle, ordered=False, **kwargs)
        total = limit * 3 + 5
        await broker.publish_batch("t", [Job(key=f"k{i % 5}", seq=i) for i in range(total)])
        await eventually(lambda: gate.active == limit, what=f"{limit} handlers running")
        for _ in range(20):  # let anything that would exceed the limit start
            await asyncio.sleep(0)
        assert gate.active == limit
        assert len(_handler_tasks("t")) <= limit  # workers, not one task per message
        gate.open.set()
        await eventually(lambda: len(gate.handled) == total, what="every message handled")
        assert gate.peak == limit
        assert sorted(seq for _, seq, _ in gate.handled) == list(range(total))
        assert await broker.pending_count("t", "g") == 0


async def test_unordered_runs_one_partition_concurrently_and_takes_turns_across_partitions() -> None:
    async with connect(partition_count=4) as broker:
        gate = Gate()
        await broker.subscribe("t", "g", gate.handle, ordered=False, max_concurrency=6)
        # one hot key (one partition) with many messages, three other keys with a few
        jobs = [Job(key="hot", seq=i) for i in range(20)] + [Job(key=f"cold{i}", seq=100 + i) for i in range(3)]
        await broker.publish_batch("t", jobs)
        await eventually(lambda: gate.active == 6)
        assert gate.peak_per_partition > 1
        gate.open.set()
        await eventually(lambda: len(gate.handled) == len(jobs))


async def test_unordered_close_lets_in_flight_handlers_finish_and_takes_nothing_new() -> None:
    async with connect() as broker:
        gate = Gate()
        sub = await broker.subscribe("t", "g", gate.handle, ordered=False, max_concurrency=2)
        await broker.publish_batch("t", [Job(key=f"k{i}", seq=i) for i in range(10)])
        await eventually(lambda: gate.active == 2)
        closing = asyncio.create_task(sub.close())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not closing.done()  # waiting for the two in-flight handlers
        gate.open.set()
        await closing
        assert len(gate.handled) == 2
        assert await broker.pending_count("t", "g") == 8
        assert _handler_tasks("t") == []  # the workers are gone with the subscription

        # what was read ahead but never handled comes back as a first attempt
        again = Gate()
        again.open.set()
        await broker.subscribe("t", "g", again.handle, ordered=False)
        await eventually(lambda: len(again.handled) == 8)
        assert {attempt for _, _, attempt in again.handled} == {1}


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_handler_past_the_grace_period_is_cut_off_and_its_message_comes_back(ordered: bool) -> None:
    async with connect(partition_count=1, shutdown_timeout=0.05) as broker:
        hang = asyncio.Event()  # never set
        started: list[int] = []

        async def stuck(ctx: MessageContext[Job]) -> None:
            started.append(ctx.message.seq)
            await hang.wait()

        sub = await broker.subscribe("t", "g", stuck, ordered=ordered, max_concurrency=1)
        await broker.publish_batch("t", [Job(key="k", seq=i) for i in range(4)])
        await eventually(lambda: started == [0])
        await sub.close()
        assert await broker.pending_count("t", "g") == 4

        gate = Gate()
        gate.open.set()
        await broker.subscribe("t", "g", gate.handle, ordered=ordered)
        await eventually(lambda: len(gate.handled) == 4)
        attempts = {seq: attempt for _, seq, attempt in gate.handled}
        # seq 0 was handed to a handler (a delivery that counts); the others were only read ahead
        assert attempts == {0: 2, 1: 1, 2: 1, 3: 1}


async def test_unordered_failures_are_retried_then_dead_lettered_while_the_rest_goes_on() -> None:
    async with connect(max_retry_attempts=3) as broker:
        attempts: dict[int, list[int]] = {}

        async def handle(ctx: MessageContext[Job]) -> None:
            attempts.setdefault(ctx.message.seq, []).append(ctx.delivery_attempt)
            if ctx.message.seq % 4 == 0:
                raise RuntimeError(f"job {ctx.message.seq} fails")

        await broker.subscribe("t", "g", handle, ordered=False, max_concurrency=3)
        await broker.publish_batch("t", [Job(key=f"k{i}", seq=i) for i in range(12)])
        await eventually(lambda: len(attempts) == 12 and all(len(attempts[s]) == 3 for s in (0, 4, 8)))

        async def three_dead() -> bool:
            return len(await broker.dead_letters("t", "g")) == 3

        await eventually(three_dead, what="three dead letters")
        letters = await broker.dead_letters("t", "g")
        assert sorted(letter.attempts for letter in letters) == [3, 3, 3]
        assert all("fails" in letter.error for letter in letters)
        for seq, seen in attempts.items():
            assert seen == ([1, 2, 3] if seq % 4 == 0 else [1])
        assert await broker.pending_count("t", "g") == 0


async def test_ordered_with_a_concurrency_limit_keeps_order_per_partition() -> None:
    async with connect(partition_count=8) as broker:
        seen: list[tuple[str, int]] = []
        active = peak = 0
        per_partition: dict[int, int] = {}
        peak_per_partition = 0

        async def handle(ctx: MessageContext[Job]) -> None:
            nonlocal active, peak, peak_per_partition
            active += 1
            per_partition[ctx.partition] = per_partition.get(ctx.partition, 0) + 1
            peak, peak_per_partition = max(peak, active), max(peak_per_partition, per_partition[ctx.partition])
            try:
                for _ in range(3):
                    await asyncio.sleep(0)
                seen.append((ctx.message.key, ctx.message.seq))
            finally:
                active -= 1
                per_partition[ctx.partition] -= 1

        await broker.subscribe("t", "g", handle, max_concurrency=2)
        jobs = [Job(key=f"k{i % 6}", seq=i) for i in range(120)]
        await broker.publish_batch("t", jobs)
        await eventually(lambda: len(seen) == len(jobs))
        assert peak <= 2 and peak_per_partition == 1
        for key in {j.key for j in jobs}:
            seqs = [s for k, s in seen if k == key]
            assert seqs == sorted(seqs), f"{key} out of order: {seqs}"


async def test_unordered_handling_creates_no_task_per_message() -> None:
    loop = asyncio.get_running_loop()
    created: list[asyncio.Future[Any]] = []
    default = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        task = default(loop, coro, **kwargs) if default else asyncio.Task(coro, loop=loop, **kwargs)
        created.append(task)  # named by create_task after the factory returns
        return task

    async with connect(partition_count=2) as broker:
        done = asyncio.Event()
        count = 0

        async def handle(ctx: MessageContext[Job]) -> None:
            nonlocal count
            count += 1
            if count == 500:
                done.set()

        await broker.subscribe("t", "g", handle, ordered=False, max_concurrency=4)
        loop.set_task_factory(counting)
        try:
            await broker.publish_batch("t", [Job(key=f"k{i}", seq=i) for i in range(500)])
            await asyncio.wait_for(done.wait(), 30)
        finally:
            loop.set_task_factory(default)
        names = [t.get_name() for t in created if isinstance(t, asyncio.Task)]
        handler_tasks = [name for name in names if name.startswith(("msgbroker-worker-", "msgbroker-h-"))]
        assert len(handler_tasks) <= 4, handler_tasks[:10]
