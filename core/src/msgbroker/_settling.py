"""Handling one delivery and settling it: decode, run the handler, then ack, retry (counting
failed attempts) or dead-letter, as docs/semantics.md says."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ._codec import REPLAY_GROUP_HEADER
from ._errors import MsgBrokerError, SerializationError
from ._hookspecs import HandleEvent
from ._lanes import LaneState, failures_of
from ._message import DeadLetter, Handler, Message, MessageContext, Outcome
from ._provider import Delivery, LaneConsumer, Transport
from ._registry import registry
from ._requests import dead_letter_reply, reply_address, reply_of
from .wire import REPLY_TO_HEADER

if TYPE_CHECKING:
    from ._settings import BrokerSettings

__all__ = ["DeliverySettler", "Settling", "error_text"]

log = logging.getLogger("msgbroker")

_HOOK_OUTCOMES = {Outcome.ACK: HandleEvent.ACK, Outcome.RETRY: HandleEvent.NAK, Outcome.DEAD: HandleEvent.DEAD_LETTER}


def error_text(error: BaseException | str | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


class DeliverySettler:
    """Carries out a handler's settle calls for one delivery (used by MessageContext)."""

    __slots__ = ("_delivery", "_lane", "_runner", "delayed", "result")

    def __init__(self, runner: Settling, lane: LaneState, delivery: Delivery) -> None:
        self._runner = runner
        self._lane = lane
        self._delivery = delivery
        self.result: str | None = None
        self.delayed = False

    def ack(self) -> Awaitable[None]:
        # not a coroutine itself: the caller awaits the provider's ack directly (one frame less)
        self.result = Outcome.ACK
        return self._runner.consumer.ack(self._delivery)

    async def retry(self, delay: float | None, error: BaseException | str | None) -> None:
        self.delayed = delay is not None
        await self._runner.retry(self, self._lane, self._delivery, delay, error)

    async def dead_letter(self, error: BaseException | str) -> None:
        self.result = Outcome.DEAD
        await self._runner.dead_letter(self._lane, self._delivery, error)


class Settling:
    """Runs one subscription's handler on a delivery and settles it."""

    def __init__(
        self,
        transport: Transport,
        consumer: LaneConsumer,
        settings: BrokerSettings,
        topic: str,
        group: str,
        member_id: str,
        handler: Handler,
        message_type: type[Message],
        semaphore: asyncio.Semaphore | None,
        observed: bool,
    ) -> None:
        self.transport = transport
        self.consumer = consumer
        self.topic = topic
        self.group = group
        self.member_id = member_id
        self.handler = handler
        self.message_type = message_type
        self._semaphore = semaphore
        self._observed = observed  # a plugin observes handling (msgbroker_handle)
        self._max_attempts = settings.max_retry_attempts
        self._retry_delay = settings.retry_delay.total_seconds()

    async def handle_observed(self, lane: LaneState, delivery: Delivery, limited: bool = True) -> str | None:
        if not self._observed:
            return await self.handle(lane, delivery, limited, None)
        replay_for = delivery.headers.get(REPLAY_GROUP_HEADER)
        if replay_for is not None and replay_for != self.group:
            return await self.handle(lane, delivery, limited, None)  # not ours: nothing to observe
        event = HandleEvent(self.transport.NAME, self.topic, self.group, delivery.partition, delivery.message_id,
                            delivery.attempt, delivery.headers, self.member_id, len(delivery.body))
        with contextlib.ExitStack() as observers:
            for observer in registry.plugins.hook.msgbroker_handle(event=event):
                observers.enter_context(observer)
            result = await self.handle(lane, delivery, limited, event)
            if event.outcome is None:
                event.outcome = _HOOK_OUTCOMES.get(result or "", HandleEvent.FAILED)
        return result

    async def handle(
        self, lane: LaneState, delivery: Delivery, limited: bool, event: HandleEvent | None
    ) -> str | None:
        try:
            headers = delivery.headers
            if headers:
                replay_for = headers.get(REPLAY_GROUP_HEADER)
                if replay_for is not None and replay_for != self.group:
                    await self.consumer.ack(delivery)  # a dead letter replayed for another group
                    return Outcome.ACK
            if delivery.attempt > self._max_attempts and failures_of(lane, delivery) >= self._max_attempts:
                died = f"delivered {delivery.attempt} times without being settled (the worker died)"
                if event is not None:
                    event.error = died
                await self.dead_letter(lane, delivery, died)
                return Outcome.DEAD
            try:
                # decode(), inlined: one call less a message
                message = self.message_type.__pydantic_validator__.validate_json(delivery.body)
            except ValidationError as exc:
                error = SerializationError(f"cannot decode as {self.message_type.__name__}: {exc}")
                if event is not None:
                    event.error = error
                await self.dead_letter(lane, delivery, error)
                return Outcome.DEAD
            settler = DeliverySettler(self, lane, delivery)
            ctx: MessageContext[Any] = MessageContext(
                message=message,
                topic=self.topic,
                group=self.group,
                partition=delivery.partition,
                message_id=delivery.message_id or str(message.message_id),
                delivery_attempt=delivery.attempt,
                headers=delivery.headers,
                settler=settler,
            )
            if event is not None:
                event.context = ctx
            reply: tuple[dict[str, str], bytes] | None = None
            try:
                if limited and self._semaphore is not None:
                    async with self._semaphore:
                        result = await self.handler(ctx)
                else:
                    result = await self.handler(ctx)
                if headers and (ctx.settled is None or ctx.settled == Outcome.ACK):
                    address = reply_address(headers)
                    if address is not None:  # a request: what the handler returned is the reply
                        reply = reply_of(result, self.topic, ctx.message_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if event is not None:
                    event.error = exc
                if ctx.settled is None:
                    log.info("msgbroker: handler failed on %s[%d] %s attempt %d: %r", self.topic,
                             delivery.partition, ctx.message_id, delivery.attempt, exc)
                    ctx.settled = Outcome.RETRY
                    await settler.retry(None, exc)
                else:
                    log.warning("msgbroker: handler raised after settling %s: %r", ctx.message_id, exc)
            else:
                if reply is not None:  # before the ack: a reply lost with a crash comes again
                    await self.transport.send_reply(headers[REPLY_TO_HEADER], ctx.message_id, *reply)
                if ctx.settled is None:
                    ctx.settled = settler.result = Outcome.ACK
                    await self.consumer.ack(delivery)  # settler.ack(), one call less
            if event is not None and settler.result == Outcome.RETRY and settler.delayed:
                event.outcome = HandleEvent.DELAY
            if settler.result is not None:
                ctx.settled = settler.result  # a retry past the attempt limit became a dead letter
            return settler.result
        except asyncio.CancelledError:
            raise
        except MsgBrokerError as exc:
            if event is not None:
                event.outcome, event.error = HandleEvent.FAILED, exc
            # The settle itself failed (connection lost, lease lost): the message stays
            # unsettled at the broker and comes back; this member retries it after a pause.
            log.warning("msgbroker: settling %s on %s[%d] failed: %s", delivery.message_id, self.topic,
                        delivery.partition, exc)
            await asyncio.sleep(0.2)
            return Outcome.RETRY if self.transport.REDELIVERY == "local" else None

    async def retry(
        self,
        settler: DeliverySettler,
        lane: LaneState,
        delivery: Delivery,
        delay: float | None,
        error: BaseException | str | None,
    ) -> None:
        failures = lane.failures.get(delivery)
        if failures is None:
            failures = lane.failures[delivery] = failures_of(lane, delivery)
        failures += 1 if delay is None else 0
        if delay is None and failures >= self._max_attempts:
            settler.result = Outcome.DEAD
            await self.dead_letter(lane, delivery, error)
            return
        if delay:
            self.transport.CAPABILITIES.require("delay")
        wait = self._retry_delay if delay is None else delay
        not_before = time.time() + wait if wait > 0 else None
        delivery.failures = failures  # for providers that carry the count to the next owner
        await self.consumer.retry(delivery, delivery.attempt + 1, not_before)
        if lane.handed is delivery:
            lane.handed = None  # the announced attempt has not been handed yet
        lane.failures[delivery] = failures
        delivery.attempt += 1
        delivery.not_before = not_before
        settler.result = Outcome.RETRY

    async def dead_letter(self, lane: LaneState, delivery: Delivery, error: BaseException | str | None) -> None:
        letter = DeadLetter(
            message_id=delivery.message_id,
            topic=self.topic,
            group=self.group,
            partition=delivery.partition,
            error=error_text(error),
            attempts=delivery.attempt,
            headers=dict(delivery.headers),
            payload=delivery.body,
            partition_key=delivery.key,
        )
        log.warning("msgbroker: dead-lettering %s from %s[%d] for %s after %d attempt(s): %s",
                    delivery.message_id, self.topic, delivery.partition, self.group, delivery.attempt, letter.error)
        await self.consumer.dead_letter(delivery, letter)
        if lane.failures:
            lane.failures.pop(delivery, None)
        address = reply_address(delivery.headers)
        if address is not None:  # a request: its requester hears why instead of timing out
            try:
                await self.transport.send_reply(address, delivery.message_id, *dead_letter_reply(letter.error))
            except MsgBrokerError as exc:
                log.warning("msgbroker: the dead-letter reply to request %s on %s could not be sent: %s",
                            delivery.message_id, self.topic, exc)
