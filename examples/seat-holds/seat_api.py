"""The seat-hold service's HTTP front: FastAPI routes that wait for the workers' decision.

The app runs the service (its subscribers and the outbox relay) in the same process
(``lifespan=service.lifespan``); more workers can run beside it with
``msgbroker run seat_holds:service``. Run it: see ``seat_holds.py``.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Response
from msgbroker import RequestFailedError, RequestTimeoutError
from pydantic import BaseModel
from seat_holds import HOLDS, HoldDecision, HoldSeat, hold_state, pay, service

api = FastAPI(title="seat-holds", lifespan=service.lifespan)


class HoldRequest(BaseModel):
    buyer: str


@api.post("/sessions/{session}/seats/{seat}/holds", status_code=201)
async def hold(session: str, seat: str, body: HoldRequest, response: Response) -> HoldDecision:
    """Hold a seat: 201 with the hold when the worker held it, 409 when it is taken."""
    try:
        decision: HoldDecision = await service.request(
            HOLDS, HoldSeat(session=session, seat=seat, buyer=body.buyer), reply_type=HoldDecision, timeout=10)
    except RequestTimeoutError as exc:
        raise HTTPException(504, str(exc)) from exc
    except RequestFailedError as exc:
        raise HTTPException(500, str(exc)) from exc
    if decision.state == "taken":
        response.status_code = 409
    return decision


@api.post("/holds/{hold_id}/payment")
async def payment(hold_id: str, response: Response) -> dict[str, object]:
    """The payment arrived: the seat is sold and its release withdrawn (409 when the hold was
    released already, 404 when there is no such hold)."""
    state, withdrawn = await pay(hold_id)
    if state == "unknown":
        raise HTTPException(404, f"no hold {hold_id!r}")
    if state != "paid":
        response.status_code = 409
    return {"hold_id": hold_id, "state": state, "release_withdrawn": withdrawn}


@api.get("/holds/{hold_id}")
async def get_hold(hold_id: str) -> dict[str, object]:
    found = await hold_state(hold_id)
    if found is None:
        raise HTTPException(404, f"no hold {hold_id!r}")
    return found
