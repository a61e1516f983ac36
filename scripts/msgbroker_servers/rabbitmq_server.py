"""RabbitMQ: one node with its own epmd, Erlang cookie, config and mnesia directory."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from .broker import Broker
from .common import HOST, Failure, rel
from .ports import choose_port, port_free, read_port
from .processes import Tracked, spawn
from .tls import TLS_CA, TLS_CERT, TLS_KEY, tls_client_context

RABBITMQ_NODENAME = "msgbroker@localhost"


def server_script() -> str | None:
    for cand in ("/usr/lib/rabbitmq/bin/rabbitmq-server",):
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("rabbitmq-server")


def ctl_script() -> str | None:
    """rabbitmqctl itself, not Debian's /usr/sbin wrapper that switches to the rabbitmq user."""
    for cand in ("/usr/lib/rabbitmq/bin/rabbitmqctl",):
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("rabbitmqctl")


def node_env(node_dir: Path, home: Path, nodename: str, port: int, dist_port: int, epmd_port: int,
             erl_args: str = "") -> dict[str, str]:
    """The environment of a RabbitMQ node whose config, plugins file, mnesia and logs are all in
    node_dir, with the Erlang cookie in home and our own epmd at epmd_port (rabbitmqctl too)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_", "NOTIFY_SOCKET"))
    }
    env.update(
        HOME=str(home),
        RUNNING_UNDER_SYSTEMD="true",  # makes rabbitmq-server exec the Erlang VM (one process)
        RABBITMQ_NODENAME=nodename,
        RABBITMQ_USE_LONGNAME="false",
        RABBITMQ_NODE_IP_ADDRESS=HOST,
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_CONF_ENV_FILE=str(node_dir / "rabbitmq-env.conf"),
        RABBITMQ_CONFIG_FILE=str(node_dir / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(node_dir / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(node_dir / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(node_dir / "mnesia"),
        RABBITMQ_LOG_BASE=str(node_dir / "logs"),
        RABBITMQ_LOGS="-",
        RABBITMQ_PID_FILE=str(node_dir / "rabbitmq.pid"),
        ERL_EPMD_ADDRESS=HOST,
        ERL_EPMD_PORT=str(epmd_port),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=f"-start_epmd false {erl_args}".strip(),
    )
    return env


def start_epmd(tracked: Tracked, port_file: Path, owner: str, log: Path, default: int = 4369) -> int:
    """An epmd (Erlang's port mapper) of our own on 127.0.0.1, tracked so that `down` stops it too."""
    port = read_port(port_file)
    if tracked.pid() is not None and port:
        return port
    port = choose_port(owner, port_file, default)
    tracked.record(spawn([shutil.which("epmd") or "epmd", "-address", HOST, "-port", str(port)], log))
    deadline = time.monotonic() + 10
    while port_free(port):
        if tracked.pid() is None or time.monotonic() > deadline:
            raise Failure(f"{owner}: epmd did not start; see {rel(log)}")
        time.sleep(0.05)
    return port


async def check_rabbitmq(url: str, tls: bool = False) -> None:
    import aio_pika

    conn = await aio_pika.connect(url, timeout=3, ssl_context=tls_client_context() if tls else None)
    try:
        channel = await conn.channel()
        await channel.close()
    finally:
        await conn.close()


class RabbitMQ(Broker):
    name = "rabbitmq"
    default_port = 5672
    env_var = "MSGBROKER_RABBITMQ__URL"
    tls_default_port = 5671  # the registered amqps port
    tls_env_var = "MSGBROKER_TEST_RABBITMQ_TLS_URL"
    start_timeout = 90.0
    stop_timeout = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.epmd = Tracked(self.dir / "epmd.pid")
        self.epmd_port_file = self.dir / "epmd_port"
        self.dist_port_file = self.dir / "dist_port"

    def url(self, port: int) -> str:
        return f"amqp://guest:guest@{HOST}:{port}/"

    def tls_url(self, port: int) -> str:
        return f"amqps://guest:guest@{HOST}:{port}/"

    @staticmethod
    def server_script() -> str | None:
        return server_script()

    def missing_packages(self) -> list[str]:
        return [] if self.server_script() and shutil.which("epmd") else ["rabbitmq-server"]

    def start_epmd(self) -> int:
        """Our own epmd (Erlang's port mapper), tracked so that `down` can stop it too."""
        return start_epmd(self.epmd, self.epmd_port_file, self.name, self.dir / "epmd.log")

    def launch(self, port: int, tls_port: int) -> int:
        epmd_port = self.start_epmd()
        dist_port = choose_port(self.name, self.dist_port_file, 25672)
        home = self.dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        (self.dir / "mnesia").mkdir(exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        conf = self.dir / "rabbitmq.conf"
        conf.write_text(
            "# written by scripts/brokers; rewritten at every start\n"
            f"listeners.tcp.default = {HOST}:{port}\n"
            "loopback_users.guest = true\n"
            "log.console = true\n"
            "log.console.level = info\n"
            "log.file = false\n"
            f"distribution.listener.interface = {HOST}\n"
            f"distribution.listener.port_range.min = {dist_port}\n"
            f"distribution.listener.port_range.max = {dist_port}\n"
            f"listeners.ssl.default = {HOST}:{tls_port}\n"
            f"ssl_options.cacertfile = {TLS_CA}\n"
            f"ssl_options.certfile = {TLS_CERT}\n"
            f"ssl_options.keyfile = {TLS_KEY}\n"
            "ssl_options.verify = verify_none\n"  # clients present no certificate
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("# intentionally empty: settings come from scripts/brokers\n")
        env = node_env(self.dir, home, RABBITMQ_NODENAME, port, dist_port, epmd_port)
        return spawn([self.server_script() or "rabbitmq-server"], self.log, env=env, cwd=self.dir)

    def after_stop(self) -> None:
        if self.epmd.pid() is not None:
            self.epmd.stop(5, "rabbitmq's epmd")
        self.epmd.forget()

    async def check(self, url: str) -> None:
        await check_rabbitmq(url)

    async def check_tls(self, url: str) -> None:
        await check_rabbitmq(url, tls=True)
