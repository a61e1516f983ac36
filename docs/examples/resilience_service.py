"""The seed's ``IResilienceService`` example: one call to an external service, retried with
backoff and jitter, behind a circuit breaker, each attempt under a timeout.

Run it: ``python docs/examples/resilience_service.py``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from msgbroker.resilience import ResilienceContext, ResilienceService, ResilienceSettings


class MyService:
    """The seed's ``MyService``."""

    def __init__(self, resilience: ResilienceService) -> None:
        self._resilience = resilience
        self.calls = 0

    async def do_work(self) -> str:
        return await self._resilience.execute(
            self.call_external_service,  # retried automatically
            context=ResilienceContext(operation_name="CallExternalService", message_id="123", topic="my-topic"),
        )

    async def call_external_service(self) -> str:
        """Stands in for a flaky dependency: the connection drops twice, then it answers."""
        self.calls += 1
        if self.calls <= 2:
            raise ConnectionResetError("connection reset by peer")  # transient
        return "reserved"


async def main() -> str:
    """Run ``do_work`` once and return its result."""
    # Short delays for the demo; defaults (or appsettings.json) give 1 s, 2 s, 4 s ... capped at 30 s.
    resilience = ResilienceService(
        ResilienceSettings(retry_delay=timedelta(milliseconds=10), max_retry_delay=timedelta(milliseconds=100))
    )
    service = MyService(resilience)
    result = await service.do_work()
    print(f"{result} after {service.calls} calls")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
