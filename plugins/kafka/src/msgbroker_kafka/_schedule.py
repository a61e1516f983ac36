"""Scheduled messages on Kafka (semantics rule 14; docs/providers/kafka.md, "Scheduled
messages"): a store of the provider's own, Kafka having no delayed delivery.

One compacted topic per name prefix, ``msgbroker.schedules`` (``kafka.name_prefix`` in front), of
:data:`SCHEDULE_PARTITIONS` partitions, holds every waiting message. All records of one message
id of one topic go to one partition (``partition_for("<topic>/<id>")``), so their order is the
log's. Each record's key is unique — ``<topic>/<id>/<nonce>`` — so a tombstone removes exactly
the record it names and compaction keeps what still matters:

* ``s`` — a schedule: the record (partition, key, headers, body) and its due time;
* ``m`` — the same, *moving*: the mover is appending it (written before the append; same key,
  so compaction keeps it in place of the ``s``);
* ``c`` — a cancel of an id, with the canceller's reply address;
* a tombstone — the record of that key is done with.

The **movers** are a consumer group, ``msgbroker.schedules.movers``: every connection that
subscribes, schedules or cancels joins it, and Kafka's group protocol gives each schedule
partition to one of them (the lease). A mover reads its partitions from the beginning (the
compacted state) and then as records come, in log order: a schedule waits in memory; at its
time the mover writes ``m``, appends the record to its topic's partition (confirmed) and
writes the tombstone. A cancel is answered from the state its log position sees — True when
the schedule was waiting (tombstoned, never appended), False when it was moving, done or
unknown — through the reply topic of request/reply, and tombstoned. Decisions follow the log, so a
mover that takes over after a crash decides as the old one did; an ``m`` without a tombstone is
appended again (a duplicate with the same id, never a loss).
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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
from msgbroker import partition_for
from msgbroker.spi import AccessDeniedError, BrokerTimeoutError, MsgBrokerError, OutgoingRecord, cancel_and_wait

from ._clients import start_client
from ._records import MESSAGE_ID_HEADER, encode_headers
from ._replies import ReplyInbox

__all__ = ["SCHEDULE_PARTITIONS", "SCHEDULE_TOPIC", "Schedules"]

log = logging.getLogger("msgbroker.kafka")

SCHEDULE_TOPIC = "msgbroker.schedules"
"""The msgbroker name of the schedule topic (``kafka.name_prefix`` is put in front)."""
MOVERS_GROUP = "msgbroker.schedules.movers"
SCHEDULE_PARTITIONS = 4
CANCEL_TIMEOUT = 20.0
"""Seconds a cancel waits for the mover's answer (a rebalance of the movers may come first)."""
_TOPIC_EXISTS = 36


class ScheduleTransport(Protocol):
    """What scheduling needs of the Kafka transport (``_transport.KafkaTransport``)."""

    settings: Any

    @property
    def producer(self) -> AIOKafkaProducer: ...

    @property
    def admin(self) -> AIOKafkaAdminClient: ...

    def kafka_name(self, name: str) -> str: ...

    def client_options(self) -> dict[str, Any]: ...

    def error(self, exc: BaseException, doing: str, *, publishing: bool = False) -> MsgBrokerError: ...

    async def ensure_topic(self, topic: str, partitions: int | None = None) -> int: ...

    async def send_reply(self, address: str, request_id: str, headers: Mapping[str, str], body: bytes) -> None: ...

    async def _replication_factor(self) -> int: ...

    def _topic_configs(self) -> dict[str, str]: ...


def _pack(record: OutgoingRecord, due: float, kind: str) -> bytes:
    return json.dumps({
        "t": kind, "due": due, "topic": record.topic, "p": record.partition, "k": record.key,
        "i": record.message_id, "h": dict(record.headers), "b": record.body.decode("latin-1"),
    }, separators=(",", ":")).encode()


def _unpack(value: bytes) -> tuple[str, float, OutgoingRecord]:
    data = json.loads(value)
    record = OutgoingRecord(str(data["topic"]), int(data["p"]), str(data["k"]), str(data["i"]),
                            {str(k): str(v) for k, v in data["h"].items()}, str(data["b"]).encode("latin-1"))
    return str(data["t"]), float(data["due"]), record


@dataclass(slots=True)
class _Waiting:
    key: bytes
    due: float
    record: OutgoingRecord
    moving: bool = False


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, mover: _Mover) -> None:
        self._mover = mover

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._mover.revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._mover.assigned(list(assigned))


class _Mover:
    """This connection's member of the movers' group."""

    def __init__(self, owner: Schedules, delay: float) -> None:
        self._owner = owner
        self._go = asyncio.Event()
        """Set to start now (see :meth:`start`); else the mover joins ``delay`` seconds after it
        was made."""
        self._delay = delay
        self._waiting: dict[int, dict[tuple[str, str], _Waiting]] = {}
        """Per schedule partition held: (topic, message id) -> what waits."""
        self._consumer: AIOKafkaConsumer | None = None
        self._done: set[bytes] = set()
        """Keys this mover appended and tombstoned whose records it has not read back yet (its
        own ``m`` comes back after the move: not a move to make again)."""
        self._ends: dict[int, int] = {}
        """Partitions still being read up to the end they had when assigned (their state is not
        complete before: nothing of them is moved meanwhile)."""
        self._task = asyncio.create_task(self._run(), name="msgbroker-kafka-schedule-mover")

    def start(self) -> None:
        """Join the movers' group now, if it waits still."""
        self._go.set()

    def revoked(self, partitions: set[int]) -> None:
        for partition in partitions:
            self._waiting.pop(partition, None)
            self._ends.pop(partition, None)

    async def assigned(self, partitions: list[TopicPartition]) -> None:
        consumer = self._consumer
        for tp in partitions:
            self._waiting[tp.partition] = {}
        if consumer is not None and partitions:
            ends = await consumer.end_offsets(partitions)
            for tp in partitions:
                self._ends[tp.partition] = int(ends.get(tp, 0))
            await consumer.seek_to_beginning(*partitions)  # the compacted state, then what comes

    async def _run(self) -> None:
        transport = self._owner.transport
        if self._delay > 0 and not self._go.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._go.wait(), self._delay)
        while True:
            consumer = None
            try:
                await self._owner.ensure_topic()
                kafka = transport.settings.kafka
                consumer = AIOKafkaConsumer(
                    **transport.client_options(), group_id=transport.kafka_name(MOVERS_GROUP),
                    enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100,
                    # the members' failover and rebalance pace, as the subscriptions' groups have it
                    session_timeout_ms=int(kafka.session_timeout.total_seconds() * 1000),
                    heartbeat_interval_ms=int(kafka.heartbeat_interval.total_seconds() * 1000))
                self._consumer = consumer
                await start_client(consumer)  # before the subscribe: the start is its bootstrap only
                consumer.subscribe([transport.kafka_name(SCHEDULE_TOPIC)], listener=_Listener(self))
                while True:
                    batches = await consumer.getmany(timeout_ms=self._wait_ms())
                    for tp, records in batches.items():
                        for record in records:
                            await self._read(tp.partition, record.key, record.value)
                    for partition, end in list(self._ends.items()):
                        tp = TopicPartition(transport.kafka_name(SCHEDULE_TOPIC), partition)
                        if await consumer.position(tp) >= end:
                            self._ends.pop(partition, None)
                    await self._move_due()
            except asyncio.CancelledError:
                raise
            except AccessDeniedError as exc:  # the login refused for good: nothing to start again
                log.warning("kafka: the schedule mover stopped: %s", exc)
                return
            except Exception as exc:
                log.warning("kafka: the schedule mover stopped (%s); starting again", exc)
                await asyncio.sleep(1.0)
            finally:
                self._consumer = None
                self._waiting.clear()
                self._ends.clear()
                self._done.clear()
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        await consumer.stop()

    def _wait_ms(self) -> int:
        due = [w.due for held in self._waiting.values() for w in held.values() if not w.moving]
        if not due:
            return 200
        return max(1, min(200, int((min(due) - time.time()) * 1000) + 1))

    async def _read(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        held = self._waiting.get(partition)
        if held is None or key is None:
            return
        if value is None:  # a tombstone: its record is done with
            self._done.discard(key)
            for name, waiting in list(held.items()):
                if waiting.key == key:
                    del held[name]
            return
        try:
            kind, due, record = _unpack(value)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("kafka: a record of the schedule topic is not one of ours (%s); skipped", exc)
            return
        name = (record.topic, record.message_id)
        if kind in ("s", "m"):
            if key in self._done:
                return
            older = held.get(name)
            if older is not None and older.key == key:
                return  # our own "m" of a move under way
            if older is not None and older.key != key and not older.moving:
                await self._owner.tombstone(partition, older.key)  # a second schedule replaces the first
            held[name] = _Waiting(key, due, record, moving=kind == "m")
            return
        if kind == "c":
            target = held.get(name)
            withdrawn = target is not None and not target.moving
            if withdrawn and target is not None:
                del held[name]
                await self._owner.tombstone(partition, target.key)
            address = record.headers.get("reply-to", "")
            if address:
                with contextlib.suppress(Exception):
                    await self._owner.transport.send_reply(address, record.headers.get("correlation", ""),
                                                           {"cancelled": "1" if withdrawn else "0"}, b"")
            await self._owner.tombstone(partition, key)

    async def _move_due(self) -> None:
        now = time.time()
        for partition, held in list(self._waiting.items()):
            if partition in self._ends:
                continue  # its state is still being read
            for name, waiting in sorted(held.items(), key=lambda item: item[1].due):
                if waiting.due > now:
                    break
                if held.get(name) is not waiting:
                    continue
                if not waiting.moving:
                    waiting.moving = True
                    await self._owner.write(partition, waiting.key, _pack(waiting.record, waiting.due, "m"))
                await self._owner.append(waiting.record)
                self._done.add(waiting.key)
                await self._owner.tombstone(partition, waiting.key)
                if held.get(name) is waiting:
                    del held[name]

    async def stop(self) -> None:
        await cancel_and_wait([self._task])


class Schedules:
    """A transport's schedule writes, its mover and its cancel answers."""

    def __init__(self, transport: ScheduleTransport) -> None:
        self.transport = transport
        self._mover: _Mover | None = None
        self._topic: asyncio.Future[None] | None = None
        self._inbox: ReplyInbox | None = None
        self._address = ""
        self._answers: dict[str, asyncio.Future[bool]] = {}

    async def ensure_topic(self) -> None:
        """Create the compacted schedule topic when missing (once per connection)."""
        topic = self._topic
        if topic is None or (topic.done() and (topic.cancelled() or topic.exception() is not None)):
            topic = self._topic = asyncio.ensure_future(self._create())
        await asyncio.shield(topic)

    async def _create(self) -> None:
        transport = self.transport
        name = transport.kafka_name(SCHEDULE_TOPIC)
        try:
            replication = await transport._replication_factor()
            configs = {**transport._topic_configs(), "cleanup.policy": "compact"}  # min.insync.replicas too
            response = await asyncio.wait_for(transport.admin.create_topics([NewTopic(
                name, SCHEDULE_PARTITIONS, replication, topic_configs=configs)]), 15.0)
            for topic, code, message in response.topic_errors:
                if topic == name and code not in (0, _TOPIC_EXISTS):
                    raise MsgBrokerError(
                        f"kafka refused to create the schedule topic {name!r}: error {code}: {message}")
        except MsgBrokerError:
            raise
        except Exception as exc:
            raise transport.error(exc, f"creating the schedule topic {name!r}") from exc
        await transport.ensure_topic(SCHEDULE_TOPIC, SCHEDULE_PARTITIONS)  # checks its partition count

    def run_mover(self, delay: float = 0.0) -> None:
        """Join the movers' group from this connection (once), ``delay`` seconds from now (a
        later call without one starts it at once)."""
        if self._mover is None:
            self._mover = _Mover(self, delay)
        elif delay <= 0:
            self._mover.start()

    @staticmethod
    def partition(topic: str, message_id: str) -> int:
        return partition_for(f"{topic}/{message_id}", SCHEDULE_PARTITIONS)

    async def write(self, partition: int, key: bytes, value: bytes | None) -> None:
        transport = self.transport
        try:
            await transport.producer.send_and_wait(transport.kafka_name(SCHEDULE_TOPIC), value, key=key,
                                                   partition=partition)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise transport.error(exc, "writing to the schedule topic", publishing=True) from exc

    async def tombstone(self, partition: int, key: bytes) -> None:
        await self.write(partition, key, None)

    async def append(self, record: OutgoingRecord) -> None:
        """Append a due record to its topic's partition as ``publish`` does (same id, key and
        headers), without checking the topic's partition count against this connection's: the
        record's partition was computed for the topic when it was scheduled."""
        transport = self.transport
        try:
            await transport.producer.send_and_wait(
                transport.kafka_name(record.topic), record.body, key=record.key.encode("utf-8"),
                partition=record.partition,
                headers=[(MESSAGE_ID_HEADER, record.message_id.encode()), *encode_headers(record.headers)])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise transport.error(exc, f"appending the due scheduled message {record.message_id}",
                                  publishing=True) from exc

    async def schedule(self, record: OutgoingRecord, deliver_at: float) -> None:
        await self.transport.ensure_topic(record.topic)  # its partition count checked now, not at the move
        await self.ensure_topic()
        key = f"{record.topic}/{record.message_id}/{uuid.uuid4().hex}".encode()
        await self.write(self.partition(record.topic, record.message_id), key, _pack(record, deliver_at, "s"))
        self.run_mover()

    async def cancel(self, topic: str, message_id: str) -> bool:
        await self.ensure_topic()
        self.run_mover()  # someone must answer: this connection, when no other mover runs
        if self._inbox is None:
            inbox = ReplyInbox(self.transport, self._answered)
            self._address = await inbox.open()
            self._inbox = inbox
        correlation = uuid.uuid4().hex
        answer = self._answers[correlation] = asyncio.get_running_loop().create_future()
        try:
            marker = OutgoingRecord(topic, 0, "", message_id, {"reply-to": self._address, "correlation": correlation},
                                    b"")
            await self.write(self.partition(topic, message_id), f"{topic}/{message_id}/{correlation}".encode(),
                             _pack(marker, 0.0, "c"))
            try:
                return await asyncio.wait_for(answer, CANCEL_TIMEOUT)
            except TimeoutError:
                raise BrokerTimeoutError(
                    f"kafka: no schedule mover answered the cancel of scheduled message {message_id} on {topic!r} "
                    f"within {CANCEL_TIMEOUT:g}s; the cancel stays in the schedule topic and withdraws it if it "
                    "still waits") from None
        finally:
            self._answers.pop(correlation, None)

    def _answered(self, correlation: str, headers: Mapping[str, str], body: bytes) -> None:
        future = self._answers.get(correlation)
        if future is not None and not future.done():
            future.set_result(headers.get("cancelled") == "1")

    async def stop(self) -> None:
        mover, self._mover = self._mover, None
        if mover is not None:
            await mover.stop()
        topic = self._topic
        if topic is not None and not topic.done():  # a creation its caller stopped waiting for (shielded)
            await cancel_and_wait([topic])
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            await inbox.close()
