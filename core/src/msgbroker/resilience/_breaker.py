"""A circuit breaker with Polly v8's semantics: a failure *ratio* over a rolling window.

Written here because the maintained Python breakers (pybreaker, aiobreaker, circuitbreaker,
purgatory) all count consecutive failures, which trips on a short burst at low traffic and
never trips on a steady 50 % failure rate at high traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import MsgBrokerError, is_transient
from ._context import ResilienceContext

if TYPE_CHECKING:
    from ._settings import ResilienceSettings

__all__ = [
    "BrokenCircuitError",
    "CircuitBreaker",
    "CircuitHealth",
    "CircuitPermit",
    "CircuitState",
    "CircuitStateChange",
    "Clock",
]

log = logging.getLogger("msgbroker.resilience")

T = TypeVar("T")

Clock = Callable[[], float]
"""A monotonic clock in seconds, like :func:`time.monotonic` (tests pass a fake one)."""

# Polly's rolling metrics: the sampling window is kept as this many buckets, so old calls roll
# off in steps of a tenth of the window instead of one timestamp per call (high traffic).
_BUCKETS = 10
# Below this sampling duration a single bucket is used, as Polly does (20 ms timer resolution).
_MIN_BUCKETED_SAMPLING = 0.2


class CircuitState(StrEnum):
    """Where the breaker is."""

    CLOSED = "closed"
    """Calls pass; their outcomes are sampled."""
    OPEN = "open"
    """Calls are rejected with :class:`BrokenCircuitError` until the break is over."""
    HALF_OPEN = "half_open"
    """The break is over: one trial call passes, the others are rejected."""


class BrokenCircuitError(MsgBrokerError):
    """The circuit is open (or half-open with its trial call under way): the call was not made.

    Never retried. ``retry_after`` says how many seconds until the breaker may let a call
    through again; a message handler delays the message by that much.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, retry_after)


@dataclass(frozen=True, slots=True)
class CircuitHealth:
    """The calls sampled in the current window."""

    throughput: int
    failures: int

    @property
    def failure_ratio(self) -> float:
        """Failures over throughput (0 when nothing was sampled)."""
        return self.failures / self.throughput if self.throughput else 0.0


@dataclass(frozen=True, slots=True)
class CircuitStateChange:
    """An event: the breaker moved from ``previous`` to ``state``."""

    breaker: str
    """The breaker's name."""
    previous: CircuitState
    state: CircuitState
    at: float
    """The breaker's clock reading when it happened."""
    break_duration: float | None = None
    """For a change to OPEN: how long it stays open, in seconds."""
    health: CircuitHealth | None = None
    """For a change to OPEN from CLOSED: what the window held when it opened."""
    error: BaseException | None = None
    """For a change to OPEN: the failure that opened it."""
    context: ResilienceContext | None = None
    """The call whose outcome (or arrival) caused the change."""


StateListener = Callable[[CircuitStateChange], object]


class CircuitPermit:
    """Leave to make one call; hand it back with the call's outcome."""

    __slots__ = ("context", "trial")

    def __init__(self, trial: bool, context: ResilienceContext | None) -> None:
        self.trial = trial
        """Whether this is the half-open trial call that decides the breaker's next state."""
        self.context = context


class _Bucket:
    __slots__ = ("failures", "started_at", "successes")

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.successes = 0
        self.failures = 0


class _RollingHealth:
    """Successes and failures over the last ``sampling_duration`` seconds, in buckets."""

    def __init__(self, sampling_duration: float, clock: Clock) -> None:
        self._sampling = sampling_duration
        buckets = _BUCKETS if sampling_duration >= _MIN_BUCKETED_SAMPLING else 1
        self._bucket_duration = sampling_duration / buckets
        self._clock = clock
        self._buckets: deque[_Bucket] = deque()

    def _current(self) -> _Bucket:
        now = self._clock()
        if not self._buckets or now - self._buckets[-1].started_at >= self._bucket_duration:
            self._buckets.append(_Bucket(now))
        while now - self._buckets[0].started_at >= self._sampling:
            self._buckets.popleft()
        return self._buckets[-1]

    def record(self, success: bool) -> None:
        bucket = self._current()
        if success:
            bucket.successes += 1
        else:
            bucket.failures += 1

    def snapshot(self) -> CircuitHealth:
        self._current()
        failures = sum(b.failures for b in self._buckets)
        return CircuitHealth(throughput=failures + sum(b.successes for b in self._buckets), failures=failures)

    def reset(self) -> None:
        self._buckets.clear()


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class CircuitBreaker:
    """Polly v8's advanced circuit breaker.

    * **Closed:** every outcome is sampled over a rolling window of ``sampling_duration``.
      When a failure arrives while the window holds at least ``minimum_throughput`` calls and
      at least ``failure_ratio`` of them failed, the breaker opens.
    * **Open:** calls are rejected with :class:`BrokenCircuitError` for ``break_duration``.
    * **Half-open:** after the break, exactly one trial call passes; the others are rejected.
      Its success closes the breaker (and clears the window); its failure opens it again. A
      trial that is cancelled hands its turn to the next call.

    Only failures that ``should_handle`` accepts count as failures (default: the transient ones,
    :func:`msgbroker.is_transient`): a permanent error says the message is bad, not that the
    dependency is down, so it is sampled as a success, as Polly samples unhandled outcomes.
    Outcomes of calls that started before the breaker opened are ignored while it is not closed.

    All of this runs on one event loop without awaiting inside a transition, so it needs no lock.
    """

    def __init__(
        self,
        *,
        failure_ratio: float = 0.5,
        minimum_throughput: int = 10,
        sampling_duration: float | timedelta = 60.0,
        break_duration: float | timedelta = 30.0,
        clock: Clock = time.monotonic,
        should_handle: Callable[[BaseException], bool] = is_transient,
        name: str = "circuit",
        on_state_change: StateListener | None = None,
    ) -> None:
        if not 0.0 < failure_ratio <= 1.0:
            raise ValueError(f"failure_ratio must be in (0, 1], got {failure_ratio!r}")
        if minimum_throughput < 1:
            raise ValueError(f"minimum_throughput must be at least 1, got {minimum_throughput!r}")
        self.failure_ratio = failure_ratio
        self.minimum_throughput = minimum_throughput
        self.sampling_duration = _seconds(sampling_duration)
        self.break_duration = _seconds(break_duration)
        if self.sampling_duration <= 0 or self.break_duration <= 0:
            raise ValueError("sampling_duration and break_duration must be positive")
        self.name = name
        self._clock = clock
        self._should_handle = should_handle
        self._health = _RollingHealth(self.sampling_duration, clock)
        self._state = CircuitState.CLOSED
        self._blocked_until = 0.0
        self._trial: CircuitPermit | None = None
        self._listeners: list[StateListener] = []
        if on_state_change is not None:
            self._listeners.append(on_state_change)

    @classmethod
    def from_settings(
        cls,
        settings: ResilienceSettings,
        *,
        clock: Clock = time.monotonic,
        name: str = "circuit",
        on_state_change: StateListener | None = None,
    ) -> CircuitBreaker:
        """A breaker configured by the ``circuit_breaker_*`` keys of ``settings``."""
        return cls(
            failure_ratio=settings.circuit_breaker_failure_ratio,
            minimum_throughput=settings.circuit_breaker_minimum_throughput,
            sampling_duration=settings.circuit_breaker_sampling_duration,
            break_duration=settings.circuit_breaker_duration,
            clock=clock,
            name=name,
            on_state_change=on_state_change,
        )

    # -- observing ---------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state (an elapsed break reads as HALF_OPEN, as in Polly)."""
        if self._state is CircuitState.OPEN and self._clock() >= self._blocked_until:
            self._transition(CircuitState.HALF_OPEN, None)
        return self._state

    @property
    def health(self) -> CircuitHealth:
        """What the sampling window holds now."""
        return self._health.snapshot()

    @property
    def retry_after(self) -> float:
        """Seconds until a call may pass again (0 when one may pass now)."""
        state = self.state
        if state is CircuitState.CLOSED or (state is CircuitState.HALF_OPEN and self._trial is None):
            return 0.0
        return max(0.0, self._blocked_until - self._clock())

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(CircuitStateChange)`` on every state change (synchronously; it must
        not block; an exception it raises is logged and ignored)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: StateListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    # -- the protocol: acquire, then report ----------------------------------------------------

    def acquire(self, context: ResilienceContext | None = None) -> CircuitPermit:
        """Leave to make a call, or :class:`BrokenCircuitError` when the circuit does not allow it."""
        state = self.state
        if state is CircuitState.CLOSED:
            return CircuitPermit(False, context)
        now = self._clock()
        if state is CircuitState.HALF_OPEN and (self._trial is None or now >= self._blocked_until):
            # A trial that outlives a whole break (it has no timeout) gives up its turn, so
            # that a hanging call cannot keep the breaker half-open forever.
            self._trial = permit = CircuitPermit(True, context)
            self._blocked_until = now + self.break_duration
            log.debug(
                "msgbroker.resilience: circuit %s is half-open; %s is the trial call",
                self.name,
                context.describe() if context else "a call",
            )
            return permit
        retry_after = max(0.0, self._blocked_until - now)
        what = "open" if state is CircuitState.OPEN else "half-open with its trial call under way"
        raise BrokenCircuitError(
            f"circuit {self.name} is {what}; calls may pass again in {retry_after:.3f}s", retry_after
        )

    def record_success(self, permit: CircuitPermit) -> None:
        """The call made under ``permit`` succeeded."""
        if permit is self._trial:
            self._trial = None
            self._health.reset()
            self._transition(CircuitState.CLOSED, permit.context)
        elif self._state is CircuitState.CLOSED:
            self._health.record(True)

    def record_failure(self, permit: CircuitPermit, error: BaseException | None = None) -> None:
        """The call made under ``permit`` failed in a way that counts against the dependency."""
        if permit is self._trial:
            self._trial = None
            self._open(permit.context, error, None)
        elif self._state is CircuitState.CLOSED:
            self._health.record(False)
            health = self._health.snapshot()
            if health.throughput >= self.minimum_throughput and health.failure_ratio >= self.failure_ratio:
                self._open(permit.context, error, health)

    def release(self, permit: CircuitPermit) -> None:
        """The call made under ``permit`` ended without an outcome (it was cancelled)."""
        if permit is self._trial:
            self._trial = None
            self._blocked_until = self._clock()  # the next call may be the trial at once

    def record(self, permit: CircuitPermit, error: BaseException | None) -> None:
        """Report an outcome: ``None`` for success, else the exception the call raised."""
        if error is None:
            self.record_success(permit)
        elif isinstance(error, asyncio.CancelledError) or not isinstance(error, Exception):
            self.release(permit)
        elif self._should_handle(error):
            self.record_failure(permit, error)
        else:
            self.record_success(permit)  # the dependency answered; the input was bad

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, context: ResilienceContext | None = None) -> T:
        """Run ``await fn(*args)`` through the breaker."""
        permit = self.acquire(context)
        try:
            result = await fn(*args)
        except BaseException as exc:
            self.record(permit, exc)
            raise
        self.record_success(permit)
        return result

    # -- transitions -------------------------------------------------------------------------

    def _open(
        self, context: ResilienceContext | None, error: BaseException | None, health: CircuitHealth | None
    ) -> None:
        self._blocked_until = self._clock() + self.break_duration
        self._transition(CircuitState.OPEN, context, error=error, health=health)

    def _transition(
        self,
        state: CircuitState,
        context: ResilienceContext | None,
        *,
        error: BaseException | None = None,
        health: CircuitHealth | None = None,
    ) -> None:
        previous, self._state = self._state, state
        if state is CircuitState.CLOSED:
            self._blocked_until = 0.0
        change = CircuitStateChange(
            breaker=self.name,
            previous=previous,
            state=state,
            at=self._clock(),
            break_duration=self.break_duration if state is CircuitState.OPEN else None,
            health=health,
            error=error,
            context=context,
        )
        if state is CircuitState.OPEN:
            why = (
                f"{health.failures} of {health.throughput} calls failed"
                if health is not None
                else "the half-open trial call failed"
            )
            log.warning(
                "msgbroker.resilience: circuit %s opened for %.3fs: %s; last error: %r",
                self.name,
                self.break_duration,
                why,
                error,
            )
        elif state is CircuitState.HALF_OPEN:
            log.info("msgbroker.resilience: circuit %s is half-open: the next call is a trial", self.name)
        else:
            log.info("msgbroker.resilience: circuit %s closed: the trial call succeeded", self.name)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("msgbroker.resilience: a listener of circuit %s failed", self.name)
