"""Stopping background tasks so that a stop always ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("msgbroker")

RECANCEL_AFTER = 1.0
"""Seconds a cancelled task is given to finish before it is cancelled again."""


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, bound: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until each has ended; their exceptions are taken (not raised).

    One cancellation is not always enough: on Python 3.11 ``asyncio.wait_for`` loses a
    cancellation that arrives as the operation it waits for completes (CPython gh-86296), and
    client libraries wrap their socket writes in it (redis-py does). The task then goes on as if
    nothing happened, and a ``while True`` loop in it never ends: a close that awaited it hung.
    So a task still running ``RECANCEL_AFTER`` seconds after its cancellation is cancelled again,
    each time, for at most ``bound`` seconds; one that outlives that is logged and left behind
    (the close goes on).
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    finished = [task for task in tasks if task.done()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while pending:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=max(0.0, min(RECANCEL_AFTER, deadline - loop.time())))
        finished.extend(done)
        if pending and loop.time() >= deadline:
            for task in pending:
                log.warning("msgbroker: task %r did not end within %.1fs of its cancellation; left running",
                            task.get_name() if isinstance(task, asyncio.Task) else task, bound)
            break
    for task in finished:
        if not task.cancelled():
            task.exception()  # taken: asyncio does not report it as never retrieved
