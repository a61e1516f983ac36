"""The raw client libraries, coded idiomatically with the batching and ack semantics of the
technique checklist (docs/benchmarks.md): what a careful user writes without msgbroker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from ._driver import Consumers, Driver, Unsupported, stop_tasks
from ._model import Sink, decode_raw, encode_raw, key_of

__all__ = ["RawKafka", "RawMemory", "RawNats", "RawRabbit", "RawRabbitRouted", "RawRedis", "raw_driver"]

FETCH = 100
"""Messages per fetch (XREADGROUP COUNT, JetStream fetch, AMQP prefetch, getmany max_records/5)."""


class RawMemory(Driver):
    """A bare ``asyncio.Queue`` hand-off: the floor of any in-process broker."""

    label = "asyncio.Queue"
    config = "one unbounded queue per topic; workers await get(); json.dumps/json.loads"

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[bytes]] = {}

    def _queue(self, topic: str) -> asyncio.Queue[bytes]:
        queue = self.queues.get(topic)
        if queue is None:
            queue = self.queues[topic] = asyncio.Queue()
        return queue

    async def drop(self, topic: str) -> None:
        self.queues.pop(topic, None)

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        put = self._queue(topic).put
        clock = time.perf_counter_ns
        for seq in seqs:
            await put(encode_raw(seq, run, clock(), data))

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        put = self._queue(topic).put_nowait
        for seq in seqs:
            put(encode_raw(seq, run, stamp, data))

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        queue = self._queue(topic)
        record = sink.record

        async def work() -> None:
            while True:
                item = decode_raw(await queue.get())
                record(item["run"], item["seq"], item["sent_ns"])

        tasks = [asyncio.create_task(work()) for _ in range(workers)]
        return Consumers(lambda: stop_tasks(tasks))


class RawRedis(Driver):
    """redis-py asyncio: XADD (pipelined when batched), XREADGROUP COUNT 100, one XACK per read."""

    label = "redis-py"
    config = (
        f"one stream; XADD MAXLEN ~100000; batch = pipeline(transaction=False); "
        f"XREADGROUP COUNT {FETCH} BLOCK 100 + one XACK of all ids per read; a blocking pool of 100 "
        f"connections (as msgbroker's: redis-py's default pool refuses the 101st concurrent call)"
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Any = None
        self.prefix = f"bench-raw-{uuid.uuid4().hex[:8]}"

    def _new(self) -> Any:
        import redis.asyncio as aioredis

        pool = aioredis.BlockingConnectionPool.from_url(self.url, max_connections=100, timeout=15)
        return aioredis.Redis.from_pool(pool)

    async def open(self) -> None:
        self.client = self._new()
        await self.client.ping()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def _stream(self, topic: str) -> str:
        return f"{self.prefix}:{topic}"

    async def drop(self, topic: str) -> None:
        await self.client.delete(self._stream(topic))

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        stream = self._stream(topic)
        xadd = self.client.xadd
        clock = time.perf_counter_ns
        for seq in seqs:
            await xadd(stream, {"d": encode_raw(seq, run, clock(), data)}, maxlen=100_000, approximate=True)

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        stream = self._stream(topic)
        async with self.client.pipeline(transaction=False) as pipe:
            for seq in seqs:
                pipe.xadd(stream, {"d": encode_raw(seq, run, stamp, data)}, maxlen=100_000, approximate=True)
            await pipe.execute()

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        from redis import exceptions as rex

        stream = self._stream(topic)
        with contextlib.suppress(rex.ResponseError):  # BUSYGROUP: exists already
            await self.client.xgroup_create(stream, group, id="0", mkstream=True)
        record = sink.record
        clients = [self._new() for _ in range(workers)]

        async def work(client: Any, name: str) -> None:
            streams = {stream: ">"}
            while True:
                reply = await client.xreadgroup(group, name, streams, count=FETCH, block=100)
                if not reply:
                    continue
                entries = reply[0][1]
                for _id, fields in entries:
                    item = decode_raw(fields[b"d"])
                    record(item["run"], item["seq"], item["sent_ns"])
                await client.xack(stream, group, *(entry_id for entry_id, _ in entries))

        tasks = [asyncio.create_task(work(c, f"w{i}")) for i, c in enumerate(clients)]

        async def close() -> None:
            await stop_tasks(tasks)
            for client in clients:
                await client.aclose()

        return Consumers(close)


class RawNats(Driver):
    """nats-py JetStream: publish (await the ack) / publish_async (bounded pending) / pull fetch 100 / ack."""

    label = "nats-py"
    config = (
        f"one file-storage stream; batch = publish_async + wait for all acks; durable pull consumer, "
        f"fetch({FETCH}), msg.ack() each (explicit ack policy)"
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: Any = None
        self.js: Any = None
        self.prefix = f"BENCHRAW{uuid.uuid4().hex[:6].upper()}"

    async def open(self) -> None:
        import nats

        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream(publish_async_max_pending=4000)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    def _names(self, topic: str) -> tuple[str, str]:
        token = topic.replace(".", "_").replace("-", "_").upper()
        return f"{self.prefix}_{token}", f"{self.prefix.lower()}.{token.lower()}"

    async def prepare(self, topic: str, partitions: int) -> None:
        from nats.js.api import StorageType, StreamConfig

        stream, subject = self._names(topic)
        await self.js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE))

    async def drop(self, topic: str) -> None:
        stream, _ = self._names(topic)
        with contextlib.suppress(Exception):
            await self.js.delete_stream(stream)

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        _, subject = self._names(topic)
        publish = self.js.publish
        clock = time.perf_counter_ns
        for seq in seqs:
            await publish(subject, encode_raw(seq, run, clock(), data))

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        _, subject = self._names(topic)
        publish = self.js.publish_async
        futures = [await publish(subject, encode_raw(seq, run, stamp, data)) for seq in seqs]
        await asyncio.gather(*futures)

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        stream, subject = self._names(topic)
        await self.js.add_consumer(
            stream, ConsumerConfig(durable_name=group, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                   max_ack_pending=20_000, filter_subject=subject)
        )
        record = sink.record
        conns = [await nats.connect(self.url) for _ in range(workers)]

        async def work(nc: Any) -> None:
            psub = await nc.jetstream().pull_subscribe_bind(group, stream=stream)
            while True:
                try:
                    msgs = await psub.fetch(FETCH, timeout=0.2)
                except TimeoutError:
                    continue
                for msg in msgs:
                    item = decode_raw(msg.data)
                    record(item["run"], item["seq"], item["sent_ns"])
                    await msg.ack()

        tasks = [asyncio.create_task(work(nc)) for nc in conns]

        async def close() -> None:
            await stop_tasks(tasks)
            for nc in conns:
                with contextlib.suppress(Exception):
                    await nc.close()

        return Consumers(close)


class RawRabbit(Driver):
    """aio-pika: publisher confirms (awaited per message, or a gathered window), prefetch 100, ack each."""

    label = "aio-pika"
    config = (
        f"one durable quorum queue, persistent messages, publisher confirms; batch = gather of the "
        f"batch's publishes (one confirm window); prefetch {FETCH}, message.ack() each"
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self.channel: Any = None
        self.prefix = f"bench-raw-{uuid.uuid4().hex[:8]}"

    async def open(self) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel(publisher_confirms=True)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    def _queue(self, topic: str) -> str:
        return f"{self.prefix}.{topic}"

    async def prepare(self, topic: str, partitions: int) -> None:
        await self.channel.declare_queue(self._queue(topic), durable=True, arguments={"x-queue-type": "quorum"})

    async def drop(self, topic: str) -> None:
        with contextlib.suppress(Exception):
            await self.channel.queue_delete(self._queue(topic))

    def _message(self, seq: int, run: int, stamp: int, data: str) -> Any:
        import aio_pika

        return aio_pika.Message(encode_raw(seq, run, stamp, data), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        queue = self._queue(topic)
        publish = self.channel.default_exchange.publish
        clock = time.perf_counter_ns
        for seq in seqs:
            await publish(self._message(seq, run, clock(), data), routing_key=queue)

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        queue = self._queue(topic)
        publish = self.channel.default_exchange.publish
        await asyncio.gather(*(publish(self._message(seq, run, stamp, data), routing_key=queue) for seq in seqs))

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        import aio_pika

        name = self._queue(topic)
        record = sink.record
        conns = [await aio_pika.connect(self.url) for _ in range(workers)]

        async def on_message(message: Any) -> None:
            item = decode_raw(message.body)
            record(item["run"], item["seq"], item["sent_ns"])
            await message.ack()

        for conn in conns:
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=FETCH)
            queue = await channel.get_queue(name, ensure=False)
            await queue.consume(on_message)

        async def close() -> None:
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.close()

        return Consumers(close)


class RawRabbitRouted(RawRabbit):
    """aio-pika publishing as our provider routes: a direct exchange per topic, one durable quorum
    queue per partition bound under its number, the client computing the partition. What the
    server costs for that routing, without msgbroker (publish cells only)."""

    label = "aio-pika, partitioned"
    config = (
        "a direct exchange per topic, one durable quorum queue per partition (64) bound under its number, "
        "routing key = msgbroker.partition_for(key); persistent, publisher confirms; batch = gather"
    )
    partitions = 64

    async def prepare(self, topic: str, partitions: int) -> None:
        name = self._queue(topic)
        exchange = await self.channel.declare_exchange(name, "direct", durable=True)
        for p in range(self.partitions):
            queue = await self.channel.declare_queue(f"{name}.{p}", durable=True, arguments={"x-queue-type": "quorum"})
            await queue.bind(exchange, routing_key=str(p))
        self.exchange = exchange

    async def drop(self, topic: str) -> None:
        name = self._queue(topic)
        with contextlib.suppress(Exception):
            for p in range(self.partitions):
                await self.channel.queue_delete(f"{name}.{p}")
            await self.channel.exchange_delete(name)

    def _route(self, seq: int) -> str:
        from msgbroker import partition_for

        return str(partition_for(key_of(seq), self.partitions))

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        publish = self.exchange.publish
        clock = time.perf_counter_ns
        for seq in seqs:
            await publish(self._message(seq, run, clock(), data), routing_key=self._route(seq))

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        publish = self.exchange.publish
        await asyncio.gather(*(publish(self._message(seq, run, stamp, data), routing_key=self._route(seq))
                               for seq in seqs))

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        raise Unsupported("publish cells only")


class RawKafka(Driver):
    """aiokafka: send_and_wait / send + gather (acks=all, idempotent, linger 2 ms — like ours) /
    getmany / commit per batch."""

    label = "aiokafka"
    config = (
        "acks=all, enable_idempotence=True, linger_ms=0 (aiokafka's default, as msgbroker-kafka); "
        "batch = send() each + gather; "
        "consumer getmany(max_records=500) + commit() per batch; topic with the cell's partition count"
    )

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producer: Any = None
        self.prefix = f"bench-raw-{uuid.uuid4().hex[:8]}"

    async def open(self) -> None:
        from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]

        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                         linger_ms=0)
        await self.producer.start()

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    def _topic(self, topic: str) -> str:
        return f"{self.prefix}.{topic}"

    async def prepare(self, topic: str, partitions: int) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

        name = self._topic(topic)
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, 1)])
            await _leaders_elected(admin, name, partitions)
        finally:
            await admin.close()

    async def drop(self, topic: str) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            with contextlib.suppress(Exception):
                await admin.delete_topics([self._topic(topic)])
        finally:
            await admin.close()

    async def publish_single(self, topic: str, seqs: range, run: int, data: str) -> None:
        name = self._topic(topic)
        send = self.producer.send_and_wait
        clock = time.perf_counter_ns
        for seq in seqs:
            await send(name, encode_raw(seq, run, clock(), data), key=key_of(seq).encode())

    async def publish_batch(self, topic: str, seqs: range, run: int, data: str, stamp: int) -> None:
        name = self._topic(topic)
        send = self.producer.send
        futures = [await send(name, encode_raw(seq, run, stamp, data), key=key_of(seq).encode()) for seq in seqs]
        await asyncio.gather(*futures)

    async def start_consumers(
        self, topic: str, group: str, workers: int, partitions: int, sink: Sink, ordered: bool
    ) -> Consumers:
        from aiokafka import AIOKafkaConsumer

        name = self._topic(topic)
        record = sink.record
        consumers = [
            AIOKafkaConsumer(name, bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest")
            for _ in range(workers)
        ]
        try:
            for consumer in consumers:
                await consumer.start()
        except BaseException:
            for consumer in consumers:
                with contextlib.suppress(Exception):
                    await consumer.stop()
            raise

        async def work(consumer: Any) -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=100, max_records=500)
                if not batches:
                    continue
                for records in batches.values():
                    for rec in records:
                        item = decode_raw(rec.value)
                        record(item["run"], item["seq"], item["sent_ns"])
                await consumer.commit()

        tasks = [asyncio.create_task(work(c)) for c in consumers]

        async def close() -> None:
            await stop_tasks(tasks)
            for consumer in consumers:
                with contextlib.suppress(Exception):
                    await consumer.stop()

        return Consumers(close)


async def _leaders_elected(admin: Any, topic: str, partitions: int, timeout: float = 20.0) -> None:
    """Wait until every partition of a new topic has a leader (the first produce otherwise
    meets NotLeaderForPartition and retries with back-off inside the timed section)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            (info,) = await admin.describe_topics([topic])
            parts = info.get("partitions") or []
            if info.get("error_code", 0) == 0 and len(parts) == partitions and all(
                p.get("leader", -1) >= 0 and p.get("error_code", 0) == 0 for p in parts
            ):
                return
        await asyncio.sleep(0.1)


def raw_driver(provider: str, url: str) -> Driver:
    """The raw-client baseline of ``provider``."""
    if provider == "memory":
        return RawMemory()
    if provider == "redis":
        return RawRedis(url)
    if provider == "nats":
        return RawNats(url)
    if provider == "rabbitmq":
        return RawRabbit(url)
    if provider == "kafka":
        return RawKafka(url)
    raise ValueError(provider)
