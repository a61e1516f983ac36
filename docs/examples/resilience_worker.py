"""The seed's ``IResilientMessageHandler`` example: a seat-lock worker whose handler runs under
retry, circuit breaker and timeout, and is settled by the outcome.

Run it: ``python docs/examples/resilience_worker.py [URL]`` (default ``memory://``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from datetime import timedelta

import msgbroker
from msgbroker import BrokerUnavailableError, Consumer, Message, MessageContext, Subscription
from msgbroker.resilience import ResilienceService, ResilienceSettings, ResilientMessageHandler
from pydantic import Field


class SeatLockMessage(Message):
    """Lock some seats of one area of one session."""

    session_id: uuid.UUID
    area_id: uuid.UUID
    seat_ids: list[str] = Field(default_factory=list)

    @property
    def partition_key(self) -> str:
        return f"{self.session_id}:{self.area_id}"  # same session and area: handled in order


class SeatLockService:
    """Stands in for the real seat store: its first answer to each request is 'busy'."""

    def __init__(self) -> None:
        self.locked: list[str] = []
        self._busy_once: set[uuid.UUID] = set()

    async def lock_seats(self, message: SeatLockMessage) -> None:
        if message.message_id not in self._busy_once:
            self._busy_once.add(message.message_id)
            raise BrokerUnavailableError("seat store is busy")  # transient: retried in place
        self.locked.extend(message.seat_ids)


class SeatLockWorker:
    """The seed's ``SeatLockWorker : BackgroundService``."""

    def __init__(
        self,
        consumer: Consumer,
        resilient_handler: ResilientMessageHandler,
        seat_lock_service: SeatLockService,
    ) -> None:
        self._consumer = consumer
        self._resilient_handler = resilient_handler
        self._seat_lock_service = seat_lock_service

    async def start(self) -> Subscription:
        async def handle(ctx: MessageContext[SeatLockMessage]) -> None:
            # ack on success; requeue a transient failure left after retries; dead-letter a
            # permanent one; delay the message while the circuit is open.
            await self._resilient_handler.handle(ctx, self._seat_lock_service.lock_seats)

        return await self._consumer.subscribe("seat-lock-requests", "seat-lock-workers", handle)


async def main(url: str = "memory://", requests: int = 5) -> list[str]:
    """Publish ``requests`` seat-lock requests, let the worker handle them, return the locked seats."""
    # Short delays for the demo; a real worker uses ResilienceSettings.from_file("appsettings.json").
    settings = ResilienceSettings(retry_delay=timedelta(milliseconds=10), max_retry_delay=timedelta(milliseconds=100))
    seats = SeatLockService()
    async with msgbroker.connect(url, partition_count=8) as broker:
        worker = SeatLockWorker(broker.consumer, ResilientMessageHandler(ResilienceService(settings)), seats)
        subscription = await worker.start()
        session = uuid.uuid4()
        for n in range(requests):
            await broker.publish(
                "seat-lock-requests", SeatLockMessage(session_id=session, area_id=uuid.uuid4(), seat_ids=[f"A{n}"])
            )

        async with asyncio.timeout(30):  # wait until the group has settled every request
            # The broker has no "all settled" notification to wait on, so poll it (hence the noqa).
            while await broker.pending_count("seat-lock-requests", "seat-lock-workers") > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await subscription.close()
    print(f"locked {sorted(seats.locked)}")
    return seats.locked


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "memory://"))
