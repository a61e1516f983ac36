"""Request and reply (docs/semantics.md, rule 13) through the service layer and in an ASGI app:
a plain handler's returned message answers, a FastAPI-style route awaits the worker's decision,
and a broker that closes ends the requests still waiting (the conformance suite checks the rule
on every provider that declares ``request_reply``)."""

from __future__ import annotations

import asyncio
import uuid

import msgbroker
import pytest
from msgbroker import Message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient


class Hold(Message):
    seat: str

    @property
    def partition_key(self) -> str:
        return self.seat


class Decision(Message):
    seat: str
    locked: bool


def seat_service() -> msgbroker.Service:
    service = msgbroker.Service(f"memory://rr-{uuid.uuid4().hex[:8]}")
    taken: set[str] = set()

    @service.subscriber("holds", "lockers")
    async def lock(hold: Hold) -> Decision:  # a plain handler: what it returns is the reply
        locked = hold.seat not in taken
        taken.add(hold.seat)
        return Decision(seat=hold.seat, locked=locked)

    return service


def test_a_route_answers_with_the_workers_decision() -> None:
    service = seat_service()

    async def hold(request: Request) -> JSONResponse:
        decision = await service.request("holds", Hold(seat=request.path_params["seat"]),
                                         reply_type=Decision, timeout=5)
        assert isinstance(decision, Decision)
        return JSONResponse({"seat": decision.seat, "status": "locked" if decision.locked else "taken"})

    app = Starlette(routes=[Route("/holds/{seat}", hold, methods=["POST"])], lifespan=service.lifespan)
    with TestClient(app) as client:
        assert client.post("/holds/A1").json() == {"seat": "A1", "status": "locked"}
        assert client.post("/holds/A1").json() == {"seat": "A1", "status": "taken"}
        assert client.post("/holds/B2").json() == {"seat": "B2", "status": "locked"}


async def test_a_handler_that_returns_no_message_fails_the_request_attempt() -> None:
    async with msgbroker.connect(f"memory://rr-{uuid.uuid4().hex[:8]}", max_retry_attempts=2,
                                 retry_delay=0) as broker:
        async def wrong(ctx: msgbroker.MessageContext[Hold]) -> object:
            return {"seat": ctx.message.seat}  # a dict, not a Message: no reply can be made of it

        await broker.subscribe("holds", "lockers", wrong, message_type=Hold)
        with pytest.raises(msgbroker.RequestFailedError, match=r"a reply must be a msgbroker\.Message"):
            await broker.request("holds", Hold(seat="C3"), timeout=5)
        # a plain publish to the same handler is no request: returning anything acks it
        await broker.publish("holds", Hold(seat="D4"))


async def test_closing_the_broker_ends_the_requests_still_waiting() -> None:
    broker = await msgbroker.connect(f"memory://rr-{uuid.uuid4().hex[:8]}")
    waiting = asyncio.ensure_future(broker.request("nobody-answers", Hold(seat="E5"), timeout=30))
    await asyncio.sleep(0.05)
    await broker.close()
    with pytest.raises(msgbroker.BrokerClosedError, match="closed before the reply came"):
        await waiting


async def test_request_needs_the_capability() -> None:
    broker = await msgbroker.connect(f"memory://rr-{uuid.uuid4().hex[:8]}")
    try:
        broker.capabilities = msgbroker.Capabilities(persistent=False, request_reply=False,
                                                     reasons={"request_reply": "no channel for replies"})
        with pytest.raises(msgbroker.CapabilityNotSupported, match=r"request_reply.*no channel for replies"):
            await broker.request("holds", Hold(seat="F6"), timeout=1)
    finally:
        await broker.close()
