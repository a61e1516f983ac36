"""Shared by every test of the repository: when a test hangs, say where its asyncio tasks wait.

pytest-timeout fails a test that runs past its limit and prints the threads' stacks; an asyncio
test that hangs shows only its event loop idling in ``select``. A little before the limit this
prints, to stderr, every task of the running event loops and the chain of coroutines each one
is suspended in, down to the future it waits for.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from collections.abc import Iterator
from types import CoroutineType, FrameType, GeneratorType
from typing import Any

import pytest

_BEFORE_THE_LIMIT = 15.0
"""Seconds before pytest-timeout's limit that the tasks are printed."""


def _limit(item: pytest.Item) -> float | None:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        value = item.config.getini("timeout")
    except ValueError:  # pytest-timeout not installed
        return None
    return float(value) if value else None


def _chain(coro: Any) -> Iterator[str]:
    """Where a suspended coroutine and those it awaits stand, innermost last."""
    for _ in range(64):
        frame: FrameType | None = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            yield f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        awaited = getattr(coro, "cr_await", None) if isinstance(coro, CoroutineType) else None
        if awaited is None and isinstance(coro, GeneratorType):
            awaited = coro.gi_yieldfrom
        if awaited is None:
            return
        if not isinstance(awaited, CoroutineType | GeneratorType):
            yield f"    waiting for {awaited!r:.300}"
            return
        coro = awaited


def _print_tasks() -> None:
    out = sys.__stderr__
    if out is None:
        return
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    lines: list[str] = []
    for loop in loops:
        tasks: list[asyncio.Task[Any]] = []
        for _ in range(5):  # the set may change under this thread: take it again
            try:
                tasks = list(asyncio.all_tasks(loop))
                break
            except RuntimeError:
                continue
        lines.append(f"+++ {len(tasks)} asyncio task(s) of {loop!r} +++")
        for task in tasks:
            lines.append(f"--- {task.get_name()}{' (cancelling)' if task.cancelling() else ''}")
            lines.extend(_chain(task.get_coro()))
    if lines:
        out.write("\n".join(lines) + "\n")
        out.flush()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    limit = _limit(item)
    timer = None
    if limit is not None and limit > 0:
        timer = threading.Timer(max(limit - _BEFORE_THE_LIMIT, limit * 0.8), _print_tasks)
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()
