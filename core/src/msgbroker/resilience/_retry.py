"""Retry on tenacity: exponential (or constant) backoff with a multiplicative jitter."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from .._errors import is_transient
from ._breaker import BrokenCircuitError
from ._context import ResilienceContext

if TYPE_CHECKING:
    from ._settings import ResilienceSettings

__all__ = ["JitteredBackoff", "RetryEvent", "RetryPolicy", "is_retryable"]

log = logging.getLogger("msgbroker.resilience")

T = TypeVar("T")

# Beyond this many doublings every delay is the cap anyway; stops 2**n overflowing a float.
_MAX_DOUBLINGS = 60


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed attempt is retried: transient (docs/resilience.md, :func:`msgbroker.is_transient`),
    and never cancellation or an open circuit."""
    if isinstance(exc, (asyncio.CancelledError, BrokenCircuitError)) or not isinstance(exc, Exception):
        return False
    return is_transient(exc)


class JitteredBackoff(wait_base):
    """A tenacity ``wait``: ``retry_delay * 2**(n-1)`` (or ``retry_delay`` when not exponential),
    capped at ``max_retry_delay``, times a random factor in ``[1 - jitter, 1 + jitter]``, and
    capped again so that no wait exceeds ``max_retry_delay``.

    tenacity's own ``wait_random_exponential``/``wait_exponential_jitter`` add an absolute jitter;
    the seed's ``JitterFactor`` is relative to the delay, hence this small class.
    """

    def __init__(
        self,
        retry_delay: float | timedelta = 1.0,
        max_retry_delay: float | timedelta = 30.0,
        *,
        exponential: bool = True,
        jitter_factor: float = 0.2,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.retry_delay = _seconds(retry_delay)
        self.max_retry_delay = _seconds(max_retry_delay)
        self.exponential = exponential
        if not 0.0 <= jitter_factor <= 1.0:
            raise ValueError(f"jitter_factor must be in [0, 1], got {jitter_factor!r}")
        self.jitter_factor = jitter_factor
        self._random = random

    @classmethod
    def from_settings(
        cls, settings: ResilienceSettings, *, random: Callable[[], float] = random.random
    ) -> JitteredBackoff:
        """The backoff ``settings`` describe."""
        return cls(
            settings.retry_delay,
            settings.max_retry_delay,
            exponential=settings.use_exponential_backoff,
            jitter_factor=settings.jitter_factor,
            random=random,
        )

    def base_delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1 for the first retry), without jitter."""
        if not self.exponential:
            return min(self.retry_delay, self.max_retry_delay)
        doublings = min(max(0, retry - 1), _MAX_DOUBLINGS)
        return min(self.retry_delay * 2.0**doublings, self.max_retry_delay)

    def bounds(self, retry: int) -> tuple[float, float]:
        """The shortest and longest delay the jitter can choose before retry number ``retry``."""
        base = self.base_delay(retry)
        return base * (1.0 - self.jitter_factor), min(base * (1.0 + self.jitter_factor), self.max_retry_delay)

    def delay(self, retry: int) -> float:
        """A delay, jitter applied, before retry number ``retry``."""
        base = self.base_delay(retry)
        factor = 1.0 + self.jitter_factor * (2.0 * self._random() - 1.0)
        return max(0.0, min(base * factor, self.max_retry_delay))

    def __call__(self, retry_state: RetryCallState) -> float:
        # attempt_number counts the attempts made so far: after the first failure it is 1.
        return self.delay(retry_state.attempt_number)


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """An event: attempt ``attempt`` of ``max_attempts`` failed and is retried after ``delay``."""

    context: ResilienceContext
    attempt: int
    max_attempts: int
    delay: float
    """Seconds until the next attempt (jitter applied)."""
    error: BaseException


RetryListener = Callable[[RetryEvent], object]


class RetryPolicy:
    """Retries transient failures (:func:`is_retryable`) with a :class:`JitteredBackoff`, on tenacity.

    ``max_retry_attempts`` counts retries after the first attempt, as Polly's ``MaxRetryAttempts``
    does. The last failure is re-raised unchanged (never wrapped in tenacity's ``RetryError``).
    """

    def __init__(
        self,
        *,
        max_retry_attempts: int = 3,
        backoff: JitteredBackoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        should_retry: Callable[[BaseException], bool] = is_retryable,
        on_retry: RetryListener | None = None,
    ) -> None:
        if max_retry_attempts < 0:
            raise ValueError(f"max_retry_attempts must not be negative, got {max_retry_attempts!r}")
        self.max_retry_attempts = max_retry_attempts
        self.backoff = backoff if backoff is not None else JitteredBackoff()
        self._sleep = sleep
        self._should_retry = should_retry
        self._listeners: list[RetryListener] = [] if on_retry is None else [on_retry]

    @classmethod
    def from_settings(
        cls,
        settings: ResilienceSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = random.random,
        on_retry: RetryListener | None = None,
    ) -> RetryPolicy:
        """The retry policy ``settings`` describe."""
        return cls(
            max_retry_attempts=settings.max_retry_attempts,
            backoff=JitteredBackoff.from_settings(settings, random=random),
            sleep=sleep,
            on_retry=on_retry,
        )

    @property
    def max_attempts(self) -> int:
        """Attempts in all: the first one and the retries."""
        return self.max_retry_attempts + 1

    def add_listener(self, listener: RetryListener) -> None:
        """Call ``listener(RetryEvent)`` before every retry (synchronously; errors are logged)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: RetryListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    def retrying(self, context: ResilienceContext | None = None) -> AsyncRetrying:
        """A fresh tenacity controller for one call (tenacity keeps per-call statistics on it)."""
        context = context or ResilienceContext()

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            assert error is not None  # tenacity sleeps only after a failed attempt
            log.info(
                "msgbroker.resilience: %s: attempt %d of %d failed (%s: %s); retrying in %.3fs",
                context.describe(),
                state.attempt_number,
                self.max_attempts,
                type(error).__name__,
                error,
                delay,
            )
            event = RetryEvent(context, state.attempt_number, self.max_attempts, delay, error)
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("msgbroker.resilience: a retry listener failed")

        return AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self.max_attempts),
            wait=self.backoff,
            retry=retry_if_exception(self._should_retry),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, context: ResilienceContext | None = None) -> T:
        """Run ``await fn(*args)``, retrying transient failures."""
        context = context or ResilienceContext()
        attempts = 0

        async def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return await fn(*args)

        try:
            return await self.retrying(context)(attempt)
        except Exception as exc:
            if self._should_retry(exc) and attempts >= self.max_attempts:
                log.warning(
                    "msgbroker.resilience: %s: giving up after %d attempt(s): %s: %s",
                    context.describe(),
                    attempts,
                    type(exc).__name__,
                    exc,
                )
            raise
