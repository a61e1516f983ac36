"""The cluster commands: cluster up|down|status [NAME...], cluster kill|pause|resume|restart
NAME NODE, cluster logs NAME NODE."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from ..apt import apt_install
from ..common import Failure, rel, say
from ..locking import locked
from ..processes import rss_kib
from .clusters import CLUSTERS, clusters_arg
from .envfile import CLUSTER_ENV_FILE, cluster_env_lines, write_cluster_env_file
from .node import Cluster

# The clusters' own lock (see __init__.py): apart from the single servers' one.
CLUSTER_LOCK = Path(__file__).with_name("__init__.py")


def ensure_installed(clusters: list[Cluster]) -> None:
    packages: list[str] = []
    for c in clusters:
        for p in c.missing_packages():
            if p not in packages:
                packages.append(p)
    apt_install(packages)
    for c in clusters:
        c.install_other()
        missing = c.missing_packages()
        if missing:
            raise Failure(f"{c.name} cluster: still missing after install: {', '.join(missing)}")


def cmd_cluster_install(names: list[str]) -> int:
    """Install what the clusters need (packages; the nats-server build) without starting them."""
    with locked(CLUSTER_LOCK):
        try:
            ensure_installed(clusters_arg(names))
        except Failure as e:
            say(f"ERROR: {e}")
            return 1
    return 0


def all_clusters() -> list[Cluster]:
    return list(CLUSTERS.values())


def cmd_cluster_up(names: list[str], timeout: float | None) -> int:
    clusters = clusters_arg(names)
    t0 = time.monotonic()
    failures: dict[str, str] = {}
    with locked(CLUSTER_LOCK):
        try:
            ensure_installed(clusters)
        except Failure as e:
            say(f"ERROR: {e}")
            return 1
        # One after the other: starting 3 JVMs or 3 Erlang VMs at once already fills two cores.
        for c in clusters:
            try:
                asyncio.run(c.up(timeout))
            except Failure as e:
                failures[c.name] = str(e)
        write_cluster_env_file(all_clusters())
    for line in cluster_env_lines([c for c in clusters if c.name not in failures]):
        print(line, flush=True)
    for f in failures.values():
        say(f"ERROR: {f}")
    if failures:
        return 1
    say(f"cluster up: {', '.join(c.name for c in clusters)} formed in {time.monotonic() - t0:.1f}s; "
        f"settings in {rel(CLUSTER_ENV_FILE)} (set -a; . {rel(CLUSTER_ENV_FILE)}; set +a)")
    return 0


def cmd_cluster_down(names: list[str]) -> int:
    with locked(CLUSTER_LOCK):
        for c in clusters_arg(names):
            if not c.stop_all():
                say(f"{c.name} cluster: not running")
        write_cluster_env_file(all_clusters())
    return 0


def cmd_cluster_status(names: list[str]) -> int:
    clusters = clusters_arg(names)

    async def formed(c: Cluster) -> str:
        if not c.running():
            return "no (stopped)"
        paused = [str(n.index) for n in c.nodes if n.paused()]
        if paused:
            return f"no (paused: node {', '.join(paused)})"
        try:
            why = await asyncio.wait_for(c.not_formed(), 20)
        except TimeoutError:
            why = "the check got no answer within 20s"
        except Exception as e:
            why = f"{type(e).__name__}: {e}"[:120]
        return "yes" if why is None else f"no ({why})"

    async def gather() -> list[str]:
        return list(await asyncio.gather(*(formed(c) for c in clusters)))

    verdicts = asyncio.run(gather())
    rows = [("CLUSTER", "NODE", "STATE", "PID", "PORT", "RSS", "LOG")]
    for c in clusters:
        for n in c.nodes:
            pid = n.proc.pid()
            state = "stopped" if pid is None else ("paused" if n.paused() else "running")
            mem = f"{rss_kib(pid) // 1024} MiB" if pid is not None else "-"
            rows.append((c.name, str(n.index), state, str(pid or "-"), str(n.port() or "-"), mem, rel(n.log)))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(col.ljust(w) for col, w in zip(r[:6], widths, strict=False)) + "  " + r[6])
    for c, verdict in zip(clusters, verdicts, strict=True):
        print(f"{c.name}: formed: {verdict}; RSS of its nodes {c.rss_kib() // 1024} MiB")
    return 0


def cmd_cluster_node(action: str, name: str, index: int, timeout: float | None) -> int:
    c = CLUSTERS[name]
    node = c.node(index)
    with locked(CLUSTER_LOCK):
        try:
            if action == "restart":
                asyncio.run(c.restart(node, timeout))
            else:
                sig = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}[action]
                c.signal_node(node, sig)
                if not c.running():
                    c.after_stop()
        finally:
            write_cluster_env_file(all_clusters())
    return 0


def cmd_cluster_logs(name: str, index: int, lines: int, follow: bool) -> int:
    node = CLUSTERS[name].node(index)
    if not node.log.exists():
        say(f"{node.label}: no log yet ({rel(node.log)})")
        return 1
    os.execvp("tail", ["tail", "-n", str(lines), *(["-F"] if follow else []), str(node.log)])
    return 0
