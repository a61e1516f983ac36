"""The example's HTTP front: a FastAPI app that publishes seat-lock requests and runs the ticket
service's subscribers in the same process (started and drained with the app).

Run it: ``MSGBROKER_URL=redis://127.0.0.1:6379 uvicorn ticket_api:api`` (from this folder).
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from ticket_service import SeatLock, locks, requests, service

api = FastAPI(title="tickets", lifespan=service.lifespan)


class LockRequest(BaseModel):
    seats: list[str]


@api.post("/sessions/{session}/areas/{area}/locks", status_code=202)
async def request_lock(session: str, area: str, body: LockRequest) -> dict[str, str]:
    """Queue a seat lock; the subscriber takes it (here or in another worker)."""
    message_id = await requests.publish(SeatLock(session=session, area=area, seats=body.seats))
    return {"message_id": message_id}


@api.get("/sessions/{session}/areas/{area}/locks")
async def locked_seats(session: str, area: str) -> dict[str, list[str]]:
    """The seats this process locked in the area."""
    return {"seats": locks.get((session, area), [])}


@api.get("/health")
async def health() -> dict[str, bool]:
    return {"broker": await service.broker.is_healthy()}
