"""Retry: backoff within its jitter bounds, what is retried, and what never is."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgbroker import BrokerConnectionError, PermanentError, TransientError
from msgbroker.resilience import (
    BrokenCircuitError,
    JitteredBackoff,
    ResilienceContext,
    ResilienceSettings,
    RetryEvent,
    RetryPolicy,
    is_retryable,
)


class RecordingSleep:
    """Stands in for asyncio.sleep: records the delays the policy chose, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Flaky:
    """Fails with ``error`` the first ``failures`` times, then returns ``"done"``."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


class NetworkGlitch(Exception):
    """Transient by its name alone (docs/resilience.md)."""


durations = st.floats(min_value=0.0, max_value=120.0, allow_nan=False, allow_infinity=False)


@given(
    retry_delay=durations,
    extra=durations,
    exponential=st.booleans(),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    retry=st.integers(min_value=1, max_value=200),
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_every_delay_is_the_capped_backoff_within_the_jitter_factor(
    retry_delay: float, extra: float, exponential: bool, jitter: float, retry: int, draw: float
) -> None:
    max_retry_delay = retry_delay + extra
    backoff = JitteredBackoff(
        retry_delay, max_retry_delay, exponential=exponential, jitter_factor=jitter, random=lambda: draw
    )
    base = min(retry_delay * 2.0 ** min(retry - 1, 60), max_retry_delay) if exponential else retry_delay
    delay = backoff.delay(retry)
    assert backoff.base_delay(retry) == pytest.approx(base)
    assert base * (1 - jitter) - 1e-9 <= delay <= min(base * (1 + jitter), max_retry_delay) + 1e-9
    low, high = backoff.bounds(retry)
    assert low - 1e-9 <= delay <= high + 1e-9
    assert delay <= max_retry_delay


@given(retry=st.integers(min_value=1, max_value=30), seed=st.integers(min_value=0, max_value=2**32))
def test_jitter_spreads_delays_over_the_whole_band(retry: int, seed: int) -> None:
    rng = random.Random(seed)
    backoff = JitteredBackoff(1.0, 1e9, jitter_factor=0.2, random=rng.random)
    base = 2.0 ** (retry - 1)
    delays = [backoff.delay(retry) / base for _ in range(200)]
    assert min(delays) >= 0.8 and max(delays) <= 1.2
    assert max(delays) - min(delays) > 0.2  # not a constant: the jitter really varies


def test_seed_settings_give_doubling_delays_capped_at_thirty_seconds() -> None:
    backoff = JitteredBackoff.from_settings(ResilienceSettings(), random=lambda: 0.5)  # no jitter at 0.5
    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.bounds(1) == pytest.approx((0.8, 1.2))
    assert backoff.bounds(6) == pytest.approx((24.0, 30.0))


def test_constant_backoff_when_exponential_is_off() -> None:
    settings = ResilienceSettings(use_exponential_backoff=False, retry_delay=2, jitter_factor=0)
    backoff = JitteredBackoff.from_settings(settings)
    assert {backoff.delay(n) for n in range(1, 20)} == {2.0}


def test_huge_retry_numbers_do_not_overflow() -> None:
    assert JitteredBackoff(1.0, 30.0, jitter_factor=0).delay(10_000) == 30.0


async def test_retries_transient_failures_with_the_chosen_delays_until_success() -> None:
    sleep = RecordingSleep()
    events: list[RetryEvent] = []
    settings = ResilienceSettings(max_retry_attempts=3, retry_delay=timedelta(seconds=1), jitter_factor=0)
    policy = RetryPolicy.from_settings(settings, sleep=sleep, on_retry=events.append)
    flaky = Flaky(2, BrokerConnectionError("connection reset"))
    assert await policy.call(flaky) == "done"
    assert flaky.calls == 3
    assert sleep.delays == [1.0, 2.0]
    assert [(e.attempt, e.max_attempts, e.delay) for e in events] == [(1, 4, 1.0), (2, 4, 2.0)]
    assert all(isinstance(e.error, BrokerConnectionError) for e in events)


async def test_gives_up_after_max_retry_attempts_and_reraises_the_last_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="msgbroker.resilience")
    sleep = RecordingSleep()
    policy = RetryPolicy.from_settings(ResilienceSettings(max_retry_attempts=2), sleep=sleep)
    flaky = Flaky(10, TimeoutError("slow"))
    context = ResilienceContext(operation_name="CallExternalService", message_id="123", topic="my-topic")
    with pytest.raises(TimeoutError, match="slow"):
        await policy.call(flaky, context=context)
    assert flaky.calls == 3
    assert len(sleep.delays) == 2
    assert (
        "CallExternalService (message 123 on my-topic): attempt 1 of 3 failed (TimeoutError: slow); retrying in"
        in caplog.text
    )
    assert "attempt 2 of 3 failed" in caplog.text
    assert "giving up after 3 attempt(s)" in caplog.text


@pytest.mark.parametrize("error", [NetworkGlitch("reset by peer"), ConnectionResetError(), TransientError("busy")])
async def test_transient_by_type_or_by_name_is_retried(error: Exception) -> None:
    policy = RetryPolicy(max_retry_attempts=1, sleep=RecordingSleep())
    flaky = Flaky(1, error)
    assert await policy.call(flaky) == "done"
    assert flaky.calls == 2


@pytest.mark.parametrize("error", [PermanentError("bad seat id"), ValueError("nope"), KeyError("seat")])
async def test_permanent_failures_are_not_retried(error: Exception) -> None:
    sleep = RecordingSleep()
    policy = RetryPolicy(max_retry_attempts=5, sleep=sleep)
    flaky = Flaky(1, error)
    with pytest.raises(type(error)):
        await policy.call(flaky)
    assert flaky.calls == 1
    assert sleep.delays == []


async def test_an_open_circuit_is_not_retried() -> None:
    policy = RetryPolicy(max_retry_attempts=5, sleep=RecordingSleep())
    flaky = Flaky(1, BrokenCircuitError("circuit open", retry_after=3.0))
    with pytest.raises(BrokenCircuitError):
        await policy.call(flaky)
    assert flaky.calls == 1


async def test_cancellation_inside_the_call_is_not_retried() -> None:
    policy = RetryPolicy(max_retry_attempts=5, sleep=RecordingSleep())
    flaky = Flaky(1, asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await policy.call(flaky)
    assert flaky.calls == 1


async def test_cancelling_the_task_during_the_backoff_stops_retrying() -> None:
    policy = RetryPolicy(max_retry_attempts=5, backoff=JitteredBackoff(3600, 3600, jitter_factor=0))
    attempted = asyncio.Event()

    async def down() -> None:
        attempted.set()
        raise BrokerConnectionError("down")

    task = asyncio.create_task(policy.call(down))
    await asyncio.wait_for(attempted.wait(), 5)
    attempted.clear()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not attempted.is_set()  # no second attempt


async def test_zero_retry_attempts_makes_one_attempt() -> None:
    policy = RetryPolicy.from_settings(ResilienceSettings(max_retry_attempts=0), sleep=RecordingSleep())
    flaky = Flaky(1, BrokerConnectionError("down"))
    with pytest.raises(BrokerConnectionError):
        await policy.call(flaky)
    assert flaky.calls == 1


async def test_each_call_counts_its_own_attempts_when_calls_run_concurrently() -> None:
    policy = RetryPolicy(max_retry_attempts=2, backoff=JitteredBackoff(0.001, 0.001, jitter_factor=0))
    flakies = [Flaky(2, BrokerConnectionError("down")) for _ in range(20)]
    assert await asyncio.gather(*(policy.call(f) for f in flakies)) == ["done"] * 20
    assert {f.calls for f in flakies} == {3}


def test_is_retryable_follows_core_classification() -> None:
    assert is_retryable(BrokerConnectionError("x"))
    assert is_retryable(TimeoutError())
    assert not is_retryable(asyncio.CancelledError())
    assert not is_retryable(BrokenCircuitError("open", 1.0))
    assert not is_retryable(KeyboardInterrupt())
    assert not is_retryable(PermanentError("x"))
