"""Helpers for testing code that uses msgbroker (and for msgbroker's own tests)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from ._harness import ServiceRun, Settle, run_in_memory

__all__ = ["ServiceRun", "Settle", "eventually", "forget_memory_broker", "run_in_memory"]


async def eventually(
    condition: Callable[[], object | Awaitable[object]], timeout: float = 10.0, what: str = "", interval: float = 0.01
) -> None:
    """Wait until ``condition()`` (sync or async) is truthy, polling every ``interval`` seconds.

    Raises ``AssertionError`` naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


def forget_memory_broker(name: str) -> bool:
    """Drop the named in-memory broker (``memory://NAME``) and everything it holds; a later
    connection to that name starts empty. Named brokers otherwise live as long as the process.
    True when there was one."""
    from ._memory import forget

    return forget(name)
