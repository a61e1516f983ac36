"""ResilienceService: the pipeline retry → circuit breaker → timeout around one call."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from msgbroker import BrokerUnavailableError, PermanentError
from msgbroker.resilience import (
    BrokenCircuitError,
    CircuitState,
    CircuitStateChange,
    ResilienceContext,
    ResilienceService,
    ResilienceSettings,
    RetryEvent,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def no_sleep(seconds: float) -> None:
    """Backoff waits are not what these tests are about."""


def fast(**overrides: object) -> ResilienceSettings:
    values: dict[str, object] = {"retry_delay": 0, "max_retry_delay": 0}
    values.update(overrides)
    return ResilienceSettings(**values)


async def test_execute_passes_arguments_and_returns_the_result() -> None:
    service = ResilienceService(fast())

    async def add(a: int, b: int) -> int:
        return a + b

    assert await service.execute(add, 2, 3, context=ResilienceContext(operation_name="add")) == 5


async def test_transient_failures_are_retried_and_each_attempt_is_a_breaker_sample() -> None:
    events: list[RetryEvent] = []
    service = ResilienceService(fast(max_retry_attempts=3), clock=FakeClock(), on_retry=events.append)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise BrokerUnavailableError("server busy")
        return "locked"

    assert await service.execute(flaky) == "locked"
    assert [e.attempt for e in events] == [1, 2]
    assert service.circuit_breaker is not None
    assert (service.circuit_breaker.health.throughput, service.circuit_breaker.health.failures) == (3, 2)


async def test_permanent_failure_is_raised_at_once() -> None:
    service = ResilienceService(fast(max_retry_attempts=3))
    calls = 0

    async def bad() -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("seat does not exist")

    with pytest.raises(PermanentError):
        await service.execute(bad)
    assert calls == 1


async def test_a_hanging_attempt_times_out_as_a_transient_failure_and_is_retried() -> None:
    service = ResilienceService(fast(max_retry_attempts=1, timeout=timedelta(milliseconds=20)))
    attempts = 0

    async def hang() -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.Event().wait()

    context = ResilienceContext(operation_name="CallExternalService", message_id="123", topic="my-topic")
    expected = r"CallExternalService \(message 123 on my-topic\) did not finish within 0.02s"
    with pytest.raises(TimeoutError, match=expected):
        await service.execute(hang, context=context)
    assert attempts == 2


async def test_a_timeout_error_raised_by_the_call_itself_is_kept() -> None:
    service = ResilienceService(fast(max_retry_attempts=0))

    async def own_timeout() -> None:
        raise TimeoutError("upstream said 504")

    with pytest.raises(TimeoutError, match="upstream said 504"):
        await service.execute(own_timeout)


async def test_the_breaker_opening_mid_retry_stops_the_retries() -> None:
    changes: list[CircuitStateChange] = []
    settings = fast(max_retry_attempts=10, circuit_breaker_minimum_throughput=2)
    service = ResilienceService(settings, clock=FakeClock(), sleep=no_sleep, on_circuit_state_change=changes.append)
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(BrokenCircuitError) as caught:
        await service.execute(down)
    assert attempts == 2  # the second failure opened the circuit; the third attempt was refused
    assert caught.value.retry_after == pytest.approx(30.0)
    assert [c.state for c in changes] == [CircuitState.OPEN]


async def test_a_hanging_half_open_trial_times_out_and_reopens_the_circuit() -> None:
    clock = FakeClock()
    settings = fast(max_retry_attempts=0, circuit_breaker_minimum_throughput=1, timeout=timedelta(milliseconds=20))
    service = ResilienceService(settings, clock=clock)
    breaker = service.circuit_breaker
    assert breaker is not None

    async def down() -> None:
        raise BrokerUnavailableError("down")

    with pytest.raises(BrokerUnavailableError):
        await service.execute(down)
    assert breaker.state is CircuitState.OPEN
    clock.now += 30

    async def hang() -> None:
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        await service.execute(hang)
    assert breaker.state is CircuitState.OPEN  # not wedged half-open


async def test_cancelling_execute_propagates_and_leaves_the_breaker_alone() -> None:
    clock = FakeClock()
    service = ResilienceService(fast(max_retry_attempts=5), clock=clock)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(service.execute(hang))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert service.circuit_breaker is not None
    assert service.circuit_breaker.health.throughput == 0


async def test_without_the_breaker_calls_keep_going_through() -> None:
    service = ResilienceService(
        fast(max_retry_attempts=0, enable_circuit_breaker=False, circuit_breaker_minimum_throughput=1)
    )
    assert service.circuit_breaker is None
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise BrokerUnavailableError("down")

    for _ in range(5):
        with pytest.raises(BrokerUnavailableError):
            await service.execute(down)
    assert attempts == 5


async def test_a_function_that_is_not_async_is_a_clear_error() -> None:
    service = ResilienceService(fast())

    def not_async() -> str:
        return "oops"

    with pytest.raises(TypeError, match="execute\\(\\) takes an async callable"):
        await service.execute(not_async)  # type: ignore[arg-type]


async def test_default_service_uses_the_seed_settings() -> None:
    service = ResilienceService()
    assert service.settings == ResilienceSettings()
    assert service.timeout == 30.0
    assert service.retry_policy.max_attempts == 4
