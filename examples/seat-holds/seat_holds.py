"""A seat-hold service that uses the outbox, request/reply and scheduled messages together.

* ``POST /sessions/{session}/seats/{seat}/holds`` (``seat_api.py``) asks the workers with
  ``service.request`` and answers with their decision: ``held`` (201) or ``taken`` (409).
* The worker (:func:`hold_seat`) decides in order per session: it schedules the hold's release
  for ``SEAT_HOLDS_HOLD_SECONDS`` later, then writes the hold, the ``held`` event (through the
  outbox) and its inbox record in **one** database transaction, and returns the decision, which
  is the reply.
* ``POST /holds/{hold_id}/payment`` (:func:`pay`) marks the hold paid with its ``sold`` event in
  one transaction and cancels the scheduled release.
* The release (:func:`release_hold`) comes when the hold is due; a hold still unpaid is released
  with its ``released`` event, again in one transaction with its inbox record.
* The outbox relay (``run_relay_in``) publishes the events to ``seat-events`` after their
  transactions commit, in order per session.

Why each step is safe: the release is scheduled *before* the hold commits, so no crash leaves a
hold that never expires (a release whose hold never committed, or was paid, changes nothing);
the inbox makes a redelivered request or release a no-op on the database, and a redelivered
request answers with the decision already taken; a cancel that loses the race with a due
release is harmless, since the release handler finds the hold paid.

Configured by the environment: ``SEAT_HOLDS_DATABASE`` (a ``postgresql://`` or ``sqlite:///``
URL), ``SEAT_HOLDS_PREFIX`` (the tables' prefix and the topics' first part, so that several
copies share a database and a broker; default ``seats``), ``SEAT_HOLDS_HOLD_SECONDS`` (600);
the broker by ``msgbroker run --url`` or ``MSGBROKER_URL`` like every service.

Run it (from this folder, with ``scripts/brokers up redis postgres`` and ``.brokers/env`` loaded)::

    SEAT_HOLDS_DATABASE=$MSGBROKER_TEST_POSTGRES_URL MSGBROKER_URL=$MSGBROKER_REDIS__URL \\
        ../../.venv/bin/python -m uvicorn seat_api:api
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from typing import Literal

import msgbroker
from msgbroker import Message, MessageContext
from msgbroker_outbox import Inbox, Outbox, async_url, run_relay_in
from sqlalchemy import Column, Float, MetaData, String, Table, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

PREFIX = os.environ.get("SEAT_HOLDS_PREFIX", "seats")
HOLD_SECONDS = float(os.environ.get("SEAT_HOLDS_HOLD_SECONDS", "600"))
HOLDS, RELEASES, EVENTS = f"{PREFIX}-holds", f"{PREFIX}-releases", f"{PREFIX}-events"
IDS = uuid.UUID("5e4a7b0c-2f1d-4c3e-9a8b-7d6c5b4a3f21")
"""Namespace of the ids derived from a request's id (the hold's and its release's): a
redelivered request derives the same ones."""


class HoldSeat(Message):
    """A buyer asks to hold a seat of a session."""

    session: str
    seat: str
    buyer: str

    @property
    def partition_key(self) -> str:  # one session's requests are decided one after the other
        return self.session


class HoldDecision(Message):
    """The worker's answer to a :class:`HoldSeat` request."""

    hold_id: str
    seat: str
    state: Literal["held", "taken"]
    expires_at: float | None = None
    """When an unpaid hold is released (Unix time), for ``held``."""


class ReleaseHold(Message):
    """Scheduled with the hold: release it unless it was paid meanwhile."""

    hold_id: str
    session: str
    seat: str

    @property
    def partition_key(self) -> str:
        return self.session


class SeatEvent(Message):
    """What happened to a seat, published through the outbox (``held``, ``sold``, ``released``)."""

    kind: Literal["held", "sold", "released"]
    hold_id: str
    session: str
    seat: str
    buyer: str

    @property
    def partition_key(self) -> str:
        return self.session


engine = create_async_engine(async_url(os.environ.get("SEAT_HOLDS_DATABASE", "sqlite:///seat-holds.db")),
                             pool_pre_ping=True)
sessions = async_sessionmaker(engine, expire_on_commit=False)
outbox = Outbox(prefix=PREFIX, buckets=16)
inbox = Inbox(prefix=PREFIX)
tables = MetaData()
holds = Table(
    f"{PREFIX}_holds", tables,
    Column("hold_id", String(36), primary_key=True),
    Column("session", String(100), nullable=False, index=True),
    Column("seat", String(100), nullable=False),
    Column("buyer", String(100), nullable=False),
    Column("state", String(10), nullable=False),  # held, paid, released
    Column("release_id", String(36), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("released_at", Float),
)
decisions = Table(
    f"{PREFIX}_decisions", tables,
    Column("request_id", String(36), primary_key=True),
    Column("hold_id", String(36), nullable=False),
    Column("seat", String(100), nullable=False),
    Column("state", String(10), nullable=False),  # held, taken
    Column("expires_at", Float),
)

service = msgbroker.Service(title="seat-holds", version="1.0.0",
                            description="Seat holds that expire unless paid.")
handled: Counter[str] = Counter()
"""Handler runs of this process per topic (the example's tests read it)."""


@service.on_startup
async def create_tables() -> None:
    await outbox.create_tables(engine)
    await inbox.create_tables(engine)
    async with engine.begin() as conn:
        await conn.run_sync(tables.create_all)


@service.on_shutdown
async def close_database() -> None:
    await engine.dispose()  # shutdown hooks run in reverse order: this one after the relay stopped


run_relay_in(service, outbox, engine)


async def _decided(request_id: str) -> HoldDecision | None:
    async with sessions() as session:
        row = (await session.execute(select(decisions).where(decisions.c.request_id == request_id))).first()
    if row is None:
        return None
    return HoldDecision(hold_id=row.hold_id, seat=row.seat, state=row.state, expires_at=row.expires_at)


@service.subscriber(HOLDS, "holders")
async def hold_seat(ctx: MessageContext[HoldSeat]) -> HoldDecision:
    """Decide a hold request; the decision is the reply (``service.request``)."""
    handled[HOLDS] += 1
    request = ctx.message
    earlier = await _decided(ctx.message_id)
    if earlier is not None:  # a redelivery: the decision was taken and committed
        return earlier
    hold_id = str(uuid.uuid5(IDS, f"hold:{ctx.message_id}"))
    release = ReleaseHold(message_id=uuid.uuid5(IDS, f"release:{hold_id}"), hold_id=hold_id,
                          session=request.session, seat=request.seat)
    expires_at = time.time() + HOLD_SECONDS
    # first the release: a crash after the commit below must not leave a hold that never expires
    await service.publish(RELEASES, release, delay=HOLD_SECONDS)
    async with sessions.begin() as session:
        if not await inbox.claim(session, "holders", ctx.message_id):
            state = None  # a duplicate delivery committed meanwhile: its decision stands
        else:
            taken = await session.scalar(select(holds.c.hold_id).where(
                holds.c.session == request.session, holds.c.seat == request.seat,
                holds.c.state.in_(("held", "paid"))))
            state = "taken" if taken else "held"
            if state == "held":
                await session.execute(holds.insert().values(
                    hold_id=hold_id, session=request.session, seat=request.seat, buyer=request.buyer,
                    state="held", release_id=str(release.message_id), expires_at=expires_at))
                await outbox.publish(session, EVENTS, SeatEvent(
                    kind="held", hold_id=hold_id, session=request.session, seat=request.seat, buyer=request.buyer))
            await session.execute(decisions.insert().values(
                request_id=ctx.message_id, hold_id=hold_id, seat=request.seat, state=state,
                expires_at=expires_at if state == "held" else None))
    if state is None:
        decided = await _decided(ctx.message_id)
        assert decided is not None, "the inbox has the request but not its decision"
        return decided
    if state == "taken":
        await service.cancel_scheduled(RELEASES, str(release.message_id))  # nothing to release
    return HoldDecision(hold_id=hold_id, seat=request.seat, state=state,
                        expires_at=expires_at if state == "held" else None)


@service.subscriber(RELEASES, "releasers")
async def release_hold(release: ReleaseHold) -> None:
    """A hold is due: release it unless it was paid (or released) meanwhile."""
    handled[RELEASES] += 1
    async with sessions.begin() as session:
        if not await inbox.claim(session, "releasers", release):
            return
        row = (await session.execute(
            update(holds).where(holds.c.hold_id == release.hold_id, holds.c.state == "held")
            .values(state="released", released_at=time.time()).returning(holds.c.buyer))).first()
        if row is not None:
            await outbox.publish(session, EVENTS, SeatEvent(
                kind="released", hold_id=release.hold_id, session=release.session, seat=release.seat,
                buyer=row.buyer))


async def pay(hold_id: str) -> tuple[str, bool]:
    """Mark a held seat paid (with its ``sold`` event) and cancel its release. Returns the
    hold's state afterwards (``paid``, ``released``, or ``unknown``) and whether a waiting
    release was withdrawn."""
    async with sessions.begin() as session:
        row = (await session.execute(
            update(holds).where(holds.c.hold_id == hold_id, holds.c.state == "held")
            .values(state="paid").returning(holds.c.session, holds.c.seat, holds.c.buyer, holds.c.release_id))
        ).first()
        if row is None:
            state = await session.scalar(select(holds.c.state).where(holds.c.hold_id == hold_id))
            return (state or "unknown"), False
        await outbox.publish(session, EVENTS, SeatEvent(kind="sold", hold_id=hold_id, session=row.session,
                                                        seat=row.seat, buyer=row.buyer))
    # After the commit: if the release is due already it comes anyway and finds the hold paid.
    return "paid", await service.cancel_scheduled(RELEASES, row.release_id)


async def hold_state(hold_id: str) -> dict[str, object] | None:
    async with sessions() as session:
        row = (await session.execute(select(holds).where(holds.c.hold_id == hold_id))).mappings().first()
    return None if row is None else dict(row)
