"""Every use of aiokafka's internals, in one place, behind a version guard.

aiokafka has no public way for a consumer to leave its group *without* a LeaveGroup request (to
vanish like a killed process, which the crash path and a close stuck in a join need, see
``_consumer._leave``), nor to cut short a join that waits on the broker, nor to finish closing a
consumer whose ``stop()`` that cut short, nor to look at the cluster's metadata again before
``metadata_max_age_ms`` and join again when a topic appeared in it. The functions below do
that through aiokafka's private attributes. They are written against, and tested with, the
aiokafka series in :data:`TESTED` (the pinned version is in the repository's constraints.txt):
importing this package with another series installed raises :class:`UntestedClientVersion`,
naming both, instead of misbehaving in a rebalance later. Nothing outside this module touches an
aiokafka attribute whose name starts with ``_``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from importlib import metadata
from typing import Any

from msgbroker.spi import ConfigurationError

__all__ = [
    "DISTRIBUTION",
    "TESTED",
    "UntestedClientVersion",
    "check_client_version",
    "coordination_task",
    "coordinator_failure",
    "coordinator_unknown",
    "drop_connections",
    "finish_stop",
    "installed_version",
    "refresh_metadata_and_rejoin",
    "skip_leave_group",
]

DISTRIBUTION = "aiokafka"
TESTED = (0, 14)
"""The (major, minor) series of aiokafka whose internals this module was tested with."""
_SERIES = re.compile(r"(\d+)\.(\d+)")


class UntestedClientVersion(ConfigurationError, ImportError):
    """The installed client library is outside the versions this provider was tested with."""


def installed_version() -> str:
    """The installed aiokafka version (what the guard checks)."""
    return metadata.version(DISTRIBUTION)


def check_client_version() -> str:
    """The installed aiokafka version; :class:`UntestedClientVersion` when it is not of the
    tested series."""
    found = installed_version()
    match = _SERIES.match(found)
    if match is None or (int(match[1]), int(match[2])) != TESTED:
        tested = "{}.{}".format(*TESTED)
        raise UntestedClientVersion(
            f"msgbroker-kafka uses internals of {DISTRIBUTION} and is tested with {DISTRIBUTION} {tested}.x "
            f"(>={tested},<{TESTED[0]}.{TESTED[1] + 1}); {DISTRIBUTION} {found} is installed: "
            f"pip install '{DISTRIBUTION}>={tested},<{TESTED[0]}.{TESTED[1] + 1}'"
        )
    return found


check_client_version()


# The consumer is typed Any: aiokafka ships no type information.


def skip_leave_group(consumer: Any) -> None:
    """Make ``consumer.stop()`` send no LeaveGroup: aiokafka sends one only while the group
    coordinator has a positive generation, so the generation is forgotten."""
    coordinator = consumer._coordinator
    if coordinator is not None and hasattr(coordinator, "generation"):
        coordinator.generation = -1


def coordination_task(consumer: Any) -> asyncio.Future[Any] | None:
    """The task that runs the consumer's group joins and rebalance callbacks (None without a
    group coordinator)."""
    task = getattr(consumer._coordinator, "_coordination_task", None)
    return task if isinstance(task, asyncio.Future) else None


def coordinator_failure(consumer: Any) -> BaseException | None:
    """The error that stopped the consumer's group protocol (e.g. GroupAuthorizationFailedError),
    without consuming it: aiokafka raises it only from the next getmany(), which a member holding
    no partition never calls."""
    coordinator = consumer._coordinator
    if coordinator is None:
        return None
    pending = getattr(coordinator, "_pending_exception", None)
    if isinstance(pending, BaseException):
        return pending
    task = getattr(coordinator, "_coordination_task", None)
    if isinstance(task, asyncio.Future) and task.done() and not task.cancelled():
        return task.exception()
    return None


def coordinator_unknown(consumer: Any) -> bool:
    """The consumer has no group coordinator it can talk to now (it is looking for one: after a
    broker restart for a moment — or for good, when the broker refuses its login)."""
    coordinator = consumer._coordinator
    return coordinator is not None and getattr(coordinator, "coordinator_id", None) is None


async def drop_connections(consumer: Any) -> None:
    """Close the consumer's connections to the brokers now: a join waiting for an answer fails at
    once and sees the consumer closing."""
    client = consumer._client
    if client is not None:
        await client.close()


async def finish_stop(consumer: Any, bound: float) -> None:
    """Close what ``consumer.stop()`` closes after the group coordinator — the fetcher, then the
    client — when that stop was cut short (a coordination task cancelled under it ends it with
    CancelledError before them): a fetcher left running connects to the brokers again, on
    sockets nobody closes. Each close is bounded by ``bound`` seconds and cannot cancel the caller."""
    fetcher = consumer._fetcher
    closers = [fetcher.close] if fetcher is not None and not fetcher._closed else []
    for close in [*closers, consumer._client.close]:
        task = asyncio.ensure_future(close())
        await asyncio.wait({task}, timeout=bound)
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()  # seen: a close that failed has nothing more to close


async def refresh_metadata_and_rejoin(consumer: Any, topic: str, bound: float) -> bool:
    """Ask a broker for the cluster's metadata now (aiokafka asks by itself only every
    ``metadata_max_age_ms``, 5 minutes) and, once it lists ``topic``, make the consumer join its
    group again, so that an assignment computed without the topic is computed again with it.
    True when the rejoin was asked for; False when the metadata still lacks the topic (or did not
    come within ``bound`` seconds)."""
    client = consumer._client
    coordinator = consumer._coordinator
    if client is None or coordinator is None:
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.force_metadata_update(), bound)
    if consumer.partitions_for_topic(topic) is None:
        return False
    coordinator.request_rejoin()
    return True
