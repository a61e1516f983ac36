"""RabbitMQ: 3 nodes (mbc1@localhost, mbc2@localhost, mbc3@localhost) with one Erlang cookie and
one epmd of their own, joined with `rabbitmqctl join_cluster`."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess

from ..common import HOST, Failure, say
from ..processes import Tracked, spawn
from ..rabbitmq_server import check_rabbitmq, ctl_script, node_env, server_script, start_epmd
from .node import Cluster, Node

# Without busy-waiting schedulers an idle Erlang VM takes almost no CPU; 3 of them share 2 cores.
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"


def nodename(index: int) -> str:
    return f"mbc{index}@localhost"


class RabbitMQCluster(Cluster):
    name = "rabbitmq"
    title = "RabbitMQ cluster"
    env_var = "MSGBROKER_TEST_CLUSTER_RABBITMQ_URLS"
    port_bases = (("port", 5701), ("dist_port", 25701))
    start_timeout = 180.0
    stop_timeout = 30.0
    poll_interval = 2.0  # each look is a rabbitmqctl run: an Erlang VM of its own

    def __init__(self) -> None:
        super().__init__()
        self.home = self.dir / "home"  # the cluster's Erlang cookie, for the nodes and rabbitmqctl
        self.epmd = Tracked(self.dir / "epmd.pid")

    def missing_packages(self) -> list[str]:
        return [] if server_script() and ctl_script() else ["rabbitmq-server"]

    def url(self, node: Node) -> str:
        return f"amqp://guest:guest@{HOST}:{node.need_port()}/"

    def before_launch(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        start_epmd(self.epmd, self.dir / "epmd_port", "rabbitmq cluster", self.dir / "epmd.log", default=4370)

    def env(self, node: Node) -> dict[str, str]:
        epmd_port = self.dir / "epmd_port"
        return node_env(node.dir, self.home, nodename(node.index), node.need_port(), node.need_port("dist_port"),
                        int(epmd_port.read_text()), ERL_ARGS)

    def launch(self, node: Node) -> int:
        (node.dir / "mnesia").mkdir(exist_ok=True)
        (node.dir / "logs").mkdir(exist_ok=True)
        dist_port = node.need_port("dist_port")
        (node.dir / "rabbitmq.conf").write_text(
            "# written by scripts/brokers cluster; rewritten at every start\n"
            f"listeners.tcp.default = {HOST}:{node.need_port()}\n"
            "loopback_users.guest = true\n"
            "log.console = true\n"
            "log.console.level = info\n"
            "log.file = false\n"
            f"distribution.listener.interface = {HOST}\n"
            f"distribution.listener.port_range.min = {dist_port}\n"
            f"distribution.listener.port_range.max = {dist_port}\n"
        )
        (node.dir / "enabled_plugins").write_text("[].\n")
        (node.dir / "rabbitmq-env.conf").write_text("# intentionally empty: settings come from scripts/brokers\n")
        return spawn([server_script() or "rabbitmq-server"], node.log, env=self.env(node), cwd=node.dir)

    async def ctl(self, node: Node, *args: str, timeout: float = 60.0) -> str:
        """rabbitmqctl against one node; its output, or a Failure with what it said."""
        argv = [ctl_script() or "rabbitmqctl", "-n", nodename(node.index), *args]
        res = await asyncio.to_thread(subprocess.run, argv, env=self.env(node), cwd=node.dir, capture_output=True,
                                      text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        if res.returncode != 0:
            said = (res.stderr.strip() or res.stdout.strip()).splitlines()
            raise Failure(f"rabbitmqctl {' '.join(args)} on {nodename(node.index)}: exit {res.returncode}: "
                          f"{' '.join(said[-3:])[:300]}")
        return res.stdout

    async def cluster_status(self, node: Node) -> dict[str, object]:
        out = await self.ctl(node, "cluster_status", "--formatter", "json")
        status: dict[str, object] = json.loads(out)
        return status

    async def node_answers(self, node: Node) -> None:
        await check_rabbitmq(self.url(node))

    async def form(self) -> None:
        """Nodes 2 and 3 join node 1's cluster where they are not in it yet."""
        first = self.nodes[0]
        for node in self.nodes[1:]:
            status = await self.cluster_status(node)
            members = status.get("disk_nodes") or []
            if isinstance(members, list) and nodename(first.index) in members:
                continue
            say(f"rabbitmq: {nodename(node.index)} joins {nodename(first.index)} (rabbitmqctl join_cluster)")
            await self.ctl(node, "stop_app")
            await self.ctl(node, "join_cluster", nodename(first.index))
            await self.ctl(node, "start_app")

    async def not_formed(self) -> str | None:
        """rabbitmqctl cluster_status shows all 3 nodes running, with no partition."""
        running = self.running()
        if len(running) < self.size:
            return f"{self.size - len(running)} of {self.size} nodes are not running"
        status = await self.cluster_status(running[0])
        names = {nodename(n.index) for n in self.nodes}
        disk = status.get("disk_nodes")
        up = status.get("running_nodes")
        if not isinstance(disk, list) or set(disk) != names:
            return f"cluster members are {disk}"
        if not isinstance(up, list) or set(up) != names:
            return f"running nodes are {up}"
        partitions = status.get("partitions")
        if partitions:
            return f"partitions: {partitions}"
        return None

    def after_stop(self) -> None:
        if self.running():
            return
        if self.epmd.pid() is not None:
            self.epmd.stop(5, "the rabbitmq cluster's epmd")
        self.epmd.forget()

