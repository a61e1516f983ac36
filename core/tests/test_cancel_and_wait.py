"""msgbroker.spi.cancel_and_wait: a stop ends even when a task loses its cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest
from msgbroker.spi import cancel_and_wait


async def test_a_loop_that_lost_its_cancellation_is_cancelled_again() -> None:
    # What Python 3.11's asyncio.wait_for does to a cancellation that arrives as the operation it
    # waits for completes (a client's socket write): the loop goes on as if it had not come.
    lost = []
    rounds = 0

    async def loop_forever() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if not lost:
                    lost.append(True)  # the first cancellation is lost
                    continue
                raise

    task = asyncio.create_task(loop_forever())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(30):  # a hang fails here rather than at pytest-timeout
        await cancel_and_wait([task])
    assert lost == [True]
    assert task.cancelled()


async def test_exceptions_are_taken_and_done_tasks_pass(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise ValueError("boom")

    async def fail_on_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("while stopping") from None

    failed = asyncio.create_task(fail())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(fail_on_cancel())
    await asyncio.sleep(0)
    await cancel_and_wait([failed, stopping])  # raises neither
    assert isinstance(failed.exception(), ValueError)
    assert isinstance(stopping.exception(), RuntimeError)


async def test_a_task_that_never_ends_is_left_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0.02)  # under way (a task cancelled before it starts never runs)
    with caplog.at_level(logging.WARNING, logger="msgbroker"):
        await cancel_and_wait([task], bound=0.3)
    assert not task.done()
    assert "stubborn" in caplog.text and "left running" in caplog.text
    release.set()
    await task
