"""Every use of redis-py's internals, in one place, behind a version guard.

Three things this provider needs are not part of redis-py's typed, documented API: a callback after
each (re)connect of a single-connection client (:func:`on_reconnect`), so that the id its
``CLIENT UNBLOCK`` targets is forgotten when a reconnect changes it; several commands sent in
one write on that client's own connection (:func:`send_in_one_write`); and a write timeout that
costs no task per command (:func:`timed_sends`). It is written against, and
tested with, the redis-py series in :data:`TESTED` (the pinned version is in the repository's
constraints.txt): importing this package with another series installed raises
:class:`UntestedClientVersion`, naming both versions, instead of misbehaving later.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from msgbroker.spi import ConfigurationError
from redis import exceptions as rex

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "DISTRIBUTION",
    "TESTED",
    "UntestedClientVersion",
    "check_client_version",
    "installed_version",
    "on_reconnect",
    "send_in_one_write",
    "timed_sends",
]

DISTRIBUTION = "redis"
TESTED = (8, 1)
"""The (major, minor) series of redis-py whose internals this module was tested with."""
_SERIES = re.compile(r"(\d+)\.(\d+)")


class UntestedClientVersion(ConfigurationError, ImportError):
    """The installed client library is outside the versions this provider was tested with."""


def installed_version() -> str:
    """The installed redis-py version (what the guard checks)."""
    return metadata.version(DISTRIBUTION)


def check_client_version() -> str:
    """The installed redis-py version; :class:`UntestedClientVersion` when it is not of the
    tested series."""
    found = installed_version()
    match = _SERIES.match(found)
    if match is None or (int(match[1]), int(match[2])) != TESTED:
        tested, above = "{}.{}".format(*TESTED), f"{TESTED[0]}.{TESTED[1] + 1}"
        raise UntestedClientVersion(
            f"msgbroker-redis uses internals of redis-py and is tested with {DISTRIBUTION} {tested}.x "
            f"(>={tested},<{above}); {DISTRIBUTION} {found} is installed: "
            f"pip install '{DISTRIBUTION}>={tested},<{above}'"
        )
    return found


check_client_version()


def on_reconnect(client: aioredis.Redis, callback: Callable[[object], None]) -> bool:
    """Have ``callback(connection)`` called after every (re)connect of ``client``'s own
    connection (a ``single_connection_client`` after ``initialize()``); redis-py keeps only a
    weak reference, so ``callback`` must be a bound method. False when the client has no
    connection of its own."""
    connection = client.connection
    if connection is None:
        return False
    connection.register_connect_callback(callback)  # type: ignore[no-untyped-call]  # redis-py: unannotated
    return True


async def send_in_one_write(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send ``commands`` on ``client``'s own connection (a ``single_connection_client``) in one
    write and read their raw replies, an error reply as its exception: a command queued behind a
    blocking one runs on the server as soon as that one returns. redis-py's pipelines take a
    connection of their pool, not the client's own, which ``CLIENT UNBLOCK`` targets. The
    connection is closed when reading is cut off (redis-py's ``read_response`` does), so no reply
    is left for the next command."""
    connection = client.connection
    if connection is None:
        raise rex.ConnectionError("the client has no connection of its own")
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


_TIMED: dict[type, type] = {}


def timed_sends(connection_class: type) -> type:
    """``connection_class`` (a redis-py connection class: TCP, TLS or Unix socket) whose writes
    keep its ``socket_timeout`` with ``asyncio.timeout`` instead of redis-py's
    ``asyncio.wait_for``, which on Python 3.11 starts a task for every command sent (a loop of
    PINGs: 194 -> 178 µs of client CPU a call, medians of 5; a single ``publish()`` 294 -> 283).
    What a timeout or a broken socket does is redis-py's: the connection is closed and
    ``TimeoutError`` / ``ConnectionError`` raised. A connection not connected yet, or without a
    timeout, sends as redis-py does."""
    timed = _TIMED.get(connection_class)
    if timed is None:
        timed = _TIMED[connection_class] = type(
            f"Timed{connection_class.__name__}", (_TimedSend, connection_class), {})
    return timed


class _TimedSend:
    # Attributes of redis-py's AbstractConnection, which every class this is mixed into is.
    is_connected: bool
    socket_timeout: float | None

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout or not self.is_connected:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if check_health:
            await self.check_health()  # type: ignore[attr-defined]  # redis-py: unannotated
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        writer = self._writer  # type: ignore[attr-defined]
        try:
            async with asyncio.timeout(timeout):
                await self._send_packed_command(command)  # type: ignore[attr-defined]
        except TimeoutError:
            # Dropped, not flushed: what is still buffered is a command the caller was told
            # failed, and a stopped server would keep the closing socket open until it reads.
            writer.transport.abort()
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise rex.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise rex.ConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            # A write cut off part way (a cancellation): the connection cannot be reused.
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise
