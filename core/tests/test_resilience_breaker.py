"""The circuit breaker against Polly v8's documented behaviour, on a fake clock."""

from __future__ import annotations

import asyncio
import logging

import pytest
from msgbroker import MsgBrokerError, PermanentError, TransientError
from msgbroker.resilience import (
    BrokenCircuitError,
    CircuitBreaker,
    CircuitState,
    CircuitStateChange,
    ResilienceContext,
    ResilienceSettings,
)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Dependency(TransientError):
    """A transient failure of the called dependency."""


def make_breaker(clock: FakeClock, events: list[CircuitStateChange] | None = None, **options: float) -> CircuitBreaker:
    settings: dict[str, float] = {
        "failure_ratio": 0.5,
        "minimum_throughput": 10,
        "sampling_duration": 60.0,
        "break_duration": 30.0,
    }
    settings.update(options)
    return CircuitBreaker(
        failure_ratio=settings["failure_ratio"],
        minimum_throughput=int(settings["minimum_throughput"]),
        sampling_duration=settings["sampling_duration"],
        break_duration=settings["break_duration"],
        clock=clock,
        name="test",
        on_state_change=events.append if events is not None else None,
    )


async def succeed() -> str:
    return "ok"


async def fail() -> None:
    raise Dependency("dependency down")


async def run(breaker: CircuitBreaker, outcome: str) -> None:
    """One call through the breaker that succeeds ("s") or fails transiently ("f")."""
    if outcome == "s":
        await breaker.call(succeed)
    else:
        with pytest.raises(Dependency):
            await breaker.call(fail)


async def test_starts_closed_and_passes_calls_through() -> None:
    breaker = make_breaker(FakeClock())
    assert breaker.state is CircuitState.CLOSED
    assert await breaker.call(succeed) == "ok"
    assert breaker.health.throughput == 1
    assert breaker.retry_after == 0.0


async def test_does_not_open_below_minimum_throughput_even_when_every_call_fails() -> None:
    breaker = make_breaker(FakeClock(), minimum_throughput=10)
    for _ in range(9):
        await run(breaker, "f")
    assert breaker.state is CircuitState.CLOSED
    assert breaker.health.failure_ratio == 1.0
    await run(breaker, "f")  # the tenth call reaches the minimum throughput
    assert breaker.state is CircuitState.OPEN


async def test_does_not_open_while_the_failure_ratio_is_below_the_threshold() -> None:
    breaker = make_breaker(FakeClock(), failure_ratio=0.5, minimum_throughput=10)
    for outcome in "ssssss" + "fffff":  # 5 of 11 failed: 0.45
        await run(breaker, outcome)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.health.failures == 5
    await run(breaker, "f")  # 6 of 12: exactly the ratio
    assert breaker.state is CircuitState.OPEN


async def test_opens_only_when_a_failure_arrives() -> None:
    breaker = make_breaker(FakeClock(), minimum_throughput=4)
    for outcome in "fff":
        await run(breaker, outcome)
    await run(breaker, "s")  # 3 of 4 failed, but a success never opens the circuit
    assert breaker.state is CircuitState.CLOSED
    await run(breaker, "f")
    assert breaker.state is CircuitState.OPEN


async def test_open_circuit_rejects_calls_without_making_them_and_says_when_to_come_back() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=2, break_duration=30.0)
    await run(breaker, "f")
    await run(breaker, "f")
    assert breaker.state is CircuitState.OPEN
    clock.advance(10)
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(BrokenCircuitError) as caught:
        await breaker.call(counted)
    assert calls == 0
    assert caught.value.retry_after == pytest.approx(20.0)
    assert isinstance(caught.value, MsgBrokerError)
    assert breaker.retry_after == pytest.approx(20.0)


async def test_half_open_after_the_break_lets_exactly_one_trial_call_through() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=2, break_duration=30.0)
    await run(breaker, "f")
    await run(breaker, "f")
    clock.advance(30)
    assert breaker.state is CircuitState.HALF_OPEN

    release = asyncio.Event()
    started = asyncio.Event()
    calls = 0

    async def slow_trial() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "recovered"

    trial = asyncio.create_task(breaker.call(slow_trial))
    await asyncio.wait_for(started.wait(), 5)

    async def quick() -> str:
        nonlocal calls
        calls += 1
        return "passed"

    others = await asyncio.gather(*(breaker.call(quick) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(o, BrokenCircuitError) for o in others), others
    assert calls == 1
    assert all(o.retry_after == pytest.approx(30.0) for o in others if isinstance(o, BrokenCircuitError))
    release.set()
    assert await asyncio.wait_for(trial, 5) == "recovered"
    assert breaker.state is CircuitState.CLOSED


async def test_a_successful_trial_closes_the_circuit_and_clears_the_window() -> None:
    clock = FakeClock()
    events: list[CircuitStateChange] = []
    breaker = make_breaker(clock, events, minimum_throughput=2)
    await run(breaker, "f")
    await run(breaker, "f")
    clock.advance(30)
    await run(breaker, "s")
    assert breaker.state is CircuitState.CLOSED
    assert breaker.health.throughput == 0
    assert [(e.previous, e.state) for e in events] == [
        (CircuitState.CLOSED, CircuitState.OPEN),
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]
    # A fresh window: one failure does not reopen it although the last samples were failures.
    await run(breaker, "f")
    assert breaker.state is CircuitState.CLOSED


async def test_a_failed_trial_reopens_the_circuit_for_a_whole_break() -> None:
    clock = FakeClock()
    events: list[CircuitStateChange] = []
    breaker = make_breaker(clock, events, minimum_throughput=2, break_duration=30.0)
    await run(breaker, "f")
    await run(breaker, "f")
    clock.advance(31)
    await run(breaker, "f")
    assert breaker.state is CircuitState.OPEN
    assert breaker.retry_after == pytest.approx(30.0)
    assert [e.state for e in events] == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.OPEN]
    assert isinstance(events[-1].error, Dependency)
    assert events[-1].break_duration == 30.0
    clock.advance(29.9)
    with pytest.raises(BrokenCircuitError):
        await breaker.call(succeed)
    clock.advance(0.1)
    assert await breaker.call(succeed) == "ok"
    assert breaker.state is CircuitState.CLOSED


async def test_the_window_rolls_old_failures_out() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=10, sampling_duration=60.0)
    for _ in range(9):
        await run(breaker, "f")
    clock.advance(59)  # still inside the window
    assert breaker.health.throughput == 9
    clock.advance(1)  # now the first bucket is a whole window old
    assert breaker.health.throughput == 0
    await run(breaker, "f")
    assert breaker.state is CircuitState.CLOSED


async def test_the_window_rolls_in_tenths_of_the_sampling_duration() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=4, sampling_duration=60.0)
    await run(breaker, "f")  # bucket at t=0
    clock.advance(6)
    await run(breaker, "f")  # bucket at t=6
    await run(breaker, "s")
    clock.advance(54)  # t=60: the first bucket leaves, the second stays
    health = breaker.health
    assert (health.throughput, health.failures) == (2, 1)
    await run(breaker, "f")  # 2 of 3 failed, but 3 < minimum throughput
    assert breaker.state is CircuitState.CLOSED
    await run(breaker, "f")  # 3 of 4
    assert breaker.state is CircuitState.OPEN


async def test_failures_spread_over_the_window_still_open_it() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=10, sampling_duration=60.0)
    for _ in range(10):
        await run(breaker, "f")
        clock.advance(5.5)  # ten calls over 55 s: all inside the window
    assert breaker.state is CircuitState.OPEN


async def test_permanent_errors_are_sampled_as_successes() -> None:
    breaker = make_breaker(FakeClock(), minimum_throughput=2)

    async def bad_input() -> None:
        raise PermanentError("seat id malformed")

    for _ in range(5):
        with pytest.raises(PermanentError):
            await breaker.call(bad_input)
    assert breaker.state is CircuitState.CLOSED
    assert (breaker.health.throughput, breaker.health.failures) == (5, 0)


async def test_a_cancelled_trial_hands_its_turn_to_the_next_call() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=2)
    await run(breaker, "f")
    await run(breaker, "f")
    clock.advance(30)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    trial = asyncio.create_task(breaker.call(hang))
    await asyncio.wait_for(started.wait(), 5)
    with pytest.raises(BrokenCircuitError):
        await breaker.call(succeed)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state is CircuitState.HALF_OPEN
    assert await breaker.call(succeed) == "ok"
    assert breaker.state is CircuitState.CLOSED


async def test_a_trial_that_outlives_a_whole_break_gives_up_its_turn() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=2, break_duration=30.0)
    await run(breaker, "f")
    await run(breaker, "f")
    clock.advance(30)
    stale = breaker.acquire()
    assert stale.trial
    clock.advance(30)
    fresh = breaker.acquire()
    assert fresh.trial
    breaker.record_failure(stale, Dependency("late"))  # the old trial's outcome no longer decides
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_success(fresh)
    assert breaker.state is CircuitState.CLOSED


async def test_outcomes_of_calls_started_before_the_break_do_not_change_an_open_circuit() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=2)
    early = breaker.acquire()
    await run(breaker, "f")
    await run(breaker, "f")
    assert breaker.state is CircuitState.OPEN
    breaker.record_success(early)
    assert breaker.state is CircuitState.OPEN


async def test_state_changes_are_logged_and_a_failing_listener_does_not_break_the_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="msgbroker.resilience")
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_throughput=2)

    def broken_listener(change: CircuitStateChange) -> None:
        raise RuntimeError("listener bug")

    breaker.add_listener(broken_listener)
    context = ResilienceContext(operation_name="CallExternalService", message_id="123", topic="my-topic")
    with pytest.raises(Dependency):
        await breaker.call(fail, context=context)
    with pytest.raises(Dependency):
        await breaker.call(fail, context=context)
    clock.advance(30)
    await breaker.call(succeed)
    text = caplog.text
    assert "circuit test opened for 30.000s: 2 of 2 calls failed" in text
    assert "circuit test is half-open" in text
    assert "circuit test closed" in text
    assert "listener bug" in text
    assert breaker.state is CircuitState.CLOSED


async def test_opened_event_carries_the_window_and_the_call() -> None:
    events: list[CircuitStateChange] = []
    clock = FakeClock()
    breaker = make_breaker(clock, events, minimum_throughput=3, failure_ratio=0.6)
    context = ResilienceContext(operation_name="lock seats", message_id="m-1", topic="seat-lock-requests")
    await run(breaker, "s")
    await run(breaker, "f")
    with pytest.raises(Dependency):
        await breaker.call(fail, context=context)
    (opened,) = events
    assert opened.state is CircuitState.OPEN
    assert opened.health is not None and (opened.health.throughput, opened.health.failures) == (3, 2)
    assert opened.context is context
    assert opened.at == clock.now


def test_from_settings_uses_the_circuit_breaker_keys() -> None:
    settings = ResilienceSettings(
        circuit_breaker_failure_ratio=0.25,
        circuit_breaker_minimum_throughput=7,
        circuit_breaker_sampling_duration="00:00:10",
        circuit_breaker_duration=4,
    )
    breaker = CircuitBreaker.from_settings(settings, clock=FakeClock())
    assert (breaker.failure_ratio, breaker.minimum_throughput) == (0.25, 7)
    assert (breaker.sampling_duration, breaker.break_duration) == (10.0, 4.0)


@pytest.mark.parametrize(
    "options",
    [{"failure_ratio": 0.0}, {"failure_ratio": 1.5}, {"minimum_throughput": 0}, {"break_duration": 0.0}],
)
def test_rejects_impossible_options(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_breaker(FakeClock(), **options)
