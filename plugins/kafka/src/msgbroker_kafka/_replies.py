"""Request/reply on Kafka (docs/semantics.md, rule 13): replies go through one topic per name
prefix, ``msgbroker.replies`` (with ``kafka.name_prefix`` in front, so a tenant's prefixed ACLs
cover it), of :data:`REPLY_PARTITIONS` partitions. A requesting connection's inbox is a random id
and the partition that id hashes to; it reads that partition from its end with a group-less
consumer (no consumer group, no commits) and takes the records that name its id. A reply is one
produce to the inbox's partition. Records of the reply topic are kept as long as the broker's
default retention; nothing reads them twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
from msgbroker import partition_for
from msgbroker.spi import MsgBrokerError, ReplySink, cancel_and_wait

from ._clients import start_client


class KafkaTransport(Protocol):
    """What replies need of the transport (``_transport.KafkaTransport``)."""

    @property
    def producer(self) -> AIOKafkaProducer: ...

    async def ensure_topic(self, topic: str, partitions: int | None = None) -> int: ...

    def kafka_name(self, name: str) -> str: ...

    def client_options(self) -> dict[str, Any]: ...

    def error(self, exc: BaseException, doing: str, *, publishing: bool = False) -> MsgBrokerError: ...

__all__ = ["REPLY_PARTITIONS", "REPLY_TOPIC", "ReplyInbox", "send_reply"]

log = logging.getLogger("msgbroker.kafka")

REPLY_TOPIC = "msgbroker.replies"
"""The msgbroker name of the reply topic (``kafka.name_prefix`` is put in front)."""
REPLY_PARTITIONS = 8
INBOX_HEADER = "msgbroker-reply-inbox"
REQUEST_HEADER = "msgbroker-reply-request"
HEADERS_HEADER = "msgbroker-reply-headers"


class ReplyInbox:
    """One connection's reply inbox: a partition of the reply topic read from its end."""

    def __init__(self, transport: KafkaTransport, deliver: ReplySink) -> None:
        self._transport = transport
        self._deliver = deliver
        self.inbox = uuid.uuid4().hex
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> str:
        transport = self._transport
        partitions = await transport.ensure_topic(REPLY_TOPIC, REPLY_PARTITIONS)
        partition = partition_for(self.inbox, partitions)
        tp = TopicPartition(transport.kafka_name(REPLY_TOPIC), partition)
        consumer = AIOKafkaConsumer(**transport.client_options(), enable_auto_commit=False, group_id=None,
                                    fetch_max_wait_ms=50, auto_offset_reset="latest")
        try:
            await start_client(consumer)
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            await consumer.position(tp)  # resolved now: a reply produced after this is read
        except Exception as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise transport.error(exc, "opening the reply inbox") from exc
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer, tp), name=f"msgbroker-kafka-replies-{self.inbox}")
        return f"{partition}:{self.inbox}"

    async def _run(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        wanted = self.inbox.encode()
        while True:
            try:
                batches = await consumer.getmany(tp, timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kafka: reading the reply inbox %s failed (%s); again shortly", self.inbox, exc)
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    headers = dict(record.headers or ())
                    if headers.get(INBOX_HEADER) != wanted:
                        continue
                    request_id = headers.get(REQUEST_HEADER, b"").decode("utf-8", "replace")
                    try:
                        reply_headers: dict[str, str] = json.loads(headers.get(HEADERS_HEADER, b"{}"))
                    except ValueError:
                        log.warning("kafka: a reply in inbox %s has unreadable headers; dropped", self.inbox)
                        continue
                    self._deliver(request_id, reply_headers, record.value or b"")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()


async def send_reply(transport: KafkaTransport, address: str, request_id: str, headers: Mapping[str, str],
                     body: bytes) -> None:
    partition_text, _, inbox = address.partition(":")
    if not partition_text.isdigit() or not inbox:
        log.warning("kafka: a reply address %r that is not <partition>:<inbox>; reply dropped", address)
        return
    await transport.ensure_topic(REPLY_TOPIC, REPLY_PARTITIONS)
    record_headers: list[tuple[str, Any]] = [
        (INBOX_HEADER, inbox.encode()), (REQUEST_HEADER, request_id.encode()),
        (HEADERS_HEADER, json.dumps(dict(headers)).encode()),
    ]
    try:
        await transport.producer.send_and_wait(transport.kafka_name(REPLY_TOPIC), body,
                                               partition=int(partition_text), headers=record_headers)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise transport.error(exc, f"sending the reply to request {request_id}", publishing=True) from exc
