"""The ticket service's handlers, tested as a user tests their own service: the msgbroker_run
fixture runs it on an in-memory broker of its own (docs/service.md, "Testing")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from msgbroker.testing import ServiceRun, run_in_memory
from ticket_service import SeatLock, locks, service

Start = Callable[..., Awaitable[ServiceRun]]


async def test_a_lock_is_taken_in_order_and_announced(msgbroker_run: Start) -> None:
    run = await msgbroker_run(service, retry_delay=0)
    for seq in range(5):
        await run.publish("seat-lock-requests", SeatLock(session="s1", area="a", seq=seq, seats=[f"A-{seq}"]))
    await run.settled()
    assert [m.seq for m in run.messages("ack", topic="seat-lock-requests")] == [0, 1, 2, 3, 4]
    assert locks[("s1", "a")] == ["A-0", "A-1", "A-2", "A-3", "A-4"]
    assert await run.broker.pending_count("seat-locked", "mailer") == 5  # a later group gets all five


async def test_a_request_without_seats_is_retried_then_dead_lettered(msgbroker_run: Start) -> None:
    run = await msgbroker_run(service, retry_delay=0, max_retry_attempts=2)
    await run.publish("seat-lock-requests", SeatLock(session="s2", area="a", seats=[]))
    await run.settled()
    assert len(run.naked) == 1 and str(run.naked[0].error) == "a seat lock names no seat"
    (dead,) = run.dead_lettered
    assert isinstance(dead.message, SeatLock) and dead.delivery_attempt == 2
    (letter,) = await run.dead_letters("seat-lock-requests", "seat-lockers")
    assert letter.error == "ValueError: a seat lock names no seat"


async def test_without_the_fixture() -> None:  # docs/service.md, "Testing your service"
    async with run_in_memory(service, max_retry_attempts=1) as run:
        await run.publish("seat-lock-requests", SeatLock(session="s2", area="a", seats=[]))
        await run.settled()
        assert [str(s.error) for s in run.dead_lettered] == ["a seat lock names no seat"]
