"""Cancellation reaches every engine task, however its wake-up and the cancel interleave.

Python 3.11's ``asyncio.wait_for`` returns the inner result instead of raising when the task
is cancelled in the same loop iteration as the inner awaitable completes (the cancellation is
swallowed). The engine waited for a delayed message's ``not_before`` that way, so a lane
woken by new data at the moment ``Broker.abort()`` cancelled it went on waiting for the rest
of the delay, and ``abort()`` did not return. Found by the conformance state machine (seed 777
of the long profile)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgbroker
from msgbroker import Message, MessageContext


class Job(Message):
    key: str

    @property
    def partition_key(self) -> str:
        return self.key


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_abort_returns_when_a_delayed_lane_is_woken_as_it_is_cancelled() -> None:
    broker = await msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=1)
    seen: list[int] = []

    async def delay_first(ctx: MessageContext[Job]) -> None:
        seen.append(ctx.delivery_attempt)
        if ctx.delivery_attempt == 1:
            await ctx.delay(60)  # the lane now waits out the delay before its next handling

    subscription = await broker.subscribe("jobs", "workers", delay_first)
    await broker.publish("jobs", Job(key="k"))
    await _until(lambda: seen == [1])
    runner = subscription._runner
    lane = runner._lanes[0]
    await _until(lambda: not lane.data.is_set() and lane.buffer and lane.buffer[0].not_before is not None)
    await asyncio.sleep(0.05)  # the lane task is inside its wait for not_before
    lane.data.set()  # the lane is woken (new data, a stop) ...
    aborting = asyncio.ensure_future(broker.abort())  # ... in the iteration that cancels it
    done, _ = await asyncio.wait({aborting}, timeout=5)
    assert done, "Broker.abort() did not return: a lane task swallowed its cancellation"
    assert lane.task is not None and lane.task.done()
    assert seen == [1]


async def test_close_returns_when_a_delayed_lane_is_woken_as_it_is_cancelled() -> None:
    broker = await msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=1, shutdown_timeout=0.2)
    seen: list[int] = []

    async def delay_first(ctx: MessageContext[Job]) -> None:
        seen.append(ctx.delivery_attempt)
        if ctx.delivery_attempt == 1:
            await ctx.delay(60)

    subscription = await broker.subscribe("jobs", "workers", delay_first)
    await broker.publish("jobs", Job(key="k"))
    await _until(lambda: seen == [1])
    lane = subscription._runner._lanes[0]
    await _until(lambda: not lane.data.is_set() and lane.buffer and lane.buffer[0].not_before is not None)
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(subscription.close())
    done, _ = await asyncio.wait({closing}, timeout=5)
    assert done, "Subscription.close() did not return while a lane waited out a delay"
    assert seen == [1]
    await broker.close()
