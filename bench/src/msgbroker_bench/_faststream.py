"""FastStream on the same broker, with its closest equivalent of each cell's work.

Handlers take ``dict`` (FastStream decodes JSON and validates through fast-depends, its normal
path); brokers are built with ``logger=None`` (no per-message access log, as in production);
acks follow ``AckPolicy.ACK`` semantics (after the handler). Members of a group are separate
FastStream brokers (connections) in this process, like our workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from ._driver import Consumers, Driver, Unsupported
from ._model import Sink, key_of

__all__ = ["faststream_driver"]

FETCH = 100


def _doc(seq: int, run: int, stamp: int, data: str) -> dict[str, Any]:
    return {"key": key_of(seq), "seq": seq, "run": run, "sent_ns": stamp, "data": data}


def _version() -> str:
    try:
        from faststream.__about__ import __version__  # type: ignore[import-not-found]

        return str(__version__)
    except Exception:
        return "?"


class _FastStream(Driver):
    kind = "faststream"

    def __init__(self, url: str) -> None:
        self.url = url
        self.broker: Any = None
        self.prefix = f"bench-fs-{uuid.uuid4().hex[:8]}"
        self.label = f"FastStream {_version()}"

    def make(self) -> Any:
        raise NotImplementedError

    async def open(self) -> None:
        self.broker = self.make()
        await self.broker.connect()

    async def close(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()

    def subscribe(self, broker: Any, topic: str, group: str, index: int, handle: Any) -> None:
        raise NotImplementedError

    async def publish_many(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        try:
            await self.publish_batch(topic, seqs, run, data, stamp)
        except Unsupported:
            # no batch API: the batch's confirmed publishes run concurrently instead
            await asyncio.gather(*(self.publish_one(topic, _doc(seq, run, stamp, data), seq) for seq in seqs))

    async def publish_one(self, topic: str, doc: dict[str, Any], seq: int) -> None:
        raise NotImplementedError

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        clock = time.perf_counter_ns
        for seq in seqs:
            await self.publish_one(topic, _doc(seq, run, clock(), data), seq)

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        record = sink.record

        async def handle(body: dict) -> None:  # type: ignore[type-arg]
            record(body["run"], body["seq"], body["sent_ns"])

        brokers = []
        for index in range(workers):
            broker = self.make()
            self.subscribe(broker, topic, group, index, handle)
            await broker.start()
            brokers.append(broker)

        async def close() -> None:
            for broker in brokers:
                with contextlib.suppress(Exception):
                    await broker.stop()

        return Consumers(close)


class FsRedis(_FastStream):
    config = ("RedisBroker; publish(stream=…); batch = publish(pipeline=…) + execute; "
              f"StreamSub(group, consumer, max_records={FETCH}), XACK per message after the handler")

    def make(self) -> Any:
        from faststream.redis import RedisBroker  # type: ignore[import-not-found]

        return RedisBroker(self.url, logger=None)

    def _stream(self, topic: str) -> str:
        return f"{self.prefix}:{topic}"

    async def drop(self, topic: str) -> None:
        with contextlib.suppress(Exception):
            await self.broker._connection.delete(self._stream(topic))

    async def publish_one(self, topic: str, doc: dict[str, Any], seq: int) -> None:
        await self.broker.publish(doc, stream=self._stream(topic), maxlen=100_000)

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        stream = self._stream(topic)
        publish = self.broker.publish
        async with self.broker._connection.pipeline(transaction=False) as pipe:
            for seq in seqs:
                await publish(_doc(seq, run, stamp, data), stream=stream, maxlen=100_000, pipeline=pipe)
            await pipe.execute()

    def subscribe(self, broker: Any, topic: str, group: str, index: int, handle: Any) -> None:
        from faststream.redis import StreamSub

        sub = StreamSub(self._stream(topic), group=group, consumer=f"c{index}", max_records=FETCH, last_id="0")
        broker.subscriber(stream=sub)(handle)


class FsNats(_FastStream):
    config = ("NatsBroker; publish(subject, stream=…) awaits the JetStream ack; no batch API (the end-to-end "
              f"publisher gathers a batch's publishes); durable pull subscriber, PullSub(batch_size={FETCH})")

    def make(self) -> Any:
        from faststream.nats import NatsBroker  # type: ignore[import-not-found]

        return NatsBroker(self.url, logger=None)

    def _names(self, topic: str) -> tuple[str, str]:
        token = topic.replace(".", "_").replace("-", "_").lower()
        return f"{self.prefix.replace('-', '_').upper()}_{token.upper()}", f"{self.prefix.replace('-', '_')}.{token}"

    async def prepare(self, topic: str, partitions: int) -> None:
        from nats.js.api import StorageType, StreamConfig

        stream, subject = self._names(topic)
        import nats

        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE))
        finally:
            await nc.close()

    async def drop(self, topic: str) -> None:
        import nats

        stream, _ = self._names(topic)
        with contextlib.suppress(Exception):
            nc = await nats.connect(self.url)
            try:
                await nc.jetstream().delete_stream(stream)
            finally:
                await nc.close()

    async def publish_one(self, topic: str, doc: dict[str, Any], seq: int) -> None:
        stream, subject = self._names(topic)
        await self.broker.publish(doc, subject, stream=stream)

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        raise Unsupported("FastStream's NatsBroker has no batch publish")

    def subscribe(self, broker: Any, topic: str, group: str, index: int, handle: Any) -> None:
        from faststream.nats import JStream, PullSub

        stream, subject = self._names(topic)
        broker.subscriber(subject, stream=JStream(stream, declare=False), durable=group,
                          pull_sub=PullSub(batch_size=FETCH, timeout=0.2))(handle)


class FsRabbit(_FastStream):
    config = ("RabbitBroker (publisher confirms on); publish(queue=…, persist=True); no batch API (the end-to-end "
              f"publisher gathers a batch's publishes); quorum queue, Channel(prefetch_count={FETCH}), "
              "ack after handler")

    def make(self) -> Any:
        from faststream.rabbit import RabbitBroker  # type: ignore[import-not-found]

        return RabbitBroker(self.url, logger=None)

    def _queue(self, topic: str) -> Any:
        from faststream.rabbit import QueueType, RabbitQueue

        return RabbitQueue(f"{self.prefix}.{topic}", queue_type=QueueType.QUORUM, durable=True)

    async def prepare(self, topic: str, partitions: int) -> None:
        await self.broker.declare_queue(self._queue(topic))

    async def drop(self, topic: str) -> None:
        import aio_pika

        with contextlib.suppress(Exception):
            conn = await aio_pika.connect(self.url)
            try:
                channel = await conn.channel()
                await channel.queue_delete(f"{self.prefix}.{topic}")
            finally:
                await conn.close()

    async def publish_one(self, topic: str, doc: dict[str, Any], seq: int) -> None:
        await self.broker.publish(doc, queue=f"{self.prefix}.{topic}", persist=True)

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        raise Unsupported("FastStream's RabbitBroker has no batch publish")

    def subscribe(self, broker: Any, topic: str, group: str, index: int, handle: Any) -> None:
        from faststream.rabbit import Channel

        broker.subscriber(self._queue(topic), channel=Channel(prefetch_count=FETCH))(handle)


class FsKafka(_FastStream):
    max_batch = 512 * 1024
    config = ("KafkaBroker(acks='all', enable_idempotence=True, linger_ms=0); publish(topic, key=…) awaits the ack; "
              "batch = publish_batch (no per-message key: one partition) in 512 KiB record batches, gathered; "
              "subscriber(group_id, AckPolicy.ACK: commit after each handler)")

    def make(self) -> Any:
        from faststream.kafka import KafkaBroker  # type: ignore[import-not-found]

        return KafkaBroker(self.url, acks="all", enable_idempotence=True, linger_ms=0, logger=None,
                           max_batch_size=self.max_batch)

    def _topic(self, topic: str) -> str:
        return f"{self.prefix}.{topic}"

    async def prepare(self, topic: str, partitions: int) -> None:
        from ._raw import RawKafka

        raw = RawKafka(self.url)
        raw.prefix = self.prefix
        await raw.prepare(topic, partitions)

    async def drop(self, topic: str) -> None:
        from ._raw import RawKafka

        raw = RawKafka(self.url)
        raw.prefix = self.prefix
        await raw.drop(topic)

    async def publish_one(self, topic: str, doc: dict[str, Any], seq: int) -> None:
        await self.broker.publish(doc, self._topic(topic), key=key_of(seq).encode())

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        # one FastStream batch is one Kafka record batch (max_batch_size): split by bytes
        name = self._topic(topic)
        step = max(1, self.max_batch // (len(data) + 200))
        await asyncio.gather(*(
            self.broker.publish_batch(*(_doc(seq, run, stamp, data) for seq in seqs[i:i + step]), topic=name)
            for i in range(0, len(seqs), step)
        ))

    def subscribe(self, broker: Any, topic: str, group: str, index: int, handle: Any) -> None:
        from faststream import AckPolicy  # type: ignore[import-not-found]

        broker.subscriber(self._topic(topic), group_id=group, auto_offset_reset="earliest",
                          ack_policy=AckPolicy.ACK)(handle)


def faststream_driver(provider: str, url: str) -> Driver:
    """FastStream's driver for ``provider`` (Unsupported where FastStream cannot do the work)."""
    try:
        import faststream  # noqa: F401
    except ImportError as exc:
        raise Unsupported("FastStream is not installed (scripts/bench installs it into bench/.venv)") from exc
    if provider == "memory":
        raise Unsupported("FastStream has no in-process broker for production use (TestBroker is a test double)")
    drivers: dict[str, type[_FastStream]] = {"redis": FsRedis, "nats": FsNats, "rabbitmq": FsRabbit, "kafka": FsKafka}
    return drivers[provider](url)
