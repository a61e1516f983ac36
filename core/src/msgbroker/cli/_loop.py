"""Where a command's coroutines run: on a new event loop (``asyncio.run``) as a command, and on the
caller's loop when called as ``await main_async([...])`` from async code (see docs/cli.md, "From
Python and in tests").

Commands are synchronous functions (typer calls them); each runs its broker work with
:func:`run_async`. ``main_async`` calls the command in a worker thread, and :func:`run_async` in
that thread hands the coroutine back to the caller's loop and waits for it, so the broker work
shares the loop (and a ``memory://NAME`` broker) with the caller's own tasks, which keep running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_caller_loop: ContextVar[asyncio.AbstractEventLoop | None] = ContextVar("msgbroker_cli_caller_loop", default=None)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine to its end: on the caller's loop under ``main_async``, else on a new loop."""
    loop = _caller_loop.get()
    if loop is None:
        return asyncio.run(coroutine)
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


def loop_running() -> bool:
    """Whether this thread runs an event loop (``asyncio.run`` cannot start another here)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def in_thread(call: Callable[[], T]) -> T:
    """``call()`` in a thread of its own, waited for (the caller's loop is blocked meanwhile)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="msgbroker-cli") as pool:
        return pool.submit(call).result()


async def on_this_loop(call: Callable[[], T]) -> T:
    """``call()`` in a worker thread whose :func:`run_async` runs coroutines on the calling loop."""
    loop = asyncio.get_running_loop()

    def bound() -> T:
        _caller_loop.set(loop)  # this thread's own context: asyncio.to_thread ran it in a copy
        return call()

    return await asyncio.to_thread(bound)
