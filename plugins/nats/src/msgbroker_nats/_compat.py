"""Every use of nats-py's internals, in one place, behind a version guard.

Four things this provider needs have no public API in nats-py:

* a PONG that answers a PING whose waiter is already done must be consumed quietly
  (:class:`Client`, which overrides nats-py's private ``_process_pong``; see its docstring);
* a reconnect attempt that a server accepted and dropped must close its socket
  (:class:`Client`, which overrides ``_connect_to_server``);
* a crash (``Transport.abort``) must drop what the client buffered and has not written yet
  (:func:`drop_pending`);
* the name of the ephemeral consumer behind a pull subscription, to delete it
  (:func:`pull_consumer_name`).

They are written against, and tested with, the nats-py series in :data:`TESTED` (the pinned
version is in the repository's constraints.txt): importing this package with another series
installed raises :class:`UntestedClientVersion`, naming both, instead of misbehaving later.
Nothing outside this module touches a nats-py attribute whose name starts with ``_``.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from msgbroker.spi import ConfigurationError

__all__ = [
    "DISTRIBUTION",
    "TESTED",
    "Client",
    "UntestedClientVersion",
    "check_client_version",
    "drop_pending",
    "installed_version",
    "pull_consumer_name",
]

DISTRIBUTION = "nats-py"
TESTED = (2, 16)
"""The (major, minor) series of nats-py whose internals this module was tested with."""
_SERIES = re.compile(r"(\d+)\.(\d+)")


class UntestedClientVersion(ConfigurationError, ImportError):
    """The installed client library is outside the versions this provider was tested with."""


def installed_version() -> str:
    """The installed nats-py version (what the guard checks)."""
    return metadata.version(DISTRIBUTION)


def check_client_version() -> str:
    """The installed nats-py version; :class:`UntestedClientVersion` when it is not of the
    tested series."""
    found = installed_version()
    match = _SERIES.match(found)
    if match is None or (int(match[1]), int(match[2])) != TESTED:
        tested, above = "{}.{}".format(*TESTED), f"{TESTED[0]}.{TESTED[1] + 1}"
        raise UntestedClientVersion(
            f"msgbroker-nats uses internals of {DISTRIBUTION} and is tested with {DISTRIBUTION} {tested}.x "
            f"(>={tested},<{above}); {DISTRIBUTION} {found} is installed: "
            f"pip install '{DISTRIBUTION}>={tested},<{above}'"
        )
    return found


check_client_version()

# Imported after the guard: an untested nats-py is named before anything of it is used.
import nats.aio.client  # noqa: E402
from nats.js.client import JetStreamContext  # noqa: E402


class Client(nats.aio.client.Client):
    """nats-py's client, with one bug fixed: a PONG that answers a PING whose waiter is already
    done is consumed quietly.

    ``flush(timeout)`` queues a future per PING and cancels it when it times out or the caller
    is cancelled (``is_healthy()`` while the server is paused, a ``pending_count`` with a
    deadline); nats-py (checked on 2.16.0) still calls ``set_result`` on it when the late PONG
    comes, and the ``InvalidStateError`` ends its read loop. The connection then keeps writing
    (publishes are stored, acks and pull requests are sent) but reads nothing — no publish
    confirmation, no API answer, no message — until the stale-connection check reconnects
    (``ping_interval`` x ``max_outstanding_pings``, 30 s here). Every publish in between is
    indeterminate, and a caller that retries it stores it again (the fault suite's paused
    server: 300 messages stored 5 times).
    """

    async def _process_pong(self) -> None:
        pongs = getattr(self, "_pongs", None)
        if pongs and pongs[0].done():
            pongs.pop(0)  # this PONG answers the abandoned PING: keep the queue in step
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()

    async def _connect_to_server(self, s: Any) -> None:
        """Close the previous attempt's socket before opening the next one. A cluster node that
        is restarting accepts the connection and drops it before its INFO; nats-py (checked on
        2.16.0) then connects to the next server over the same transport object without closing
        the dropped socket, which is left to the garbage collector (a ResourceWarning per
        attempt)."""
        transport = getattr(self, "_transport", None)
        if transport is not None:
            transport.close()  # closing twice is harmless; a transport never connected has nothing to close
        await super()._connect_to_server(s)


def drop_pending(nc: nats.aio.client.Client) -> None:
    """Forget what ``nc`` buffered and has not written to the socket yet (a crash: acks and naks
    still in the buffer never reach the server)."""
    nc._pending = []
    nc._pending_data_size = 0


def pull_consumer_name(sub: JetStreamContext.PullSubscription) -> str:
    """The name of the (ephemeral) consumer behind a pull subscription."""
    return str(sub._consumer)
