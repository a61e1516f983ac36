"""The relay: moves committed outbox messages to the broker, at least once, in order per bucket
(so per partition key), with leases so that several relays share the buckets safely."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any, Self

from msgbroker import Broker, ConfigurationError, Service, partition_for
from msgbroker.spi import OutgoingRecord
from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._outbox import Outbox

log = logging.getLogger("msgbroker.outbox")


class Relay:
    """One relay process's worker. Start it with ``await relay.start()`` (or ``async with``), stop
    it with ``await relay.stop()``; :func:`run_relay_in` runs one inside a ``msgbroker.Service``.

    * ``lease_ttl`` (default 10 s): a bucket's lease lasts this long on the database's clock and
      is renewed every third of it; a relay that dies holding buckets loses them after this, and
      another relay takes them over. A relay stops publishing a bucket when it has not renewed
      its lease for 0.8 times ``lease_ttl`` (its own clock).
    * ``batch_size`` (default 500): messages read (oldest first, over the buckets held) and
      published per round.
    * ``poll_interval`` (default 0.1 s): the wait when a round moved nothing. On PostgreSQL (an
      adapter that ``notifies``) a commit that wrote outbox rows ends the wait at once (the
      table's trigger notifies, the relay LISTENs), so the poll only matters when that connection
      is lost; ``listen=False`` polls only.
    * ``keep_sent`` (default 3600 s): sent messages stay marked sent (``sent_at``) this long, then
      are deleted; 0 deletes them once sent.
    """

    def __init__(self, outbox: Outbox, engine: AsyncEngine, broker: Broker, *, relay_id: str | None = None,
                 batch_size: int = 500, lease_ttl: float = 10.0, poll_interval: float = 0.1,
                 keep_sent: float = 3600.0, listen: bool = True) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, got {batch_size!r}")
        if not lease_ttl >= 1.0:
            raise ConfigurationError(f"lease_ttl must be at least 1 s, got {lease_ttl!r}")
        if not poll_interval > 0:
            raise ConfigurationError(f"poll_interval must be above 0 s, got {poll_interval!r}")
        if not keep_sent >= 0:
            raise ConfigurationError(f"keep_sent must be 0 s or more, got {keep_sent!r}")
        self.outbox = outbox
        self.engine = engine
        self.broker = broker
        self.adapter = outbox.adapter_for(engine)
        self.dialect = self.adapter.name
        self.relay_id = relay_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.batch_size = batch_size
        self.lease_ttl = float(lease_ttl)
        self.poll_interval = float(poll_interval)
        self.keep_sent = float(keep_sent)
        self.listen = bool(listen)
        self.held: set[int] = set()
        """The buckets this relay holds right now."""
        self.moved = 0
        """Messages this relay has published and marked sent."""
        self.notified = 0
        """Commits PostgreSQL told this relay of (each ended a wait at once)."""
        self._valid_until = 0.0  # monotonic: publish nothing after this without renewing
        self._renewed_at = -math.inf
        self._cleaned_at = time.monotonic()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # a commit wrote outbox rows (PostgreSQL's NOTIFY)
        self._listener: AsyncConnection | None = None
        self._listening: object = None  # the adapter's handle of the LISTEN
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> Self:
        """Start relaying. When the database answers, first check that its outbox has a lease
        row for each bucket: a ``ConfigurationError`` names both counts otherwise (the tables were
        not created, or the writers use other ``buckets``). A database that does not answer yet
        is not an error: the relay keeps trying."""
        if self._task is None:
            await self._check_buckets()
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name=f"msgbroker-outbox-relay {self.relay_id}")
        return self

    async def _check_buckets(self) -> None:
        leases = self.outbox.leases
        try:
            async with self.engine.connect() as conn:
                count = int(await conn.scalar(select(func.count()).select_from(leases)) or 0)
                top = await conn.scalar(select(func.max(leases.c.bucket)))
        except Exception as exc:
            log.warning("outbox relay %s: cannot check the outbox's buckets yet (%s: %s); starting anyway",
                        self.relay_id, type(exc).__name__, exc)
            return
        if count != self.outbox.buckets or (top is not None and int(top) != self.outbox.buckets - 1):
            raise ConfigurationError(
                f"the outbox table {leases.name} has {count} bucket(s), the relay was given buckets="
                f"{self.outbox.buckets}: call Outbox.create_tables() first, or give the relay the writers' buckets")

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Finish the batch in hand, then hand every bucket back at once (no waiting for leases)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        await task
        with contextlib.suppress(Exception):
            await self._release(list(self.held), leave=True)
        await self._unlisten()

    async def abort(self) -> None:
        """Stop after the statement in hand and hand nothing back: the buckets stay leased until
        their leases run out, as after a crash (for tests; the fault tests kill relay processes
        with SIGKILL for the real thing). Not cancelled mid-statement, so that no database
        connection is left half-used."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await task
        await self._unlisten()

    # -- the loop

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                if time.monotonic() - self._renewed_at >= self.lease_ttl / 3:
                    await self._heartbeat()
                    await self._listen()
                self._wake.clear()  # a commit from now on wakes the pause below
                moved = await self._relay_round()
                if time.monotonic() - self._cleaned_at >= 60.0:
                    await self._clean()
                backoff = 0.1
                if moved == 0:  # wait for a commit, the next poll, or the next heartbeat
                    heartbeat_in = self._renewed_at + self.lease_ttl / 3 - time.monotonic()
                    await self._pause(max(0.0, min(self.poll_interval, heartbeat_in)))
            except Exception as exc:  # the database or the broker away: try again, keep the order
                log.warning("outbox relay %s: %s: %s; trying again in %.1f s",
                            self.relay_id, type(exc).__name__, exc, backoff)
                await self._pause(backoff, wake=False)
                backoff = min(backoff * 2, 2.0)

    async def _pause(self, seconds: float, *, wake: bool = True) -> None:
        """Wait ``seconds``, or less when stopping or (``wake``) when a commit notified us."""
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wake:
            waits.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _listen(self) -> None:
        """An adapter that ``notifies`` (PostgreSQL): LISTEN with a connection of its own, made
        again when it was lost (a restart). Polling goes on beside it; failing here only costs latency."""
        if not self.adapter.notifies or not self.listen:
            return
        if self._listening is not None and self.adapter.is_listening(self._listening):
            return
        await self._unlisten()
        try:
            conn = await self.engine.connect()
        except Exception as exc:
            log.debug("outbox relay %s: no LISTEN connection: %s", self.relay_id, exc)
            return
        try:
            handle = await self.adapter.listen(conn, self.outbox.prefix, self._notified)
        except Exception as exc:
            log.debug("outbox relay %s: LISTEN failed: %s", self.relay_id, exc)
            with contextlib.suppress(Exception):
                await conn.invalidate()
            return
        self._listener, self._listening = conn, handle

    def _notified(self) -> None:
        self.notified += 1
        self._wake.set()

    async def _unlisten(self) -> None:
        """Close the LISTEN connection for good (never back to the pool with a listener on it)."""
        conn, self._listener, self._listening = self._listener, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def _lock_leases(self, conn: AsyncConnection) -> None:
        """Serialise the relays' lease changes (a few a second at most), by the adapter:
        PostgreSQL takes a transaction-level advisory lock; SQLite has one writer, and every lease
        transaction writes first."""
        await self.adapter.lock_leases(conn, self.outbox.leases)

    async def _heartbeat(self) -> None:
        """In one transaction: announce this relay, renew its leases, and take or give back
        buckets so that each live relay holds about buckets / relays."""
        started = time.monotonic()
        t_now = self.adapter.clock()
        leases, relays = self.outbox.leases, self.outbox.relays
        ttl = self.lease_ttl
        async with self.engine.begin() as conn:
            await self._lock_leases(conn)
            await conn.execute(self.adapter.upsert(relays, ["relay_id"],
                                                   {"relay_id": self.relay_id, "expires_at": t_now + ttl},
                                                   {"expires_at": t_now + ttl}))
            renewed = await conn.execute(
                leases.update().where(and_(leases.c.owner == self.relay_id, leases.c.expires_at > t_now))
                .values(expires_at=t_now + ttl).returning(leases.c.bucket))
            held = {int(r[0]) for r in renewed}
            live = int(await conn.scalar(select(func.count()).select_from(relays)
                                         .where(relays.c.expires_at > t_now)) or 1)
            await conn.execute(relays.delete().where(relays.c.expires_at < t_now - 60.0))
            fair = math.ceil(self.outbox.buckets / max(live, 1))
            if len(held) > fair:
                extra = sorted(held)[fair:]
                await conn.execute(
                    leases.update().where(and_(leases.c.bucket.in_(extra), leases.c.owner == self.relay_id))
                    .values(owner=None, expires_at=0.0))
                held.difference_update(extra)
            elif len(held) < fair:
                free = select(leases.c.bucket).where(or_(leases.c.owner.is_(None), leases.c.expires_at < t_now)) \
                    .order_by(leases.c.bucket).limit(fair - len(held)).scalar_subquery()
                taken = await conn.execute(
                    leases.update().where(leases.c.bucket.in_(free))
                    .values(owner=self.relay_id, fence=leases.c.fence + 1, expires_at=t_now + ttl)
                    .returning(leases.c.bucket))
                held.update(int(r[0]) for r in taken)
        self.held = held
        self._renewed_at = started
        self._valid_until = started + 0.8 * ttl

    async def _release(self, buckets: Sequence[int], *, leave: bool = False) -> None:
        leases, relays = self.outbox.leases, self.outbox.relays
        async with self.engine.begin() as conn:
            await self._lock_leases(conn)
            if buckets:
                await conn.execute(
                    leases.update().where(and_(leases.c.bucket.in_(list(buckets)), leases.c.owner == self.relay_id))
                    .values(owner=None, expires_at=0.0))
            if leave:
                await conn.execute(relays.delete().where(relays.c.relay_id == self.relay_id))
        self.held.difference_update(buckets)

    async def _relay_round(self) -> int:
        """Publish the oldest unsent messages of the buckets held, in id order (so in order within
        each bucket), then mark them sent. One query, one publish per run of a topic, one update."""
        if not self.held or time.monotonic() >= self._valid_until:
            return 0  # nothing held, or the leases may have run out: renew before publishing anything
        m = self.outbox.messages
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                select(m.c.id, m.c.topic, m.c.partition_key, m.c.message_id, m.c.headers, m.c.body)
                .where(and_(m.c.bucket.in_(sorted(self.held)), m.c.sent_at.is_(None)))
                .order_by(m.c.id).limit(self.batch_size))).all()
        if not rows or time.monotonic() >= self._valid_until:
            return 0
        await self._publish(rows)
        async with self.engine.begin() as conn:
            if self.keep_sent == 0:
                await conn.execute(m.delete().where(m.c.id.in_([r.id for r in rows])))
            else:
                await conn.execute(m.update().where(m.c.id.in_([r.id for r in rows]))
                                   .values(sent_at=self.adapter.clock()))
        self.moved += len(rows)
        return len(rows)

    async def _publish(self, rows: Sequence[Any]) -> None:
        """One ``send`` per run of consecutive messages of one topic, each confirmed before the next."""
        settings = self.broker.settings
        window: float | None = None
        if settings.enable_deduplication:
            self.broker.capabilities.require("deduplication")
            window = settings.deduplication_window.total_seconds()
        count = settings.partition_count
        run: list[OutgoingRecord] = []
        for row in rows:
            if run and run[0].topic != row.topic:
                await self.broker.producer.send(run[0].topic, run, window)
                run = []
            run.append(OutgoingRecord(row.topic, partition_for(row.partition_key, count), row.partition_key,
                                      row.message_id, json.loads(row.headers), bytes(row.body)))
        if run:
            await self.broker.producer.send(run[0].topic, run, window)

    async def _clean(self) -> None:
        self._cleaned_at = time.monotonic()
        if self.keep_sent == 0:
            return
        m = self.outbox.messages
        async with self.engine.begin() as conn:
            await conn.execute(m.delete().where(and_(m.c.sent_at.is_not(None),
                                                     m.c.sent_at < self.adapter.clock() - self.keep_sent)))


def run_relay_in(service: Service, outbox: Outbox, engine: AsyncEngine, **options: Any) -> None:
    """Run a relay in each worker of ``service`` (``msgbroker run``, the app's lifespan, tests'
    ``service.start``): it starts once the service's broker is open and stops, handing its buckets
    back, before the broker closes. ``options`` are :class:`Relay`'s."""
    holder: list[Relay] = []

    @service.on_startup
    async def _start_outbox_relay() -> None:
        holder.append(await Relay(outbox, engine, service.broker, **options).start())

    @service.on_shutdown
    async def _stop_outbox_relay() -> None:
        while holder:
            await holder.pop().stop()
