"""Starting an aiokafka client so that a cancellation cannot leave a connection open.

aiokafka's ``start()`` first asks a bootstrap server for the cluster's metadata on a connection
of its own, which it keeps nowhere until the answer came: cancelled meanwhile (a close of the
connection, a subscription stopped while it starts), that connection stays open with nothing
left to close it, and the client's ``stop()`` cannot either. Asyncio reports it later, from
the garbage collector, as an unclosed socket. :func:`start_client` lets a start end before the
cancellation is raised: it waits for the start (every client here starts before it subscribes,
so a start is its bootstrap and takes milliseconds; at most ``bound`` seconds), stops the client,
then raises the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

__all__ = ["START_BOUND", "start_client"]

log = logging.getLogger("msgbroker.kafka")

START_BOUND = 10.0
"""Seconds a cancelled start is waited for before it is cancelled too."""


async def start_client(client: Any, *, bound: float = START_BOUND) -> None:
    """``await client.start()`` for an aiokafka consumer, producer or admin client; a
    cancellation waits for the start to end (at most ``bound`` seconds), stops the client, and
    is raised then."""
    starting = asyncio.ensure_future(client.start())
    try:
        await asyncio.shield(starting)
    except asyncio.CancelledError:
        await _finish_cancelled(client, starting, bound)
        raise


async def _finish_cancelled(client: Any, starting: asyncio.Future[Any], bound: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while not starting.done() and loop.time() < deadline:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still the one cancellation
            await asyncio.wait({starting}, timeout=deadline - loop.time())
    if not starting.done():
        log.warning("kafka: a client's start was cancelled and did not end within %.0fs; cut short", bound)
        starting.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait({starting}, timeout=1.0)
    elif not starting.cancelled():
        starting.exception()  # taken: the caller was cancelled, a failed start is not news to it
    stop = getattr(client, "stop", None) or client.close  # the admin client closes
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(stop()), bound)
