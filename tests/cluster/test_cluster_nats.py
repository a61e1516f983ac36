"""The NATS provider on a 3-node JetStream cluster (a current nats-server, from ``scripts/brokers
cluster up nats``) with ``nats.replicas=3``, proven under node failure.

* the conformance suite against the cluster (``restart_server`` is a rolling restart of the three
  nodes);
* worker processes (the fault suite's) handling a stream of messages while the leader of the
  topic's stream is killed (``scripts/brokers cluster kill``) and brought back (``cluster up``);
* with ``MSGBROKER_TEST_CLUSTER_FULL=1`` also the leader paused (SIGSTOP) longer than the
  clients' publish and request timeouts, and a rolling restart of all three nodes under load.

Every scenario checks lost 0, order violations 0 and pending back to 0, and reports duplicates
and the recovery time::

    scripts/brokers cluster up nats && set -a && . .brokers/env && . .brokers/cluster.env && set +a
    .venv/bin/python -m pytest -m cluster tests/cluster/test_cluster_nats.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgbroker
import pytest
from msgbroker_conformance import ConformanceHarness, ConformanceSuite

from ._load import ClusterPool, Load, RecordTail, settle, wait_for_handling
from .test_cluster_smoke import addresses, brokers, nats_connect

pytestmark = pytest.mark.cluster

URLS = "MSGBROKER_TEST_CLUSTER_NATS_URLS"
FULL = os.environ.get("MSGBROKER_TEST_CLUSTER_FULL") == "1"
NOT_FULL = "set MSGBROKER_TEST_CLUSTER_FULL=1 to run it (about 40 s each; see docs/reliability.md, Clusters)"
PARTITIONS = 16
PREFIX = "MSGBROKER"


def cluster_url() -> str:
    """The three nodes, comma-separated: the provider's nats.url for a cluster (fails naming the
    variable when it is missing)."""
    return ",".join(addresses(URLS, 3))


def settings() -> dict[str, Any]:
    return {"partition_count": PARTITIONS, "retry_delay": 0.05, "max_retry_attempts": 5,
            "nats": {"ack_wait": 2, "replicas": 3}}


async def stream_leader(topic: str) -> int:
    """The node (1-3) that leads the topic's stream (server names ``msgbroker-cluster-nats-N``)."""
    nc = await nats_connect(addresses(URLS, 3))
    try:
        info = await nc.jsm(timeout=5).stream_info(f"{PREFIX}_{topic}")
        assert info.cluster is not None and info.cluster.leader, info
        return int(info.cluster.leader.rsplit("-", 1)[1])
    finally:
        await nc.close()


async def led_elsewhere(topic: str, node: int, since: float, timeout: float = 60) -> float:
    """Seconds from ``since`` until another node leads the topic's stream."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                if await stream_leader(topic) != node:
                    return round(time.monotonic() - since, 1)
        await asyncio.sleep(0.2)
    raise AssertionError(f"no other node took the lead of {topic!r}'s stream from node {node} within {timeout:.0f}s")


async def delete_streams(prefixes: list[str]) -> None:
    """Remove the streams (and KV buckets) of these stream prefixes, keeping the cluster lean."""
    nc = await nats_connect(addresses(URLS, 3))
    try:
        jsm = nc.jsm(timeout=10)
        names: list[str] = []
        while page := await jsm.streams_info(offset=len(names)):
            names += [info.config.name for info in page]
        for name in names:
            if any(name.startswith((f"{p}_", f"KV_{p}_")) for p in prefixes):
                with contextlib.suppress(Exception):
                    await jsm.delete_stream(name)
    finally:
        await nc.close()


# --------------------------------------------------------------------------- conformance


class NatsClusterHarness(ConformanceHarness):
    """The cluster's three nodes as the servers; a stream prefix per case, 2 s ack_wait, 3 replicas."""

    url = os.environ.get(URLS, "").strip() or None
    url_env = URLS
    timeout_multiplier = 1.5
    prefixes: ClassVar[list[str]] = []

    def overrides(self, namespace: str) -> dict[str, Any]:
        prefix = f"CCONF-{namespace}"
        self.prefixes.append(prefix)
        return {"nats": {"stream_prefix": prefix, "ack_wait": 2, "replicas": 3}}

    async def restart_server(self) -> None:
        """A rolling restart: each node in turn, waiting until it is back in the cluster."""
        for node in range(1, 4):
            await asyncio.to_thread(brokers, "restart", "nats", str(node))


class TestNatsClusterConformance(ConformanceSuite):
    harness = NatsClusterHarness()


@pytest.fixture(scope="module", autouse=True)
def _remove_the_streams() -> Iterator[None]:
    yield
    if NatsClusterHarness.url and NatsClusterHarness.prefixes:
        with contextlib.suppress(Exception):
            asyncio.run(delete_streams(list(NatsClusterHarness.prefixes)))
        NatsClusterHarness.prefixes.clear()


# --------------------------------------------------------------------------- node failure


async def _scenario(tmp_path: Path, name: str) -> tuple[ClusterPool, msgbroker.Broker]:
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    pool = ClusterPool("nats-cluster", cluster_url(), settings(), topic, tmp_path / f"{name}.jsonl")
    broker = msgbroker.connect(cluster_url(), **settings())
    await broker.open()
    for _ in range(3):
        await asyncio.to_thread(pool.start)
    return pool, broker


async def _clean(pool: ClusterPool, broker: msgbroker.Broker) -> None:
    pool.stop_all()
    await broker.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(30):
            nc = await nats_connect(addresses(URLS, 3))
            try:
                for stream in (f"{PREFIX}_{pool.topic}", f"{PREFIX}_{pool.topic}~dlq"):
                    with contextlib.suppress(Exception):
                        await nc.jsm(timeout=10).delete_stream(stream)
            finally:
                await nc.close()


@pytest.mark.timeout(300)
async def test_the_leader_of_the_topics_stream_killed_and_brought_back(tmp_path: Path) -> None:
    pool, broker = await _scenario(tmp_path, "kill")
    killed = False
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        node = await stream_leader(pool.topic)
        await asyncio.to_thread(brokers, "kill", "nats", str(node))
        killed, started = True, time.monotonic()
        failover = await led_elsewhere(pool.topic, node, started)
        recovery = await load.recovery(tail, started, timeout=90)
        await asyncio.to_thread(brokers, "up", "nats")
        killed = False
        back = round(time.monotonic() - started, 1)
        await asyncio.sleep(3)  # under load with the node back
        await load.stop()
        await settle(broker, pool, load.sent, "leader of the topic's stream killed (replicas=3)", no_loss=True,
                     timeout=120, failover_s=failover, recovery_s=recovery, node_back_s=back,
                     publish_gap_s=load.gap())
    finally:
        if killed:
            await asyncio.to_thread(brokers, "up", "nats")
        await _clean(pool, broker)


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.timeout(300)
async def test_the_leader_of_the_topics_stream_paused_past_the_client_timeouts(tmp_path: Path) -> None:
    pool, broker = await _scenario(tmp_path, "pause")
    node = 0
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        node = await stream_leader(pool.topic)
        await asyncio.to_thread(brokers, "pause", "nats", str(node))
        started = time.monotonic()
        await asyncio.sleep(12)  # > the provider's publish (10 s) and request (5 s) timeouts, > ack_wait
        await asyncio.to_thread(brokers, "resume", "nats", str(node))
        node = 0
        recovery = await load.recovery(tail, started, timeout=90)
        await asyncio.to_thread(brokers, "up", "nats")  # waits until the cluster is whole again
        await asyncio.sleep(3)
        await load.stop()
        await settle(broker, pool, load.sent, "leader of the topic's stream paused 12 s (replicas=3)", no_loss=True,
                     timeout=120, pauses=1, recovery_s=recovery, publish_gap_s=load.gap())
    finally:
        if node:
            await asyncio.to_thread(brokers, "resume", "nats", str(node))
        await _clean(pool, broker)


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.timeout(300)
async def test_a_rolling_restart_of_all_three_nodes_under_load(tmp_path: Path) -> None:
    pool, broker = await _scenario(tmp_path, "rolling")
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        started = time.monotonic()
        for node in range(1, 4):
            await asyncio.to_thread(brokers, "restart", "nats", str(node))
        took = round(time.monotonic() - started, 1)
        await asyncio.sleep(3)
        await load.stop()
        await settle(broker, pool, load.sent, "rolling restart of all 3 nodes (replicas=3)", no_loss=True,
                     timeout=120, restarts=3, rolling_s=took, publish_gap_s=load.gap())
    finally:
        await _clean(pool, broker)
