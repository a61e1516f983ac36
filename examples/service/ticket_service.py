"""The example service of docs/service.md: seat locks for a ticket sale.

Run it: ``msgbroker run ticket_service:service --url redis://127.0.0.1:6379 --workers 2``
(from this folder). Requests for one session and area are handled in order, by one worker at a
time; each lock taken is announced on ``seat-locked``.
"""

from __future__ import annotations

import asyncio
import os

import msgbroker
from msgbroker import Message


class SeatLock(Message):
    """A request to lock seats of one area of one session."""

    session: str
    area: str
    seq: int = 0
    """The request's number within its session and area (the example's checks use it)."""
    seats: list[str]

    @property
    def partition_key(self) -> str:  # same session and area: same partition, handled in order
        return f"{self.session}:{self.area}"


class SeatLocked(Message):
    """Seats were locked for a request."""

    session: str
    area: str
    seq: int
    seats: list[str]
    worker: int
    """The process that locked them."""

    @property
    def partition_key(self) -> str:
        return f"{self.session}:{self.area}"


# No broker here: `msgbroker run --url/--config`, or MSGBROKER_URL / MSGBROKER_CONFIG, say which.
service = msgbroker.Service(title="tickets", version="1.0.0", description="Seat locks for a ticket sale.")
requests = service.publisher("seat-lock-requests", SeatLock, description="A client asks for seats.")
announcements = service.publisher("seat-locked", SeatLocked, description="Seats were locked.")

WORK_SECONDS = float(os.environ.get("TICKETS_WORK_SECONDS", "0"))
"""Simulated work per request (the example's tests slow the handler down with it)."""

locks: dict[tuple[str, str], list[str]] = {}
"""Seats locked by this process, per (session, area): the stand-in for a database."""


@service.subscriber("seat-lock-requests", "seat-lockers")
async def lock_seats(request: SeatLock) -> None:
    """Lock the requested seats, in order per session and area; announce the lock."""
    if not request.seats:
        raise ValueError("a seat lock names no seat")  # retried, then dead-lettered
    if WORK_SECONDS:
        await asyncio.sleep(WORK_SECONDS)
    locks.setdefault((request.session, request.area), []).extend(request.seats)
    await announcements.publish(SeatLocked(session=request.session, area=request.area, seq=request.seq,
                                           seats=request.seats, worker=os.getpid()))
