"""Scheduled messages in the core (docs/semantics.md, rule 14): the arguments ``publish`` takes,
the refusal of a provider without the capability, and the service's publishers (the conformance
suite checks the rule itself on every provider that declares ``scheduling``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import msgbroker
import pytest
from msgbroker import Message


class Hold(Message):
    seat: str

    @property
    def partition_key(self) -> str:
        return self.seat


@pytest.mark.parametrize(("deliver_at", "delay", "says"), [
    (datetime(2030, 1, 1, tzinfo=UTC), 5, "not both"),
    (datetime(2030, 1, 1), None, "no timezone"),
    ("2030-01-01T00:00:00Z", None, "timezone-aware datetime"),
    (None, -1, "delay=-1"),
    (None, float("nan"), "delay=nan"),
    (None, "5", "delay='5'"),
    (None, True, "delay=True"),
])
def test_bad_scheduling_arguments_are_refused_naming_them(deliver_at: object, delay: object, says: str) -> None:
    async def run() -> None:
        async with msgbroker.connect("memory://") as broker:
            with pytest.raises(msgbroker.ConfigurationError, match=says.replace("(", r"\(")):
                await broker.publish("t", Hold(seat="a"), deliver_at=deliver_at, delay=delay)  # type: ignore[arg-type]

    asyncio.run(run())


def test_a_provider_without_scheduling_refuses_it_with_its_reason() -> None:
    async def run() -> None:
        async with msgbroker.connect("memory://") as broker:
            broker.capabilities = msgbroker.Capabilities(persistent=False, scheduling="none",
                                                         reasons={"scheduling": "no store for it"})
            with pytest.raises(msgbroker.CapabilityNotSupported, match=r"scheduling.*no store for it"):
                await broker.publish("t", Hold(seat="a"), delay=1)
            with pytest.raises(msgbroker.CapabilityNotSupported, match=r"scheduling.*no store for it"):
                await broker.publish("t", Hold(seat="a"), deliver_at=datetime.now(UTC) - timedelta(seconds=1))
            with pytest.raises(msgbroker.CapabilityNotSupported, match="scheduling"):
                await broker.cancel_scheduled("t", str(uuid.uuid4()))

    asyncio.run(run())


def test_a_service_publisher_schedules_and_cancels() -> None:
    service = msgbroker.Service(f"memory://sched-{uuid.uuid4().hex[:8]}")
    handled: list[tuple[str, float]] = []
    holds = service.publisher("holds", Hold)

    @service.subscriber("holds", "lockers")
    async def lock(hold: Hold) -> None:
        handled.append((hold.seat, time.time()))

    async def run() -> None:
        async with service:
            due = time.time() + 0.4
            await holds.publish(Hold(seat="later"), delay=timedelta(seconds=0.4))
            withdrawn = await service.publish("holds", Hold(seat="never"), delay=0.3)
            assert await service.cancel_scheduled("holds", withdrawn) is True
            await holds.publish(Hold(seat="now"))
            for _ in range(300):
                if len(handled) >= 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert [seat for seat, _ in handled] == ["now", "later"]
            assert handled[1][1] >= due - 0.005

    asyncio.run(run())
