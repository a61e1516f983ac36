"""The Redis provider on a Redis Cluster (3 primaries, 3 replicas) from ``scripts/brokers cluster
up redis``, proven under node failure.

* the conformance suite against the cluster (``restart_server`` is a rolling restart of all six
  nodes);
* worker processes (the fault suite's) handling a stream of messages while the primary that owns
  the topic's slot is killed (``scripts/brokers cluster kill``) and brought back (``cluster up``):
  with ``redis.wait_replicas=1`` nothing confirmed is lost; without it the loss is measured and
  reported (Redis replicates asynchronously: a failover may lose what the replica had not got);
* with ``MSGBROKER_TEST_CLUSTER_FULL=1`` also the primary paused (SIGSTOP) longer than the
  clients' socket timeout, and a rolling restart of all six nodes under load.

Every scenario checks lost 0 (where guaranteed), order violations 0 and pending back to 0, and
reports duplicates and the recovery time::

    scripts/brokers cluster up redis && set -a && . .brokers/env && . .brokers/cluster.env && set +a
    .venv/bin/python -m pytest -m cluster tests/cluster/test_cluster_redis.py -s
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import msgbroker
import pytest
from msgbroker_conformance import ConformanceHarness, ConformanceSuite

from ._load import ClusterPool, Load, RecordTail, settle, wait_for_handling
from .test_cluster_smoke import addresses, brokers, host_port

pytestmark = pytest.mark.cluster

URLS = "MSGBROKER_TEST_CLUSTER_REDIS_URLS"
FULL = os.environ.get("MSGBROKER_TEST_CLUSTER_FULL") == "1"
NOT_FULL = "set MSGBROKER_TEST_CLUSTER_FULL=1 to run it (about 40 s each; see docs/reliability.md, Clusters)"
PARTITIONS = 16


def cluster_url() -> str:
    """The six nodes, comma-separated: the provider's redis.url for a cluster (fails naming the
    variable when it is missing)."""
    return ",".join(addresses(URLS, 6))


def settings(wait_replicas: int) -> dict[str, Any]:
    return {"partition_count": PARTITIONS, "retry_delay": 0.05, "max_retry_attempts": 5,
            "redis": {"claim_timeout": 2, "wait_replicas": wait_replicas, "wait_timeout": 1}}


async def primary_of(topic: str) -> int:
    """The node (1-6, in the order of the variable) that is the primary of the topic's slot."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    urls = addresses(URLS, 6)
    client = RedisCluster(startup_nodes=[ClusterNode(*host_port(u)) for u in urls], socket_timeout=5)
    try:
        await client.initialize()
        node = client.get_node_from_key("{" + topic + "}")
        assert node is not None
        return [host_port(u) for u in urls].index((node.host, int(node.port))) + 1
    finally:
        await client.aclose()


async def failed_over(topic: str, node: int, since: float, timeout: float = 60) -> float:
    """Seconds from ``since`` until another node is the primary of the topic's slot."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        try:
            if await primary_of(topic) != node:
                return round(time.monotonic() - since, 1)
        except Exception:
            pass  # the cluster is failing over
        await asyncio.sleep(0.2)
    raise AssertionError(f"no replica took over the slot of {topic!r} from node {node} within {timeout:.0f}s")


# --------------------------------------------------------------------------- conformance


class RedisClusterHarness(ConformanceHarness):
    """The cluster's six nodes as start nodes; a key prefix per case, 2 s claims."""

    url = os.environ.get(URLS, "").strip() or None
    url_env = URLS
    timeout_multiplier = 1.5
    restarts: ClassVar[int] = 0

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"redis": {"key_prefix": f"conf-{namespace}", "claim_timeout": 2, "wait_replicas": 1}}

    async def restart_server(self) -> None:
        """A rolling restart: each node in turn, waiting until the cluster is whole again."""
        for node in range(1, 7):
            await asyncio.to_thread(brokers, "restart", "redis", str(node))
        type(self).restarts += 1


class TestRedisClusterConformance(ConformanceSuite):
    harness = RedisClusterHarness()


# --------------------------------------------------------------------------- node failure


async def _scenario(tmp_path: Path, wait_replicas: int, name: str) -> tuple[ClusterPool, msgbroker.Broker]:
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    pool = ClusterPool("redis-cluster", cluster_url(), settings(wait_replicas), topic, tmp_path / f"{name}.jsonl")
    broker = msgbroker.connect(cluster_url(), **settings(wait_replicas))
    await broker.open()
    for _ in range(3):
        await asyncio.to_thread(pool.start)
    return pool, broker


@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait-1", "no-wait"])
@pytest.mark.timeout(300)
async def test_the_primary_of_the_topics_slot_killed_and_brought_back(tmp_path: Path, wait_replicas: int) -> None:
    pool, broker = await _scenario(tmp_path, wait_replicas, "kill")
    killed = False
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        node = await primary_of(pool.topic)
        await asyncio.to_thread(brokers, "kill", "redis", str(node))
        killed, started = True, time.monotonic()
        failover = await failed_over(pool.topic, node, started)
        # The killed node rejoins as a replica of the new primary. With wait_replicas=1 no write to
        # the slot is confirmed before it does: the new primary has no other replica.
        await asyncio.to_thread(brokers, "up", "redis")
        killed = False
        back = round(time.monotonic() - started, 1)
        recovery = await load.recovery(tail, started, timeout=90)
        await asyncio.sleep(3)  # under load with the node back (as a replica of the new primary)
        await load.stop()
        scenario = f"primary of the topic's slot killed (wait_replicas={wait_replicas})"
        verdict = await settle(broker, pool, load.sent, scenario, no_loss=wait_replicas > 0, timeout=120,
                               failover_s=failover, node_back_s=back, recovery_s=recovery, publish_gap_s=load.gap())
        assert verdict.published > 0
    finally:
        if killed:
            await asyncio.to_thread(brokers, "up", "redis")
        pool.stop_all()
        await broker.close()


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait-1", "no-wait"])
@pytest.mark.timeout(300)
async def test_the_primary_of_the_topics_slot_paused_past_the_client_timeouts(tmp_path: Path,
                                                                              wait_replicas: int) -> None:
    """Stopped longer than the provider's socket timeout (and the cluster's node timeout, so a
    replica takes over), then resumed: the old primary may still run what its clients had sent
    before it learns it was replaced, and then drops it as a replica; WAIT refuses to confirm that."""
    pool, broker = await _scenario(tmp_path, wait_replicas, "pause")
    node = 0
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        node = await primary_of(pool.topic)
        await asyncio.to_thread(brokers, "pause", "redis", str(node))
        started = time.monotonic()
        await asyncio.sleep(17)  # > the provider's 15 s socket timeout, > cluster-node-timeout (5 s)
        await asyncio.to_thread(brokers, "resume", "redis", str(node))
        node = 0
        recovery = await load.recovery(tail, started, timeout=90)
        await asyncio.to_thread(brokers, "up", "redis")  # waits until the cluster is whole again
        await asyncio.sleep(3)
        await load.stop()
        scenario = f"primary of the topic's slot paused 17 s (wait_replicas={wait_replicas})"
        await settle(broker, pool, load.sent, scenario, no_loss=wait_replicas > 0, timeout=120, pauses=1,
                     recovery_s=recovery, publish_gap_s=load.gap())
    finally:
        if node:
            await asyncio.to_thread(brokers, "resume", "redis", str(node))
        pool.stop_all()
        await broker.close()


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.timeout(300)
async def test_a_rolling_restart_of_all_six_nodes_under_load(tmp_path: Path) -> None:
    pool, broker = await _scenario(tmp_path, 1, "rolling")
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        started = time.monotonic()
        for node in range(1, 7):
            await asyncio.to_thread(brokers, "restart", "redis", str(node))
        took = round(time.monotonic() - started, 1)
        await asyncio.sleep(2)
        await load.stop()
        await settle(broker, pool, load.sent, "rolling restart of all 6 nodes (wait_replicas=1)", no_loss=True,
                     timeout=120, restarts=6, rolling_s=took, publish_gap_s=load.gap())
    finally:
        pool.stop_all()
        await broker.close()
