"""ResilientMessageHandler end to end on the in-memory provider: ack, requeue, dead letter, delay."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import msgbroker
import pytest
from msgbroker import Broker, BrokerUnavailableError, Message, MessageContext, PermanentError
from msgbroker.resilience import (
    CircuitState,
    ResilienceService,
    ResilienceSettings,
    ResilientMessageHandler,
)
from pydantic import Field

TOPIC = "seat-lock-requests"
GROUP = "seat-lock-workers"


class SeatLockMessage(Message):
    session_id: str
    seat_ids: list[str] = Field(default_factory=list)

    @property
    def partition_key(self) -> str:
        return self.session_id


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def eventually(condition: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"condition not met within {within}s")


def fast_settings(**overrides: Any) -> ResilienceSettings:
    values: dict[str, Any] = {"retry_delay": timedelta(milliseconds=1), "max_retry_delay": timedelta(milliseconds=5)}
    values.update(overrides)
    return ResilienceSettings(**values)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with msgbroker.connect("memory://", partition_count=4, retry_delay=0) as connected:
        yield connected


class Worker:
    """Records each delivery handed to the subscription, then lets the resilient handler run ``work``."""

    def __init__(self, resilient: ResilientMessageHandler, work: Callable[[SeatLockMessage], Awaitable[None]]) -> None:
        self.resilient = resilient
        self.work = work
        self.deliveries: list[MessageContext[SeatLockMessage]] = []

    async def __call__(self, ctx: MessageContext[SeatLockMessage]) -> None:
        self.deliveries.append(ctx)
        await self.resilient.handle(ctx, self.work)

    def attempts_of(self, message_id: str) -> list[int]:
        return [c.delivery_attempt for c in self.deliveries if c.message_id == message_id]


async def test_transient_failures_are_retried_inside_one_delivery_and_acked_once(broker: Broker) -> None:
    calls = 0

    async def lock_seats(message: SeatLockMessage) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise BrokerUnavailableError("seat store is busy")

    worker = Worker(ResilientMessageHandler(ResilienceService(fast_settings())), lock_seats)
    await broker.subscribe(TOPIC, GROUP, worker, message_type=SeatLockMessage)
    message_id = await broker.publish(TOPIC, SeatLockMessage(session_id="s-1", seat_ids=["A1"]))
    await eventually(lambda: bool(worker.deliveries) and worker.deliveries[0].settled is not None)
    await eventually(lambda: _pending_is(broker, 0))
    assert calls == 3
    assert [(c.message_id, c.delivery_attempt, c.settled) for c in worker.deliveries] == [(message_id, 1, "ack")]
    assert await broker.dead_letters(TOPIC, GROUP) == []


async def test_a_permanent_failure_is_dead_lettered_at_once_with_the_error(broker: Broker) -> None:
    calls = 0

    async def lock_seats(message: SeatLockMessage) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError(f"seats {message.seat_ids} do not exist")

    worker = Worker(ResilientMessageHandler(ResilienceService(fast_settings())), lock_seats)
    await broker.subscribe(TOPIC, GROUP, worker, message_type=SeatLockMessage)
    message_id = await broker.publish(TOPIC, SeatLockMessage(session_id="s-2", seat_ids=["Z9"]))
    await eventually(lambda: _dead_letter_count(broker, 1))
    (letter,) = await broker.dead_letters(TOPIC, GROUP)
    assert letter.message_id == message_id
    assert letter.error == "PermanentError: seats ['Z9'] do not exist"
    assert letter.attempts == 1
    assert calls == 1
    assert worker.attempts_of(message_id) == [1]


async def test_a_failure_that_stays_transient_is_requeued_until_the_broker_dead_letters_it(broker: Broker) -> None:
    calls = 0

    async def lock_seats(message: SeatLockMessage) -> None:
        nonlocal calls
        calls += 1
        raise BrokerUnavailableError(f"seat store down (call {calls})")

    settings = fast_settings(max_retry_attempts=1, enable_circuit_breaker=False)
    worker = Worker(ResilientMessageHandler(ResilienceService(settings)), lock_seats)
    await broker.subscribe(TOPIC, GROUP, worker, message_type=SeatLockMessage)
    message_id = await broker.publish(TOPIC, SeatLockMessage(session_id="s-3"))
    await eventually(lambda: _dead_letter_count(broker, 1))
    (letter,) = await broker.dead_letters(TOPIC, GROUP)
    max_attempts = broker.settings.max_retry_attempts
    assert letter.attempts == max_attempts
    assert worker.attempts_of(message_id) == list(range(1, max_attempts + 1))
    assert calls == max_attempts * 2  # each delivery: the first attempt and one retry
    assert letter.error == f"BrokerUnavailableError: seat store down (call {calls})"
    # The handler only ever asked for a requeue; the engine turned the last one into a dead letter.
    assert [c.settled for c in worker.deliveries] == ["retry"] * (max_attempts - 1) + ["dead"]


async def test_while_the_circuit_is_open_messages_are_delayed_not_dead_lettered(broker: Broker) -> None:
    clock = FakeClock()
    settings = fast_settings(
        max_retry_attempts=0,
        circuit_breaker_minimum_throughput=1,
        circuit_breaker_duration=timedelta(milliseconds=50),
    )
    service = ResilienceService(settings, clock=clock)
    assert service.circuit_breaker is not None

    async def outage() -> None:
        raise BrokerUnavailableError("payment gateway down")

    with pytest.raises(BrokerUnavailableError):
        await service.execute(outage)
    assert service.circuit_breaker.state is CircuitState.OPEN

    locked: list[str] = []

    async def lock_seats(message: SeatLockMessage) -> None:
        locked.append(message.session_id)

    worker = Worker(ResilientMessageHandler(service), lock_seats)
    await broker.subscribe(TOPIC, GROUP, worker, message_type=SeatLockMessage)
    sessions = [f"s-{n}" for n in range(4)]
    ids = [await broker.publish(TOPIC, SeatLockMessage(session_id=s)) for s in sessions]
    max_attempts = broker.settings.max_retry_attempts
    # The fake clock stands still, so the circuit stays open: every delivery is delayed by the
    # remaining break, again and again, far past the broker's max_retry_attempts.
    await eventually(lambda: len(worker.attempts_of(ids[0])) > max_attempts + 2)
    assert locked == []
    assert await broker.dead_letters(TOPIC, GROUP) == []
    assert {c.settled for c in worker.deliveries if c.settled is not None} == {"retry"}  # delayed
    assert await broker.pending_count(TOPIC, GROUP) == len(ids)

    clock.now += 0.05  # the break is over: a trial passes, closes the circuit, the rest follow
    await eventually(lambda: sorted(locked) == sessions)
    await eventually(lambda: _pending_is(broker, 0))
    assert await broker.dead_letters(TOPIC, GROUP) == []
    assert service.circuit_breaker.state is CircuitState.CLOSED
    assert sorted(locked) == sessions


async def test_wrap_makes_a_subscribable_handler_typed_by_the_functions_parameter(broker: Broker) -> None:
    received: list[SeatLockMessage] = []

    async def lock_seats(message: SeatLockMessage) -> None:
        received.append(message)

    handler = ResilientMessageHandler(ResilienceService(fast_settings())).wrap(lock_seats)
    assert handler.__name__ == "lock_seats"
    await broker.subscribe(TOPIC, GROUP, handler)  # no message_type=: taken from the annotation
    await broker.publish(TOPIC, SeatLockMessage(session_id=str(uuid.uuid4()), seat_ids=["B2", "B3"]))
    await eventually(lambda: len(received) == 1)
    assert isinstance(received[0], SeatLockMessage)
    assert received[0].seat_ids == ["B2", "B3"]
    await eventually(lambda: _pending_is(broker, 0))


async def _pending_is(broker: Broker, count: int) -> bool:
    return await broker.pending_count(TOPIC, GROUP) == count


async def _dead_letter_count(broker: Broker, count: int) -> bool:
    return len(await broker.dead_letters(TOPIC, GROUP)) == count
