"""NATS: 3 nats-server nodes with JetStream clustering. nats-server 2.9 from Debian is too old
for today's JetStream clustering, so a current one is built from its Go module with the
machine's Go toolchain into .cache/nats-server/<version>/ (once; about 40 s)."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request

from ..common import HOST, Failure
from ..nats_server import build_nats_server, built_nats_server, check_nats
from ..processes import spawn
from .node import Cluster, Node

NATS_VERSION = os.environ.get("MSGBROKER_BROKERS_NATS_CLUSTER_VERSION", "v2.15.3")
CLUSTER_NAME = "msgbroker-cluster"


def server_name(index: int) -> str:
    return f"{CLUSTER_NAME}-nats-{index}"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _get_json(url: str) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON body) of a monitoring endpoint; 503 bodies are JSON too."""
    try:
        with _NO_PROXY.open(url, timeout=3) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": body.decode(errors="replace")[:200]}


class NatsCluster(Cluster):
    name = "nats"
    title = "NATS JetStream cluster"
    env_var = "MSGBROKER_TEST_CLUSTER_NATS_URLS"
    port_bases = (("port", 4301), ("route_port", 6301), ("http_port", 8301))
    start_timeout = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.binary = built_nats_server(NATS_VERSION)

    def installed(self) -> bool:
        return os.access(self.binary, os.X_OK)

    def install_other(self) -> None:
        build_nats_server(NATS_VERSION, "nats cluster")

    def missing_packages(self) -> list[str]:
        return []  # the build needs Go, which apt's golang would be too old for: install_other says so

    def url(self, node: Node) -> str:
        return f"nats://{HOST}:{node.need_port()}"

    def launch(self, node: Node) -> int:
        store = node.dir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://{HOST}:{n.need_port('route_port')}" for n in self.nodes)
        conf = node.dir / "nats.conf"
        conf.write_text(
            "# written by scripts/brokers cluster; rewritten at every start\n"
            f"server_name: {server_name(node.index)}\n"
            f"listen: {HOST}:{node.need_port()}\n"
            f"http: {HOST}:{node.need_port('http_port')}\n"
            f'jetstream {{\n  store_dir: "{store}"\n  max_memory_store: 256MB\n  max_file_store: 2GB\n}}\n'
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: {HOST}:{node.need_port('route_port')}\n"
            f"  routes: [{routes}]\n}}\n"
        )
        return spawn([str(self.binary), "-c", str(conf)], node.log)

    async def node_answers(self, node: Node) -> None:
        status, body = await asyncio.to_thread(_get_json, f"http://{HOST}:{node.need_port('http_port')}/varz")
        if status != 200:
            raise Failure(f"/varz answered {status}: {body}")

    async def not_formed(self) -> str | None:
        """On every node: /healthz says ok (JetStream current), /jsz names the same meta leader,
        a meta group of 3, and both other peers current."""
        running = self.running()
        if len(running) < self.size:
            return f"{self.size - len(running)} of {self.size} nodes are not running"
        leaders: set[str] = set()
        for node in running:
            base = f"http://{HOST}:{node.need_port('http_port')}"
            status, body = await asyncio.to_thread(_get_json, f"{base}/healthz")
            if status != 200:
                return f"node {node.index}: /healthz {status} {body.get('error', body)}"
            status, jsz = await asyncio.to_thread(_get_json, f"{base}/jsz")
            meta = jsz.get("meta_cluster")
            if status != 200 or not isinstance(meta, dict):
                return f"node {node.index}: /jsz has no meta_cluster yet"
            leader = meta.get("leader")
            if not leader:
                return f"node {node.index}: no JetStream meta leader yet"
            leaders.add(str(leader))
            if meta.get("cluster_size") != self.size:
                return f"node {node.index}: meta group of {meta.get('cluster_size')}"
            if leader == server_name(node.index):
                replicas = meta.get("replicas") or []
                current = [r for r in replicas if isinstance(r, dict) and r.get("current") and not r.get("offline")]
                if len(current) != self.size - 1:
                    return f"meta leader {leader}: {len(current)} of {self.size - 1} followers current"
        if len(leaders) != 1:
            return f"the nodes name different meta leaders: {', '.join(sorted(leaders))}"
        for node in running:  # and clients get JetStream answers on every node
            await check_nats(self.url(node))
        return None
