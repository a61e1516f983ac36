"""The seat-hold example against the real PostgreSQL and Redis: the API waits for the worker's
decision (request/reply), the hold and its event commit together (outbox), the release comes
when the hold is due unless the payment withdrew it (scheduled messages), and a redelivered
request changes nothing twice (inbox)."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgbroker
from fastapi.testclient import TestClient
from msgbroker import MessageContext
from msgbroker.testing import eventually
from seat_api import api
from seat_holds import EVENTS, HOLD_SECONDS, HOLDS, RELEASES, HoldSeat, SeatEvent, handled, service
from sqlalchemy import func, select

PRECISION = 0.5
"""The Redis provider's declared schedule precision (docs/scheduling.md)."""


def wait_for(check, what: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return found


async def events_on_the_broker(url: str, session: str, count: int) -> list[SeatEvent]:
    """What the relay published to the events topic for ``session``, read by a group of the
    test's own (Redis keeps a topic's messages for a group that subscribes later)."""
    seen: list[SeatEvent] = []

    async def collect(ctx: MessageContext[SeatEvent]) -> None:
        if ctx.message.session == session:
            seen.append(ctx.message)

    async with msgbroker.connect(url) as broker:
        async with await broker.subscribe(EVENTS, f"audit-{uuid.uuid4().hex[:6]}", collect, message_type=SeatEvent):
            await eventually(lambda: len(seen) >= count, timeout=30, what=f"{count} events of {session}")
            await asyncio.sleep(0.5)  # and nothing more
    return seen


def test_hold_then_pay_or_let_it_expire(seat_env: str) -> None:
    session = f"s-{uuid.uuid4().hex[:6]}"
    releases_before = handled[RELEASES]
    with TestClient(api) as client:
        alice = client.post(f"/sessions/{session}/seats/A-1/holds", json={"buyer": "alice"})
        assert alice.status_code == 201, alice.text
        assert alice.json()["state"] == "held"
        bob = client.post(f"/sessions/{session}/seats/A-1/holds", json={"buyer": "bob"})
        assert bob.status_code == 409 and bob.json()["state"] == "taken", bob.text
        carol = client.post(f"/sessions/{session}/seats/A-2/holds", json={"buyer": "carol"})
        assert carol.status_code == 201, carol.text
        paid_id, expiring_id = alice.json()["hold_id"], carol.json()["hold_id"]

        paid = client.post(f"/holds/{paid_id}/payment")
        assert paid.status_code == 200, paid.text
        assert paid.json() == {"hold_id": paid_id, "state": "paid", "release_withdrawn": True}

        released = wait_for(lambda: (h := client.get(f"/holds/{expiring_id}").json())["state"] == "released" and h,
                            "carol's unpaid hold released", timeout=HOLD_SECONDS + 30)
        assert released["released_at"] >= carol.json()["expires_at"] - 0.01, "released before its time"

        # Past alice's time (and the precision): her release was withdrawn, so nothing comes
        time.sleep(max(0.0, alice.json()["expires_at"] + PRECISION + 1.0 - time.time()))
        assert client.get(f"/holds/{paid_id}").json()["state"] == "paid"
        assert handled[RELEASES] - releases_before == 1, "a withdrawn release (the paid or the taken seat's) came"

        late = client.post(f"/holds/{expiring_id}/payment")
        assert late.status_code == 409 and late.json()["state"] == "released", late.text
        assert client.post(f"/holds/{uuid.uuid4()}/payment").status_code == 404

    events = asyncio.run(events_on_the_broker(seat_env, session, 4))
    assert [(e.kind, e.seat, e.buyer) for e in events] == [
        ("held", "A-1", "alice"), ("held", "A-2", "carol"), ("sold", "A-1", "alice"), ("released", "A-2", "carol"),
    ]


async def test_a_redelivered_request_has_one_effect_and_the_same_answer(seat_env: str) -> None:
    from seat_holds import decisions, holds, sessions

    session = f"s-{uuid.uuid4().hex[:6]}"
    request = HoldSeat(session=session, seat="B-1", buyer="dave")
    before = handled[HOLDS]
    await service.start()
    try:
        # The same message twice: what a worker killed after its commit, before its ack, leaves
        await service.publish(HOLDS, request)
        await service.publish(HOLDS, request)
        answer = await service.request(HOLDS, HoldSeat(session=session, seat="B-1", buyer="erin"),
                                       reply_type=None, timeout=10)
        assert answer["state"] == "taken", answer
        assert handled[HOLDS] - before == 3
        async with sessions() as db:
            assert await db.scalar(select(func.count()).select_from(holds).where(holds.c.session == session)) == 1
            assert await db.scalar(select(func.count()).select_from(decisions)
                                   .where(decisions.c.request_id == str(request.message_id))) == 1
    finally:
        await service.stop()
