"""Running a service in a test: on a fresh in-memory broker, with every settle recorded
(``msgbroker.testing.run_in_memory`` and the ``msgbroker_run`` pytest fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._broker import Broker, connect
from ._errors import MsgBrokerError
from ._hookspecs import HandleEvent, hookimpl
from ._memory import forget
from ._message import DeadLetter, Message
from ._registry import registry
from ._service import Service
from ._settings import BrokerSettings

__all__ = ["ServiceRun", "Settle", "run_in_memory"]


@dataclass(frozen=True, slots=True)
class Settle:
    """How one delivery ended."""

    topic: str
    group: str
    partition: int
    message_id: str
    delivery_attempt: int
    outcome: str
    """``ack``, ``nak`` (retried), ``delay``, ``dead_letter``, or ``failed`` (settling itself failed)."""
    message: Message | None
    """The decoded message; None when it never reached the handler (it did not decode)."""
    error: BaseException | str | None
    """What the handler raised, or why msgbroker gave up on it (a payload that does not decode, too
    many deliveries); None when the handler settled it itself (``dead_letters()`` has its reason)."""


class _Recorder:
    """A ``msgbroker_handle`` plugin: records the settles of the run's members."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Settle]] = []  # (member id, settle)
        self.in_flight: dict[str, int] = {}

    @hookimpl
    def msgbroker_handle(self, event: HandleEvent) -> contextlib.AbstractContextManager[object]:
        return self._handling(event)

    @contextlib.contextmanager
    def _handling(self, event: HandleEvent) -> Iterator[None]:
        member = event.member_id
        self.in_flight[member] = self.in_flight.get(member, 0) + 1
        try:
            yield
        finally:
            self.in_flight[member] -= 1
            if event.outcome is not None:  # None: cut off by a shutdown, to be delivered again
                message = event.context.message if event.context is not None else None
                self.events.append((member, Settle(event.topic, event.group, event.partition, event.message_id,
                                                   event.delivery_attempt, event.outcome, message, event.error)))


class ServiceRun:
    """A service running on its own in-memory broker, and what happened to every delivery."""

    def __init__(self, service: Service, broker: Broker, recorder: _Recorder) -> None:
        self.service = service
        self.broker = broker
        self._recorder = recorder
        self._members: set[str] = set()
        self._lanes = sorted({(s.topic, s.group) for s in service.subscribers})

    def _started(self) -> None:
        self._members = {s.member_id for s in self.service.subscriptions}

    @property
    def settles(self) -> list[Settle]:
        """Every settle of the service's subscribers, in the order they happened."""
        members = self._members
        return [settle for member, settle in self._recorder.events if member in members]

    def _with(self, outcome: str) -> list[Settle]:
        return [s for s in self.settles if s.outcome == outcome]

    @property
    def acked(self) -> list[Settle]:
        return self._with(HandleEvent.ACK)

    @property
    def naked(self) -> list[Settle]:
        """Handled and given back to be retried (a raise, or ``ctx.nak()``)."""
        return self._with(HandleEvent.NAK)

    @property
    def delayed(self) -> list[Settle]:
        return self._with(HandleEvent.DELAY)

    @property
    def dead_lettered(self) -> list[Settle]:
        return self._with(HandleEvent.DEAD_LETTER)

    def messages(self, outcome: str = HandleEvent.ACK, topic: str | None = None) -> list[Message]:
        """The messages settled with ``outcome`` (on ``topic``), in order."""
        return [s.message for s in self._with(outcome)
                if s.message is not None and (topic is None or s.topic == topic)]

    async def publish(self, topic: str, message: Message, *, headers: Mapping[str, str] | None = None) -> str:
        return await self.broker.publish(topic, message, headers=headers)

    async def publish_batch(self, topic: str, messages: Sequence[Message]) -> list[str]:
        return await self.broker.publish_batch(topic, messages)

    async def dead_letters(self, topic: str, group: str) -> list[DeadLetter]:
        return await self.broker.dead_letters(topic, group)

    async def pending(self) -> dict[tuple[str, str], int]:
        """Unsettled messages per (topic, group) of the service's subscribers."""
        return {lane: await self.broker.pending_count(*lane) for lane in self._lanes}

    def _busy(self) -> int:
        return sum(n for member, n in self._recorder.in_flight.items() if member in self._members)

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until no subscriber has anything left: nothing pending (delayed and retried
        messages included) and no handler running. An ``AssertionError`` after ``timeout``
        seconds says what is left."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while True:
            pending = await self.pending()
            busy = self._busy()
            quiet = quiet + 1 if busy == 0 and not any(pending.values()) else 0
            if quiet >= 2:  # twice in a row: nothing was between a poll and its handler
                return
            if time.monotonic() > deadline:
                left = {f"{t}/{g}": n for (t, g), n in pending.items() if n}
                raise AssertionError(f"not settled after {timeout}s: pending {left or 'none'}, "
                                     f"{busy} handler(s) running")
            await asyncio.sleep(0.01)


def _settings_of(service: Service) -> dict[str, Any]:
    """The service's general settings (partitions, retries, timeouts), without its provider."""
    try:
        settings = service.connect().settings
    except (MsgBrokerError, ValueError):
        return {}
    general = settings.model_dump(include=set(BrokerSettings.model_fields))
    general.pop("provider", None)
    general.pop("memory", None)
    return general


@contextlib.asynccontextmanager
async def run_in_memory(service: Service, **overrides: Any) -> AsyncIterator[ServiceRun]:
    """Start ``service`` on a new in-memory broker of its own, with the service's settings
    (partitions, retries, timeouts) and ``overrides`` (``retry_delay=0``, say); yields a
    :class:`ServiceRun`; stops the service (draining it) and drops the broker on exit."""
    name = f"msgbroker-test-{uuid.uuid4().hex[:12]}"
    recorder = _Recorder()
    plugin_name = f"msgbroker.testing.{name}"
    registry.plugins.register(recorder, name=plugin_name)  # before subscribing: looked up at start
    try:
        broker = connect(f"memory://{name}", **{**_settings_of(service), **overrides})
        run = ServiceRun(service, broker, recorder)
        await service.start(broker)
        try:
            run._started()
            yield run
        finally:
            await service.stop()
            await broker.close()
    finally:
        registry.plugins.unregister(name=plugin_name)
        forget(name)
