"""Redis Cluster: 6 redis-server nodes, 3 primaries and 3 replicas, made one cluster with
`redis-cli --cluster create ... --cluster-replicas 1`."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

from ..common import HOST, Failure, rel, say
from ..processes import spawn
from .node import Cluster, Node

SLOTS = 16384


async def _command(port: int, *args: str) -> str:
    """One command to one node, the answer as text (CLUSTER INFO, CLUSTER NODES, INFO)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=HOST, port=port, socket_connect_timeout=2, socket_timeout=3)
    try:
        raw = await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def _shards(port: int) -> str:
    """What CLUSTER SHARDS on this node lacks: empty when it lists all the nodes as online (a
    replica still "loading", with replication offset 0, is not in CLUSTER SLOTS, so a client
    that starts then does not know it)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=HOST, port=port, socket_connect_timeout=2, socket_timeout=3)
    try:
        shards = await client.execute_command("CLUSTER", "SHARDS")  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
    nodes = [(n[b"port"], n[b"health"].decode()) for shard in shards for n in shard[b"nodes"]]
    not_online = [f"{port_}: {health}" for port_, health in nodes if health != "online"]
    if len(nodes) != RedisCluster.size:
        return f"{len(nodes)} nodes in CLUSTER SHARDS"
    return ", ".join(not_online) and f"nodes not online: {', '.join(not_online)}"


def _fields(text: str) -> dict[str, str]:
    """`key:value` lines (CLUSTER INFO, INFO) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key] = value
    return out


class RedisCluster(Cluster):
    name = "redis"
    title = "Redis Cluster"
    size = 6
    env_var = "MSGBROKER_TEST_CLUSTER_REDIS_URLS"
    port_bases = (("port", 7001), ("bus_port", 17001))
    start_timeout = 60.0
    poll_interval = 0.3

    def missing_packages(self) -> list[str]:
        return [] if shutil.which("redis-server") and shutil.which("redis-cli") else ["redis-server"]

    def url(self, node: Node) -> str:
        return f"redis://{HOST}:{node.need_port()}"

    def launch(self, node: Node) -> int:
        data = node.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        conf = node.dir / "redis.conf"
        conf.write_text(
            "# written by scripts/brokers cluster; rewritten at every start\n"
            f"bind {HOST}\n"
            f"port {node.need_port()}\n"
            "protected-mode yes\n"
            "daemonize no\n"
            'logfile ""\n'
            f"dir {data}\n"
            "cluster-enabled yes\n"
            "cluster-config-file nodes.conf\n"  # in dir: the node's view of the cluster, kept
            f"cluster-port {node.need_port('bus_port')}\n"
            f"cluster-announce-ip {HOST}\n"
            "cluster-node-timeout 5000\n"
            "appendonly yes\n"
            "appendfsync everysec\n"
            # A replica whose replication offset is still 0 is left out of CLUSTER SLOTS (clients
            # do not see it) until its primary sends something; the primary's ping every second
            # instead of every 10 makes a quiet primary's replicas visible that much sooner.
            "repl-ping-replica-period 1\n"
        )
        return spawn([shutil.which("redis-server") or "redis-server", str(conf)], node.log)

    async def node_answers(self, node: Node) -> None:
        if await _command(node.need_port(), "PING") not in ("True", "PONG", "b'PONG'"):
            raise Failure("PING did not answer PONG")

    async def form(self) -> None:
        """`redis-cli --cluster create` when every node is still alone and owns no slot."""
        infos = [_fields(await _command(n.need_port(), "CLUSTER", "INFO")) for n in self.nodes]
        if not all(i.get("cluster_known_nodes") == "1" and i.get("cluster_slots_assigned") == "0" for i in infos):
            return  # formed before (each node keeps its nodes.conf), or partly: wait_formed tells
        addresses = [f"{HOST}:{n.need_port()}" for n in self.nodes]
        say(f"redis: redis-cli --cluster create {' '.join(addresses)} --cluster-replicas 1")
        argv = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create", *addresses,
                "--cluster-replicas", "1", "--cluster-yes"]
        res = await asyncio.to_thread(subprocess.run, argv, stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, check=False)
        (self.dir / "create.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise Failure(f"redis: `redis-cli --cluster create` failed (exit {res.returncode}); "
                          f"see {rel(self.dir / 'create.log')}")

    async def not_formed(self) -> str | None:
        """cluster_state:ok on every node, each node sees 6 connected and none failing, 3 primaries
        own all slots, every node tells clients of all 6 (CLUSTER SHARDS: each one online) and
        every replica's link to its primary is up."""
        running = self.running()
        if len(running) < self.size:
            return f"{self.size - len(running)} of {self.size} nodes are not running"
        for node in running:
            port = node.need_port()
            info = _fields(await _command(port, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                return f"node {node.index}: cluster_state:{info.get('cluster_state')}"
            if info.get("cluster_known_nodes") != str(self.size) or info.get("cluster_slots_ok") != str(SLOTS):
                return (f"node {node.index}: knows {info.get('cluster_known_nodes')} nodes, "
                        f"{info.get('cluster_slots_ok')} slots ok")
            primaries = 0
            for line in (await _command(port, "CLUSTER", "NODES")).splitlines():
                parts = line.split()
                if len(parts) < 8:
                    continue
                flags = parts[2].split(",")
                if "fail" in flags or "fail?" in flags or "handshake" in flags or parts[7] != "connected":
                    return f"node {node.index} sees {parts[1]} as {parts[2]} {parts[7]}"
                if "master" in flags and len(parts) > 8:
                    primaries += 1
            if primaries != self.size // 2:
                return f"node {node.index} sees {primaries} primaries with slots"
            shards = await _shards(port)
            if shards:
                return f"node {node.index} does not show clients {shards}"
            repl = _fields(await _command(port, "INFO", "replication"))
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return f"node {node.index}: link to its primary is {repl.get('master_link_status')}"
        return None
