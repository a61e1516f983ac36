"""Scheduled messages on RabbitMQ (semantics rule 14; docs/providers/rabbitmq.md, "Scheduled
messages"): a store of the provider's own, RabbitMQ 3.10 having no delayed delivery without the
delayed-message plugin.

Each topic has a durable quorum queue ``<prefix>:<topic>:@sched`` with single active consumer,
bound to the provider's direct exchange under its own name. A scheduled message is published
there (confirmed) with its due time, partition, key and headers in AMQP headers. Every
connection that subscribes to the topic, schedules or cancels on it consumes that queue (the
**mover**); the broker hands the queue to one consumer at a time — the lease — and to the next
when its connection goes. The mover holds every waiting message unacknowledged (prefetch
unlimited), sorted by a timer each; at its time it publishes the record to the topic as any
publish does and then acknowledges it. A crash in between publishes it again through the next
mover (a duplicate with the same id).

A cancel is a marker message in the same queue, after the message it cancels, with a reply
address: the mover reads queue order, so it answers True exactly when it still held the
message (which it then acknowledges without publishing) and False otherwise, before it
acknowledges the marker. The answer comes back through the replies exchange of request/reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiormq
from aiormq.abc import DeliveredMessage
from msgbroker.spi import (
    AccessDeniedError,
    BrokerClosedError,
    BrokerTimeoutError,
    OutgoingRecord,
    PublishFailedError,
    cancel_and_wait,
)
from pamqp import commands as spec

from ._declare import declare_replicated
from ._errors import translate
from ._link import Link
from ._names import Topology
from ._replies import ReplyInbox

__all__ = ["CANCEL_TIMEOUT", "Schedules"]

log = logging.getLogger("msgbroker.rabbitmq")

DUE_HEADER = "msgbroker-sched-due"
"""Epoch milliseconds."""
PARTITION_HEADER = "msgbroker-sched-partition"
KEY_HEADER = "msgbroker-sched-key"
HEADERS_HEADER = "msgbroker-sched-headers"
"""The message's own headers, JSON (kept apart from the provider's)."""
CANCEL_HEADER = "msgbroker-sched-cancel"
"""A cancel marker: the message id to withdraw."""
ANSWER_HEADER = "msgbroker-sched-cancelled"
"""The mover's answer to a marker: ``1`` (it was waiting, now withdrawn) or ``0``."""
CANCEL_TIMEOUT = 10.0
"""Seconds a cancel waits for the mover's answer."""


class ScheduleTransport(Protocol):
    """What the scheduling needs of the RabbitMQ transport."""

    topology: Topology

    async def up(self) -> Link: ...

    async def ensure_topic(self, topic: str, link: Link | None = None) -> None: ...

    async def publish(self, records: Any, dedup_window: float | None) -> None: ...

    async def confirm_channel(self, link: Link) -> aiormq.abc.AbstractChannel: ...

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None: ...


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


@dataclass(slots=True)
class _Waiting:
    tag: int
    record: OutgoingRecord
    timer: asyncio.TimerHandle | None = None
    moving: bool = False


class _Mover:
    """One topic's consumer of its schedule queue (active when the broker picks it)."""

    def __init__(self, owner: Schedules, topic: str) -> None:
        self._owner = owner
        self._topic = topic
        self._held: dict[str, _Waiting] = {}
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._task = asyncio.create_task(self._run(), name=f"msgbroker-rabbitmq-mover-{topic}")

    async def _run(self) -> None:
        transport, queue = self._owner.transport, self._owner.transport.topology.sched_queue(self._topic)
        while True:
            try:
                link = await transport.up()
                await self._owner.declare(link, self._topic)
                _, raw = await link.channel()
                self._raw = raw
                await raw.basic_qos(prefetch_count=0)  # hold every waiting message
                await raw.basic_consume(queue, self._on_message, no_ack=False)
                await raw.closing  # the connection or the channel went (a consumer timeout): again
            except asyncio.CancelledError:
                raise
            except (AccessDeniedError, BrokerClosedError) as exc:  # for good: as the subscriptions end
                log.error("rabbitmq: moving the scheduled messages of %r ends: %s", self._topic, exc)
                self._forget()
                return
            except Exception as exc:
                log.debug("rabbitmq: the mover of %r lost its channel (%s); opening another", self._topic, exc)
            finally:
                self._forget()
            await asyncio.sleep(1.0)

    def _forget(self) -> None:
        """The channel is gone: the server gives its unacknowledged messages to the next mover."""
        for waiting in self._held.values():
            if waiting.timer is not None:
                waiting.timer.cancel()
        self._held.clear()
        self._raw = None

    async def _on_message(self, message: DeliveredMessage) -> None:
        raw = self._raw
        if raw is None:
            return
        tag = message.delivery_tag or 0
        properties = message.header.properties
        headers = dict(properties.headers or {})
        try:
            if CANCEL_HEADER in headers:
                await self._cancel(raw, tag, _text(headers[CANCEL_HEADER]), properties)
                return
            message_id = properties.message_id or ""
            record = OutgoingRecord(
                self._topic, int(_text(headers[PARTITION_HEADER])), _text(headers[KEY_HEADER]), message_id,
                {str(k): str(v) for k, v in json.loads(_text(headers.get(HEADERS_HEADER) or "{}")).items()},
                message.body)
            due = int(_text(headers[DUE_HEADER])) / 1000
        except (KeyError, ValueError, TypeError) as exc:
            log.error("rabbitmq: a message in the schedule queue of %r is not one of ours (%s); dropped", self._topic,
                      exc)
            await raw.basic_ack(tag)
            return
        older = self._held.pop(message_id, None)
        if older is not None and not older.moving:  # a second schedule of the id replaces the first
            if older.timer is not None:
                older.timer.cancel()
            await raw.basic_ack(older.tag)
        waiting = self._held[message_id] = _Waiting(tag, record)
        loop = asyncio.get_running_loop()
        waiting.timer = loop.call_later(max(0.0, due - time.time()),
                                        lambda: asyncio.ensure_future(self._move(raw, message_id, waiting)))

    async def _move(self, raw: aiormq.abc.AbstractChannel, message_id: str, waiting: _Waiting) -> None:
        if self._held.get(message_id) is not waiting or self._raw is not raw:
            return
        waiting.moving = True
        while self._raw is raw:
            try:
                await self._owner.transport.publish([waiting.record], None)
                break
            except Exception as exc:  # the next mover has it if this channel goes meanwhile
                log.warning("rabbitmq: publishing the due scheduled message %s of %r failed (%s); trying again",
                            message_id, self._topic, exc)
                await asyncio.sleep(1.0)
        else:
            return
        if self._held.get(message_id) is waiting:
            del self._held[message_id]
        with contextlib.suppress(Exception):
            await raw.basic_ack(waiting.tag)

    async def _cancel(self, raw: aiormq.abc.AbstractChannel, tag: int, message_id: str,
                      properties: spec.Basic.Properties) -> None:
        waiting = self._held.get(message_id)
        withdrawn = waiting is not None and not waiting.moving
        if withdrawn and waiting is not None:
            del self._held[message_id]
            if waiting.timer is not None:
                waiting.timer.cancel()
        if properties.reply_to and properties.correlation_id:
            with contextlib.suppress(Exception):  # the canceller is gone: it asks again or times out
                await self._owner.transport.send_reply(properties.reply_to, properties.correlation_id,
                                                       {ANSWER_HEADER: "1" if withdrawn else "0"}, b"")
        if withdrawn and waiting is not None:
            await raw.basic_ack(waiting.tag)  # answered first: a crash before this withdraws it again
        await raw.basic_ack(tag)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])


class Schedules:
    """A transport's schedule queues, movers and cancel inbox."""

    def __init__(self, transport: ScheduleTransport) -> None:
        self.transport = transport
        self._movers: dict[str, _Mover] = {}
        self._declared: dict[tuple[int, int, str], asyncio.Future[None]] = {}
        self._answers: dict[str, asyncio.Future[bool]] = {}
        self._inbox: ReplyInbox | None = None
        self._inbox_on: tuple[int, int] | None = None

    async def declare(self, link: Link, topic: str) -> None:
        """The topic's schedule queue, bound to the direct exchange (once per connection)."""
        key = (id(link), link.generation, topic)
        declared = self._declared.get(key)
        if declared is None or (declared.done() and declared.exception() is not None):
            declared = self._declared[key] = asyncio.ensure_future(self._declare(link, topic))
        await asyncio.shield(declared)

    async def _declare(self, link: Link, topic: str) -> None:
        topology = self.transport.topology
        queue, direct = topology.sched_queue(topic), topology.direct_exchange()
        channel, raw = await link.channel()
        try:
            arguments = topology.sched_arguments()
            channel, raw = await declare_replicated(link, channel, raw, queue, arguments, arguments)
            await raw.exchange_declare(direct, exchange_type="direct", durable=True)
            await raw.queue_bind(queue, direct, routing_key=queue)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, f"declaring the schedule queue of topic {topic!r}") from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    def run_mover(self, topic: str) -> None:
        """Consume ``topic``'s schedule queue from this connection (once)."""
        if topic not in self._movers:
            self._movers[topic] = _Mover(self, topic)

    async def _send(self, link: Link, topic: str, body: bytes, properties: spec.Basic.Properties,
                    doing: str) -> None:
        topology = self.transport.topology
        raw = await self.transport.confirm_channel(link)
        try:
            confirmation = await raw.basic_publish(body, exchange=topology.direct_exchange(),
                                                   routing_key=topology.sched_queue(topic), properties=properties,
                                                   mandatory=True)
        except Exception as exc:
            raise translate(exc, doing) from exc
        if not isinstance(confirmation, spec.Basic.Ack):
            raise PublishFailedError(f"rabbitmq: the server did not store {doing}: {confirmation!r}")

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        link = await self.transport.up()
        await self.transport.ensure_topic(record.topic, link)
        await self.declare(link, record.topic)
        properties = spec.Basic.Properties(
            message_id=record.message_id, delivery_mode=2, content_type="application/json",
            headers={DUE_HEADER: max(0, int(deliver_at * 1000 + 0.999)), PARTITION_HEADER: record.partition,
                     KEY_HEADER: record.key, HEADERS_HEADER: json.dumps(dict(record.headers))})
        await self._send(link, record.topic, record.body, properties,
                         f"scheduled message {record.message_id} on {record.topic!r}")
        self.run_mover(record.topic)

    async def cancel(self, topic: str, message_id: str) -> bool:
        link = await self.transport.up()
        await self.declare(link, topic)
        self.run_mover(topic)  # someone must answer: this connection, when no other mover runs
        inbox = await self._inbox_for(link)
        correlation = uuid.uuid4().hex
        answer = self._answers[correlation] = asyncio.get_running_loop().create_future()
        try:
            properties = spec.Basic.Properties(delivery_mode=2, reply_to=inbox.queue, correlation_id=correlation,
                                               headers={CANCEL_HEADER: message_id})
            await self._send(link, topic, b"", properties, f"the cancel of scheduled message {message_id} on {topic!r}")
            try:
                return await asyncio.wait_for(answer, CANCEL_TIMEOUT)
            except TimeoutError:
                raise BrokerTimeoutError(
                    f"rabbitmq: no mover of {topic!r} answered the cancel of scheduled message {message_id} within "
                    f"{CANCEL_TIMEOUT:g}s; the marker stays in the queue and withdraws it if it still waits"
                ) from None
        finally:
            self._answers.pop(correlation, None)

    async def _inbox_for(self, link: Link) -> ReplyInbox:
        on = (id(link), link.generation)
        if self._inbox is None or self._inbox_on != on:
            inbox = self._inbox or ReplyInbox(self.transport.topology, self._answered)
            try:
                await inbox.declare(link)
            except Exception as exc:
                raise translate(exc, "opening the inbox for cancel answers") from exc
            self._inbox, self._inbox_on = inbox, on
        return self._inbox

    def _answered(self, correlation: str, headers: Mapping[str, str], body: bytes) -> None:
        future = self._answers.get(correlation)
        if future is not None and not future.done():
            future.set_result(headers.get(ANSWER_HEADER) == "1")

    async def stop(self) -> None:
        movers, self._movers = self._movers, {}
        for mover in movers.values():
            await mover.stop()
