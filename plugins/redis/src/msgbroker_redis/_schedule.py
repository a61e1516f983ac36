"""Scheduled messages on Redis (semantics rule 14; docs/providers/redis.md, "Scheduled messages").

A scheduled record waits in the topic's sorted set ``<base>:sched`` (score: due time, ms) with
its packed record in the hash ``<base>:sched:rec``. Every connection that subscribes to a topic
or schedules on it runs a mover for it; the movers share one lease per topic
(``<base>:sched:mover``), and its holder calls the ``MOVE_DUE`` script a few times a second:
the script appends every due record to its lane and removes it in one atomic run, on the server's
clock. The others look every third of the lease time and take over when the holder stops
renewing it (a crash: after the claim timeout; a close releases it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from msgbroker.spi import AccessDeniedError, BrokerClosedError, cancel_and_wait

__all__ = ["MOVE_INTERVAL", "Movers"]

log = logging.getLogger("msgbroker.redis")

MOVE_INTERVAL = 0.2
"""Seconds between two looks of the lease holder at its topic's schedule, at most (it sleeps
less when the next record is due sooner): what the declared precision is made of."""
MOVE_LIMIT = 500
"""Records one script run moves at most (the rest: at once in the next run)."""


class _Keys(Protocol):
    base: str

    @property
    def meta(self) -> str: ...


class ScheduleTransport(Protocol):
    """What the movers need of the Redis transport."""

    max_stream_length: int
    trim_slack: int

    def keys(self, topic: str) -> _Keys: ...

    def lease_ttl(self) -> float: ...

    async def call(self, name: str, keys: Sequence[Any], args: Sequence[Any], doing: str) -> Any: ...


class Movers:
    """One mover task per topic this connection subscribes to or schedules on."""

    def __init__(self, transport: ScheduleTransport) -> None:
        self._transport = transport
        self.holder = f"mover-{uuid.uuid4().hex}"
        """This connection's name in the movers' lease."""
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def ensure(self, topic: str) -> None:
        """Run a mover for ``topic`` (once per connection)."""
        task = self._tasks.get(topic)
        if task is None or task.done():
            self._tasks[topic] = asyncio.create_task(self._run(topic), name=f"msgbroker-redis-mover-{topic}")

    async def _run(self, topic: str) -> None:
        transport = self._transport
        keys = transport.keys(topic)
        lease_ms = max(1000, int(transport.lease_ttl() * 1000))
        doing = f"moving the due scheduled messages of {topic!r}"
        while True:
            try:
                moved, wait = await transport.call(
                    "MOVE_DUE", [keys.meta],
                    [keys.base, transport.max_stream_length, transport.trim_slack, MOVE_LIMIT, self.holder, lease_ms],
                    doing)
            except asyncio.CancelledError:
                raise
            except (AccessDeniedError, BrokerClosedError) as exc:
                log.error("redis: %s stopped: %s", doing, exc)
                return
            except Exception as exc:  # a lost connection, a failover: the next look tries again
                log.debug("redis: %s failed, trying again: %s", doing, exc)
                await asyncio.sleep(1.0)
                continue
            if moved < 0:  # another connection holds the lease
                await asyncio.sleep(lease_ms / 3000)
            elif moved >= MOVE_LIMIT:
                await asyncio.sleep(0)
            elif wait >= 0:
                await asyncio.sleep(min(MOVE_INTERVAL, wait / 1000 + 0.001))
            else:
                await asyncio.sleep(MOVE_INTERVAL)

    async def stop(self, release: bool) -> None:
        """Stop every mover; ``release`` gives their leases up at once (a close), else they run
        out (a crash)."""
        tasks, self._tasks = self._tasks, {}
        await cancel_and_wait(tasks.values())
        if release:
            for topic in tasks:
                keys = self._transport.keys(topic)
                with contextlib.suppress(Exception):
                    await self._transport.call("RELEASE", [f"{keys.base}:sched:mover"], [self.holder],
                                               f"releasing the mover lease of {topic!r}")
