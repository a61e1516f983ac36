"""The Kafka provider on the 3-node KRaft cluster of ``scripts/brokers cluster up kafka``
(replication factor 3, ``min.insync.replicas`` 2), proven under node failure.

* the topics the provider creates (``<topic>``, ``<topic>.dlq``, ``<topic>.dlq.removed``) get
  ``kafka.replication_factor`` and ``kafka.min_insync_replicas``; without the first, the brokers'
  ``default.replication.factor``;
* the conformance suite against the cluster (``restart_server`` is a rolling restart of the
  three nodes); its state machine, minutes on the cluster, with ``MSGBROKER_TEST_CLUSTER_FULL=1``;
* worker processes (the fault suite's) handling a stream of messages while the node that leads
  the most of the topic's partitions — and is the coordinator of the workers' group — is killed
  (``scripts/brokers cluster kill``, SIGKILL) and brought back (``cluster up``);
* with ``MSGBROKER_TEST_CLUSTER_FULL=1`` also that node paused (SIGSTOP) longer than the group's
  session timeout and the brokers' session with the controller, then resumed, and a rolling
  restart of all three nodes under load.

The producer is idempotent with ``acks=all``. Every scenario checks lost 0, order violations 0
and pending back to 0, and reports duplicates, the failover and the recovery time::

    scripts/brokers cluster up kafka && set -a && . .brokers/env && . .brokers/cluster.env && set +a
    .venv/bin/python -m pytest -m cluster tests/cluster/test_cluster_kafka.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgbroker
import pytest
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType  # type: ignore[import-untyped]
from msgbroker_conformance import ConformanceHarness, ConformanceSuite
from msgbroker_kafka import KafkaTransport

from tests.faults.model import FaultMessage

from ._load import ClusterPool, Load, RecordTail, settle, wait_for_handling
from .test_cluster_smoke import addresses, brokers

pytestmark = pytest.mark.cluster

SERVERS = "MSGBROKER_TEST_CLUSTER_KAFKA_BOOTSTRAP_SERVERS"
FULL = os.environ.get("MSGBROKER_TEST_CLUSTER_FULL") == "1"
NOT_FULL = "set MSGBROKER_TEST_CLUSTER_FULL=1 to run it (one to several minutes; see docs/providers/kafka.md)"
PARTITIONS = 16
SESSION_TIMEOUT = 6
"""The group's session timeout (s): the broker's smallest, for fast failover of members."""
_DYNAMIC_TOPIC_CONFIG = 1
"""DescribeConfigs' source of a value the topic sets itself."""


def cluster_url() -> str:
    """``kafka://`` with the three brokers (fails naming the variable when it is missing)."""
    return "kafka://" + ",".join(addresses(SERVERS, 3))


def settings(**kafka: Any) -> dict[str, Any]:
    return {"partition_count": PARTITIONS, "retry_delay": 0.05, "max_retry_attempts": 5,
            "kafka": {"session_timeout": SESSION_TIMEOUT, "heartbeat_interval": 1, "replication_factor": 3,
                      "min_insync_replicas": 2, **kafka}}


@contextlib.asynccontextmanager
async def admin(without: int | None = None) -> Any:
    """An admin client bootstrapping from the nodes (node N is the variable's Nth), ``without``
    one of them (a paused node accepts connections and never answers)."""
    servers = [a for n, a in enumerate(addresses(SERVERS, 3), start=1) if n != without]
    client = AIOKafkaAdminClient(bootstrap_servers=",".join(servers), request_timeout_ms=10000)
    async with asyncio.timeout(30):
        await client.start()
    try:
        async with asyncio.timeout(30):
            yield client
    finally:
        await client.close()


async def topic_layout(topics: list[str]) -> dict[str, tuple[int, str | None]]:
    """Per topic: the number of replicas of its partitions (each the same) and its
    ``min.insync.replicas`` when the topic sets it itself (None: the brokers' default applies)."""
    async with admin() as client:
        described = await client.describe_topics(topics)
        replicas = {d["topic"]: {len(p["replicas"]) for p in d["partitions"]} for d in described}
        responses = await client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, {"min.insync.replicas": None}) for t in topics])
    insync: dict[str, str | None] = {}
    for response in responses:
        for resource in response.resources:
            for name, value, _read_only, source, *_ in resource[4]:
                if name == "min.insync.replicas":
                    insync[resource[3]] = value if source == _DYNAMIC_TOPIC_CONFIG else None
    assert all(len(r) == 1 for r in replicas.values()), replicas
    return {t: (next(iter(replicas[t])), insync.get(t)) for t in topics}


async def leaders(topic: str, without: int | None = None) -> dict[int, int]:
    """Per partition of ``topic``: the node leading it (node.id N is node N; -1: none), asked of
    the nodes but ``without``."""
    async with admin(without) as client:
        [described] = await client.describe_topics([topic])
    return {p["partition"]: int(p["leader"]) for p in described["partitions"]}


async def coordinator(group: str) -> int:
    """The node coordinating ``group``."""
    async with admin() as client:
        return int(await client.find_coordinator(group))


async def group_coordinated_by(node: int) -> str:
    """A new group name whose coordinator is ``node`` (the coordinator is the leader of the
    ``__consumer_offsets`` partition the name hashes to)."""
    for _ in range(60):
        group = f"workers-{uuid.uuid4().hex[:6]}"
        if await coordinator(group) == node:
            return group
    raise AssertionError(f"no group name coordinated by node {node} in 60 tries")


async def led_elsewhere(topic: str, node: int, since: float, timeout: float = 60) -> float:
    """Seconds from ``since`` until every partition of ``topic`` has a leader other than ``node``."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                led = await leaders(topic, without=node)
            if led and all(leader not in (node, -1) for leader in led.values()):
                return round(time.monotonic() - since, 1)
        await asyncio.sleep(0.2)
    raise AssertionError(f"the partitions of {topic!r} led by node {node} got no other leader within {timeout:.0f}s")


async def delete_topics(names: list[str]) -> None:
    async with admin() as client:
        existing = set(await client.list_topics())
        gone = [t for t in names if t in existing]
        if gone:
            await client.delete_topics(gone)


def created_by(topic: str) -> list[str]:
    """The topics the provider creates for ``topic``."""
    return [topic, f"{topic}.dlq", f"{topic}.dlq.removed"]


# --------------------------------------------------------------------------- topic settings


async def test_created_topics_get_the_replication_and_min_insync_settings() -> None:
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    other = f"cluster-{uuid.uuid4().hex[:8]}"

    async def handle(ctx: msgbroker.MessageContext[FaultMessage]) -> None:
        raise AssertionError(f"not a message: {ctx.message!r}")

    try:
        async with msgbroker.connect(cluster_url(), **settings()) as broker:
            await broker.subscribe(topic, "workers", handle, message_type=FaultMessage)
            poison = msgbroker.OutgoingRecord(topic, 0, "k", str(uuid.uuid4()), {}, b"\xff not json")
            await broker.live_transport().publish([poison], None)  # dead-lettered at once: <topic>.dlq
            for _ in range(300):
                if await broker.dead_letters(topic, "workers"):
                    break
                await asyncio.sleep(0.1)
            assert await broker.replay_dead_letters(topic, "workers") == 1  # its removal marker: <topic>.dlq.removed
        layout = await topic_layout(created_by(topic))
        assert layout == {t: (3, "2") for t in created_by(topic)}, layout
        # without the settings: the brokers' default.replication.factor (3 here) and min.insync.replicas
        async with msgbroker.connect(cluster_url(), **settings(replication_factor=None,
                                                               min_insync_replicas=None)) as broker:
            await broker.publish(other, FaultMessage(key="k", seq=0))
        assert await topic_layout([other]) == {other: (3, None)}
    finally:
        with contextlib.suppress(Exception):
            await delete_topics([*created_by(topic), other])


def test_min_insync_replicas_above_the_replication_factor_is_refused() -> None:
    with pytest.raises(msgbroker.ConfigurationError, match="min_insync_replicas=3 is more than"):
        msgbroker.connect(cluster_url(), **settings(replication_factor=2, min_insync_replicas=3))


# --------------------------------------------------------------------------- node failure


async def _scenario(tmp_path: Path, name: str) -> tuple[ClusterPool, msgbroker.Broker, int, int]:
    """Worker processes on a new topic, in a group coordinated by the node that leads the most
    of the topic's partitions (of the nodes that coordinate groups at all): (pool, publishing
    broker, that node, partitions it leads)."""
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    pool = ClusterPool("kafka-cluster", cluster_url(), settings(), topic, tmp_path / f"{name}.jsonl")
    broker = msgbroker.connect(cluster_url(), **settings())
    try:
        await broker.open()
        transport = broker.live_transport()
        assert isinstance(transport, KafkaTransport)
        await transport.ensure_topic(topic)  # created before the workers, to know its leaders
        led: dict[int, int] = {}
        for _ in range(100):  # a new topic's metadata reaches the brokers one by one
            led = await leaders(topic)
            if len(led) == PARTITIONS and -1 not in led.values():
                break
            await asyncio.sleep(0.1)
        coordinators = set((await leaders("__consumer_offsets")).values())
        counts = {n: sum(1 for leader in led.values() if leader == n) for n in coordinators}
        node = max(counts, key=lambda n: counts[n])
        assert counts[node], (led, coordinators)
        pool.group = await group_coordinated_by(node)
        for _ in range(3):
            await asyncio.to_thread(pool.start)
    except BaseException:
        await _clean(pool, broker)
        raise
    return pool, broker, node, counts[node]


async def _clean(pool: ClusterPool, broker: msgbroker.Broker) -> None:
    pool.stop_all()
    try:
        with contextlib.suppress(Exception):
            await delete_topics(created_by(pool.topic))
    finally:
        await broker.close()


@pytest.mark.timeout(300)
async def test_the_node_leading_the_topic_killed_and_brought_back(tmp_path: Path) -> None:
    pool, broker, node, led = await _scenario(tmp_path, "kill")
    killed = False
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        await asyncio.to_thread(brokers, "kill", "kafka", str(node))
        killed, started = True, time.monotonic()
        failover = await led_elsewhere(pool.topic, node, started)
        recovery = await load.recovery(tail, started, timeout=90)
        await asyncio.to_thread(brokers, "up", "kafka")  # waits until every replica is in sync again
        killed = False
        back = round(time.monotonic() - started, 1)
        await asyncio.sleep(3)  # under load with the node back
        await load.stop()
        await settle(broker, pool, load.sent, f"node leading {led}/{PARTITIONS} partitions and the group killed (RF 3)",
                     no_loss=True, timeout=120, failover_s=failover, recovery_s=recovery, node_back_s=back,
                     publish_gap_s=load.gap())
    finally:
        if killed:
            await asyncio.to_thread(brokers, "up", "kafka")
        await _clean(pool, broker)


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.timeout(300)
async def test_the_node_leading_the_topic_paused_past_the_timeouts(tmp_path: Path) -> None:
    pool, broker, node, led = await _scenario(tmp_path, "pause")
    paused = False
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        await asyncio.to_thread(brokers, "pause", "kafka", str(node))
        paused, started = True, time.monotonic()
        failover = await led_elsewhere(pool.topic, node, started)
        # > the group's session timeout (6 s) and the brokers' session with the controller (4 s)
        await asyncio.sleep(max(0.0, started + 15 - time.monotonic()))
        await asyncio.to_thread(brokers, "resume", "kafka", str(node))
        paused = False
        recovery = await load.recovery(tail, started, timeout=90)
        await asyncio.to_thread(brokers, "up", "kafka")  # waits until every replica is in sync again
        await asyncio.sleep(3)
        await load.stop()
        await settle(broker, pool, load.sent,
                     f"node leading {led}/{PARTITIONS} partitions and the group paused 15 s (RF 3)", no_loss=True,
                     timeout=120, pauses=1, failover_s=failover, recovery_s=recovery, publish_gap_s=load.gap())
    finally:
        if paused:
            await asyncio.to_thread(brokers, "resume", "kafka", str(node))
        await _clean(pool, broker)


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.timeout(400)
async def test_a_rolling_restart_of_all_three_nodes_under_load(tmp_path: Path) -> None:
    pool, broker, _node, _led = await _scenario(tmp_path, "rolling")
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        started = time.monotonic()
        for node in range(1, 4):
            await asyncio.to_thread(brokers, "restart", "kafka", str(node))  # back, every replica in sync
        took = round(time.monotonic() - started, 1)
        await asyncio.sleep(3)
        await load.stop()
        await settle(broker, pool, load.sent, "rolling restart of all 3 nodes (RF 3)", no_loss=True,
                     timeout=120, restarts=3, rolling_s=took, publish_gap_s=load.gap())
    finally:
        await _clean(pool, broker)


# --------------------------------------------------------------------------- conformance


class KafkaClusterHarness(ConformanceHarness):
    """The cluster's three brokers as bootstrap servers; replication factor 3, min.insync 2, the
    broker's smallest session timeout (6 s)."""

    _servers = os.environ.get(SERVERS, "").strip()
    url: ClassVar[str | None] = f"kafka://{_servers}" if _servers else None
    url_env: ClassVar[str | None] = SERVERS
    timeout_multiplier: ClassVar[float] = 1.5

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"kafka": {"session_timeout": SESSION_TIMEOUT, "heartbeat_interval": 1,
                          "client_id": f"cconf-{namespace}", "replication_factor": 3, "min_insync_replicas": 2}}

    async def restart_server(self) -> None:
        """A rolling restart: each node in turn, waiting until it is back with its replicas in sync."""
        for node in range(1, 4):
            await asyncio.to_thread(brokers, "restart", "kafka", str(node))


class TestKafkaClusterConformance(ConformanceSuite):
    harness = KafkaClusterHarness()

    # Minutes on the cluster (each join of its members waits until the others drained their
    # handlers, and a crashed member is noticed after the session timeout): not in the default run.
    @pytest.mark.skipif(not FULL, reason=NOT_FULL)
    @pytest.mark.timeout(900)
    @functools.wraps(ConformanceSuite.test_state_machine_against_the_reference_model)
    def test_state_machine_against_the_reference_model(self) -> None:
        ConformanceSuite.test_state_machine_against_the_reference_model(self)


@pytest.fixture(scope="module", autouse=True)
def _remove_the_topics() -> Iterator[None]:
    """Delete the topics this module's cases made (conformance cases name theirs at random), so
    the cluster stays lean for the next run."""
    if not KafkaClusterHarness.url:
        yield
        return
    before: set[str] | None = None
    with contextlib.suppress(Exception):
        before = set(asyncio.run(_topics()))
    yield
    if before is not None:  # never without knowing what was there before
        with contextlib.suppress(Exception):
            asyncio.run(delete_topics(sorted(set(asyncio.run(_topics())) - before)))


async def _topics() -> list[str]:
    async with admin() as client:
        return [t for t in await client.list_topics() if not t.startswith("__")]
