"""Request/reply on Redis (docs/semantics.md, rule 13): a requester's reply inbox is a stream of
its own, ``<prefix>:replies:<uuid>``, read with a blocking ``XREAD`` on a connection of its own;
a reply is one ``XADD ... NOMKSTREAM`` (nothing is created for an inbox that is gone). The
stream expires unless its reader keeps renewing it, so a requester that dies leaves nothing
behind. Only the commands and keys the provider already uses (``~<prefix>:*``, XADD, XREAD,
XRANGE, PEXPIRE, DEL): no extra ACL permission."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol, cast

from msgbroker.spi import ReplySink, cancel_and_wait

from ._clients import Client, Connections, Reader
from ._errors import REDIS_ERRORS, translate


class RedisTransport(Protocol):
    """What the inbox needs of the transport (``_transport.RedisTransport``)."""

    prefix: str

    @property
    def user(self) -> str: ...

    @property
    def redis(self) -> Client: ...

    @property
    def connections(self) -> Connections: ...

__all__ = ["ReplyInbox", "send_reply"]

log = logging.getLogger("msgbroker.redis")

INBOX_TTL = 60.0
"""Seconds an inbox stream lives without its reader renewing it (every third of that)."""
INBOX_LENGTH = 1000
"""Replies an inbox keeps at most (approximately): its reader takes them as they come."""


class ReplyInbox:
    """One connection's reply inbox."""

    def __init__(self, transport: RedisTransport, deliver: ReplySink) -> None:
        self._transport = transport
        self._deliver = deliver
        self.key = f"{transport.prefix}:replies:{uuid.uuid4().hex}"
        self._last = b"0-0"
        self._renewed = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reader: Reader | None = None

    async def open(self) -> str:
        client = self._transport.redis
        doing = "opening the reply inbox"
        try:
            # the stream must exist for the repliers' XADD NOMKSTREAM; its first entry marks it
            first = await client.xadd(self.key, {"o": b"1"}, maxlen=INBOX_LENGTH, approximate=True)
            self._last = first if isinstance(first, bytes) else str(first).encode()
            await client.pexpire(self.key, int(INBOX_TTL * 1000))
        except REDIS_ERRORS as exc:
            raise translate(exc, doing, self._transport.user) from exc
        self._renewed = time.monotonic()
        self._reader = Reader(self._transport.connections, self.key)
        self._task = asyncio.create_task(self._run(), name=f"msgbroker-redis-replies-{self.key}")
        return self.key

    async def _run(self) -> None:
        reader = self._reader
        assert reader is not None
        failures = 0
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._renewed > INBOX_TTL / 3:
                    await self._transport.redis.pexpire(self.key, int(INBOX_TTL * 1000))
                    self._renewed = time.monotonic()
                arrived = await reader.wait({self.key: self._last}, INBOX_TTL / 6, self._stop, "reading replies")
                if arrived:
                    await self._take()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost connection: the reader reconnects at its next wait
                failures += 1
                log.warning("redis: reading the reply inbox %s failed (%s); again shortly", self.key, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(2.0, 0.1 * 2**failures))

    async def _take(self) -> None:
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await self._transport.redis.xrange(
            self.key, min=b"(" + self._last, max=b"+", count=INBOX_LENGTH))
        for entry_id, fields in entries:
            self._last = entry_id
            request_id = fields.get(b"r")
            if request_id is None:
                continue  # the inbox's first entry
            try:
                headers: dict[str, str] = json.loads(fields.get(b"h", b"{}"))
            except ValueError:
                log.warning("redis: a reply in %s has unreadable headers; dropped", self.key)
                continue
            self._deliver(request_id.decode("utf-8", "replace"), headers, fields.get(b"b", b""))

    async def close(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        with contextlib.suppress(Exception):
            await self._transport.redis.delete(self.key)


async def send_reply(transport: RedisTransport, address: str, request_id: str, headers: Mapping[str, str],
                     body: bytes) -> None:
    """XADD the reply to the requester's inbox; an inbox that is gone stays gone (NOMKSTREAM)."""
    prefix = f"{transport.prefix}:replies:"
    if not address.startswith(prefix):
        log.warning("redis: a reply address %r outside this broker's key prefix %r; reply dropped", address, prefix)
        return
    fields: dict[Any, Any] = {"r": request_id, "h": json.dumps(dict(headers)), "b": body}
    try:
        await transport.redis.xadd(address, fields, maxlen=INBOX_LENGTH, approximate=True, nomkstream=True)
    except REDIS_ERRORS as exc:
        raise translate(exc, f"sending the reply to request {request_id}", transport.user) from exc
