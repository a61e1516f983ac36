"""Every use of redis-py's internals, in one place, behind a version guard.

One thing this provider needs is not part of redis-py's typed, documented API: a callback after
each (re)connect of a single-connection client (:func:`on_reconnect`), so that the id its
``CLIENT UNBLOCK`` targets is forgotten when a reconnect changes it. It is written against, and
tested with, the redis-py series in :data:`TESTED` (the pinned version is in the repository's
constraints.txt): importing this package with another series installed raises
:class:`UntestedClientVersion`, naming both versions, instead of misbehaving later.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

from msgbroker.spi import ConfigurationError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "DISTRIBUTION",
    "TESTED",
    "UntestedClientVersion",
    "check_client_version",
    "installed_version",
    "on_reconnect",
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
