"""Smoke tests of the real brokers started by ``scripts/brokers up`` (or your own servers).

Each test publishes one message and reads it back with the broker's own client library, using
the address from the ``MSGBROKER_*`` environment variables. A missing variable is a failure,
never a skip: run ``scripts/brokers up`` and load its settings first::

    scripts/brokers up && set -a && . .brokers/env && set +a
    .venv/bin/python -m pytest tests/brokers -q -p no:cacheprovider

Every name (stream, subject, queue, topic, group) is unique per run and removed afterwards;
every test is bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

HOW = ("run `scripts/brokers up` and load its settings (`set -a; . .brokers/env; set +a`), "
       "or point it at your own server")


def setting(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"{name} is not set: {HOW}", pytrace=False)
    return value


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.mark.asyncio
async def test_redis_stream_xadd_xread() -> None:
    import redis.asyncio as aioredis

    url = setting("MSGBROKER_REDIS__URL")
    stream = unique("msgbroker-smoke-")
    client = aioredis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        async with asyncio.timeout(20):
            msg_id = await client.xadd(stream, {"body": b"hello redis"})
            got = await client.xread({stream: "0-0"}, count=1, block=2000)
            assert got, "XREAD returned nothing"
            [(name, [(read_id, fields)])] = got
            assert name == stream.encode()
            assert read_id == msg_id
            assert fields == {b"body": b"hello redis"}
    finally:
        async with asyncio.timeout(10):
            await client.delete(stream)
            await client.aclose()


@pytest.mark.asyncio
async def test_nats_jetstream_publish_fetch() -> None:
    import nats

    url = setting("MSGBROKER_NATS__URL")
    token = uuid.uuid4().hex[:12]
    stream, subject, durable = f"SMOKE_{token}", f"msgbroker.smoke.{token}", f"smoke_{token}"
    async with asyncio.timeout(10):
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
    js = nc.jetstream(timeout=5)
    try:
        async with asyncio.timeout(30):
            await js.add_stream(name=stream, subjects=[subject])
            ack = await js.publish(subject, b"hello nats")
            assert ack.stream == stream
            sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
            [msg] = await sub.fetch(1, timeout=10)
            assert msg.data == b"hello nats"
            await msg.ack()
    finally:
        async with asyncio.timeout(10):
            try:
                await js.delete_stream(stream)
            finally:
                await nc.close()


@pytest.mark.asyncio
async def test_rabbitmq_queue_publish_get() -> None:
    import aio_pika

    url = setting("MSGBROKER_RABBITMQ__URL")
    queue_name = unique("msgbroker-smoke-")
    async with asyncio.timeout(15):
        conn = await aio_pika.connect(url, timeout=10)
    try:
        async with asyncio.timeout(30):
            channel = await conn.channel()  # publisher confirms on: publish returns once stored
            queue = await channel.declare_queue(queue_name, durable=True)
            await channel.default_exchange.publish(
                aio_pika.Message(b"hello rabbitmq", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name,
            )
            msg = None
            while msg is None:
                msg = await queue.get(timeout=5, fail=False)
                if msg is None:
                    await asyncio.sleep(0.1)
            assert msg.body == b"hello rabbitmq"
            await msg.ack()
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        async with asyncio.timeout(10):
            await conn.close()


@pytest.mark.asyncio
async def test_kafka_produce_consume() -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = setting("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS")
    topic, group = unique("msgbroker-smoke-"), unique("msgbroker-smoke-group-")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10000, acks="all")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        request_timeout_ms=10000,
    )
    async with asyncio.timeout(15):
        await admin.start()
    try:
        async with asyncio.timeout(60):
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
            await producer.start()
            sent = await producer.send_and_wait(topic, b"hello kafka", key=b"k")
            assert sent.topic == topic and sent.offset == 0
            await consumer.start()
            msg = await consumer.getone()
            assert (msg.key, msg.value, msg.offset) == (b"k", b"hello kafka", 0)
            await consumer.commit()
    finally:
        async with asyncio.timeout(30):
            await consumer.stop()
            await producer.stop()
            try:
                await admin.delete_topics([topic])
            finally:
                await admin.close()


@pytest.mark.asyncio
async def test_postgres_table_insert_select() -> None:
    """The outbox's database (plugins/outbox): the test role logs in, owns its database and
    may create tables there."""
    import asyncpg

    url = setting("MSGBROKER_TEST_POSTGRES_URL")
    table = unique("msgbroker_smoke_")
    async with asyncio.timeout(20):
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, body text NOT NULL)")
            await conn.execute(f"INSERT INTO {table} (body) VALUES ($1)", "hello postgres")
            assert await conn.fetchval(f"SELECT body FROM {table}") == "hello postgres"
            assert await conn.fetchval("SELECT current_user") == "msgbroker"
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.close()
