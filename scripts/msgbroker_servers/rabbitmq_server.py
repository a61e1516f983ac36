"""RabbitMQ: one node with its own epmd, Erlang cookie, config and mnesia directory; on it, a
virtual host with two least-privilege tenants (docs/security.md) beside ``guest``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from .broker import Broker
from .common import HOST, Failure, rel, say
from .passwords import kept_passwords
from .ports import choose_port, port_free, read_port
from .processes import Tracked, spawn
from .tls import TLS_CA, TLS_CERT, TLS_KEY, tls_client_context

RABBITMQ_NODENAME = "msgbroker@localhost"

TENANT_VHOST = "msgbroker-tenants"
"""The virtual host the tenants share: their permission regexes alone keep them apart, which is
what the tests prove (a vhost each would refuse the other tenant before any regex is asked)."""
TENANTS = ("a", "b")
"""Tenant A and tenant B: users ``tenant-a`` and ``tenant-b``, exchange prefixes of the same names."""


def tenant_rule(prefix: str) -> str:
    """The configure, write and read regex of a user whose ``rabbitmq.exchange_prefix`` is
    ``prefix``: every exchange and queue the provider names ``<prefix>:...``, nothing else (no
    default exchange, no server-named queue). ``.`` is the only character of a prefix that
    means something in a regex."""
    return "^" + prefix.replace(".", "\\.") + ":"


def password_hash(password: str) -> str:
    """RabbitMQ's stored form of a password (rabbit_password_hashing_sha256): base64 of a 4-byte
    salt followed by SHA-256(salt + password), so the password itself never reaches rabbitmqctl's
    command line or a file."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


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
        self.secrets_file = self.dir / "tenants.json"
        self.tenants_stamp = self.dir / "tenants.provisioned"
        """The digest of the tenants' definitions last imported into this node's data."""

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

    # -- the tenants: users, virtual host and permissions for the least-privilege tests --------

    @staticmethod
    def users() -> list[str]:
        return [f"tenant-{t}" for t in TENANTS]

    def passwords(self) -> dict[str, str]:
        """{user: password}, made once and kept in .brokers/rabbitmq/tenants.json (mode 0600)."""
        return kept_passwords(self.secrets_file, self.users())

    def secrets(self) -> list[str]:
        return list(self.passwords().values()) if self.secrets_file.exists() else []

    def tenant_url(self, user: str, port: int) -> str:
        return f"amqp://{user}:{self.passwords()[user]}@{HOST}:{port}/{TENANT_VHOST}"

    def permissions(self) -> list[dict[str, str]]:
        """Each tenant's regexes on the tenants' vhost; guest may do anything there (the tests'
        own look at what a tenant left)."""
        rules = [{"user": u, "vhost": TENANT_VHOST, "configure": tenant_rule(u), "write": tenant_rule(u),
                  "read": tenant_rule(u)} for u in self.users()]
        return [*rules, {"user": "guest", "vhost": TENANT_VHOST, "configure": ".*", "write": ".*", "read": ".*"}]

    def _digest(self) -> str:
        """What the definitions say, passwords included, without the random salts of their hashes."""
        wanted = {"vhost": TENANT_VHOST, "passwords": self.passwords(), "permissions": self.permissions()}
        return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()

    def provisioned(self) -> bool:
        """The tenants' definitions as they are now were imported into this node's data."""
        with contextlib.suppress(FileNotFoundError):
            stamp = self.tenants_stamp.read_text().strip()
            return self.secrets_file.exists() and stamp == self._digest()
        return False

    def ctl_env(self) -> dict[str, str]:
        """rabbitmqctl's environment: the node's, with its Erlang cookie and its epmd."""
        port, dist_port = self.port(), read_port(self.dist_port_file)
        epmd_port = read_port(self.epmd_port_file)
        if not (port and dist_port and epmd_port):
            raise Failure("rabbitmq: no ports recorded; is it running? (scripts/brokers up rabbitmq)")
        return node_env(self.dir, self.dir / "home", RABBITMQ_NODENAME, port, dist_port, epmd_port)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """rabbitmqctl against our node; its output, or a Failure with what it said."""
        argv = [ctl_script() or "rabbitmqctl", "-n", RABBITMQ_NODENAME, *args]
        try:
            res = subprocess.run(argv, env=self.ctl_env(), cwd=self.dir, capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as e:
            raise Failure(f"rabbitmqctl {args[0]} did not finish within {timeout:.0f}s") from e
        if res.returncode != 0:
            said = (res.stderr.strip() or res.stdout.strip()).splitlines()
            raise Failure(f"rabbitmqctl {args[0]}: exit {res.returncode}: {' '.join(said[-3:])[:300]}")
        return res.stdout

    async def tenants_log_in(self, port: int) -> bool:
        """Both tenants log in to their vhost with the passwords we keep."""
        for user in self.users():
            try:
                await asyncio.wait_for(check_rabbitmq(self.tenant_url(user, port)), 5)
            except Exception:
                return False
        return True

    async def after_ready(self) -> None:
        """Create (or repair) the tenants' vhost, users and permissions with one
        `rabbitmqctl import_definitions`, unless they are in place already. Idempotent: the
        definitions create what is missing and set what differs; guest and the rest stay."""
        port = self.port()
        if port is None or self.external_url():
            return
        if self.provisioned() and await self.tenants_log_in(port):
            return
        self.tenants_stamp.unlink(missing_ok=True)
        definitions = {
            "vhosts": [{"name": TENANT_VHOST}],
            "users": [{"name": u, "password_hash": password_hash(p), "tags": [],
                       "hashing_algorithm": "rabbit_password_hashing_sha256"} for u, p in self.passwords().items()],
            "permissions": self.permissions(),
        }
        path = self.dir / "tenants.definitions.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(definitions, f)
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.ctl, "import_definitions", str(path))
        finally:
            path.unlink(missing_ok=True)
        if not await self.tenants_log_in(port):
            raise Failure(f"rabbitmq: the tenants cannot log in to vhost {TENANT_VHOST} after import_definitions; "
                          f"{self.log_hint()}")
        self.tenants_stamp.write_text(self._digest() + "\n")
        say(f"rabbitmq: tenants {', '.join(self.users())} on vhost {TENANT_VHOST} "
            f"({time.monotonic() - t0:.1f}s)")

    def extra_env(self) -> list[str]:
        """The tenants' URLs (with their passwords) and prefixes, and guest's URL on their vhost,
        once they are in place."""
        port = self.port()
        if port is None or self.external_url() or not self.provisioned():
            return []
        lines = [f"MSGBROKER_TEST_RABBITMQ_AUTH_ADMIN_URL=amqp://guest:guest@{HOST}:{port}/{TENANT_VHOST}"]
        for t in TENANTS:
            up = t.upper()
            lines.append(f"MSGBROKER_TEST_RABBITMQ_AUTH_URL_{up}={self.tenant_url(f'tenant-{t}', port)}")
            lines.append(f"MSGBROKER_TEST_RABBITMQ_AUTH_PREFIX_{up}=tenant-{t}")
        return lines

    async def check(self, url: str) -> None:
        await check_rabbitmq(url)

    async def check_tls(self, url: str) -> None:
        await check_rabbitmq(url, tls=True)
