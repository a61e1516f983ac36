"""Every use of aio-pika's and aiormq's internals, in one place, behind a version guard.

Three things this provider needs are not in the client libraries' abstract (public) interfaces:

* the channel numbers in use on a connection and the negotiated maximum, reached through
  aio-pika's connection into aiormq's (:func:`channel_numbers`), so that channel numbers are
  not reused too early (see ``_link.Link._next_channel_number``);
* whether the server still knows a consumer of a channel — it cancels a consumer when its
  queue is deleted (:func:`is_consuming`, aiormq's ``Channel.consumers``);
* publishing without holding aiormq's channel lock until each frame is on the socket
  (:func:`publish_unlocked`, aiormq's ``Channel.basic_publish(wait=False)``);
* a connection's outgoing frame queue without aiormq's bound of 10 frames
  (:func:`unbounded_writes`): aiormq answers the server's ``channel.close`` with
  ``put_nowait`` and drops the answer when that queue is full.

They are written against, and tested with, the series in :data:`TESTED` (the pinned versions
are in the repository's constraints.txt): importing this package with another series of either
library installed raises :class:`UntestedClientVersion`, naming both versions, instead of
misbehaving later. Nothing outside this module uses an attribute of these libraries' objects
beyond their abstract interfaces (``aio_pika.abc``, ``aiormq.abc``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection
from importlib import metadata
from typing import TYPE_CHECKING, Any

from msgbroker.spi import ConfigurationError

if TYPE_CHECKING:
    import aiormq.abc
    from aio_pika.abc import AbstractConnection

__all__ = [
    "TESTED",
    "UntestedClientVersion",
    "channel_numbers",
    "check_client_versions",
    "installed_version",
    "is_consuming",
    "publish_unlocked",
    "unbounded_writes",
]

TESTED = {"aio-pika": (10, 2), "aiormq": (7, 2)}
"""Per distribution, the (major, minor) series whose internals this module was tested with."""
_SERIES = re.compile(r"(\d+)\.(\d+)")


class UntestedClientVersion(ConfigurationError, ImportError):
    """The installed client library is outside the versions this provider was tested with."""


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (what the guard checks)."""
    return metadata.version(distribution)


def check_client_versions() -> dict[str, str]:
    """The installed aio-pika and aiormq versions; :class:`UntestedClientVersion` when one is
    not of its tested series."""
    found: dict[str, str] = {}
    for distribution, series in TESTED.items():
        version = found[distribution] = installed_version(distribution)
        match = _SERIES.match(version)
        if match is None or (int(match[1]), int(match[2])) != series:
            tested, above = "{}.{}".format(*series), f"{series[0]}.{series[1] + 1}"
            raise UntestedClientVersion(
                f"msgbroker-rabbitmq uses internals of {distribution} and is tested with {distribution} "
                f"{tested}.x (>={tested},<{above}); {distribution} {version} is installed: "
                f"pip install '{distribution}>={tested},<{above}'"
            )
    return found


check_client_versions()


def channel_numbers(conn: AbstractConnection) -> tuple[Collection[int], int] | None:
    """The channel numbers open on ``conn`` and the highest one the server allows, or None when
    the connection has no aiormq connection under it (closed)."""
    underlay = getattr(conn.transport, "connection", None)
    in_use = getattr(underlay, "channels", None)
    if in_use is None:
        return None
    tune = getattr(underlay, "connection_tune", None)
    return in_use, min(getattr(tune, "channel_max", 0) or 2047, 65535)


def is_consuming(channel: aiormq.abc.AbstractChannel, consumer_tag: str) -> bool:
    """Whether ``consumer_tag`` is still a consumer of ``channel`` (the server cancels one whose
    queue was deleted)."""
    consumers: Collection[str] = getattr(channel, "consumers", {})
    return consumer_tag in consumers


async def publish_unlocked(channel: aiormq.abc.AbstractChannel, body: bytes, **options: Any) -> Any:
    """``channel.basic_publish(body, **options)`` with ``wait=False``: aiormq does not hold its
    channel lock until each frame is on the socket. Returns what ``basic_publish`` returns (the
    confirmation, or the message the server returned)."""
    raw: Any = channel  # aiormq's Channel takes ``wait``; its abstract base does not declare it
    return await raw.basic_publish(body, wait=False, **options)


def unbounded_writes(conn: AbstractConnection) -> None:
    """Lift the bound (10 frames) of the outgoing frame queue of ``conn``'s aiormq connection.

    aiormq answers a ``channel.close`` from the server (a passive declare of a missing queue, a
    refused command) with ``write_queue.put_nowait(close-ok)`` and ignores ``QueueFull``, while
    it frees the channel's number at once. With the queue full — a member opening its lanes
    sends many frames at once — the server never got the ``close-ok``, still counted the channel
    as open, and closed the whole connection when the number was used again ("second
    'channel.open' seen"); a member with 1,024 lanes lost its connection again and again, until
    its prefetched messages were dead-lettered for their delivery count. Without the bound the
    answer is always queued; what a connection buffers stays bounded by this provider's own
    windows (publish batches, ``SHORT_CHANNELS``, prefetch)."""
    underlay = getattr(conn.transport, "connection", None)
    queue = getattr(underlay, "write_queue", None)
    if isinstance(queue, asyncio.Queue) and queue.maxsize:
        # asyncio.Queue (CPython 3.11-3.13) keeps its bound in ``_maxsize``, read by ``full()``,
        # ``put`` and ``put_nowait``; the queue object itself is shared by aiormq's writer
        # task and every channel, so it cannot be replaced
        setattr(queue, "_maxsize", 0)  # noqa: B010
