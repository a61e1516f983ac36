"""The command line of scripts/brokers (docs/brokers.md)."""

from __future__ import annotations

import argparse
import signal

from .broker import quiet_client_logs
from .browser import cmd_browser
from .cluster.clusters import CLUSTER_NAMES, CLUSTERS
from .cluster.commands import (
    cmd_cluster_down,
    cmd_cluster_install,
    cmd_cluster_logs,
    cmd_cluster_node,
    cmd_cluster_status,
    cmd_cluster_up,
)
from .commands import cmd_down, cmd_logs, cmd_restart, cmd_signal, cmd_status, cmd_up, cmd_wait
from .common import Failure, say
from .envfile import addresses_as_up_left_them
from .servers import ALL, BROKERS

TIMEOUT_HELP = "seconds to wait for each server (default: 20 for redis/nats, 90 for rabbitmq/kafka)"


def add_names(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(ALL)}; default all")
    return p


def add_timeout(p: argparse.ArgumentParser, what: str = TIMEOUT_HELP) -> None:
    p.add_argument("--timeout", type=float, default=None, help=what)


def parser_for() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/brokers",
        description="Real Redis, NATS JetStream, RabbitMQ and Kafka on 127.0.0.1 for tests (docs/brokers.md).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_timeout(add_names(sub.add_parser(
        "up", help="install what is missing, start what is not running, wait until all answer")))
    add_names(sub.add_parser("down", help="stop the servers this script started"))
    sub.add_parser("status", help="show each server: state, pid, port, health")
    p = sub.add_parser("logs", help="show the end of a server's log")
    p.add_argument("name", choices=ALL, metavar="NAME", help=f"one of {', '.join(ALL)}")
    p.add_argument("-n", "--lines", type=int, default=200)
    p.add_argument("-f", "--follow", action="store_true")
    add_timeout(add_names(sub.add_parser("restart", help="stop and start again on the same port, keeping data")))
    add_names(sub.add_parser("kill", help="kill -9 (start again with up)"))
    add_names(sub.add_parser("pause", help="SIGSTOP: the server hangs without closing connections"))
    add_names(sub.add_parser("resume", help="SIGCONT after pause"))
    add_timeout(add_names(sub.add_parser("wait", help="wait until healthy (after resume or restart)")))
    sub.add_parser("browser", help="install Chromium and chromedriver (Debian's) for the dashboard's browser tests")
    add_cluster_commands(sub.add_parser("cluster", help="3-node clusters of each server: cluster up|down|status ..."))
    return parser


def add_cluster_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cluster_cmd", required=True)
    names_help = f"any of {', '.join(CLUSTER_NAMES)}; default all, started one after the other"
    wait_help = "seconds to wait for each cluster (default: 60 for redis/nats, 180 for rabbitmq/kafka)"
    p = sub.add_parser("up", help="start what is not running, wait until each cluster is formed")
    p.add_argument("names", nargs="*", metavar="NAME", help=names_help)
    add_timeout(p, wait_help)
    sub.add_parser("install", help="install what the clusters need (packages, the nats-server build), start "
                   "nothing").add_argument("names", nargs="*", metavar="NAME", help=names_help)
    sub.add_parser("down", help="stop the cluster nodes").add_argument(
        "names", nargs="*", metavar="NAME", help=names_help)
    sub.add_parser("status", help="each node: state, pid, port, memory; each cluster: formed").add_argument(
        "names", nargs="*", metavar="NAME", help=names_help)
    for action, what in (("kill", "kill -9 one node (start it again with cluster up NAME)"),
                         ("pause", "SIGSTOP one node"), ("resume", "SIGCONT one node"),
                         ("restart", "stop one node, start it, wait until it is back in the cluster"),
                         ("logs", "show the end of one node's log")):
        p = sub.add_parser(action, help=what)
        p.add_argument("name", choices=CLUSTER_NAMES, metavar="NAME", help=f"one of {', '.join(CLUSTER_NAMES)}")
        p.add_argument("node", type=int, metavar="NODE", help="1 to 3 (redis: 1 to 6)")
        if action == "restart":
            add_timeout(p, wait_help)
        if action == "logs":
            p.add_argument("-n", "--lines", type=int, default=200)
            p.add_argument("-f", "--follow", action="store_true")


def run_cluster(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    for n in getattr(args, "names", []):
        if n not in CLUSTER_NAMES:
            parser.error(f"unknown cluster {n!r}: choose from {', '.join(CLUSTER_NAMES)}")
    cmd = args.cluster_cmd
    if cmd == "up":
        return cmd_cluster_up(args.names, args.timeout)
    if cmd == "install":
        return cmd_cluster_install(args.names)
    if cmd == "down":
        return cmd_cluster_down(args.names)
    if cmd == "status":
        return cmd_cluster_status(args.names)
    CLUSTERS[args.name].node(args.node)  # NODE in range, else a Failure naming the range
    if cmd == "logs":
        return cmd_cluster_logs(args.name, args.node, args.lines, args.follow)
    return cmd_cluster_node(cmd, args.name, args.node, getattr(args, "timeout", None))


def main(argv: list[str] | None = None) -> int:
    quiet_client_logs()
    parser = parser_for()
    args = parser.parse_args(argv)
    if args.cmd in ("up", "restart") and args.timeout is not None:
        for b in BROKERS.values():
            b.start_timeout = args.timeout
    for n in getattr(args, "names", []) if args.cmd != "cluster" else []:
        if n not in ALL:
            parser.error(f"unknown server {n!r}: choose from {', '.join(ALL)}")
    try:
        if args.cmd == "cluster":
            return run_cluster(args, parser)
        if args.cmd == "up":
            return cmd_up(args.names)
        if args.cmd == "status":
            return cmd_status()
        if args.cmd == "browser":
            return cmd_browser()
        if args.cmd == "logs":
            return cmd_logs(args.name, args.lines, args.follow)
        with addresses_as_up_left_them(list(BROKERS.values())):  # these act on our servers only
            if args.cmd == "down":
                return cmd_down(args.names)
            if args.cmd == "restart":
                return cmd_restart(args.names)
            if args.cmd == "kill":
                return cmd_signal(args.names, signal.SIGKILL, "kill")
            if args.cmd == "pause":
                return cmd_signal(args.names, signal.SIGSTOP, "pause")
            if args.cmd == "resume":
                return cmd_signal(args.names, signal.SIGCONT, "resume")
        if args.cmd == "wait":
            return cmd_wait(args.names, args.timeout)
    except Failure as e:
        say(f"ERROR: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.cmd}")
    return 2
