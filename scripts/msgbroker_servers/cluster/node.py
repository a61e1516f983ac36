"""What every cluster has in common: its nodes (processes with their own ports and folders),
starting the missing ones, waiting until the cluster is formed, stopping and breaking nodes."""

from __future__ import annotations

import asyncio
import signal
import time

from ..broker import answers
from ..common import HOST, RUN_DIR, Failure, rel, say
from ..ports import choose_port, read_port, wait_port_free
from ..processes import Tracked, log_tail, rss_kib

CLUSTER_DIR = RUN_DIR / "cluster"


class Node:
    """One server process of a cluster: folder, log, pid file and the ports it was given."""

    def __init__(self, cluster: Cluster, index: int):
        self.cluster = cluster
        self.index = index
        self.dir = cluster.dir / str(index)
        self.log = self.dir / f"{cluster.name}-{index}.log"
        self.proc = Tracked(self.dir / "pid")

    @property
    def label(self) -> str:
        return f"{self.cluster.name} node {self.index}"

    def port(self, kind: str = "port") -> int | None:
        return read_port(self.dir / kind)

    def need_port(self, kind: str = "port") -> int:
        port = self.port(kind)
        if port is None:
            raise Failure(f"{self.label}: no {kind} chosen yet")
        return port

    def choose(self, kind: str, default: int, patience: float) -> int:
        """A port for this node (remembered in its folder as `kind`), see ports.choose_port."""
        return choose_port(f"{self.label} ({kind})", self.dir / kind, default, patience)

    def running(self) -> bool:
        return self.proc.pid() is not None

    def paused(self) -> bool:
        return self.proc.paused()

    def hint(self) -> str:
        return f"see its log {rel(self.log)} (scripts/brokers cluster logs {self.cluster.name} {self.index})"


class Cluster:
    """A cluster of `size` nodes. Subclasses say how to install, configure, start and check
    their server, and how the nodes become one cluster."""

    name: str
    title: str  # what the cluster is, for messages
    size: int = 3
    env_var: str
    # (kind, base): node i gets base + i - 1, remembered in the file `kind` in its folder.
    port_bases: tuple[tuple[str, int], ...]
    start_timeout: float = 60.0
    stop_timeout: float = 20.0
    poll_interval: float = 0.5

    def __init__(self) -> None:
        self.dir = CLUSTER_DIR / self.name
        self.nodes = [Node(self, i) for i in range(1, self.size + 1)]

    # -- to be provided by each cluster
    def missing_packages(self) -> list[str]:
        return []

    def install_other(self) -> None:
        """Anything installed some other way than apt (the nats-server build)."""

    def before_launch(self) -> None:
        """Once per start of one or more nodes, before the first (RabbitMQ's epmd, Kafka's id)."""

    def launch(self, node: Node) -> int:
        """Write the node's config and start it; its ports are chosen already. Return its pid."""
        raise NotImplementedError

    def url(self, node: Node) -> str:
        raise NotImplementedError

    async def node_answers(self, node: Node) -> None:
        """Raise unless the node answers its clients (not necessarily as part of the cluster)."""
        raise NotImplementedError

    async def form(self) -> None:
        """Make the answering nodes one cluster where they are not yet (idempotent)."""

    async def not_formed(self) -> str | None:
        """None when the cluster is formed and in sync on every running node, else why not."""
        raise NotImplementedError

    def after_stop(self) -> None:
        """Stop helper processes (RabbitMQ's epmd) once no node is running."""

    # -- shared logic
    def node(self, index: int) -> Node:
        if not 1 <= index <= self.size:
            raise Failure(f"{self.name}: NODE is 1 to {self.size}, not {index}")
        return self.nodes[index - 1]

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.running()]

    def urls(self) -> list[str]:
        return [self.url(n) for n in self.nodes if n.port() is not None]

    def env_line(self) -> str:
        return f"{self.env_var}={','.join(self.urls())}"

    def reset_hint(self) -> str:
        return (f"to start {self.name} from empty: scripts/brokers cluster down {self.name}; "
                f"rm -rf {rel(self.dir)}; scripts/brokers cluster up {self.name}")

    def choose_ports(self, node: Node, patience: float) -> None:
        for kind, base in self.port_bases:
            node.choose(kind, base + node.index - 1, patience)

    def start_nodes(self, nodes: list[Node], patience: float = 1.0) -> None:
        """Start the given nodes (not waiting): all their ports are chosen before the first
        starts, since each node's config names its peers."""
        if not nodes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for node in nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            self.choose_ports(node, patience)
        self.before_launch()
        for node in nodes:
            say(f"starting {node.label} on {HOST}:{node.port()} (log {rel(node.log)})")
            node.proc.record(self.launch(node))

    def stop_node(self, node: Node) -> bool:
        pid = node.proc.pid()
        if pid is None:
            node.proc.forget()
            return False
        say(f"stopping {node.label} (pid {pid})")
        node.proc.stop(self.stop_timeout, node.label)
        return True

    def stop_all(self) -> bool:
        """Stop every node, the last one first (RabbitMQ: node 1 is then the last to stop)."""
        stopped = False
        for node in reversed(self.nodes):
            stopped = self.stop_node(node) or stopped
        self.after_stop()
        return stopped

    def stop_all_at_once(self) -> bool:
        """SIGTERM to every node together, then wait (SIGKILL after stop_timeout): for servers
        whose last node cannot finish a clean shutdown once the others are gone (Kafka's
        brokers wait for a controller quorum)."""
        running = [(n, pid) for n in self.nodes if (pid := n.proc.pid()) is not None]
        for node, pid in running:
            say(f"stopping {node.label} (pid {pid})")
            node.proc.signal(signal.SIGTERM)
            node.proc.signal(signal.SIGCONT)  # a paused node must wake up to see the SIGTERM
        deadline = time.monotonic() + self.stop_timeout
        for node, _pid in running:
            node.proc.stop(max(1.0, deadline - time.monotonic()), node.label)
        for node in self.nodes:
            if node.proc.pid() is None:
                node.proc.forget()
        self.after_stop()
        return bool(running)

    async def wait_nodes_answer(self, nodes: list[Node], deadline: float) -> None:
        async def one(node: Node) -> None:
            last = ""
            while True:
                if node.proc.pid() is None:
                    raise Failure(f"{node.label} exited while starting; {node.hint()}{log_tail(node.log)}")
                if node.paused():
                    raise Failure(f"{node.label} is paused (SIGSTOP); run: "
                                  f"scripts/brokers cluster resume {self.name} {node.index}")
                remaining = deadline - time.monotonic()
                ok, last = await answers(self.node_answers(node), max(1.0, min(5.0, remaining)))
                if ok:
                    return
                if time.monotonic() >= deadline:
                    raise Failure(f"{node.label} did not answer in time (last error: {last}); {node.hint()}; "
                                  f"it is left running: scripts/brokers cluster down {self.name} stops it")
                await asyncio.sleep(self.poll_interval)

        await asyncio.gather(*(one(n) for n in nodes))

    async def wait_formed(self, deadline: float) -> None:
        last: str | None = "not checked yet"
        while True:
            for node in self.running():
                if node.paused():
                    raise Failure(f"{node.label} is paused (SIGSTOP); run: "
                                  f"scripts/brokers cluster resume {self.name} {node.index}")
            try:
                last = await asyncio.wait_for(self.not_formed(), max(2.0, min(15.0, deadline - time.monotonic())))
            except TimeoutError:
                last = "the check got no answer in time"
            except Exception as e:  # a node refusing a connection mid-election is worth another look
                last = f"{type(e).__name__}: {e}"[:300]
            if last is None:
                return
            if time.monotonic() >= deadline:
                raise Failure(f"the {self.title} did not form in time (last: {last}); the nodes are left running; "
                              f"see their logs under {rel(self.dir)}; {self.reset_hint()}")
            await asyncio.sleep(self.poll_interval)

    async def up(self, timeout: float | None = None) -> None:
        """Start the nodes that are not running and wait until the cluster is formed."""
        t0 = time.monotonic()
        deadline = t0 + (timeout or self.start_timeout)
        for node in self.nodes:
            if node.paused():
                raise Failure(f"{node.label} is paused (SIGSTOP); run: "
                              f"scripts/brokers cluster resume {self.name} {node.index}")
        missing = [n for n in self.nodes if not n.running()]
        if not missing:
            ok, why = await answers(self.not_formed_or_raise(), 15.0)
            if ok:
                say(f"{self.name}: cluster already running and formed ({self.size} nodes, ports "
                    f"{', '.join(str(n.port()) for n in self.nodes)})")
                return
            say(f"{self.name}: all nodes running but not formed yet ({why}); waiting")
        self.start_nodes(missing)
        await self.wait_nodes_answer(self.nodes, deadline)
        await self.form()
        await self.wait_formed(deadline)
        say(f"{self.name}: cluster formed after {time.monotonic() - t0:.1f}s ({self.size} nodes, ports "
            f"{', '.join(str(n.port()) for n in self.nodes)})")

    async def not_formed_or_raise(self) -> None:
        why = await self.not_formed()
        if why is not None:
            raise Failure(why)

    async def restart(self, node: Node, timeout: float | None = None) -> None:
        t0 = time.monotonic()
        deadline = t0 + (timeout or self.start_timeout)
        self.stop_node(node)
        port = node.port()
        if port is not None and not wait_port_free(port, 10):
            raise Failure(f"{node.label}: port {port} is still taken; cannot restart on it")
        self.start_nodes([node], patience=10.0)
        await self.wait_nodes_answer([node], deadline)
        await self.form()
        await self.wait_formed(deadline)
        say(f"{node.label}: restarted and back in the cluster after {time.monotonic() - t0:.1f}s")

    def signal_node(self, node: Node, sig: int) -> None:
        pid = node.proc.pid()
        if pid is None:
            raise Failure(f"{node.label} is not running; start it with: scripts/brokers cluster up {self.name}")
        node.proc.signal(sig)
        if sig == signal.SIGKILL:
            if not node.proc.wait_gone(10):
                raise Failure(f"{node.label}: pid {pid} still there after SIGKILL")
            node.proc.forget()
            say(f"{node.label}: killed (pid {pid}); start it again with: scripts/brokers cluster up {self.name}")
        elif sig == signal.SIGSTOP:
            deadline = time.monotonic() + 5
            while not node.paused() and time.monotonic() < deadline:
                time.sleep(0.02)
            say(f"{node.label}: paused (pid {pid}); wake it with: "
                f"scripts/brokers cluster resume {self.name} {node.index}")
        else:
            say(f"{node.label}: resumed (pid {pid})")

    def rss_kib(self) -> int:
        return sum(rss_kib(pid) for n in self.nodes if (pid := n.proc.pid()) is not None)

