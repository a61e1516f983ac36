"""Smoke tests of the 3-node clusters started by ``scripts/brokers cluster up``.

Each cluster must answer on every node, have its 3 nodes (Redis Cluster: 6 nodes, 3 primaries
with 3 replicas) and carry a write/read round trip through the raw client library; then one node
is killed with ``scripts/brokers cluster kill NAME NODE`` (the one leading the data where that
can be told) and a round trip must still work on the other two, before ``scripts/brokers cluster
up NAME`` brings the node back and waits until the cluster is whole again.

The addresses come from the ``MSGBROKER_TEST_CLUSTER_*`` variables. A missing one is a failure,
never a skip::

    scripts/brokers cluster up && set -a && . .brokers/cluster.env && set +a
    .venv/bin/python -m pytest tests/cluster -q -m cluster

Every name is unique per run and removed afterwards; every step has a time limit.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
    from nats.aio.client import Client as NATS
    from redis.asyncio.cluster import RedisCluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
HOW = ("run `scripts/brokers cluster up` and load its settings (`set -a; . .brokers/cluster.env; set +a`); "
       "tests marked `cluster` need the 3-node clusters (deselect them with -m 'not cluster')")
T = TypeVar("T")


def addresses(name: str, count: int = 3) -> list[str]:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"{name} is not set: {HOW}", pytrace=False)
    found = [a.strip() for a in value.split(",") if a.strip()]
    assert len(found) == count, f"{name} names {len(found)} nodes, not {count}: {value}"
    return found


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def brokers(*args: str, timeout: float = 240) -> None:
    """scripts/brokers cluster ARGS; a failure shows what it said."""
    out = subprocess.run([str(ROOT / "scripts" / "brokers"), "cluster", *args], capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, f"scripts/brokers cluster {' '.join(args)} failed: {out.stderr[-3000:]}"


async def eventually(attempt: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """The first result of attempt() that does not raise, retried until timeout (a cluster that
    lost a node elects a new leader first); the last error when it never succeeds."""
    last: BaseException | None = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            async with asyncio.timeout(max(1.0, deadline - loop.time())):
                return await attempt()
        except Exception as e:
            last = e
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what} did not succeed within {timeout:.0f}s; last error: {last!r}")


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


# --------------------------------------------------------------------------- Redis Cluster


def redis_cluster(urls: list[str]) -> RedisCluster:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(*host_port(u)) for u in urls], socket_connect_timeout=2,
                        socket_timeout=3)


async def test_redis_cluster_has_three_primaries_three_replicas_and_a_round_trip() -> None:
    urls = addresses("MSGBROKER_TEST_CLUSTER_REDIS_URLS", 6)
    rc = redis_cluster(urls)
    keys = [unique(f"msgbroker-cluster-smoke-{i}-") for i in range(12)]
    stream = "{" + unique("smoke-") + "}:stream"
    try:
        async with asyncio.timeout(30):
            await rc.initialize()
            assert len(rc.get_nodes()) == 6
            assert len(rc.get_primaries()) == 3
            assert len(rc.get_replicas()) == 3
            for url in urls:  # every node answers and sees the cluster as whole
                node = rc.get_node(*host_port(url))
                assert node is not None, f"{url} is not one of the cluster's nodes"
                info = await rc.cluster_info(target_nodes=node)
                assert info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == 6, (url, info)
            for i, key in enumerate(keys):
                await rc.set(key, f"value-{i}")
            assert [await rc.get(k) for k in keys] == [f"value-{i}".encode() for i in range(len(keys))]
            owners = {node.name for k in keys if (node := rc.get_node_from_key(k)) is not None}
            assert len(owners) >= 2, f"12 random keys all on one primary: {owners}"
            msg_id = await rc.xadd(stream, {"body": b"hello redis cluster"})
            got: Any = await rc.xread({stream: "0-0"}, count=1)
            [(_name, [(read_id, fields)])] = got
            assert (read_id, fields) == (msg_id, {b"body": b"hello redis cluster"})
    finally:
        async with asyncio.timeout(15):
            for k in [*keys, stream]:
                await rc.delete(k)
            await rc.aclose()


# --------------------------------------------------------------------------- NATS


async def nats_connect(urls: list[str]) -> NATS:
    import nats

    async def ignore(*_a: object) -> None:
        return None

    return await nats.connect(servers=urls, connect_timeout=3, max_reconnect_attempts=20, reconnect_time_wait=0.5,
                              error_cb=ignore, disconnected_cb=ignore, reconnected_cb=ignore, closed_cb=ignore)


async def test_nats_cluster_has_three_nodes_and_a_replicated_round_trip() -> None:
    import nats.js.errors

    urls = addresses("MSGBROKER_TEST_CLUSTER_NATS_URLS")
    token = uuid.uuid4().hex[:12]
    stream, subject = f"CLUSTER_SMOKE_{token}", f"msgbroker.cluster.smoke.{token}"
    async with asyncio.timeout(20):
        for url in urls:  # every node answers JetStream requests
            nc = await nats_connect([url])
            try:
                await nc.jetstream(timeout=5).account_info()
            finally:
                await nc.close()
        nc = await nats_connect(urls)
    js = nc.jetstream(timeout=10)
    try:
        async with asyncio.timeout(60):
            await js.add_stream(name=stream, subjects=[subject], num_replicas=3)
            info = await js.stream_info(stream)
            assert info.cluster is not None and info.cluster.leader, info
            peers = [info.cluster.leader, *(r.name for r in info.cluster.replicas or [])]
            assert len(set(peers)) == 3, f"stream on {peers}, not 3 nodes"
            ack = await js.publish(subject, b"hello nats cluster")
            assert ack.stream == stream
            sub = await js.pull_subscribe(subject, durable=f"smoke_{token}", stream=stream)
            while True:
                try:
                    [msg] = await sub.fetch(1, timeout=10)
                    break
                except nats.js.errors.ServiceUnavailableError:
                    # No responder yet: the new consumer's leader is still being elected (the
                    # cluster tests before this one restart nodes); the 60-s bound above holds.
                    await asyncio.sleep(0.5)
            assert msg.data == b"hello nats cluster"
            await msg.ack()
    finally:
        async with asyncio.timeout(15):
            try:
                await js.delete_stream(stream)
            finally:
                await nc.close()


# --------------------------------------------------------------------------- RabbitMQ


async def test_rabbitmq_cluster_shares_a_quorum_queue_across_its_three_nodes() -> None:
    import aio_pika

    urls = addresses("MSGBROKER_TEST_CLUSTER_RABBITMQ_URLS")
    queue_name = unique("msgbroker-cluster-smoke-")
    async with asyncio.timeout(30):
        conns = [await aio_pika.connect(u, timeout=10) for u in urls]
    try:
        async with asyncio.timeout(60):
            first, second, third = [await c.channel() for c in conns]
            await first.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
            for channel in (second, third):  # the queue declared through node 1 is there on 2 and 3
                await channel.declare_queue(queue_name, passive=True)
            await second.default_exchange.publish(
                aio_pika.Message(b"hello rabbitmq cluster", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name)
            queue = await third.declare_queue(queue_name, passive=True)
            msg = await eventually(lambda: queue_get(queue), 20, "get through node 3")
            assert msg.body == b"hello rabbitmq cluster"
            await msg.ack()
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        async with asyncio.timeout(15):
            for c in conns:
                await c.close()


async def queue_get(queue: AbstractQueue) -> AbstractIncomingMessage:
    msg = await queue.get(timeout=5, fail=False)
    assert msg is not None, "no message yet"
    return msg


# --------------------------------------------------------------------------- Kafka


async def test_kafka_cluster_has_three_brokers_and_a_replicated_round_trip() -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]

    servers = addresses("MSGBROKER_TEST_CLUSTER_KAFKA_BOOTSTRAP_SERVERS")
    bootstrap = ",".join(servers)
    topic, group = unique("msgbroker-cluster-smoke-"), unique("msgbroker-cluster-smoke-group-")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10000, acks="all")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=",".join(reversed(servers)), group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False, request_timeout_ms=10000)
    async with asyncio.timeout(15):
        await admin.start()
    try:
        async with asyncio.timeout(90):
            cluster = await admin.describe_cluster()
            assert sorted(f"{b['host']}:{b['port']}" for b in cluster["brokers"]) == sorted(servers), cluster
            await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=3)])
            [described] = await eventually(lambda: in_sync(admin, topic, 3), 30, "all replicas in sync")
            assert {p["leader"] for p in described["partitions"]} <= {1, 2, 3}
            await producer.start()
            sent = await producer.send_and_wait(topic, b"hello kafka cluster", key=b"k")
            await consumer.start()
            msg = await consumer.getone()
            assert (msg.key, msg.value, msg.partition, msg.offset) == (b"k", b"hello kafka cluster",
                                                                       sent.partition, sent.offset)
            await consumer.commit()
    finally:
        async with asyncio.timeout(30):
            await consumer.stop()
            await producer.stop()
            try:
                await admin.delete_topics([topic])
            finally:
                await admin.close()


async def in_sync(admin: Any, topic: str, partitions: int) -> list[dict[str, Any]]:
    described: list[dict[str, Any]] = await admin.describe_topics([topic])
    assert len(described[0]["partitions"]) == partitions, described  # just created: maybe not known yet
    for p in described[0]["partitions"]:
        assert len(p["replicas"]) == 3 and sorted(p["isr"]) == sorted(p["replicas"]), p
    return described


# --------------------------------------------------------------------------- one node killed


async def test_redis_cluster_round_trip_with_the_keys_primary_killed() -> None:
    urls = addresses("MSGBROKER_TEST_CLUSTER_REDIS_URLS", 6)
    rc = redis_cluster(urls)
    key = unique("msgbroker-cluster-kill-")
    killed = False
    try:
        async with asyncio.timeout(30):
            await rc.initialize()
            await rc.set(key, b"before")
            primary = rc.get_node_from_key(key)
            assert primary is not None
            # the write is on a replica too before its primary dies
            assert await rc.execute_command("WAIT", 1, 5000, target_nodes=primary) >= 1
        node = [host_port(u) for u in urls].index((primary.host, int(primary.port))) + 1
        await asyncio.to_thread(brokers, "kill", "redis", str(node))
        killed = True

        async def round_trip() -> bytes | None:
            await rc.set(f"{key}:after", b"after")
            assert await rc.get(f"{key}:after") == b"after"
            value = await rc.get(key)
            assert value is None or isinstance(value, bytes)
            return value

        assert await eventually(round_trip, 40, "a round trip after a failover") == b"before"
        for k in (key, f"{key}:after"):  # in different slots: one at a time
            await rc.delete(k)
    finally:
        try:
            if killed:
                await asyncio.to_thread(brokers, "up", "redis")
        finally:
            async with asyncio.timeout(10):
                await rc.aclose()


async def test_nats_cluster_round_trip_with_the_stream_leader_killed() -> None:
    urls = addresses("MSGBROKER_TEST_CLUSTER_NATS_URLS")
    token = uuid.uuid4().hex[:12]
    stream, subject = f"CLUSTER_KILL_{token}", f"msgbroker.cluster.kill.{token}"
    killed = False
    async with asyncio.timeout(20):
        nc = await nats_connect(urls)
    js = nc.jetstream(timeout=5)
    try:
        async with asyncio.timeout(30):
            await js.add_stream(name=stream, subjects=[subject], num_replicas=3)
            await js.publish(subject, b"before")
            info = await js.stream_info(stream)
            assert info.cluster is not None and info.cluster.leader
        node = int(info.cluster.leader.rsplit("-", 1)[1])  # server_name msgbroker-cluster-nats-N
        await asyncio.to_thread(brokers, "kill", "nats", str(node))
        killed = True
        await eventually(lambda: js.publish(subject, b"after"), 40, "a publish after the leader died")
        sub = await eventually(lambda: js.pull_subscribe(subject, durable=f"kill_{token}", stream=stream), 30,
                               "a consumer after the leader died")
        got: list[bytes] = []

        async def fetch_all() -> list[bytes]:
            for msg in await sub.fetch(2 - len(got), timeout=5):
                got.append(msg.data)
                await msg.ack()
            assert len(got) == 2, got
            return got

        assert await eventually(fetch_all, 30, "fetching both messages") == [b"before", b"after"]
    finally:
        try:
            if killed:  # first, so that a failing clean-up cannot leave the node down
                await asyncio.to_thread(brokers, "up", "nats")
        finally:
            async with asyncio.timeout(20):
                try:
                    await js.delete_stream(stream)
                finally:
                    await nc.close()


async def test_rabbitmq_cluster_round_trip_with_node_1_killed() -> None:
    import aio_pika

    urls = addresses("MSGBROKER_TEST_CLUSTER_RABBITMQ_URLS")
    queue_name = unique("msgbroker-cluster-kill-")
    killed = False
    async with asyncio.timeout(20):
        first = await aio_pika.connect(urls[0], timeout=10)
    try:
        async with asyncio.timeout(30):
            channel = await first.channel()
            await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
            await channel.default_exchange.publish(
                aio_pika.Message(b"before", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue_name)
    finally:
        async with asyncio.timeout(10):
            await first.close()
    try:
        await asyncio.to_thread(brokers, "kill", "rabbitmq", "1")  # declared there: node 1 led the queue
        killed = True
        async with asyncio.timeout(60):
            second = await aio_pika.connect(urls[1], timeout=10)
            third = await aio_pika.connect(urls[2], timeout=10)
            try:
                async def publish() -> None:
                    # A fresh channel each try: RabbitMQ 3.10 keeps nacking on a channel whose first
                    # publish to the queue came before the new leader was known.
                    publisher = await second.channel()
                    try:
                        await publisher.default_exchange.publish(
                            aio_pika.Message(b"after", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                            routing_key=queue_name)
                    finally:
                        await publisher.close()

                await eventually(publish, 30, "a publish through node 2")
                queue = await (await third.channel()).declare_queue(queue_name, passive=True)
                bodies = []
                for _ in range(2):
                    msg = await eventually(lambda: queue_get(queue), 30, "a get through node 3")
                    bodies.append(msg.body)
                    await msg.ack()
                assert bodies == [b"before", b"after"]
            finally:
                await second.close()
                await third.close()
    finally:
        if killed:
            await asyncio.to_thread(brokers, "up", "rabbitmq")
        async with asyncio.timeout(30):
            conn = await aio_pika.connect(urls[1], timeout=10)
            try:
                await (await conn.channel()).queue_delete(queue_name)
            finally:
                await conn.close()


async def test_kafka_cluster_round_trip_with_the_partition_leader_killed() -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    servers = addresses("MSGBROKER_TEST_CLUSTER_KAFKA_BOOTSTRAP_SERVERS")
    bootstrap = ",".join(servers)
    topic = unique("msgbroker-cluster-kill-")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10000, acks="all",
                                retry_backoff_ms=500)
    killed = False
    async with asyncio.timeout(15):
        await admin.start()
    try:
        async with asyncio.timeout(60):
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=3)])
            [described] = await eventually(lambda: in_sync(admin, topic, 1), 30, "all replicas in sync")
            leader = described["partitions"][0]["leader"]  # node.id N is node N
            await producer.start()
            await producer.send_and_wait(topic, b"before", partition=0)
        await asyncio.to_thread(brokers, "kill", "kafka", str(leader))
        killed = True
        await eventually(lambda: producer.send_and_wait(topic, b"after", partition=0), 60,
                         "a produce (acks=all, 2 in sync) after the leader died")
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", request_timeout_ms=10000)
        try:
            async with asyncio.timeout(60):
                await consumer.start()
                consumer.assign([TopicPartition(topic, 0)])
                got = [(await consumer.getone()).value for _ in range(2)]
                assert got == [b"before", b"after"]
        finally:
            await consumer.stop()
    finally:
        try:
            if killed:  # first, so that a failing clean-up cannot leave the node down
                await asyncio.to_thread(brokers, "up", "kafka")
        finally:
            async with asyncio.timeout(30):
                await producer.stop()
                try:
                    await admin.delete_topics([topic])
                finally:
                    await admin.close()
