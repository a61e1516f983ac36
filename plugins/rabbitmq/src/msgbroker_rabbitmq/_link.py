"""One AMQP connection that reconnects by itself, in generations.

aio-pika's ``RobustConnection`` restores channels, consumers and exclusive queues on its own
before it tells the application, so a member would consume lanes whose lease (an exclusive
queue of the old connection) it no longer holds. This link uses aio-pika's plain connection
and reconnects itself: everything bound to a connection (leases, consumers, unacked
deliveries) belongs to one *generation*, and the owner re-runs its assignment in ``on_up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from msgbroker.spi import BrokerConnectionError, tls_verification_error
from yarl import URL

from ._compat import channel_numbers
from ._errors import redacted, translate

__all__ = ["Link"]

log = logging.getLogger("msgbroker.rabbitmq")

CONNECT_TIMEOUT = 10.0


class Link:
    """A reconnecting connection; ``generation`` grows by one at every (re)connect."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        heartbeat: int,
        on_up: Callable[[], Awaitable[None]] | None = None,
        on_down: Callable[[], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parsed = URL(url)
        if "heartbeat" not in parsed.query:
            parsed = parsed.update_query(heartbeat=heartbeat)
        self._url = str(parsed)
        self._shown = redacted(url)
        self._ssl_context = ssl_context
        self._name = name
        self._on_up = on_up
        self._on_down = on_down
        self._conn: AbstractConnection | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None
        self.generation = 0
        self._channel_number = 0

    @property
    def is_up(self) -> bool:
        return self._up.is_set() and self._conn is not None and not self._closing

    async def _connect(self, timeout: float) -> AbstractConnection:
        try:
            conn = await aio_pika.connect(
                self._url, timeout=timeout, client_properties={"connection_name": self._name},
                ssl_context=self._ssl_context,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise (tls_verification_error(exc, "rabbitmq", self._shown)
                   or translate(exc, f"connecting to {self._shown}")) from exc

        def closed(_sender: Any, _exc: BaseException | None = None) -> None:
            self._lost(conn)

        conn.close_callbacks.add(closed)
        return conn

    async def open(self) -> None:
        """Connect for the first time (raises :class:`BrokerConnectionError` when unreachable)."""
        self._conn = await self._connect(CONNECT_TIMEOUT)
        self.generation += 1
        self._up.set()

    def _lost(self, conn: AbstractConnection) -> None:
        if self._closing or conn is not self._conn:
            return
        log.warning("rabbitmq: connection %s to %s lost; reconnecting", self._name, self._shown)
        self._up.clear()
        self._conn = None
        if self._on_down is not None:
            self._on_down()
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(
                self._reconnect(), name=f"msgbroker-rabbitmq-reconnect-{self._name}"
            )

    async def _reconnect(self) -> None:
        pause = 0.1
        while not self._closing:
            await asyncio.sleep(pause)
            pause = min(2.0, pause * 2)
            try:
                conn = await self._connect(CONNECT_TIMEOUT)
            except asyncio.CancelledError:
                raise
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
                log.warning("rabbitmq: restoring %s after reconnect failed (%s); again", self._name, exc)
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.close()
                continue
            if self._closing:
                with contextlib.suppress(Exception):
                    await conn.close()
                return
            log.info("rabbitmq: connection %s restored (generation %d)", self._name, self.generation)
            self._up.set()
            return

    async def wait_up(self, timeout: float) -> bool:
        """Wait (bounded) for the connection; False when it is still down."""
        if self._closing:
            return False
        if self._up.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self._up.is_set() and not self._closing

    @property
    def connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is None or self._closing:
            raise BrokerConnectionError(f"rabbitmq: connection {self._name} to {self._shown} is down")
        return conn

    def _next_channel_number(self, conn: AbstractConnection) -> int | None:
        """Channel numbers in rising order, wrapping at the negotiated maximum: aiormq on its own
        reuses the number of a channel the server has just closed before our close-ok reached
        the server, which then closes the whole connection ("second 'channel.open' seen")."""
        numbers = channel_numbers(conn)
        if numbers is None:
            return None
        in_use, limit = numbers
        for _ in range(limit):
            self._channel_number = self._channel_number % limit + 1
            if self._channel_number not in in_use:
                return self._channel_number
        return None

    async def channel(self, *, confirms: bool = False) -> tuple[AbstractChannel, aiormq.abc.AbstractChannel]:
        """A new channel (and its aiormq underlay) on the current connection."""
        try:
            conn = self.connection
            channel = await conn.channel(
                channel_number=self._next_channel_number(conn), publisher_confirms=confirms, on_return_raises=False
            )
            return channel, await channel.get_underlay_channel()
        except asyncio.CancelledError:
            raise
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
