"""``ResilienceService``: one call under retry, circuit breaker and timeout."""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ._breaker import CircuitBreaker, Clock, StateListener
from ._context import ResilienceContext
from ._retry import RetryListener, RetryPolicy
from ._settings import ResilienceSettings

__all__ = ["ResilienceService"]

T = TypeVar("T")


class ResilienceService:
    """Runs async calls under the seed's resilience pipeline (docs/resilience.md).

    The strategies nest as Polly recommends, outermost first::

        retry  →  circuit breaker  →  timeout  →  fn

    * **Timeout innermost**, per attempt: a hanging call (the breaker's half-open trial
      included) fails with ``TimeoutError`` after ``timeout`` and counts as a transient failure,
      so it can neither wedge the breaker nor use up the whole retry budget in one attempt.
    * **Breaker inside retry**: every attempt is one sample of the dependency's health, and once
      the breaker opens the next attempt fails at once with
      :class:`~msgbroker.resilience.BrokenCircuitError`, which is never retried — retries stop
      hammering a dependency that is down.
    * **Retry outermost**: transient failures (:func:`msgbroker.is_transient`) are retried with
      exponential backoff and jitter; permanent ones and cancellation propagate at once.

    One service holds one breaker, shared by every call made through it (like one Polly
    pipeline); use one service per dependency that can fail on its own.

    ``clock`` (monotonic seconds) drives the breaker, ``sleep`` the waits between retries and
    ``random`` (``[0, 1)``) the jitter; tests replace them. The timeout always runs on the event
    loop's clock.
    """

    def __init__(
        self,
        settings: ResilienceSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = random.random,
        name: str = "resilience",
        on_retry: RetryListener | None = None,
        on_circuit_state_change: StateListener | None = None,
    ) -> None:
        self.settings = settings if settings is not None else ResilienceSettings()
        self.name = name
        self.retry_policy = RetryPolicy.from_settings(self.settings, sleep=sleep, random=random, on_retry=on_retry)
        """The retry strategy (``add_listener`` to observe retries)."""
        self.circuit_breaker: CircuitBreaker | None = (
            CircuitBreaker.from_settings(self.settings, clock=clock, name=name, on_state_change=on_circuit_state_change)
            if self.settings.enable_circuit_breaker
            else None
        )
        """The breaker (``None`` when ``enable_circuit_breaker`` is off); ``add_listener`` to observe it."""
        self.timeout = self.settings.timeout.total_seconds()
        """Seconds one attempt may take."""

    async def execute(self, fn: Callable[..., Awaitable[T]], *args: Any, context: ResilienceContext | None = None) -> T:
        """Run ``await fn(*args)`` under timeout, circuit breaker and retry; return its result.

        Raises the last error when retries are used up, a permanent error at once,
        :class:`~msgbroker.resilience.BrokenCircuitError` when the circuit is open (never
        retried), and ``TimeoutError`` when the last attempt timed out.
        """
        context = context if context is not None else ResilienceContext()
        breaker = self.circuit_breaker

        async def attempt() -> T:
            if breaker is None:
                return await self._within_timeout(fn, args, context)
            return await breaker.call(self._within_timeout, fn, args, context, context=context)

        return await self.retry_policy.call(attempt, context=context)

    async def _within_timeout(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], context: ResilienceContext
    ) -> T:
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                awaitable = fn(*args)
                if not inspect.isawaitable(awaitable):
                    raise TypeError(f"execute() takes an async callable; {fn!r} returned {awaitable!r}")
                return await awaitable
        except TimeoutError as exc:
            if deadline.expired():
                # asyncio's TimeoutError carries no text; say what timed out (still transient).
                raise TimeoutError(f"{context.describe()} did not finish within {self.timeout:g}s") from exc
            raise
