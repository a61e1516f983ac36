"""The RabbitMQ provider on the 3-node cluster of ``scripts/brokers cluster up rabbitmq`` (quorum
queues on all three nodes), proven under node failure.

* the conformance suite against the cluster (``restart_server`` is a rolling restart of the three
  nodes);
* worker processes (the fault suite's) handling a stream of messages while the node that leads
  the group's lane queues is killed (``scripts/brokers cluster kill``) and brought back
  (``cluster up``);
* with ``MSGBROKER_TEST_CLUSTER_FULL=1`` also that node paused (SIGSTOP) longer than the
  clients' timeouts, and a rolling restart of all three nodes under load.

Every client gets all three node addresses (``rabbitmq.url``, comma-separated), each in its own
order: the producer and the first worker start on node 1, the other workers on nodes 2 and 3.
The first worker's subscribe declares the group's queues through node 1, so node 1 leads them
(RabbitMQ places a quorum queue's leader on its declarer's node); the test asks ``rabbitmqctl``
which node leads them and fails that one. ``max_retry_attempts`` is the default 3, so a node
failure that counted deliveries no handler failed would dead-letter healthy messages (lost).
Every scenario checks lost 0, order violations 0 and pending back to 0, and reports duplicates
and the failover and recovery times::

    scripts/brokers cluster up rabbitmq && set -a && . .brokers/env && . .brokers/cluster.env && set +a
    .venv/bin/python -m pytest -m cluster tests/cluster/test_cluster_rabbitmq.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import msgbroker
import pytest
from msgbroker_conformance import ConformanceHarness, ConformanceSuite

from ._load import ROOT, ClusterPool, Load, RecordTail, settle, wait_for_handling
from .test_cluster_smoke import addresses, brokers

pytestmark = pytest.mark.cluster

URLS = "MSGBROKER_TEST_CLUSTER_RABBITMQ_URLS"
FULL = os.environ.get("MSGBROKER_TEST_CLUSTER_FULL") == "1"
NOT_FULL = ("set MSGBROKER_TEST_CLUSTER_FULL=1 to run it (pause about 70 s, rolling restart 2-5 min; "
            "see docs/providers/rabbitmq.md, Clusters)")
PARTITIONS = 16
GROUP = "workers"
CLUSTER_DIR = ROOT / ".brokers" / "cluster" / "rabbitmq"
"""Where scripts/brokers keeps the cluster: its Erlang cookie (home/) and its epmd's port."""
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"  # Debian's /usr/sbin wrapper switches to the rabbitmq user


def starting_at(node: int) -> str:
    """``rabbitmq.url`` listing the three nodes, ``node`` (1-3) first (fails naming the variable
    when it is missing)."""
    urls = addresses(URLS, 3)
    return ",".join(urls[node - 1:] + urls[:node - 1])


def settings() -> dict[str, Any]:
    return {"partition_count": PARTITIONS, "retry_delay": 0.05, "max_retry_attempts": 3,
            "rabbitmq": {"claim_timeout": 2, "queue_expires": 300}}


def ctl_env() -> dict[str, str]:
    """rabbitmqctl's environment for the cluster: its Erlang cookie and its epmd."""
    return {**os.environ, "HOME": str(CLUSTER_DIR / "home"), "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": (CLUSTER_DIR / "epmd_port").read_text().strip()}


def queue_leaders(prefix: str, ask: tuple[int, ...] = (1, 2, 3), timeout: float = 30) -> dict[str, int]:
    """Per quorum queue whose name starts with ``prefix``: the node (1-3) leading it, as
    ``rabbitmqctl list_queues`` on the first node of ``ask`` that answers (within ``timeout``
    seconds each) reports it."""
    env = ctl_env()
    said = ""
    for node in ask:
        out = subprocess.run([RABBITMQCTL, "-n", f"mbc{node}@localhost", "list_queues", "name", "type", "leader",
                              "--formatter", "json", "-q"], env=env, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL, check=False)
        if out.returncode == 0:
            return {q["name"]: int(q["leader"].split("@")[0].removeprefix("mbc"))
                    for q in json.loads(out.stdout or "[]")
                    if q["name"].startswith(prefix) and q["type"] == "quorum" and q["leader"]}
        said = out.stderr[-500:]
    raise AssertionError(f"rabbitmqctl list_queues: no node of {ask} answered: {said}")


def rabbitmqctl(*args: str, node: int = 2, timeout: float = 30) -> str:
    """``rabbitmqctl -n mbcN@localhost ARGS`` against the cluster of scripts/brokers; its output."""
    out = subprocess.run([RABBITMQCTL, "-n", f"mbc{node}@localhost", *args], env=ctl_env(), capture_output=True,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    return out.stdout + out.stderr[-500:]


def lane_states(topic: str) -> str:
    """What the cluster says about the group's lane queues and their consumers (for a failure)."""
    try:
        queues = rabbitmqctl("list_queues", "name", "leader", "messages_ready", "messages_unacknowledged",
                             "consumers", "-q")
        consumers = rabbitmqctl("list_consumers", "queue_name", "channel_pid", "active", "activity_status", "-q")
    except Exception as exc:
        return f"rabbitmqctl failed: {exc!r}"
    mine = lanes_prefix(topic)
    return "\n".join(line for line in (queues + consumers).splitlines() if mine in line)


def lanes_prefix(topic: str) -> str:
    return f"msgbroker:{topic}:{GROUP}:"


def leading_node(topic: str) -> int:
    """The node that leads most of the group's lane queues (all of them, as declared here)."""
    leaders = queue_leaders(lanes_prefix(topic))
    lanes = {name: node for name, node in leaders.items() if name.rsplit(":", 1)[1].isdigit()}
    assert len(lanes) == PARTITIONS, f"{len(lanes)} lane queues with a leader, not {PARTITIONS}: {leaders}"
    return Counter(lanes.values()).most_common(1)[0][0]


async def led_elsewhere(topic: str, node: int, since: float, timeout: float = 60) -> float:
    """Seconds from ``since`` until every lane queue of the group has a leader other than ``node``
    (asking the other nodes)."""
    others = tuple(n for n in (1, 2, 3) if n != node)
    deadline = since + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            leaders = await asyncio.to_thread(queue_leaders, lanes_prefix(topic), others,
                                              max(2.0, deadline - time.monotonic()))
            lanes = [n for name, n in leaders.items() if name.rsplit(":", 1)[1].isdigit()]
            if len(lanes) == PARTITIONS and node not in lanes:
                return round(time.monotonic() - since, 1)
        await asyncio.sleep(0.2)
    raise AssertionError(f"the lane queues of {topic!r} were still led by node {node} after {timeout:.0f}s")


# --------------------------------------------------------------------------- conformance


class RabbitMQClusterHarness(ConformanceHarness):
    """The cluster's three nodes in ``rabbitmq.url``; an exchange prefix per case, 4 s claims."""

    url: ClassVar[str | None] = os.environ.get(URLS) or None
    url_env: ClassVar[str | None] = URLS
    timeout_multiplier: ClassVar[float] = 1.5

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"rabbitmq": {"exchange_prefix": f"cconf-{namespace}", "claim_timeout": 4, "queue_expires": 300}}

    async def restart_server(self) -> None:
        """A rolling restart: each node in turn, waiting until it is back in the cluster."""
        for node in range(1, 4):
            await asyncio.to_thread(brokers, "restart", "rabbitmq", str(node))


class TestRabbitMQClusterConformance(ConformanceSuite):
    harness = RabbitMQClusterHarness()

    # With the 4 s claim timeout the fencing case needs, a crash or a join in the state machine
    # waits up to 2 x 4 + 5 s (x 1.5 on the cluster): about 5 minutes in all, past pytest's 300 s.
    @pytest.mark.timeout(900)
    @functools.wraps(ConformanceSuite.test_state_machine_against_the_reference_model)
    def test_state_machine_against_the_reference_model(self) -> None:
        ConformanceSuite.test_state_machine_against_the_reference_model(self)


# --------------------------------------------------------------------------- node failure


async def _scenario(tmp_path: Path, name: str) -> tuple[ClusterPool, msgbroker.Broker, int]:
    """Three workers (the first declares the group's queues, through node 1), the producer on
    node 1; returns the node leading the lane queues."""
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    pool = ClusterPool("rabbitmq-cluster", starting_at(1), settings(), topic, tmp_path / f"{name}.jsonl")
    broker = msgbroker.connect(starting_at(1), **settings())
    try:
        await broker.open()
        for node in (1, 2, 3):
            pool.url = starting_at(node)
            await asyncio.to_thread(pool.start, "--work", "0.05")
        return pool, broker, await asyncio.to_thread(leading_node, topic)
    except BaseException:
        await _clean(pool, broker)
        raise


async def _settle(broker: msgbroker.Broker, pool: ClusterPool, load: Load, scenario: str, **figures: Any) -> None:
    """settle(...) with lost 0 asserted; a failure shows what the cluster says about the lanes."""
    try:
        await settle(broker, pool, load.sent, scenario, no_loss=True, timeout=120, **figures)
    except AssertionError:
        print(f"{scenario}: the lane queues (name leader ready unacked consumers) and consumers:\n"
              + await asyncio.to_thread(lane_states, pool.topic))
        raise


async def _clean(pool: ClusterPool, broker: msgbroker.Broker) -> None:
    """Stop the workers; delete the topic's queues (each quorum queue is a Raft group on every node)."""
    pool.stop_all()
    try:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(60):
                await broker.transport.delete_topic(pool.topic, [pool.group])  # type: ignore[attr-defined]
    finally:
        await broker.close()


@pytest.mark.timeout(300)
async def test_the_node_leading_the_queues_killed_and_brought_back(tmp_path: Path) -> None:
    pool, broker, node = await _scenario(tmp_path, "kill")
    killed = False
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        await asyncio.to_thread(brokers, "kill", "rabbitmq", str(node))
        killed, started = True, time.monotonic()
        failover, recovery = await asyncio.gather(led_elsewhere(pool.topic, node, started),
                                                  load.recovery(tail, started, timeout=90))
        await asyncio.sleep(max(0.0, started + 6 - time.monotonic()))  # down at least 6 s
        await asyncio.to_thread(brokers, "up", "rabbitmq")
        killed = False
        back = round(time.monotonic() - started, 1)
        await asyncio.sleep(3)  # under load with the node back
        await load.stop()
        await _settle(broker, pool, load, "node leading the lane queues killed (quorum, 3 nodes)", node=node,
                      failover_s=failover, recovery_s=recovery, node_back_s=back, publish_gap_s=load.gap())
    finally:
        if killed:
            await asyncio.to_thread(brokers, "up", "rabbitmq")
        await _clean(pool, broker)


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.timeout(300)
async def test_the_node_leading_the_queues_paused_past_the_client_timeouts(tmp_path: Path) -> None:
    pool, broker, node = await _scenario(tmp_path, "pause")
    paused = False
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        await asyncio.to_thread(brokers, "pause", "rabbitmq", str(node))
        paused, started = True, time.monotonic()
        # > the clients' 3 x (heartbeat 5 s + 1) without a frame and the 10 s confirm patience;
        # < Erlang's net_ticktime (60 s), past which the other nodes would count it partitioned
        failover: float | None = None
        with contextlib.suppress(AssertionError):  # whether the lanes' leaders move while it is paused
            failover = await led_elsewhere(pool.topic, node, started, timeout=25)
        await asyncio.sleep(max(0.0, started + 25 - time.monotonic()))
        await asyncio.to_thread(brokers, "resume", "rabbitmq", str(node))
        paused = False
        recovery = await load.recovery(tail, started, timeout=90)
        await asyncio.to_thread(brokers, "up", "rabbitmq")  # waits until the cluster is whole again
        await asyncio.sleep(3)
        await load.stop()
        await _settle(broker, pool, load, "node leading the lane queues paused 25 s (quorum, 3 nodes)", node=node,
                      pauses=1, failover_s=failover, recovery_s=recovery, publish_gap_s=load.gap())
    finally:
        if paused:
            await asyncio.to_thread(brokers, "resume", "rabbitmq", str(node))
        await _clean(pool, broker)


@pytest.mark.skipif(not FULL, reason=NOT_FULL)
@pytest.mark.timeout(900)  # each restart waits until the node is back in the cluster: minutes on a busy machine
async def test_a_rolling_restart_of_all_three_nodes_under_load(tmp_path: Path) -> None:
    pool, broker, _ = await _scenario(tmp_path, "rolling")
    try:
        load = Load(broker, pool.topic)
        load.start()
        tail = RecordTail(pool.record)
        await wait_for_handling(tail, 200)
        started = time.monotonic()
        for node in range(1, 4):
            await asyncio.to_thread(brokers, "restart", "rabbitmq", str(node))  # back in the cluster
        took = round(time.monotonic() - started, 1)
        await asyncio.sleep(3)
        await load.stop()
        await _settle(broker, pool, load, "rolling restart of all 3 nodes (quorum)", restarts=3, rolling_s=took,
                      publish_gap_s=load.gap())
    finally:
        await _clean(pool, broker)
