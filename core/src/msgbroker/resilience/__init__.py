"""Resilience for message handlers and calls: retry with backoff and jitter, a circuit breaker
with Polly v8 semantics, and timeouts (docs/resilience.md; the seed's Resilience module).

::

    from msgbroker.resilience import ResilienceService, ResilienceSettings, ResilientMessageHandler

    resilience = ResilienceService(ResilienceSettings.from_file("appsettings.json"))
    resilient = ResilientMessageHandler(resilience)

    async def handle(ctx: MessageContext[SeatLockMessage]) -> None:
        await resilient.handle(ctx, seat_locks.lock_seats)
"""

from __future__ import annotations

from ._breaker import (
    BrokenCircuitError,
    CircuitBreaker,
    CircuitHealth,
    CircuitPermit,
    CircuitState,
    CircuitStateChange,
    Clock,
)
from ._context import ResilienceContext
from ._handler import ResilientMessageHandler
from ._retry import JitteredBackoff, RetryEvent, RetryPolicy, is_retryable
from ._service import ResilienceService
from ._settings import ResilienceSettings

__all__ = [
    "BrokenCircuitError",
    "CircuitBreaker",
    "CircuitHealth",
    "CircuitPermit",
    "CircuitState",
    "CircuitStateChange",
    "Clock",
    "JitteredBackoff",
    "ResilienceContext",
    "ResilienceService",
    "ResilienceSettings",
    "ResilientMessageHandler",
    "RetryEvent",
    "RetryPolicy",
    "is_retryable",
]
