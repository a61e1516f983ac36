"""One AMQP connection that reconnects by itself, in generations, to any node of a cluster.

aio-pika's ``RobustConnection`` restores channels, consumers and exclusive queues on its own
before it tells the application, so a member would consume lanes whose lease (an exclusive
queue of the old connection) it no longer holds; it also knows one URL only. This link uses
aio-pika's plain connection and reconnects itself, to the node addresses in turn: everything
bound to a connection (leases, consumers, unacked deliveries) belongs to one *generation*, and
the owner re-runs its assignment in ``on_up``.

A refused login, virtual host or permission while reconnecting (the user was deleted, its
password changed, its permissions revoked) is not retried: the link stays down for good with
``refused`` set, and its owner is told (``on_refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from msgbroker.resilience import JitteredBackoff
from msgbroker.spi import (
    AccessDeniedError,
    BrokerConnectionError,
    ConfigurationError,
    MsgBrokerError,
    tls_verification_error,
)
from yarl import URL

from ._compat import channel_numbers, unbounded_writes
from ._errors import cancelled, redacted, translate, user_of, vhost_of

__all__ = ["Link", "split_urls"]

log = logging.getLogger("msgbroker.rabbitmq")

CONNECT_TIMEOUT = 10.0
"""How long connecting to one node may take (a paused node accepts TCP and never answers)."""
CLUSTER_CONNECT_TIMEOUT = 5.0
"""The same when there are other nodes to try."""
RECONNECT_BACKOFF = JitteredBackoff(0.1, 2.0, jitter_factor=0.2)
"""The pause before each round over the nodes (the resilience module's backoff: 0.1 s doubling
to 2 s, ±20 %)."""


def split_urls(url: str) -> list[str]:
    """The node addresses of ``rabbitmq.url``: one AMQP URL, or several separated by commas
    (the nodes of a cluster, in the order they are tried). ConfigurationError names a bad one."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ConfigurationError("rabbitmq.url is empty: give an amqp:// or amqps:// url (several: comma-separated)")
    schemes = set()
    for one in urls:
        try:
            parsed = URL(one)
            parsed.port  # noqa: B018 - a port that is not a number raises here
        except ValueError as exc:
            raise ConfigurationError(f"rabbitmq.url: {redacted(one)!r} is not a url: {exc}") from exc
        if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
            raise ConfigurationError(
                f"rabbitmq.url: {redacted(one)!r} is not an amqp:// or amqps:// url with a host "
                "(several nodes: comma-separated urls, e.g. amqp://u:p@node1:5672/,amqp://u:p@node2:5672/)"
            )
        schemes.add(parsed.scheme)
    if len(schemes) > 1:
        raise ConfigurationError("rabbitmq.url mixes amqp:// and amqps:// urls: use one scheme for every node")
    return urls


class Link:
    """A reconnecting connection; ``generation`` grows by one at every (re)connect.

    The first connect tries ``urls`` in order; a reconnect starts with the node after the one
    whose connection was lost and goes round them all, pausing between rounds."""

    def __init__(
        self,
        urls: Sequence[str],
        name: str,
        *,
        heartbeat: int,
        on_up: Callable[[], Awaitable[None]] | None = None,
        on_down: Callable[[], None] | None = None,
        on_refused: Callable[[AccessDeniedError], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._urls: list[str] = []
        for url in urls:
            parsed = URL(url)
            if "heartbeat" not in parsed.query:
                parsed = parsed.update_query(heartbeat=heartbeat)
            self._urls.append(str(parsed))
        self._shown = [redacted(url) for url in urls]
        self._node = 0
        """Index of the node connected to (or tried first)."""
        self._ssl_context = ssl_context
        self._name = name
        self._on_up = on_up
        self._on_down = on_down
        self._on_refused = on_refused
        self.refused: AccessDeniedError | None = None
        """Why the server refused a reconnect for good (credentials or permissions); None otherwise."""
        self._conn: AbstractConnection | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None
        self.generation = 0
        self.reconnected_at: float | None = None
        """When (``time.monotonic()``) the connection was last re-established; None before any reconnect."""
        self._channel_number = 0
        self._opened: dict[int, aiormq.abc.AbstractChannel] = {}
        """The channel last opened under each number on the connection ``_opened_on``."""
        self._opened_on: AbstractConnection | None = None

    @property
    def is_up(self) -> bool:
        return self._up.is_set() and self._conn is not None and not self._closing

    @property
    def node(self) -> str:
        """The address connected to (or tried next), password hidden."""
        return self._shown[self._node]

    async def _connect_to(self, index: int, timeout: float) -> AbstractConnection:
        shown = self._shown[index]
        try:
            conn = await aio_pika.connect(
                self._urls[index], timeout=timeout, client_properties={"connection_name": self._name},
                ssl_context=self._ssl_context,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise (tls_verification_error(exc, "rabbitmq", shown)
                   or translate(exc, f"connecting to {shown}", user_of(self._urls[index]),
                                vhost_of(self._urls[index]))) from exc

        unbounded_writes(conn)

        def closed(_sender: Any, _exc: BaseException | None = None) -> None:
            self._lost(conn)

        conn.close_callbacks.add(closed)
        return conn

    async def _connect(self, first: int) -> AbstractConnection:
        """A connection to the first node that answers, trying them in order from ``first``;
        a ConfigurationError (credentials, TLS) at once, else the last node's error."""
        count = len(self._urls)
        timeout = CONNECT_TIMEOUT if count == 1 else CLUSTER_CONNECT_TIMEOUT
        failures: list[MsgBrokerError] = []
        for step in range(count):
            index = (first + step) % count
            try:
                conn = await self._connect_to(index, timeout)
            except ConfigurationError:
                raise
            except MsgBrokerError as exc:
                failures.append(exc)
                continue
            self._node = index
            return conn
        if count == 1:
            raise failures[0]
        raise BrokerConnectionError(
            f"rabbitmq: none of the {count} nodes answered ({', '.join(self._shown)}); last: {failures[-1]}"
        ) from failures[-1]

    async def open(self) -> None:
        """Connect for the first time (raises :class:`BrokerConnectionError` when no node answers)."""
        self._conn = await self._connect(0)
        self.generation += 1
        self._up.set()

    def _lost(self, conn: AbstractConnection) -> None:
        if self._closing or conn is not self._conn:
            return
        log.warning("rabbitmq: connection %s to %s lost; reconnecting", self._name, self.node)
        self._up.clear()
        self._conn = None
        if self._on_down is not None:
            self._on_down()
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(
                self._reconnect(), name=f"msgbroker-rabbitmq-reconnect-{self._name}"
            )

    def _refuse(self, exc: AccessDeniedError) -> None:
        """The server refused us for good: stay down, tell the owner (retrying cannot help)."""
        self.refused = exc
        log.error("rabbitmq: connection %s is not restored: %s", self._name, exc)
        if self._on_refused is not None:
            self._on_refused(exc)

    async def _reconnect(self) -> None:
        rounds = 0
        first = (self._node + 1) % len(self._urls)  # the node we lost is likely down: the others first
        while not self._closing:
            rounds += 1
            await asyncio.sleep(RECONNECT_BACKOFF.delay(rounds))
            try:
                conn = await self._connect(first)
            except asyncio.CancelledError:
                raise
            except AccessDeniedError as exc:
                self._refuse(exc)
                return
            except Exception as exc:
                log.info("rabbitmq: reconnecting %s: %s", self._name, exc)
                continue
            self._conn = conn
            self.generation += 1
            try:
                if self._on_up is not None:
                    await self._on_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.close()
                error = translate(exc, f"restoring {self._name} on {self.node}")
                if isinstance(error, AccessDeniedError):
                    self._refuse(error)
                    return
                log.warning("rabbitmq: restoring %s on %s after reconnect failed (%s); again",
                            self._name, self.node, exc)
                first = (self._node + 1) % len(self._urls)
                continue
            if self._closing:
                with contextlib.suppress(Exception):
                    await conn.close()
                return
            log.info("rabbitmq: connection %s restored to %s (generation %d)", self._name, self.node, self.generation)
            self.reconnected_at = time.monotonic()
            self._up.set()
            return

    async def wait_up(self, timeout: float) -> bool:
        """Wait (bounded) for the connection; False when it is still down. Raises ``refused``,
        at once, when the server refused it for good (credentials or permissions taken away)."""
        if self.refused is not None:
            raise self.refused
        if self._closing:
            return False
        if self._up.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        if self.refused is not None:
            raise self.refused
        return self._up.is_set() and not self._closing

    @property
    def connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is None and self.refused is not None:
            raise self.refused
        if conn is None or self._closing:
            raise BrokerConnectionError(f"rabbitmq: connection {self._name} to {self.node} is down")
        return conn

    def _next_channel_number(self, conn: AbstractConnection) -> int | None:
        """Channel numbers in rising order, wrapping at the negotiated maximum, skipping a number
        whose last channel is not closed yet.

        aiormq frees a number when the server's ``channel.close`` arrives, but answers it
        (``close-ok``) only when the channel's own reader gets to it; a channel opened under the
        number in between reaches the server first, which then closes the whole connection
        ("second 'channel.open' seen"). Rising order alone leaves that to timing; with 1,024
        lanes (a channel each, and a short one each whose passive declare the server refuses) the
        numbers wrap within a second. A channel is closed (``is_closed``) only after its
        ``close-ok`` was queued, ahead of any later open. (What closed such a member's connection
        again and again until 2026-12-06 was a ``close-ok`` aiormq dropped altogether:
        :func:`unbounded_writes`.)"""
        numbers = channel_numbers(conn)
        if numbers is None:
            return None
        in_use, limit = numbers
        if self._opened_on is not conn:
            self._opened_on, self._opened = conn, {}
        opened = self._opened
        for _ in range(limit):
            self._channel_number = number = self._channel_number % limit + 1
            if number in in_use:
                continue
            last = opened.get(number)
            if last is None or last.is_closed:
                return number
        return None

    async def channel(self, *, confirms: bool = False) -> tuple[AbstractChannel, aiormq.abc.AbstractChannel]:
        """A new channel (and its aiormq underlay) on the current connection."""
        try:
            conn = self.connection
            number = self._next_channel_number(conn)
            channel = await conn.channel(channel_number=number, publisher_confirms=confirms, on_return_raises=False)
            raw = await channel.get_underlay_channel()
            if number is not None and self._opened_on is conn:
                self._opened[number] = raw
            return channel, raw
        except asyncio.CancelledError:
            if cancelled():
                raise
            raise BrokerConnectionError(
                f"rabbitmq: opening a channel on {self._name}: the connection was lost"
            ) from None
        except Exception as exc:
            raise translate(exc, f"opening a channel on {self._name}") from exc

    async def close(self) -> None:
        """Close for good (no reconnect)."""
        self._closing = True
        self._up.clear()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5.0)
